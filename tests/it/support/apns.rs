//! A fake APNs: HTTP/2 over TLS, verifying provider tokens and headers like Apple does.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use walpush::channels::push::Clock;
use walpush::config::ApnsConfig;

use super::tls::{self, answer, Answer, Request};

/// The team id the fake expects in `iss`.
pub const TEAM_ID: &str = "TEAM123456";
/// The key id the fake expects in `kid`.
pub const KEY_ID: &str = "KEY1234567";
/// The bundle id the fake expects in `apns-topic`.
pub const TOPIC: &str = "com.example.app";

/// A request the fake accepted or refused.
#[derive(Debug, Clone)]
pub struct Received {
    /// The device token from the path.
    pub device_token: String,
    /// The provider token (JWT) used.
    pub jwt: String,
    /// Header values by name (lowercase), for the `apns-*` headers.
    pub headers: HashMap<String, String>,
    /// The JSON body.
    pub body: Value,
    /// What the fake answered.
    pub status: u16,
    /// The APNs reason of a refusal.
    pub reason: Option<String>,
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    answers: HashMap<String, (u16, String, Option<u64>)>,
}

/// A running fake APNs.
pub struct FakeApns {
    /// The channel's `endpoint`.
    pub endpoint: String,
    /// The CA to trust: the channel's `ca_file`.
    pub ca_file: PathBuf,
    /// The `.p8` signing key (PKCS#8 PEM).
    pub key_file: PathBuf,
    /// Provider time: token age is judged by this clock; share it with the channel.
    pub clock: Arc<Clock>,
    state: Arc<Mutex<State>>,
    _server: tls::Server,
}

impl FakeApns {
    /// Starts a fake with a fresh signing key; every device token is accepted until told
    /// otherwise.
    pub async fn start() -> FakeApns {
        let key = rcgen::KeyPair::generate().expect("p8 key");
        let public = DecodingKey::from_ec_pem(key.public_key_pem().as_bytes()).expect("public");
        let state = Arc::new(Mutex::new(State::default()));
        let clock = Clock::system();
        let handler = {
            let state = state.clone();
            let clock = clock.clone();
            Arc::new(move |req: Request| handle(&state, &public, &clock, req))
        };
        let server = tls::serve(handler).await;
        let key_file = server.dir.path().join(format!("AuthKey_{KEY_ID}.p8"));
        std::fs::write(&key_file, key.serialize_pem()).expect("write p8");
        FakeApns {
            endpoint: server.url.clone(),
            ca_file: server.ca_file.clone(),
            key_file,
            clock,
            state,
            _server: server,
        }
    }

    /// A channel configuration pointing at this fake.
    pub fn config(&self) -> ApnsConfig {
        ApnsConfig {
            endpoint: self.endpoint.clone(),
            key_file: self.key_file.clone(),
            key_id: KEY_ID.to_owned(),
            team_id: TEAM_ID.to_owned(),
            topic: TOPIC.to_owned(),
            ca_file: Some(self.ca_file.clone()),
            timeout_ms: 10_000,
            concurrency: 8,
        }
    }

    /// From now on, answer `status` with `reason` for this device token (and `Retry-After`).
    pub fn answer(&self, device_token: &str, status: u16, reason: &str, retry_after: Option<u64>) {
        let mut state = self.state.lock().unwrap();
        state.answers.insert(
            device_token.to_owned(),
            (status, reason.to_owned(), retry_after),
        );
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// The distinct provider tokens seen so far.
    pub fn provider_tokens(&self) -> HashSet<String> {
        self.received().into_iter().map(|r| r.jwt).collect()
    }
}

fn handle(state: &Mutex<State>, public: &DecodingKey, clock: &Clock, req: Request) -> Answer {
    let header = |name: &str| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let device_token = req
        .path
        .strip_prefix("/3/device/")
        .unwrap_or_default()
        .to_owned();
    let jwt = header("authorization")
        .and_then(|v| v.strip_prefix("bearer ").map(str::to_owned))
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);

    let verdict = verify(&req, &device_token, &jwt, &body, public, clock);
    let configured = state.lock().unwrap().answers.get(&device_token).cloned();
    let (status, reason, retry_after) = match (verdict, configured) {
        (Err((status, reason)), _) => (status, Some(reason.to_owned()), None),
        (Ok(()), Some((status, reason, retry_after))) => (status, Some(reason), retry_after),
        (Ok(()), None) => (200, None, None),
    };

