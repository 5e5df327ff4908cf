//! Web Push: RFC 8291 `aes128gcm` encrypted messages with RFC 8292 VAPID authentication.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use web_push_native::p256;
use web_push_native::p256::elliptic_curve::sec1::ToEncodedPoint;
use web_push_native::p256::pkcs8::{DecodePrivateKey, EncodePrivateKey};

use super::push::{self, Clock, Payload};
use super::{BoxFuture, Channel, Job, Outcome, SetupError};
use crate::config::WebPushConfig;

/// The largest plaintext that fits one 4096-byte `aes128gcm` record with its 86-byte header,
/// padding delimiter and tag (RFC 8291 §4).
pub const MAX_PLAINTEXT: usize = 3993;

/// `TTL` when the payload gives none: four weeks, what push services keep at most.
pub const DEFAULT_TTL: u64 = 28 * 24 * 3600;

/// A VAPID token is valid this long (RFC 8292 allows at most 24 hours).
const VAPID_LIFETIME_SECS: u64 = 12 * 3600;

/// A cached VAPID token is replaced when it has less than this left.
const VAPID_MARGIN_SECS: u64 = 3600;

/// The `webpush` channel.
pub struct WebPush {
    name: String,
    client: reqwest::Client,
    permits: Semaphore,
    vapid: Vapid,
}

/// The VAPID signing key and the tokens made with it, one per push-service origin.
struct Vapid {
    key: EncodingKey,
    /// The uncompressed public key, base64url: the `k` parameter.
    public_key: String,
    subject: String,
    clock: Arc<Clock>,
    tokens: Mutex<HashMap<String, (Arc<str>, u64)>>,
}

#[derive(serde::Serialize)]
struct VapidClaims<'a> {
    aud: &'a str,
    exp: u64,
    sub: &'a str,
}

impl Vapid {
    /// Reads a P-256 private key in PEM, PKCS#8 (`PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`).
    fn load(pem: &str, subject: &str, clock: Arc<Clock>) -> Result<Vapid, String> {
        let secret = p256::SecretKey::from_pkcs8_pem(pem)
            .or_else(|_| p256::SecretKey::from_sec1_pem(pem))
            .map_err(|_| "is not a PEM P-256 private key (PKCS#8 or SEC1)".to_owned())?;
        let der = secret
            .to_pkcs8_der()
            .map_err(|err| format!("cannot re-encode: {err}"))?;
        let public = secret.public_key().to_encoded_point(false);
        Ok(Vapid {
            key: EncodingKey::from_ec_der(der.as_bytes()),
            public_key: URL_SAFE_NO_PAD.encode(public.as_bytes()),
            subject: subject.to_owned(),
            clock,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// The `Authorization` header value for a push service origin.
    fn authorization(&self, origin: &str) -> Result<String, String> {
        let now = self.clock.now_unix();
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = tokens
            .get(origin)
            .filter(|(_, exp)| now + VAPID_MARGIN_SECS < *exp);
        let token = match fresh {
            Some((token, _)) => token.clone(),
            None => {
                let exp = now + VAPID_LIFETIME_SECS;
                let claims = VapidClaims {
                    aud: origin,
                    exp,
                    sub: &self.subject,
                };
                let token: Arc<str> =
                    jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.key)
                        .map_err(|err| format!("webpush: cannot sign the VAPID token: {err}"))?
                        .into();
                tokens.insert(origin.to_owned(), (token.clone(), exp));
                token
            }
        };
        Ok(format!("vapid t={token}, k={}", self.public_key))
    }
}

/// A browser's push subscription, as `PushSubscription.toJSON()` gives it.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The push service URL.
    pub endpoint: url::Url,
    /// The user agent's P-256 public key (`keys.p256dh`).
    pub p256dh: p256::PublicKey,
    /// The 16-byte authentication secret (`keys.auth`).
    pub auth: [u8; 16],
}

impl Subscription {
    /// Parses a device address; a malformed one is refused with a reason.
    pub fn parse(address: &str) -> Result<Subscription, String> {
        let bad = |what: &str| format!("webpush: malformed subscription: {what}");
        let value: Value = serde_json::from_str(address).map_err(|_| bad("not JSON"))?;
        fn text(v: Option<&Value>) -> Option<&str> {
            v.and_then(Value::as_str)
        }
        let endpoint = text(value.get("endpoint")).ok_or_else(|| bad("no endpoint"))?;
        let endpoint = url::Url::parse(endpoint).map_err(|_| bad("endpoint is not a URL"))?;
        if endpoint.scheme() != "https" || endpoint.host().is_none() {
            return Err(bad("endpoint is not an https URL"));
        }
        let keys = value.get("keys");
        let decode = |key: &str| {
            let text = text(keys.and_then(|k| k.get(key)))
                .ok_or_else(|| bad(&format!("no keys.{key}")))?;
            URL_SAFE_NO_PAD
                .decode(text.trim_end_matches('='))
                .map_err(|_| bad(&format!("keys.{key} is not base64url")))
        };
        let p256dh = p256::PublicKey::from_sec1_bytes(&decode("p256dh")?)
            .map_err(|_| bad("keys.p256dh is not a P-256 public key"))?;
        let auth: [u8; 16] = decode("auth")?
            .try_into()
            .map_err(|_| bad("keys.auth is not 16 bytes"))?;
        Ok(Subscription {
            endpoint,
            p256dh,
            auth,
        })
    }
}

/// One job rendered for Web Push, before encryption.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The JSON the service worker receives.
    pub plaintext: String,
    /// `TTL` in seconds.
    pub ttl: u64,
    /// `Urgency`: `high` for something to show, else `normal`.
    pub urgency: &'static str,
    /// `Topic`, from the collapse key.
    pub topic: Option<String>,
}

