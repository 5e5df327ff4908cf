//! A webhook receiver that verifies Standard Webhooks signatures and answers as scripted.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub webhook_id: String,
    pub body: serde_json::Value,
    pub status: u16,
}

#[derive(Default)]
struct Inner {
    requests: Vec<Request>,
    rejected: usize,
    scripts: HashMap<String, VecDeque<(u16, Option<u64>)>>,
}

#[derive(Clone)]
pub struct Receiver {
    pub base: String,
    key: Arc<Vec<u8>>,
    inner: Arc<Mutex<Inner>>,
}

impl Receiver {
    /// Starts a receiver that accepts signatures made with `secret` (`whsec_...`).
    pub async fn start(secret: &str) -> Receiver {
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret.strip_prefix("whsec_").expect("whsec_ secret"))
            .expect("base64 secret");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver {
            base: format!("http://{}", listener.local_addr().unwrap()),
            key: Arc::new(key),
            inner: Arc::default(),
        };
        let app = Router::new()
            .route("/{*path}", post(handle))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        receiver
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }

    /// The next answers for `path`, in order (status, Retry-After seconds); then 204.
    pub fn script(&self, path: &str, answers: &[(u16, Option<u64>)]) {
        self.inner
            .lock()
            .unwrap()
            .scripts
            .insert(path.to_owned(), answers.iter().copied().collect());
    }

    pub fn requests(&self) -> Vec<Request> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// Requests whose signature did not verify.
    pub fn rejected(&self) -> usize {
        self.inner.lock().unwrap().rejected
    }

    /// Events accepted (2xx) for `path`: each body, or each element of an array body.
    pub fn accepted_events(&self, path: &str) -> Vec<serde_json::Value> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path && (200..300).contains(&r.status))
            .flat_map(|r| match r.body {
                serde_json::Value::Array(events) => events,
                event => vec![event],
            })
            .collect()
    }

    pub async fn wait_requests(&self, count: usize) -> Vec<Request> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let requests = self.requests();
            if requests.len() >= count {
                return requests;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited 60s for {count} requests, got {}",
                requests.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Option<String> {
        let get = |name: &str| headers.get(name)?.to_str().ok();
        let id = get("webhook-id")?;
        let timestamp: u64 = get("webhook-timestamp")?.parse().ok()?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        if now.abs_diff(timestamp) > 300 || id.is_empty() {
            return None;
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).ok()?;
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        let expected =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let signatures = get("webhook-signature")?;
        signatures
            .split(' ')
            .filter_map(|s| s.strip_prefix("v1,"))
            .any(|s| s == expected)
            .then(|| id.to_owned())
    }
}

async fn handle(
    State(receiver): State<Receiver>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let Some(webhook_id) = receiver.verify(&headers, &body) else {
        receiver.inner.lock().unwrap().rejected += 1;
        return (StatusCode::UNAUTHORIZED, HeaderMap::new());
    };
    let body: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(_) => return (StatusCode::BAD_REQUEST, HeaderMap::new()),
    };
    let mut inner = receiver.inner.lock().unwrap();
    let (status, retry_after) = inner
        .scripts
        .get_mut(&path)
        .and_then(VecDeque::pop_front)
        .unwrap_or((204, None));
    inner.requests.push(Request {
        path,
        webhook_id,
        body,
        status,
    });
    let mut headers = HeaderMap::new();
    if let Some(seconds) = retry_after {
        headers.insert("retry-after", seconds.to_string().parse().unwrap());
    }
    (StatusCode::from_u16(status).unwrap(), headers)
}
