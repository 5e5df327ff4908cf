//! Firebase Cloud Messaging HTTP v1: `messages:send` with an OAuth2 access token from a
//! service account.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Map, Value};
use tokio::sync::{Mutex, Semaphore};

use super::push::{self, Clock, Payload};
use super::{BoxFuture, Channel, Job, Outcome, SetupError};
use crate::config::FcmConfig;

/// The OAuth2 scope FCM requires.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// FCM refuses messages whose notification and data exceed this (bytes).
pub const MAX_PAYLOAD: usize = 4096;

/// An access token is replaced this long before the expiry the token endpoint announced.
const REFRESH_MARGIN_SECS: u64 = 300;

/// Lifetime asked for in the JWT assertion (Google's maximum).
const ASSERTION_LIFETIME_SECS: u64 = 3600;

/// The fields of a service-account JSON file walpush uses.
#[derive(serde::Deserialize)]
struct ServiceAccount {
    client_email: String,
    private_key: String,
    token_uri: String,
    project_id: String,
}

/// The `fcm` channel.
pub struct Fcm {
    name: String,
    send_url: String,
    client: reqwest::Client,
    permits: Semaphore,
    tokens: AccessTokens,
}

/// OAuth2 access tokens from the JWT bearer grant, cached until shortly before they expire.
struct AccessTokens {
    key: EncodingKey,
    client_email: String,
    token_uri: String,
    clock: Arc<Clock>,
    /// The current token and its expiry (Unix seconds). The lock is held while fetching, so
    /// concurrent sends wait for one fetch instead of starting their own.
    current: Mutex<Option<(Arc<str>, u64)>>,
}

#[derive(serde::Serialize)]
struct GrantClaims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

/// Why no access token could be had.
#[derive(Debug, thiserror::Error)]
enum TokenError {
    /// Worth trying again later (network, 5xx).
    #[error("fcm: access token request failed: {0}")]
    Transient(String),
    /// The credentials are refused; an operator must act.
    #[error("fcm: service account refused by the token endpoint: {0}")]
    Refused(String),
}

impl AccessTokens {
    async fn get(&self, client: &reqwest::Client) -> Result<Arc<str>, TokenError> {
        let mut current = self.current.lock().await;
        let now = self.clock.now_unix();
        if let Some((token, expires)) = current.as_ref() {
            if now + REFRESH_MARGIN_SECS < *expires {
                return Ok(token.clone());
            }
        }
        let (token, lifetime) = self.fetch(client, now).await?;
        *current = Some((token.clone(), now + lifetime));
        Ok(token)
    }

    /// Drops `used` so the next send fetches a new token (unless another task already has).
    async fn expire(&self, used: &str) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|(token, _)| &**token == used) {
            *current = None;
        }
    }

    async fn fetch(
        &self,
        client: &reqwest::Client,
        now: u64,
    ) -> Result<(Arc<str>, u64), TokenError> {
        let claims = GrantClaims {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &self.token_uri,
            iat: now,
            exp: now + ASSERTION_LIFETIME_SECS,
        };
        let assertion = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map_err(|err| TokenError::Refused(format!("cannot sign the assertion: {err}")))?;
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let response = client
            .post(&self.token_uri)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(|err| TokenError::Transient(transport_kind(&err).to_owned()))?;
        let status = response.status().as_u16();
        let body = response.bytes().await.unwrap_or_default();
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status != 200 {
            let error = value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no error given");
            let what = format!("HTTP {status} {}", push::clip(error, 100));
            return Err(if status == 429 || status >= 500 {
                TokenError::Transient(what)
            } else {
                TokenError::Refused(what)
            });
        }
        let token = value.get("access_token").and_then(Value::as_str);
        let lifetime = value
            .get("expires_in")
            .and_then(Value::as_u64)
            .unwrap_or(3600);
        match token {
            Some(token) if !token.is_empty() => Ok((Arc::from(token), lifetime)),
            _ => Err(TokenError::Transient(
                "answer without access_token".to_owned(),
            )),
        }
    }
}

fn transport_kind(err: &reqwest::Error) -> &'static str {
    if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "connection failed"
    } else {
        "request failed"
    }
}

