//! Signed webhooks (Standard Webhooks): one event, or an array of events per request.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::{BoxFuture, Channel, Job, Outcome, SetupError};
use crate::config::WebhookConfig;

/// The `webhook` channel.
pub struct Webhook {
    name: String,
    key: Vec<u8>,
    max_events: usize,
    client: reqwest::Client,
    permits: Arc<Semaphore>,
}

impl Webhook {
    /// Builds the channel from its configuration.
    pub fn new(name: &str, cfg: &WebhookConfig) -> Result<Webhook, SetupError> {
        let key = secret_key(&cfg.secret).ok_or_else(|| SetupError {
            name: name.to_owned(),
            message: "secret must be whsec_ followed by base64".to_owned(),
        })?;
        let client = super::http_client(
            name,
            cfg.ca_file.as_deref(),
            Duration::from_millis(cfg.timeout_ms),
            cfg.concurrency,
        )?;
        Ok(Webhook {
            name: name.to_owned(),
            key,
            max_events: cfg.max_events_per_request.max(1),
            client,
            permits: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
        })
    }

    async fn send_all(&self, jobs: &[Job]) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; jobs.len()];

        // Render every event; a job that cannot be rendered is dead on its own.
        // Addresses repeat across a batch (one per device): each is parsed once, not per event.
        let mut by_url: HashMap<&str, Vec<(usize, String)>> = HashMap::new();
        let mut checked: HashMap<&str, Result<(), String>> = HashMap::new();
        for (index, job) in jobs.iter().enumerate() {
            let rendered = render_event(job).and_then(|event| {
                let address = checked
                    .entry(&job.address)
                    .or_insert_with(|| check_address(&job.address));
                address.clone().map(|()| event)
            });
            match rendered {
                Ok(event) => by_url.entry(&job.address).or_default().push((index, event)),
                Err(reason) => outcomes[index] = Some(Outcome::Dead { reason }),
            }
        }

        // One request per chunk of `max_events` events. Chunks to one URL go one after the
        // other, so a device receives its deliveries in commit order; URLs go at once, within
        // the channel's concurrency limit.
        let per_url = by_url.into_iter().map(|(url, events)| async move {
            let mut results = Vec::with_capacity(events.len());
            for chunk in events.chunks(self.max_events) {
                let outcome = self.post(url, jobs, chunk).await;
                results.extend(chunk.iter().map(|(index, _)| (*index, outcome.clone())));
            }
            results
        });
        for results in futures_util::future::join_all(per_url).await {
            for (index, outcome) in results {
                outcomes[index] = Some(outcome);
            }
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or(Outcome::Dead {
                    reason: "webhook: not sent".to_owned(),
                })
            })
            .collect()
    }

    async fn post(&self, url: &str, jobs: &[Job], chunk: &[(usize, String)]) -> Outcome {
        let (id, body) = if self.max_events == 1 {
            let (index, event) = &chunk[0];
            (jobs[*index].idempotency_id(), event.clone())
        } else {
            let ids: Vec<String> = chunk
                .iter()
                .map(|(i, _)| jobs[*i].idempotency_id())
                .collect();
            let events: Vec<&str> = chunk.iter().map(|(_, e)| e.as_str()).collect();
            (batch_id(&ids), format!("[{}]", events.join(",")))
        };
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let signature = sign(&self.key, &id, timestamp, body.as_bytes());

        let Ok(_permit) = self.permits.acquire().await else {
            return Outcome::Retry {
                reason: "webhook: channel closed".to_owned(),
                after: None,
            };
        };
        let response = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        match response {
            Ok(response) => classify(response.status().as_u16(), response.headers()),
            Err(err) => super::transport_error("webhook", &err),
        }
    }
}

impl Channel for Webhook {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn send<'a>(&'a self, jobs: &'a [Job]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(self.send_all(jobs))
    }

    fn destination(&self, job: &Job) -> String {
        url::Url::parse(&job.address)
            .map(|url| url.origin().ascii_serialization())
            .unwrap_or_default()
    }
}

/// Maps an HTTP status to an outcome, as the design says for webhooks.
pub fn classify(status: u16, headers: &reqwest::header::HeaderMap) -> Outcome {
    match status {
        200..=299 => Outcome::Sent { provider_ref: None },
        410 => Outcome::Gone {
            reason: "webhook: 410".to_owned(),
        },
        408 | 429 | 500..=599 => Outcome::Retry {
            reason: format!("webhook: HTTP {status}"),
            after: super::retry_after(headers),
        },
        _ => Outcome::Dead {
            reason: format!("webhook: HTTP {status}"),
        },
    }
}