    let mut headers = HashMap::new();
    for (name, value) in &req.headers {
        if name.as_str().starts_with("apns-") {
            headers.insert(
                name.to_string(),
                value.to_str().unwrap_or_default().to_owned(),
            );
        }
    }
    let apns_id = headers
        .get("apns-id")
        .cloned()
        .unwrap_or_else(|| "generated".to_owned());
    state.lock().unwrap().received.push(Received {
        device_token,
        jwt,
        headers,
        body,
        status,
        reason: reason.clone(),
    });

    let mut reply = vec![("apns-id", apns_id)];
    if let Some(seconds) = retry_after {
        reply.push(("retry-after", seconds.to_string()));
    }
    match reason {
        None => answer(status, &reply, ""),
        Some(reason) => answer(status, &reply, json!({ "reason": reason }).to_string()),
    }
}

/// The checks APNs makes before looking at the device, as (status, reason) on failure.
fn verify(
    req: &Request,
    device_token: &str,
    jwt: &str,
    body: &Value,
    public: &DecodingKey,
    clock: &Clock,
) -> Result<(), (u16, &'static str)> {
    let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
    if req.version != hyper::Version::HTTP_2 {
        return Err((400, "BadHttpVersion"));
    }
    if req.method != hyper::Method::POST {
        return Err((405, "MethodNotAllowed"));
    }
    if device_token.is_empty() || !device_token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err((400, "BadDeviceToken"));
    }
    if jwt.is_empty() {
        return Err((403, "MissingProviderToken"));
    }

    // The provider token: ES256 by the team's key, `kid` and `iss` as registered, not older
    // than an hour.
    let jwt_header = jsonwebtoken::decode_header(jwt).map_err(|_| (403, "InvalidProviderToken"))?;
    if jwt_header.alg != Algorithm::ES256 || jwt_header.kid.as_deref() != Some(KEY_ID) {
        return Err((403, "InvalidProviderToken"));
    }
    let mut validation = Validation::new(Algorithm::ES256);
    validation.required_spec_claims = HashSet::new();
    validation.validate_exp = false;
    let claims = jsonwebtoken::decode::<Value>(jwt, public, &validation)
        .map_err(|_| (403, "InvalidProviderToken"))?
        .claims;
    if claims["iss"] != TEAM_ID {
        return Err((403, "InvalidProviderToken"));
    }
    let iat = claims["iat"]
        .as_u64()
        .ok_or((403, "InvalidProviderToken"))?;
    let now = clock.now_unix();
    if iat > now + 60 {
        return Err((403, "InvalidProviderToken"));
    }
    if now - iat > 3600 {
        return Err((403, "ExpiredProviderToken"));
    }

    match header("apns-topic") {
        None => return Err((400, "MissingTopic")),
        Some(topic) if topic != TOPIC => return Err((400, "DeviceTokenNotForTopic")),
        Some(_) => {}
    }
    let push_type = header("apns-push-type").ok_or((400, "InvalidPushType"))?;
    let priority = header("apns-priority").unwrap_or("10");
    match (push_type, priority) {
        ("alert", "10" | "5") | ("background", "5") => {}
        ("alert" | "background", _) => return Err((400, "BadPriority")),
        _ => return Err((400, "InvalidPushType")),
    }
    if let Some(id) = header("apns-id") {
        if uuid::Uuid::parse_str(id).is_err() {
            return Err((400, "BadMessageId"));
        }
    }
    if header("apns-collapse-id").is_some_and(|id| id.len() > 64) {
        return Err((400, "BadCollapseId"));
    }
    if header("apns-expiration").is_some_and(|e| e.parse::<u64>().is_err()) {
        return Err((400, "BadExpirationDate"));
    }
    if req.body.len() > 4096 {
        return Err((413, "PayloadTooLarge"));
    }
    if !body.get("aps").is_some_and(Value::is_object) {
        return Err((400, "PayloadEmpty"));
    }
    if push_type == "alert" && body["aps"].get("alert").is_none() {
        return Err((400, "PayloadEmpty"));
    }
    Ok(())
}
