//! Apple Push Notification service: HTTP/2 requests authenticated with an ES256 provider token.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::push::{self, Clock, Payload};
use super::{BoxFuture, Channel, Job, Outcome, SetupError};
use crate::config::ApnsConfig;

/// APNs refuses payloads larger than this (bytes).
pub const MAX_PAYLOAD: usize = 4096;

/// A provider token is replaced after this long (APNs accepts 20 to 60 minutes).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(40 * 60);

/// APNs collapse ids are at most this long (bytes).
const MAX_COLLAPSE_ID: usize = 64;

/// Namespace of the `apns-id` UUIDs (v5 over `outbox_id:device_id`).
const APNS_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x5a1b_0c4e_77d2_4f0e_9a63_1e2d_8c40_aa01);

/// The `apns` channel.
pub struct Apns {
    name: String,
    endpoint: String,
    topic: String,
    client: reqwest::Client,
    permits: Semaphore,
    tokens: ProviderTokens,
}

/// The ES256 provider token, minted from the `.p8` key and cached.
struct ProviderTokens {
    key: EncodingKey,
    key_id: String,
    team_id: String,
    clock: Arc<Clock>,
    /// The current token and when it was minted (Unix seconds).
    current: Mutex<Option<(Arc<str>, u64)>>,
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

impl ProviderTokens {
    /// The cached token, minted anew when it is older than [`TOKEN_LIFETIME`].
    fn get(&self) -> Result<Arc<str>, String> {
        let now = self.clock.now_unix();
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((token, minted)) = current.as_ref() {
            if now.saturating_sub(*minted) < TOKEN_LIFETIME.as_secs() {
                return Ok(token.clone());
            }
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = Claims {
            iss: &self.team_id,
            iat: now,
        };
        let token: Arc<str> = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|err| format!("apns: cannot sign the provider token: {err}"))?
            .into();
        *current = Some((token.clone(), now));
        Ok(token)
    }

    /// Drops `used` so the next request mints a new token (unless another task already has).
    fn expire(&self, used: &str) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|(token, _)| &**token == used) {
            *current = None;
        }
    }
}

/// One job rendered for APNs.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// The JSON body.
    pub body: String,
    /// `alert` or `background`.
    pub push_type: &'static str,
    /// 10 for alerts, 5 for background pushes.
    pub priority: u8,
    /// `apns-expiration` (Unix seconds), from the payload's `ttl`.
    pub expiration: Option<u64>,
    /// `apns-collapse-id`
    pub collapse_id: Option<String>,
    /// `apns-id`
    pub apns_id: String,
}

impl Apns {
    /// Builds the channel from its configuration.
    pub fn new(name: &str, cfg: &ApnsConfig) -> Result<Apns, SetupError> {
        Apns::with_clock(name, cfg, Clock::system())
    }

    /// Builds the channel with a clock for the provider token (tests advance it).
    pub fn with_clock(name: &str, cfg: &ApnsConfig, clock: Arc<Clock>) -> Result<Apns, SetupError> {
        let setup = |message: String| SetupError {
            name: name.to_owned(),
            message,
        };
        let pem = std::fs::read(&cfg.key_file).map_err(|err| {
            setup(format!(
                "cannot read key_file {}: {err}",
                cfg.key_file.display()
            ))
        })?;
        let key = EncodingKey::from_ec_pem(&pem).map_err(|err| {
            setup(format!(
                "key_file must be the .p8 (PKCS#8 P-256) key from Apple: {err}"
            ))
        })?;
        let client = super::http_client(
            name,
            cfg.ca_file.as_deref(),
            Duration::from_millis(cfg.timeout_ms),
            cfg.concurrency,
        )?;
        Ok(Apns {
            name: name.to_owned(),
            endpoint: cfg.endpoint.trim_end_matches('/').to_owned(),
            topic: cfg.topic.clone(),
            client,
            permits: Semaphore::new(cfg.concurrency.max(1)),
            tokens: ProviderTokens {
                key,
                key_id: cfg.key_id.clone(),
                team_id: cfg.team_id.clone(),
                clock: clock.clone(),
                current: Mutex::new(None),
            },
        })
    }