impl Fcm {
    /// Builds the channel from its configuration.
    pub fn new(name: &str, cfg: &FcmConfig) -> Result<Fcm, SetupError> {
        Fcm::with_clock(name, cfg, Clock::system())
    }

    /// Builds the channel with a clock for access-token expiry (tests advance it).
    pub fn with_clock(name: &str, cfg: &FcmConfig, clock: Arc<Clock>) -> Result<Fcm, SetupError> {
        let setup = |message: String| SetupError {
            name: name.to_owned(),
            message,
        };
        let file = &cfg.service_account_file;
        let text = std::fs::read(file).map_err(|err| {
            setup(format!(
                "cannot read service_account_file {}: {err}",
                file.display()
            ))
        })?;
        let account: ServiceAccount = serde_json::from_slice(&text).map_err(|err| {
            setup(format!(
                "service_account_file must be a service-account JSON key with client_email, \
                 private_key, token_uri and project_id: {err}"
            ))
        })?;
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes()).map_err(|err| {
            setup(format!(
                "service_account_file: private_key is not an RSA PEM key: {err}"
            ))
        })?;
        let client = super::http_client(
            name,
            cfg.ca_file.as_deref(),
            Duration::from_millis(cfg.timeout_ms),
            cfg.concurrency,
        )?;
        Ok(Fcm {
            name: name.to_owned(),
            send_url: format!(
                "{}/v1/projects/{}/messages:send",
                cfg.endpoint.trim_end_matches('/'),
                account.project_id
            ),
            client,
            permits: Semaphore::new(cfg.concurrency.max(1)),
            tokens: AccessTokens {
                key,
                client_email: account.client_email,
                token_uri: account.token_uri,
                clock,
                current: Mutex::new(None),
            },
        })
    }

    async fn send_one(&self, job: &Job) -> Outcome {
        let message = match render(job) {
            Ok(message) => message,
            Err(reason) => return Outcome::Dead { reason },
        };
        let Ok(_permit) = self.permits.acquire().await else {
            return Outcome::Retry {
                reason: "fcm: channel closed".to_owned(),
                after: None,
            };
        };

        // A 401 means the access token was revoked or expired early: fetch a new one and send
        // again, once.
        let mut refreshed = false;
        loop {
            let token = match self.tokens.get(&self.client).await {
                Ok(token) => token,
                Err(err @ TokenError::Transient(_)) => {
                    tracing::warn!(channel = %self.name, error = %err, "fcm access token");
                    return Outcome::Retry {
                        reason: err.to_string(),
                        after: None,
                    };
                }
                Err(err @ TokenError::Refused(_)) => {
                    tracing::error!(
                        channel = %self.name, error = %err,
                        "fcm access token refused: check service_account_file"
                    );
                    return Outcome::Dead {
                        reason: err.to_string(),
                    };
                }
            };
            let response = self
                .client
                .post(&self.send_url)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(message.clone())
                .send()
                .await;
            let response = match response {
                Ok(response) => response,
                Err(err) => return super::transport_error("fcm", &err),
            };
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response.bytes().await.unwrap_or_default();
            if status == 401 && !refreshed {
                tracing::info!(
                    channel = %self.name,
                    "fcm access token rejected, fetching a new one"
                );
                self.tokens.expire(&token).await;
                refreshed = true;
                continue;
            }
            let answer = Answer::parse(&body);
            let outcome = classify(status, &answer, &headers);
            self.log(job, status, &answer, &outcome);
            return outcome;
        }
    }

    fn log(&self, job: &Job, status: u16, answer: &Answer, outcome: &Outcome) {
        let device = push::token_hash(&job.address);
        let code = answer.code.as_deref().unwrap_or("");
        match outcome {
            Outcome::Gone { .. } => tracing::warn!(
                channel = %self.name, outbox_id = job.row.id, device, status, code,
                "fcm registration token is gone, deactivating the device"
            ),
            Outcome::Dead { .. }
                if matches!(status, 401 | 403) || code == "THIRD_PARTY_AUTH_ERROR" =>
            {
                tracing::error!(
                    channel = %self.name, status, code,
                    "fcm refused the channel's credentials: check the service account's project \
                     and its firebase messaging permission"
                )
            }
            Outcome::Retry { .. } => tracing::warn!(
                channel = %self.name, outbox_id = job.row.id, device, status, code,
                "fcm asked to retry"
            ),
            _ => {}
        }
    }
}