impl WebPush {
    /// Builds the channel from its configuration.
    pub fn new(name: &str, cfg: &WebPushConfig) -> Result<WebPush, SetupError> {
        WebPush::with_clock(name, cfg, Clock::system())
    }

    /// Builds the channel with a clock for VAPID token expiry (tests advance it).
    pub fn with_clock(
        name: &str,
        cfg: &WebPushConfig,
        clock: Arc<Clock>,
    ) -> Result<WebPush, SetupError> {
        let setup = |message: String| SetupError {
            name: name.to_owned(),
            message,
        };
        let file = &cfg.vapid_private_key_file;
        let pem = std::fs::read_to_string(file).map_err(|err| {
            setup(format!(
                "cannot read vapid_private_key_file {}: {err}",
                file.display()
            ))
        })?;
        let vapid = Vapid::load(&pem, &cfg.subject, clock)
            .map_err(|err| setup(format!("vapid_private_key_file {err}")))?;
        let client = super::http_client(
            name,
            cfg.ca_file.as_deref(),
            Duration::from_millis(cfg.timeout_ms),
            cfg.concurrency,
        )?;
        Ok(WebPush {
            name: name.to_owned(),
            client,
            permits: Semaphore::new(cfg.concurrency.max(1)),
            vapid,
        })
    }

    /// The VAPID public key (base64url), the `applicationServerKey` browsers subscribe with.
    pub fn public_key(&self) -> &str {
        &self.vapid.public_key
    }

    async fn send_one(&self, job: &Job) -> Outcome {
        let subscription = match Subscription::parse(&job.address) {
            Ok(s) => s,
            Err(reason) => return Outcome::Dead { reason },
        };
        let message = match render(job) {
            Ok(m) => m,
            Err(reason) => return Outcome::Dead { reason },
        };
        let auth = web_push_native::Auth::clone_from_slice(&subscription.auth);
        let body = match web_push_native::encrypt(
            message.plaintext.into_bytes(),
            &subscription.p256dh,
            &auth,
        ) {
            Ok(body) => body,
            Err(err) => {
                return Outcome::Dead {
                    reason: format!("webpush: cannot encrypt: {err}"),
                }
            }
        };
        let origin = subscription.endpoint.origin().ascii_serialization();
        let authorization = match self.vapid.authorization(&origin) {
            Ok(value) => value,
            Err(reason) => return Outcome::Dead { reason },
        };

        let Ok(_permit) = self.permits.acquire().await else {
            return Outcome::Retry {
                reason: "webpush: channel closed".to_owned(),
                after: None,
            };
        };
        let mut request = self
            .client
            .post(subscription.endpoint.clone())
            .header("authorization", authorization)
            .header("ttl", message.ttl.to_string())
            .header("urgency", message.urgency)
            .header("content-encoding", "aes128gcm")
            .header("content-type", "application/octet-stream");
        if let Some(topic) = &message.topic {
            request = request.header("topic", topic);
        }
        let response = match request.body(body).send().await {
            Ok(response) => response,
            Err(err) => return super::transport_error("webpush", &err),
        };
        let status = response.status().as_u16();
        let outcome = classify(status, response.headers());
        self.log(job, status, &outcome);
        outcome
    }