/// The event JSON of the design: `{"id", "type", "timestamp", "recipient", "lsn", "data"}`.
pub fn render(job: &Job) -> Result<String, String> {
    let event = render_event(job)?;
    check_address(&job.address)?;
    Ok(event)
}

/// Whether a device address is an http(s) URL a request can go to.
fn check_address(address: &str) -> Result<(), String> {
    let scheme_ok = address.starts_with("https://") || address.starts_with("http://");
    if !scheme_ok || url::Url::parse(address).is_err() {
        return Err("webhook: device address is not an http(s) URL".to_owned());
    }
    Ok(())
}

/// The event JSON of one job, without looking at its address.
fn render_event(job: &Job) -> Result<String, String> {
    let row = &job.row;
    if !row.payload_is_object() {
        return Err("payload is not a JSON object".to_owned());
    }
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
    Ok(format!(
        r#"{{"id":"{}","type":{},"timestamp":{},"recipient":{},"lsn":"{}","data":{}}}"#,
        row.id,
        quote(&row.topic),
        quote(&row.created_at),
        quote(&row.recipient),
        row.commit_lsn,
        row.payload
    ))
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac accepts any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The key bytes of a `whsec_` secret.
pub fn secret_key(secret: &str) -> Option<Vec<u8>> {
    let encoded = secret.strip_prefix("whsec_")?;
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()
}

/// The `webhook-id` of a request carrying several events: derived from their ids, so the
/// same group is recognisable when retried.
fn batch_id(ids: &[String]) -> String {
    let mut hasher = Sha256::new();
    for id in ids {
        hasher.update(id.as_bytes());
        hasher.update(b"\n");
    }
    let digest = hasher.finalize();
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("msg_batch_{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::outbox::OutboxRow;

    fn job(payload: &str, address: &str) -> Job {
        Job {
            row: Arc::new(OutboxRow {
                id: 7,
                topic: "order.shipped".to_owned(),
                recipient: "u\"1".to_owned(),
                payload: Arc::from(payload),
                channels: None,
                collapse_key: None,
                created_at: "2026-12-03T18:40:00.000000Z".to_owned(),
                commit_lsn: Lsn(0x16B3748),
            }),
            device_id: 3,
            address: Arc::from(address),
        }
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification.
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn event_json_has_the_design_fields() {
        let event = render(&job(r#"{"title": "hi"}"#, "http://127.0.0.1:1/x")).unwrap();
        let value: serde_json::Value = serde_json::from_str(&event).unwrap();
        assert_eq!(value["id"], "7");
        assert_eq!(value["type"], "order.shipped");
        assert_eq!(value["recipient"], "u\"1");
        assert_eq!(value["lsn"], "0/16B3748");
        assert_eq!(value["timestamp"], "2026-12-03T18:40:00.000000Z");
        assert_eq!(value["data"]["title"], "hi");
    }

    #[test]
    fn non_object_payload_is_refused_with_a_reason() {
        let err = render(&job("[1,2]", "http://127.0.0.1:1/x")).unwrap_err();
        assert!(err.contains("not a JSON object"));
        let err = render(&job("{}", "ftp://x")).unwrap_err();
        assert!(err.contains("not an http(s) URL"));
    }

    #[test]
    fn statuses_map_to_outcomes() {
        let none = reqwest::header::HeaderMap::new();
        assert_eq!(classify(204, &none), Outcome::Sent { provider_ref: None });
        assert!(matches!(classify(410, &none), Outcome::Gone { .. }));
        assert!(matches!(classify(400, &none), Outcome::Dead { .. }));
        assert!(matches!(classify(404, &none), Outcome::Dead { .. }));
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("retry-after", "7".parse().unwrap());
        assert_eq!(
            classify(429, &headers),
            Outcome::Retry {
                reason: "webhook: HTTP 429".to_owned(),
                after: Some(Duration::from_secs(7))
            }
        );
        assert!(matches!(
            classify(503, &none),
            Outcome::Retry { after: None, .. }
        ));
        assert!(matches!(classify(408, &none), Outcome::Retry { .. }));
    }

    #[test]
    fn batch_ids_are_stable_and_distinct() {
        let a = batch_id(&["msg_1_1".to_owned(), "msg_2_1".to_owned()]);
        assert_eq!(a, batch_id(&["msg_1_1".to_owned(), "msg_2_1".to_owned()]));
        assert_ne!(a, batch_id(&["msg_1_1".to_owned(), "msg_3_1".to_owned()]));
    }
}