    async fn send_one(&self, job: &Job) -> Outcome {
        let notification = match render(job, self.tokens.clock.now_unix()) {
            Ok(n) => n,
            Err(reason) => return Outcome::Dead { reason },
        };
        let Ok(_permit) = self.permits.acquire().await else {
            return Outcome::Retry {
                reason: "apns: channel closed".to_owned(),
                after: None,
            };
        };

        // An expired provider token is replaced and the push sent again, once.
        let mut refreshed = false;
        loop {
            let token = match self.tokens.get() {
                Ok(token) => token,
                Err(reason) => {
                    tracing::error!(channel = %self.name, error = %reason, "apns provider token");
                    return Outcome::Dead { reason };
                }
            };
            let (status, headers, reason) = match self.post(job, &notification, &token).await {
                Ok(answer) => answer,
                Err(err) => return super::transport_error("apns", &err),
            };
            if status == 403 && reason.as_deref() == Some("ExpiredProviderToken") && !refreshed {
                tracing::info!(
                    channel = %self.name,
                    "apns provider token expired, minting a new one"
                );
                self.tokens.expire(&token);
                refreshed = true;
                continue;
            }
            let outcome = classify(status, reason.as_deref(), &headers, &notification.apns_id);
            self.log(job, status, reason.as_deref(), &outcome);
            return outcome;
        }
    }

    async fn post(
        &self,
        job: &Job,
        n: &Notification,
        token: &str,
    ) -> Result<(u16, reqwest::header::HeaderMap, Option<String>), reqwest::Error> {
        let url = format!("{}/3/device/{}", self.endpoint, job.address);
        let mut request = self
            .client
            .post(url)
            .version(reqwest::Version::HTTP_2)
            .header("authorization", format!("bearer {token}"))
            .header("apns-topic", &self.topic)
            .header("apns-push-type", n.push_type)
            .header("apns-priority", n.priority.to_string())
            .header("apns-id", &n.apns_id)
            .header("content-type", "application/json");
        if let Some(expiration) = n.expiration {
            request = request.header("apns-expiration", expiration.to_string());
        }
        if let Some(collapse_id) = &n.collapse_id {
            request = request.header("apns-collapse-id", collapse_id);
        }
        let response = request.body(n.body.clone()).send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap_or_default();
        let reason = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("reason").and_then(Value::as_str).map(str::to_owned));
        Ok((status, headers, reason))
    }

    fn log(&self, job: &Job, status: u16, reason: Option<&str>, outcome: &Outcome) {
        let device = push::token_hash(&job.address);
        let reason = reason.unwrap_or("");
        match outcome {
            Outcome::Gone { .. } => tracing::warn!(
                channel = %self.name, outbox_id = job.row.id, device, status, reason,
                "apns device token is gone, deactivating the device"
            ),
            Outcome::Dead { .. } if is_configuration_fault(reason) => tracing::error!(
                channel = %self.name, status, reason,
                "apns refused the channel's credentials or topic: check key_file, key_id, team_id and topic"
            ),
            Outcome::Retry { .. } => tracing::warn!(
                channel = %self.name, outbox_id = job.row.id, device, status, reason,
                "apns asked to retry"
            ),
            _ => {}
        }
    }
}

impl Channel for Apns {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "apns"
    }

    fn send<'a>(&'a self, jobs: &'a [Job]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(push::in_device_order(jobs, |job| self.send_one(job)))
    }
}

