//! A fake Web Push service: decrypts each message with the subscription's private key
//! (RFC 8291) and checks the VAPID token (RFC 8292).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, KeyInit};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use p256::elliptic_curve::rand_core::OsRng;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::LineEnding;
use serde_json::{json, Value};
use sha2::Sha256;
use walpush::channels::push::Clock;
use walpush::config::WebPushConfig;

use super::tls::{self, answer, Answer, Request};

/// The VAPID subject the tests configure.
pub const SUBJECT: &str = "mailto:ops@example.com";

/// A push message the fake accepted or refused.
#[derive(Debug, Clone)]
pub struct Received {
    /// Which subscription (the endpoint's last path segment).
    pub subscription: String,
    /// The decrypted message, when decryption succeeded.
    pub plaintext: Option<Value>,
    /// `TTL`, `Urgency`, `Topic`.
    pub headers: HashMap<String, String>,
    /// The VAPID token used.
    pub jwt: String,
    /// What the fake answered.
    pub status: u16,
}

struct Browser {
    secret: p256::SecretKey,
    auth: [u8; 16],
}

#[derive(Default)]
struct State {
    browsers: HashMap<String, Browser>,
    received: Vec<Received>,
    answers: HashMap<String, (u16, Option<u64>)>,
}

/// A running fake push service.
pub struct FakeWebPush {
    /// `https://127.0.0.1:PORT`
    pub url: String,
    /// The CA to trust: the channel's `ca_file`.
    pub ca_file: PathBuf,
    /// The VAPID private key (SEC1 `EC PRIVATE KEY` PEM).
    pub vapid_key_file: PathBuf,
    /// The VAPID private key again, as PKCS#8 `PRIVATE KEY` PEM.
    pub vapid_pkcs8_file: PathBuf,
    /// Push-service time: VAPID expiry is judged by this clock; share it with the channel.
    pub clock: Arc<Clock>,
    state: Arc<Mutex<State>>,
    _server: tls::Server,
}

impl FakeWebPush {
    /// Starts a fake with a fresh VAPID key; browsers subscribe with its public half.
    pub async fn start() -> FakeWebPush {
        let vapid = p256::SecretKey::random(&mut OsRng);
        let vapid_public = vapid.public_key().to_encoded_point(false);
        let state = Arc::new(Mutex::new(State::default()));
        let clock = Clock::system();
        let origin = Arc::new(std::sync::OnceLock::<String>::new());
        let handler = {
            let (state, clock, origin) = (state.clone(), clock.clone(), origin.clone());
            let k = URL_SAFE_NO_PAD.encode(vapid_public.as_bytes());
            Arc::new(move |req: Request| {
                let origin = origin.get().map(String::as_str).unwrap_or_default();
                handle(&state, &k, origin, &clock, req)
            })
        };
        let server = tls::serve(handler).await;
        origin.set(server.url.clone()).expect("set once");

        let vapid_key_file = server.dir.path().join("vapid-private.pem");
        std::fs::write(
            &vapid_key_file,
            vapid.to_sec1_pem(LineEnding::LF).expect("sec1").as_bytes(),
        )
        .expect("write vapid key");
        let vapid_pkcs8_file = server.dir.path().join("vapid-private-pkcs8.pem");
        let pkcs8 =
            p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&vapid, LineEnding::LF).expect("pkcs8");
        std::fs::write(&vapid_pkcs8_file, pkcs8.as_bytes()).expect("write vapid key");
        FakeWebPush {
            url: server.url.clone(),
            ca_file: server.ca_file.clone(),
            vapid_key_file,
            vapid_pkcs8_file,
            clock,
            state,
            _server: server,
        }
    }

    /// A channel configuration pointing at this fake.
    pub fn config(&self) -> WebPushConfig {
        WebPushConfig {
            vapid_private_key_file: self.vapid_key_file.clone(),
            subject: SUBJECT.to_owned(),
            ca_file: Some(self.ca_file.clone()),
            timeout_ms: 10_000,
            concurrency: 8,
        }
    }

    /// A new browser subscription: the device address (`PushSubscription.toJSON()`).
    pub fn subscribe(&self, id: &str) -> String {
        let secret = p256::SecretKey::random(&mut OsRng);
        let auth: [u8; 16] = rand::random();
        let p256dh = secret.public_key().to_encoded_point(false);
        let address = json!({
            "endpoint": format!("{}/push/{id}", self.url),
            "expirationTime": null,
            "keys": {"p256dh": URL_SAFE_NO_PAD.encode(p256dh.as_bytes()),
                     "auth": URL_SAFE_NO_PAD.encode(auth)},
        });
        self.state
            .lock()
            .unwrap()
            .browsers
            .insert(id.to_owned(), Browser { secret, auth });
        address.to_string()
    }

    /// From now on, answer this subscription with `status` (and `Retry-After`).
    pub fn answer(&self, id: &str, status: u16, retry_after: Option<u64>) {
        self.state
            .lock()
            .unwrap()
            .answers
            .insert(id.to_owned(), (status, retry_after));
    }

    /// Every push message so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }
}