impl Channel for Fcm {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "fcm"
    }

    fn send<'a>(&'a self, jobs: &'a [Job]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(push::in_device_order(jobs, |job| self.send_one(job)))
    }
}

/// Renders a job as the `messages:send` body: `{"message": {token, notification, data,
/// android}}` with the `fcm` override merged into `message`.
pub fn render(job: &Job) -> Result<String, String> {
    let token = &*job.address;
    if token.is_empty() || token.len() > 4096 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("fcm: device address is not a registration token".to_owned());
    }
    let payload = Payload::parse(&job.row)?;

    let mut message = Map::new();
    message.insert("token".to_owned(), Value::from(token));
    let mut notification = Map::new();
    for key in ["title", "body"] {
        if let Some(text) = payload.str(key) {
            notification.insert(key.to_owned(), Value::from(text));
        }
    }
    if !notification.is_empty() {
        message.insert("notification".to_owned(), Value::Object(notification));
    }

    // FCM data values must be strings: other JSON values travel as their JSON text.
    let mut data = Map::new();
    for (key, value) in payload.data() {
        let text = match value {
            Value::String(s) => s,
            other => other.to_string(),
        };
        data.insert(key, Value::String(text));
    }
    if let Some(url) = payload.str("url") {
        data.entry("url").or_insert_with(|| Value::from(url));
    }
    if !data.is_empty() {
        message.insert("data".to_owned(), Value::Object(data));
    }

    let mut android = Map::new();
    let priority = if payload.is_alert() { "high" } else { "normal" };
    android.insert("priority".to_owned(), Value::from(priority));
    if let Some(key) = &job.row.collapse_key {
        android.insert("collapse_key".to_owned(), Value::from(key.as_str()));
    }
    if let Some(ttl) = payload.ttl() {
        android.insert("ttl".to_owned(), Value::from(format!("{ttl}s")));
    }
    if let Some(sound) = payload.str("sound") {
        android.insert("notification".to_owned(), json!({ "sound": sound }));
    }
    message.insert("android".to_owned(), Value::Object(android));
    if let Some(overrides) = payload.overrides("fcm") {
        push::merge(&mut message, overrides);
    }

    let size: usize = ["notification", "data"]
        .iter()
        .filter_map(|key| message.get(*key))
        .map(|value| value.to_string().len())
        .sum();
    if size > MAX_PAYLOAD {
        return Err(format!(
            "fcm: payload is {size} bytes, over the {MAX_PAYLOAD}-byte limit"
        ));
    }
    Ok(json!({ "message": message }).to_string())
}

/// What FCM said, from its JSON answer.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Answer {
    /// `name` of a sent message: `projects/*/messages/*`.
    pub name: Option<String>,
    /// `error.details[].errorCode`
    pub code: Option<String>,
    /// `error.status`
    pub status: Option<String>,
    /// `error.message`
    pub message: Option<String>,
}

impl Answer {
    /// Reads an answer body; anything unreadable is an empty answer.
    pub fn parse(body: &[u8]) -> Answer {
        let Ok(value) = serde_json::from_slice::<Value>(body) else {
            return Answer::default();
        };
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let error = value.get("error");
        let code = error
            .and_then(|e| e.get("details"))
            .and_then(Value::as_array)
            .and_then(|details| details.iter().find_map(|d| text(d.get("errorCode"))));
        Answer {
            name: text(value.get("name")),
            code,
            status: text(error.and_then(|e| e.get("status"))),
            message: text(error.and_then(|e| e.get("message"))),
        }
    }
}