/// Renders a job: the `aps` dictionary from the common keys, `data` keys at the top level, the
/// `apns` override merged over the whole; `now` (Unix seconds) anchors `apns-expiration`.
pub fn render(job: &Job, now: u64) -> Result<Notification, String> {
    if !is_device_token(&job.address) {
        return Err("apns: device address is not a device token".to_owned());
    }
    let payload = Payload::parse(&job.row)?;

    let mut aps = Map::new();
    let alert = payload.is_alert();
    if alert {
        let mut fields = Map::new();
        for key in ["title", "body"] {
            if let Some(text) = payload.str(key) {
                fields.insert(key.to_owned(), Value::from(text));
            }
        }
        aps.insert("alert".to_owned(), Value::Object(fields));
    } else {
        aps.insert("content-available".to_owned(), json!(1));
    }
    for key in ["badge", "sound"] {
        if let Some(value) = payload.0.get(key) {
            aps.insert(key.to_owned(), value.clone());
        }
    }
    let mut body = payload.data();
    body.remove("aps");
    if let Some(url) = payload.str("url") {
        body.entry("url").or_insert_with(|| Value::from(url));
    }
    body.insert("aps".to_owned(), Value::Object(aps));
    if let Some(overrides) = payload.overrides("apns") {
        push::merge(&mut body, overrides);
    }

    let text = Value::Object(body).to_string();
    if text.len() > MAX_PAYLOAD {
        return Err(format!(
            "apns: payload is {} bytes, over the {MAX_PAYLOAD}-byte limit",
            text.len()
        ));
    }
    Ok(Notification {
        body: text,
        push_type: if alert { "alert" } else { "background" },
        priority: if alert { 10 } else { 5 },
        expiration: payload.ttl().map(|ttl| now + ttl),
        collapse_id: job.row.collapse_key.as_deref().map(collapse_id),
        apns_id: apns_id(job.row.id, job.device_id),
    })
}

/// The `apns-id` of a delivery: a UUID derived from `(outbox_id, device_id)`, so that a
/// repeat of the same delivery carries the same id.
pub fn apns_id(outbox_id: i64, device_id: i64) -> String {
    let name = format!("{outbox_id}:{device_id}");
    uuid::Uuid::new_v5(&APNS_ID_NAMESPACE, name.as_bytes())
        .hyphenated()
        .to_string()
        .to_uppercase()
}