    fn log(&self, job: &Job, status: u16, outcome: &Outcome) {
        // The endpoint URL identifies the browser: name it by a hash only.
        let device = push::token_hash(&job.address);
        match outcome {
            Outcome::Gone { .. } => tracing::warn!(
                channel = %self.name, outbox_id = job.row.id, device, status,
                "webpush subscription is gone, deactivating the device"
            ),
            Outcome::Dead { .. } if matches!(status, 401 | 403) => tracing::error!(
                channel = %self.name, status,
                "push service refused the VAPID authorization: check vapid_private_key_file and \
                 that browsers subscribed with its public key"
            ),
            Outcome::Retry { .. } => tracing::warn!(
                channel = %self.name, outbox_id = job.row.id, device, status,
                "push service asked to retry"
            ),
            _ => {}
        }
    }
}

impl Channel for WebPush {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "webpush"
    }

    fn send<'a>(&'a self, jobs: &'a [Job]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(push::in_device_order(jobs, |job| self.send_one(job)))
    }
}

/// Renders a job: `{"id", "title", "body", "url", "badge", "data"}` for the service worker,
/// the `webpush` override merged over it.
pub fn render(job: &Job) -> Result<Message, String> {
    let payload = Payload::parse(&job.row)?;
    let mut body = Map::new();
    body.insert("id".to_owned(), Value::from(job.idempotency_id()));
    for key in ["title", "body", "url", "badge", "sound"] {
        if let Some(value) = payload.0.get(key) {
            body.insert(key.to_owned(), value.clone());
        }
    }
    let data = payload.data();
    if !data.is_empty() {
        body.insert("data".to_owned(), Value::Object(data));
    }
    if let Some(overrides) = payload.overrides("webpush") {
        push::merge(&mut body, overrides);
    }
    let plaintext = Value::Object(body).to_string();
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(format!(
            "webpush: payload is {} bytes, over the {MAX_PLAINTEXT}-byte limit",
            plaintext.len()
        ));
    }
    Ok(Message {
        plaintext,
        ttl: payload.ttl().unwrap_or(DEFAULT_TTL),
        urgency: if payload.is_alert() { "high" } else { "normal" },
        topic: job.row.collapse_key.as_deref().map(topic),
    })
}

/// A collapse key as an RFC 8030 `Topic` (at most 32 characters of the base64url alphabet):
/// as is when it fits, else 24 bytes of its SHA-256 in base64url.
pub fn topic(key: &str) -> String {
    let fits = !key.is_empty()
        && key.len() <= 32
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if fits {
        return key.to_owned();
    }
    URL_SAFE_NO_PAD.encode(&Sha256::digest(key.as_bytes())[..24])
}

