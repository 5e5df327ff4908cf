//! A fake FCM: an OAuth2 token endpoint checking the RS256 assertion, and `messages:send`
//! checking the bearer token and the message shape.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use serde_json::{json, Value};
use walpush::channels::fcm::SCOPE;
use walpush::channels::push::Clock;
use walpush::config::FcmConfig;

use super::tls::{self, answer, Answer, Request};

/// The project id of the fake service account.
pub const PROJECT: &str = "walpush-test";
/// The fake service account's e-mail.
pub const CLIENT_EMAIL: &str = "walpush@walpush-test.iam.gserviceaccount.com";

/// A `messages:send` request the fake accepted or refused.
#[derive(Debug, Clone)]
pub struct Received {
    /// `message.token`
    pub token: String,
    /// The `message` object.
    pub message: Value,
    /// What the fake answered.
    pub status: u16,
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    /// Access tokens issued, with their expiry (Unix seconds).
    issued: HashMap<String, u64>,
    token_requests: usize,
    answers: HashMap<String, (u16, String, Option<u64>)>,
}

/// A running fake FCM.
pub struct FakeFcm {
    /// The channel's `endpoint`.
    pub endpoint: String,
    /// The CA to trust: the channel's `ca_file`.
    pub ca_file: PathBuf,
    /// The service-account JSON (its `token_uri` points at this fake).
    pub service_account_file: PathBuf,
    /// Google's time: token expiry is judged by this clock; share it with the channel.
    pub clock: Arc<Clock>,
    state: Arc<Mutex<State>>,
    _server: tls::Server,
}

/// One RSA key for the whole test binary: generating it is slow.
fn rsa_key() -> &'static rsa::RsaPrivateKey {
    static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa"))
}

impl FakeFcm {
    /// Starts a fake; every registration token is accepted until told otherwise.
    pub async fn start() -> FakeFcm {
        let key = tokio::task::spawn_blocking(rsa_key).await.expect("rsa key");
        let public_pem = key
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem");
        let public = DecodingKey::from_rsa_pem(public_pem.as_bytes()).expect("public key");
        let state = Arc::new(Mutex::new(State::default()));
        let clock = Clock::system();
        let token_uri = Arc::new(OnceLock::<String>::new());
        let handler = {
            let (state, clock, token_uri) = (state.clone(), clock.clone(), token_uri.clone());
            Arc::new(move |req: Request| {
                let token_uri = token_uri.get().map(String::as_str).unwrap_or_default();
                handle(&state, &public, &clock, token_uri, req)
            })
        };
        let server = tls::serve(handler).await;
        token_uri
            .set(format!("{}/token", server.url))
            .expect("set once");

        let account = json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": "0123456789abcdef",
            "private_key": &*key.to_pkcs8_pem(LineEnding::LF).expect("pkcs8"),
            "client_email": CLIENT_EMAIL,
            "token_uri": format!("{}/token", server.url),
        });
        let service_account_file = server.dir.path().join("service-account.json");
        std::fs::write(&service_account_file, account.to_string()).expect("write account");
        FakeFcm {
            endpoint: server.url.clone(),
            ca_file: server.ca_file.clone(),
            service_account_file,
            clock,
            state,
            _server: server,
        }
    }

    /// A channel configuration pointing at this fake.
    pub fn config(&self) -> FcmConfig {
        FcmConfig {
            service_account_file: self.service_account_file.clone(),
            endpoint: self.endpoint.clone(),
            ca_file: Some(self.ca_file.clone()),
            timeout_ms: 10_000,
            concurrency: 8,
        }
    }

    /// From now on, answer this registration token with an error (`errorCode`).
    pub fn answer(&self, token: &str, status: u16, error_code: &str, retry_after: Option<u64>) {
        let mut state = self.state.lock().unwrap();
        state.answers.insert(
            token.to_owned(),
            (status, error_code.to_owned(), retry_after),
        );
    }

    /// Forgets every access token issued, as a revocation would.
    pub fn revoke_access_tokens(&self) {
        self.state.lock().unwrap().issued.clear();
    }

    /// How many access tokens were asked for.
    pub fn token_requests(&self) -> usize {
        self.state.lock().unwrap().token_requests
    }

    /// Every `messages:send` request so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }
}

fn handle(
    state: &Mutex<State>,
    public: &DecodingKey,
    clock: &Clock,
    token_uri: &str,
    req: Request,
) -> Answer {
    let send_path = format!("/v1/projects/{PROJECT}/messages:send");
    if req.method != hyper::Method::POST {
        return answer(405, &[], "");
    }
    if req.path == "/token" {
        return token(state, public, clock, token_uri, &req);
    }
    if req.path != send_path {
        return google_error(404, "NOT_FOUND", None, "unknown path");
    }

    // The bearer token must be one this fake issued and still valid.
    let bearer = req
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let now = clock.now_unix();
    let valid = bearer.is_some_and(|t| {
        state
            .lock()
            .unwrap()
            .issued
            .get(t)
            .is_some_and(|e| *e > now)
    });
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let message = body.get("message").cloned().unwrap_or(Value::Null);
    let token = message["token"].as_str().unwrap_or_default().to_owned();

    let configured = state.lock().unwrap().answers.get(&token).cloned();
    let reply = if !valid {
        google_error(
            401,
            "UNAUTHENTICATED",
            None,
            "request had invalid authentication credentials",
        )
    } else if let Err(what) = check_message(&message) {
        google_error(400, "INVALID_ARGUMENT", Some("INVALID_ARGUMENT"), what)
    } else if let Some((status, code, retry_after)) = configured {
        let mut reply = google_error(status, "FAILED", Some(&code), "configured answer");
        if let Some(seconds) = retry_after {
            reply
                .headers_mut()
                .insert("retry-after", seconds.to_string().parse().unwrap());
        }
        reply
    } else {
        let n = state.lock().unwrap().received.len();
        answer(
            200,
            &[],
            json!({ "name": format!("projects/{PROJECT}/messages/{n}") }).to_string(),
        )
    };
    let status = reply.status().as_u16();
    state.lock().unwrap().received.push(Received {
        token,
        message,
        status,
    });
    reply
}