/// The collapse key as an `apns-collapse-id`: as is up to 64 bytes, else its SHA-256 in hex
/// (64 characters), so distinct long keys stay distinct.
pub fn collapse_id(key: &str) -> String {
    if key.len() <= MAX_COLLAPSE_ID {
        return key.to_owned();
    }
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether an address looks like an APNs device token (hex, of a sane length).
/// Real tokens are hex; anything path-safe is passed on for APNs to judge (`BadDeviceToken`),
/// so only what could escape the `/3/device/` path is refused here.
fn is_device_token(address: &str) -> bool {
    (1..=200).contains(&address.len())
        && address
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// APNs reasons that mean the channel's configuration is wrong, not the push.
pub fn is_configuration_fault(reason: &str) -> bool {
    matches!(
        reason,
        "InvalidProviderToken"
            | "MissingProviderToken"
            | "BadCertificate"
            | "BadCertificateEnvironment"
            | "Forbidden"
            | "TopicDisallowed"
            | "BadTopic"
            | "MissingTopic"
    )
}

/// Maps an APNs answer (status and JSON `reason`) to an outcome.
pub fn classify(
    status: u16,
    reason: Option<&str>,
    headers: &reqwest::header::HeaderMap,
    apns_id: &str,
) -> Outcome {
    let reason_text = reason.unwrap_or("no reason given");
    match (status, reason) {
        (200, _) => {
            let id = headers
                .get("apns-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or(apns_id);
            Outcome::Sent {
                provider_ref: Some(id.to_owned()),
            }
        }
        (410, _) => Outcome::Gone {
            reason: format!("apns: {}", reason.unwrap_or("Unregistered")),
        },
        (400, Some(r @ ("BadDeviceToken" | "DeviceTokenNotForTopic"))) => Outcome::Gone {
            reason: format!("apns: {r}"),
        },
        (429 | 500..=599, _) | (403, Some("ExpiredProviderToken")) => Outcome::Retry {
            reason: format!("apns: HTTP {status} {reason_text}"),
            after: super::retry_after(headers),
        },
        _ => Outcome::Dead {
            reason: format!("apns: HTTP {status} {reason_text}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::outbox::OutboxRow;

    const TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

    fn job(payload: &str, collapse_key: Option<&str>) -> Job {
        Job {
            row: Arc::new(OutboxRow {
                id: 42,
                topic: "order.shipped".to_owned(),
                recipient: "u1".to_owned(),
                payload: Arc::from(payload),
                channels: None,
                collapse_key: collapse_key.map(str::to_owned),
                created_at: "2026-12-03T18:40:00Z".to_owned(),
                commit_lsn: Lsn(1),
            }),
            device_id: 9,
            address: Arc::from(TOKEN),
        }
    }

    #[test]
    fn alert_rendering_puts_data_at_the_top_and_merges_the_override() {
        let payload = r#"{"title":"Shipped","body":"Order 7","badge":3,"sound":"default",
            "data":{"order":7},"ttl":60,"apns":{"aps":{"mutable-content":1},"extra":"x"}}"#;
        let n = render(&job(payload, Some("order-7")), 1_000).unwrap();
        let body: Value = serde_json::from_str(&n.body).unwrap();
        assert_eq!(
            body["aps"]["alert"],
            json!({"title": "Shipped", "body": "Order 7"})
        );
        assert_eq!(body["aps"]["badge"], 3);
        assert_eq!(body["aps"]["sound"], "default");
        assert_eq!(body["aps"]["mutable-content"], 1);
        assert_eq!(body["order"], 7);
        assert_eq!(body["extra"], "x");
        assert_eq!((n.push_type, n.priority), ("alert", 10));
        assert_eq!(n.expiration, Some(1_060));
        assert_eq!(n.collapse_id.as_deref(), Some("order-7"));
    }

    #[test]
    fn payload_without_title_or_body_is_a_background_push() {
        let n = render(&job(r#"{"data":{"sync":true}}"#, None), 0).unwrap();
        let body: Value = serde_json::from_str(&n.body).unwrap();
        assert_eq!(body["aps"], json!({"content-available": 1}));
        assert_eq!((n.push_type, n.priority), ("background", 5));
        assert_eq!(n.expiration, None);
    }

    #[test]
    fn unrenderable_jobs_are_refused_with_a_reason() {
        let big = format!(r#"{{"body":"{}"}}"#, "x".repeat(MAX_PAYLOAD));
        assert!(render(&job(&big, None), 0)
            .unwrap_err()
            .contains("over the 4096-byte limit"));
        assert!(render(&job("[1]", None), 0)
            .unwrap_err()
            .contains("not a JSON object"));
        let mut bad = job("{}", None);
        bad.address = Arc::from("../../etc/passwd");
        assert!(render(&bad, 0).unwrap_err().contains("not a device token"));
    }

    #[test]
    fn apns_id_is_a_stable_uuid_per_delivery() {
        let id = apns_id(42, 9);
        assert_eq!(id, apns_id(42, 9));
        assert_ne!(id, apns_id(42, 10));
        assert_ne!(id, apns_id(4, 29));
        assert!(uuid::Uuid::parse_str(&id).is_ok());
    }

    #[test]
    fn long_collapse_keys_are_hashed_to_64_bytes() {
        let long = "k".repeat(100);
        assert_eq!(collapse_id(&long).len(), 64);
        assert_ne!(collapse_id(&long), collapse_id(&"k".repeat(101)));
    }

    #[test]
    fn answers_map_to_outcomes() {
        let none = reqwest::header::HeaderMap::new();
        let c = |status, reason| classify(status, reason, &none, "ID");
        assert_eq!(
            c(200, None),
            Outcome::Sent {
                provider_ref: Some("ID".to_owned())
            }
        );
        assert_eq!(
            c(410, Some("Unregistered")),
            Outcome::Gone {
                reason: "apns: Unregistered".into()
            }
        );
        assert!(matches!(
            c(400, Some("BadDeviceToken")),
            Outcome::Gone { .. }
        ));
        assert!(matches!(
            c(400, Some("DeviceTokenNotForTopic")),
            Outcome::Gone { .. }
        ));
        assert!(matches!(
            c(429, Some("TooManyRequests")),
            Outcome::Retry { .. }
        ));
        assert!(matches!(c(503, None), Outcome::Retry { .. }));
        assert!(matches!(
            c(403, Some("ExpiredProviderToken")),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            c(403, Some("InvalidProviderToken")),
            Outcome::Dead { .. }
        ));
        assert!(matches!(
            c(400, Some("PayloadTooLarge")),
            Outcome::Dead { .. }
        ));
        assert!(is_configuration_fault("BadCertificate"));
        assert!(!is_configuration_fault("BadDeviceToken"));
    }
}