/// Maps a push service's status to an outcome.
pub fn classify(status: u16, headers: &reqwest::header::HeaderMap) -> Outcome {
    match status {
        200..=299 => {
            let location = headers.get("location").and_then(|v| v.to_str().ok());
            Outcome::Sent {
                provider_ref: location.map(str::to_owned),
            }
        }
        404 | 410 => Outcome::Gone {
            reason: format!("webpush: {status}"),
        },
        413 => Outcome::Dead {
            reason: "webpush: 413 payload too large".to_owned(),
        },
        429 | 500..=599 => Outcome::Retry {
            reason: format!("webpush: HTTP {status}"),
            after: super::retry_after(headers),
        },
        _ => Outcome::Dead {
            reason: format!("webpush: HTTP {status}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::outbox::OutboxRow;

    const P256DH: &str =
        "BLn9b-VR0ca83knDNZ32dCHGyjJp-1riX9ZTN40MqV8K_LpQmLqxC_DoHvqvFXO_nGdAB4W9dogZb_sM-uV4JbY";

    fn subscription(endpoint: &str, p256dh: &str, auth: &str) -> String {
        serde_json::json!({"endpoint": endpoint, "keys": {"p256dh": p256dh, "auth": auth}})
            .to_string()
    }

    fn job(payload: &str) -> Job {
        Job {
            row: Arc::new(OutboxRow {
                id: 3,
                topic: "news".to_owned(),
                recipient: "u1".to_owned(),
                payload: Arc::from(payload),
                channels: None,
                collapse_key: Some("news:today is long enough to need hashing!".to_owned()),
                created_at: "2026-12-03T18:40:00Z".to_owned(),
                commit_lsn: Lsn(1),
            }),
            device_id: 4,
            address: Arc::from(subscription(
                "https://push.example/x",
                P256DH,
                "AAAAAAAAAAAAAAAAAAAAAA",
            )),
        }
    }

    #[test]
    fn subscriptions_parse_and_malformed_ones_are_refused() {
        let ok = Subscription::parse(&subscription(
            "https://push.example/a",
            P256DH,
            "AAAAAAAAAAAAAAAAAAAAAA",
        ));
        assert_eq!(ok.unwrap().auth, [0; 16]);
        let cases = [
            ("not json", "not JSON".to_owned()),
            ("{}", "no endpoint".to_owned()),
            (
                &*subscription("http://push.example/a", P256DH, "AAAAAAAAAAAAAAAAAAAAAA"),
                "not an https URL".to_owned(),
            ),
            (
                &*subscription("https://push.example/a", "AAAA", "AAAAAAAAAAAAAAAAAAAAAA"),
                "not a P-256".to_owned(),
            ),
            (
                &*subscription("https://push.example/a", P256DH, "AAAA"),
                "not 16 bytes".to_owned(),
            ),
            (
                &*subscription("https://push.example/a", "!!", "AAAAAAAAAAAAAAAAAAAAAA"),
                "not base64url".to_owned(),
            ),
        ];
        for (address, expected) in cases {
            let err = Subscription::parse(address).unwrap_err();
            assert!(err.contains(&expected), "{address}: {err}");
        }
    }

    #[test]
    fn message_carries_the_common_keys_and_headers() {
        let m = render(&job(
            r#"{"title":"T","data":{"k":1},"ttl":90,"webpush":{"icon":"/i.png"}}"#,
        ))
        .unwrap();
        let body: Value = serde_json::from_str(&m.plaintext).unwrap();
        assert_eq!(body["id"], "msg_3_4");
        assert_eq!(body["title"], "T");
        assert_eq!(body["data"]["k"], 1);
        assert_eq!(body["icon"], "/i.png");
        assert_eq!((m.ttl, m.urgency), (90, "high"));
        let topic = m.topic.unwrap();
        assert_eq!(topic.len(), 32);
        assert!(topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(super::topic("short-key_1"), "short-key_1");
    }

    #[test]
    fn oversized_payload_is_refused() {
        let big = format!(r#"{{"body":"{}"}}"#, "x".repeat(MAX_PLAINTEXT));
        assert!(render(&job(&big))
            .unwrap_err()
            .contains("over the 3993-byte limit"));
    }

    #[test]
    fn statuses_map_to_outcomes() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("location", "https://push.example/m/1".parse().unwrap());
        assert_eq!(
            classify(201, &headers),
            Outcome::Sent {
                provider_ref: Some("https://push.example/m/1".to_owned())
            }
        );
        let none = reqwest::header::HeaderMap::new();
        assert_eq!(
            classify(410, &none),
            Outcome::Gone {
                reason: "webpush: 410".to_owned()
            }
        );
        assert_eq!(
            classify(404, &none),
            Outcome::Gone {
                reason: "webpush: 404".to_owned()
            }
        );
        assert!(matches!(classify(413, &none), Outcome::Dead { .. }));
        assert!(matches!(classify(429, &none), Outcome::Retry { .. }));
        assert!(matches!(classify(502, &none), Outcome::Retry { .. }));
        assert!(matches!(classify(403, &none), Outcome::Dead { .. }));
    }
}