fn handle(state: &Mutex<State>, k: &str, origin: &str, clock: &Clock, req: Request) -> Answer {
    let header = |name: &str| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let id = req
        .path
        .strip_prefix("/push/")
        .unwrap_or_default()
        .to_owned();
    let authorization = header("authorization");
    let jwt = authorization
        .strip_prefix("vapid t=")
        .and_then(|rest| rest.split(", k=").next())
        .unwrap_or_default()
        .to_owned();
    let mut headers = HashMap::new();
    for name in ["ttl", "urgency", "topic", "content-encoding"] {
        headers.insert(name.to_owned(), header(name).to_owned());
    }

    let mut guard = state.lock().unwrap();
    let verdict = match guard.browsers.get(&id) {
        None => Err(404),
        Some(browser) => verify(&req, &jwt, k, origin, clock).and_then(|()| {
            decrypt(browser, &req.body)
                .ok_or(400)
                .and_then(|text| serde_json::from_slice::<Value>(&text).map_err(|_| 400))
        }),
    };
    let (status, plaintext) = match verdict {
        Err(status) => (status, None),
        Ok(value) => match guard.answers.get(&id) {
            Some((status, _)) => (*status, Some(value)),
            None => (201, Some(value)),
        },
    };
    let n = guard.received.len();
    guard.received.push(Received {
        subscription: id.clone(),
        plaintext,
        headers,
        jwt,
        status,
    });
    let mut reply = Vec::new();
    if status == 201 {
        reply.push(("location", format!("{origin}/message/{n}")));
    }
    if let Some((_, Some(seconds))) = guard.answers.get(&id) {
        reply.push(("retry-after", seconds.to_string()));
    }
    answer(status, &reply, "")
}

/// RFC 8292 and RFC 8030 header checks, as a status on failure.
fn verify(req: &Request, jwt: &str, k: &str, origin: &str, clock: &Clock) -> Result<(), u16> {
    let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
    let authorization = header("authorization").ok_or(401u16)?;
    // The key must be the one the browser subscribed with (applicationServerKey).
    let sent_k = authorization.split(", k=").nth(1).ok_or(401u16)?;
    if sent_k != k {
        return Err(403);
    }
    let point = URL_SAFE_NO_PAD.decode(k).map_err(|_| 401u16)?;
    let (x, y) = (
        URL_SAFE_NO_PAD.encode(&point[1..33]),
        URL_SAFE_NO_PAD.encode(&point[33..65]),
    );
    let key = DecodingKey::from_ec_components(&x, &y).map_err(|_| 401u16)?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&[origin]);
    validation.set_required_spec_claims(&["exp", "aud", "sub"]);
    validation.validate_exp = false;
    let claims = jsonwebtoken::decode::<Value>(jwt, &key, &validation)
        .map_err(|_| 401u16)?
        .claims;
    let exp = claims["exp"].as_u64().ok_or(401u16)?;
    let now = clock.now_unix();
    if exp <= now || exp > now + 24 * 3600 {
        return Err(401);
    }
    let sub = claims["sub"].as_str().unwrap_or_default();
    if !(sub.starts_with("mailto:") || sub.starts_with("https:")) {
        return Err(401);
    }

    if header("content-encoding") != Some("aes128gcm") {
        return Err(415);
    }
    if header("ttl").is_none_or(|t| t.parse::<u64>().is_err()) {
        return Err(400);
    }
    if header("urgency").is_some_and(|u| !["very-low", "low", "normal", "high"].contains(&u)) {
        return Err(400);
    }
    let topic_ok = |t: &str| {
        t.len() <= 32
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if header("topic").is_some_and(|t| !topic_ok(t)) {
        return Err(400);
    }
    if req.body.len() > 4096 {
        return Err(413);
    }
    Ok(())
}

/// RFC 8291 decryption of a single-record `aes128gcm` body, as a browser does it.
fn decrypt(browser: &Browser, body: &[u8]) -> Option<Vec<u8>> {
    // Header: salt (16) | record size (4) | key id length (1) | key id = sender's public key.
    let salt = body.get(..16)?;
    let id_len = *body.get(20)? as usize;
    let sender = p256::PublicKey::from_sec1_bytes(body.get(21..21 + id_len)?).ok()?;
    let ciphertext = body.get(21 + id_len..)?;

    let shared = p256::ecdh::diffie_hellman(browser.secret.to_nonzero_scalar(), sender.as_affine());
    let mut info = b"WebPush: info\0".to_vec();
    info.extend_from_slice(
        browser
            .secret
            .public_key()
            .to_encoded_point(false)
            .as_bytes(),
    );
    info.extend_from_slice(sender.to_encoded_point(false).as_bytes());
    let mut ikm = [0u8; 32];
    hkdf::Hkdf::<Sha256>::new(Some(&browser.auth), shared.raw_secret_bytes().as_slice())
        .expand(&info, &mut ikm)
        .ok()?;
    let prk = hkdf::Hkdf::<Sha256>::new(Some(salt), &ikm);
    let (mut cek, mut nonce) = ([0u8; 16], [0u8; 12]);
    prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek)
        .ok()?;
    prk.expand(b"Content-Encoding: nonce\0", &mut nonce).ok()?;

    let cipher = aes_gcm::Aes128Gcm::new_from_slice(&cek).ok()?;
    let mut padded = cipher
        .decrypt(aes_gcm::Nonce::from_slice(&nonce), ciphertext)
        .ok()?;
    // The last record ends with the delimiter 0x02 followed by zero or more 0x00.
    while padded.last() == Some(&0) {
        padded.pop();
    }
    (padded.pop() == Some(2)).then_some(padded)
}

/// The distinct VAPID tokens in `received`.
pub fn vapid_tokens(received: &[Received]) -> HashSet<String> {
    received.iter().map(|r| r.jwt.clone()).collect()
}