/// Maps an FCM answer to an outcome.
pub fn classify(status: u16, answer: &Answer, headers: &reqwest::header::HeaderMap) -> Outcome {
    if status == 200 {
        return Outcome::Sent {
            provider_ref: answer.name.clone(),
        };
    }
    let code = answer
        .code
        .as_deref()
        .or(answer.status.as_deref())
        .unwrap_or("");
    let reason = match &answer.message {
        Some(message) => format!("fcm: {code}: {}", push::clip(message, 200)),
        None if code.is_empty() => format!("fcm: HTTP {status}"),
        None => format!("fcm: {code}"),
    };
    match code {
        "UNREGISTERED" | "SENDER_ID_MISMATCH" => Outcome::Gone {
            reason: format!("fcm: {code}"),
        },
        "QUOTA_EXCEEDED" | "UNAVAILABLE" | "INTERNAL" => Outcome::Retry {
            reason,
            after: super::retry_after(headers),
        },
        _ if status == 429 || status >= 500 || status == 401 => Outcome::Retry {
            reason,
            after: super::retry_after(headers),
        },
        _ => Outcome::Dead { reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::outbox::OutboxRow;

    fn job(payload: &str) -> Job {
        Job {
            row: Arc::new(OutboxRow {
                id: 5,
                topic: "chat.message".to_owned(),
                recipient: "u1".to_owned(),
                payload: Arc::from(payload),
                channels: None,
                collapse_key: Some("chat-1".to_owned()),
                created_at: "2026-12-03T18:40:00Z".to_owned(),
                commit_lsn: Lsn(1),
            }),
            device_id: 2,
            address: Arc::from("fcm-token:APA91b"),
        }
    }

    #[test]
    fn message_has_token_notification_string_data_and_android_options() {
        let payload = r#"{"title":"Hi","body":"there","data":{"n":1,"s":"x","o":{"a":true}},
            "ttl":30,"fcm":{"android":{"priority":"normal"},
            "fcm_options":{"analytics_label":"l"}}}"#;
        let value: Value = serde_json::from_str(&render(&job(payload)).unwrap()).unwrap();
        let m = &value["message"];
        assert_eq!(m["token"], "fcm-token:APA91b");
        assert_eq!(m["notification"], json!({"title": "Hi", "body": "there"}));
        assert_eq!(m["data"], json!({"n": "1", "s": "x", "o": "{\"a\":true}"}));
        assert_eq!(
            m["android"],
            json!({"collapse_key": "chat-1", "ttl": "30s", "priority": "normal"})
        );
        assert_eq!(m["fcm_options"]["analytics_label"], "l");
    }

    #[test]
    fn unrenderable_jobs_are_refused_with_a_reason() {
        let big = format!(r#"{{"body":"{}"}}"#, "x".repeat(MAX_PAYLOAD));
        assert!(render(&job(&big))
            .unwrap_err()
            .contains("over the 4096-byte limit"));
        assert!(render(&job("\"text\""))
            .unwrap_err()
            .contains("not a JSON object"));
        let mut bad = job("{}");
        bad.address = Arc::from("has space");
        assert!(render(&bad)
            .unwrap_err()
            .contains("not a registration token"));
    }

    #[test]
    fn error_codes_map_to_outcomes() {
        let none = reqwest::header::HeaderMap::new();
        let answer = |code: &str| {
            let body = json!({"error": {"code": 404, "status": "NOT_FOUND", "message": "gone",
                "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                             "errorCode": code}]}});
            Answer::parse(body.to_string().as_bytes())
        };
        let sent = Answer::parse(br#"{"name":"projects/p/messages/1"}"#);
        assert_eq!(
            classify(200, &sent, &none),
            Outcome::Sent {
                provider_ref: Some("projects/p/messages/1".to_owned())
            }
        );
        assert_eq!(
            classify(404, &answer("UNREGISTERED"), &none),
            Outcome::Gone {
                reason: "fcm: UNREGISTERED".to_owned()
            }
        );
        assert!(matches!(
            classify(403, &answer("SENDER_ID_MISMATCH"), &none),
            Outcome::Gone { .. }
        ));
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("retry-after", "12".parse().unwrap());
        assert!(matches!(
            classify(429, &answer("QUOTA_EXCEEDED"), &headers),
            Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(12)
        ));
        assert!(matches!(
            classify(503, &answer("UNAVAILABLE"), &none),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            classify(500, &Answer::default(), &none),
            Outcome::Retry { .. }
        ));
        let dead = classify(400, &answer("INVALID_ARGUMENT"), &none);
        assert_eq!(
            dead,
            Outcome::Dead {
                reason: "fcm: INVALID_ARGUMENT: gone".to_owned()
            }
        );
    }
}