/// The token endpoint: the JWT bearer grant with an RS256 assertion by the service account.
fn token(
    state: &Mutex<State>,
    public: &DecodingKey,
    clock: &Clock,
    token_uri: &str,
    req: &Request,
) -> Answer {
    state.lock().unwrap().token_requests += 1;
    let refuse = |what: &str| {
        answer(
            400,
            &[],
            json!({"error": "invalid_grant", "error_description": what}).to_string(),
        )
    };
    let form: HashMap<String, String> = url::form_urlencoded::parse(&req.body)
        .into_owned()
        .collect();
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return answer(
            400,
            &[],
            json!({"error": "unsupported_grant_type"}).to_string(),
        );
    }
    let Some(assertion) = form.get("assertion") else {
        return refuse("no assertion");
    };
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[token_uri]);
    validation.set_issuer(&[CLIENT_EMAIL]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    validation.validate_exp = false;
    let claims = match jsonwebtoken::decode::<Value>(assertion, public, &validation) {
        Ok(data) => data.claims,
        Err(_) => return refuse("invalid JWT signature or claims"),
    };
    let now = clock.now_unix();
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap_or(0),
        claims["exp"].as_u64().unwrap_or(0),
    );
    if claims["scope"] != SCOPE {
        return refuse("wrong scope");
    }
    if exp <= now || exp < iat || exp - iat > 3600 || iat > now + 60 {
        return refuse(
            "invalid JWT: token must be a short-lived token and in a reasonable timeframe",
        );
    }
    let mut state = state.lock().unwrap();
    let access_token = format!("ya29.fake-{}", state.token_requests);
    state.issued.insert(access_token.clone(), now + 3600);
    let body = json!({"access_token": access_token, "expires_in": 3599, "token_type": "Bearer"});
    answer(200, &[], body.to_string())
}

/// What FCM checks in a message before trying to deliver it.
fn check_message(message: &Value) -> Result<(), &'static str> {
    let object = message.as_object().ok_or("message must be an object")?;
    const KNOWN: [&str; 9] = [
        "name",
        "token",
        "topic",
        "condition",
        "data",
        "notification",
        "android",
        "webpush",
        "apns",
    ];
    if object
        .keys()
        .any(|k| !KNOWN.contains(&k.as_str()) && k != "fcm_options")
    {
        return Err("unknown field in message");
    }
    if message["token"].as_str().is_none_or(str::is_empty) {
        return Err("message.token is required");
    }
    if let Some(data) = message.get("data") {
        let data = data.as_object().ok_or("data must be a map")?;
        if data.values().any(|v| !v.is_string()) {
            return Err("data values must be strings");
        }
    }
    if let Some(notification) = message.get("notification") {
        let fields = notification
            .as_object()
            .ok_or("notification must be an object")?;
        if fields
            .iter()
            .any(|(k, v)| !["title", "body", "image"].contains(&k.as_str()) || !v.is_string())
        {
            return Err("invalid notification");
        }
    }
    if let Some(android) = message.get("android") {
        if let Some(ttl) = android.get("ttl") {
            let ok = ttl
                .as_str()
                .and_then(|t| t.strip_suffix('s'))
                .is_some_and(|n| n.parse::<f64>().is_ok());
            if !ok {
                return Err("android.ttl must be a duration like \"3.5s\"");
            }
        }
        if let Some(priority) = android.get("priority") {
            if !["high", "normal", "HIGH", "NORMAL"].contains(&priority.as_str().unwrap_or("")) {
                return Err("invalid android.priority");
            }
        }
        if android.get("collapse_key").is_some_and(|k| !k.is_string()) {
            return Err("android.collapse_key must be a string");
        }
    }
    let size: usize = ["data", "notification"]
        .iter()
        .map(|k| message.get(*k).map_or(0, |v| v.to_string().len()))
        .sum();
    if size > 4096 {
        return Err("message is too big");
    }
    Ok(())
}

/// A Google API error with an optional FCM `errorCode` detail.
fn google_error(status: u16, api_status: &str, error_code: Option<&str>, message: &str) -> Answer {
    let details = match error_code {
        Some(code) => json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                              "errorCode": code}]),
        None => json!([]),
    };
    let body = json!({"error": {"code": status, "message": message, "status": api_status,
                                "details": details}});
    answer(status, &[], body.to_string())
}
