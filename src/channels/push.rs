//! Shared pieces of the device channels (APNs, FCM, Web Push): payload conventions and time.
//!
//! DESIGN §1: a payload is a JSON object with the common keys `title`, `body`, `data`, `badge`,
//! `sound`, `url` and `ttl`, and one object per channel kind whose keys are merged over the
//! common rendering for that kind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::channels::Outcome;
use crate::outbox::OutboxRow;

/// A payload, parsed once per job.
#[derive(Debug, Clone)]
pub struct Payload(pub Map<String, Value>);

impl Payload {
    /// Parses a row's payload; anything but a JSON object is refused with a reason.
    pub fn parse(row: &OutboxRow) -> Result<Payload, String> {
        match serde_json::from_str::<Value>(&row.payload) {
            Ok(Value::Object(map)) => Ok(Payload(map)),
            Ok(_) => Err("payload is not a JSON object".to_owned()),
            Err(_) => Err("payload is not valid JSON".to_owned()),
        }
    }

    /// A common key holding a string.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(Value::as_str)
    }

    /// Whether the payload shows something to a person (a `title` or a `body`).
    pub fn is_alert(&self) -> bool {
        self.str("title").is_some() || self.str("body").is_some()
    }

    /// The common `data` object, empty when absent or not an object.
    pub fn data(&self) -> Map<String, Value> {
        match self.0.get("data") {
            Some(Value::Object(map)) => map.clone(),
            _ => Map::new(),
        }
    }

    /// The `ttl` key in whole seconds, when it is a non-negative number.
    pub fn ttl(&self) -> Option<u64> {
        let ttl = self.0.get("ttl")?;
        ttl.as_u64()
            .or_else(|| ttl.as_f64().filter(|t| *t >= 0.0).map(|t| t as u64))
    }

    /// The override object for a channel kind (`apns`, `fcm`, `webpush`), if any.
    pub fn overrides(&self, kind: &str) -> Option<&Map<String, Value>> {
        self.0.get(kind).and_then(Value::as_object)
    }
}

/// Merges `overrides` into `base`: objects merge key by key, a `null` removes the key, any
/// other value replaces what was there.
pub fn merge(base: &mut Map<String, Value>, overrides: &Map<String, Value>) {
    for (key, value) in overrides {
        match (base.get_mut(key), value) {
            (_, Value::Null) => {
                base.remove(key);
            }
            (Some(Value::Object(inner)), Value::Object(over)) => merge(inner, over),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// A short, stable, non-reversible name for a device token, for logs.
pub fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// The first `max` bytes of `text`, cut at a character boundary, for provider messages kept
/// in `last_error`.
pub fn clip(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Wall-clock time as the credentials see it: the system clock, plus a skew tests can advance
/// to expire cached tokens without waiting.
#[derive(Debug, Default)]
pub struct Clock {
    skew_secs: AtomicU64,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Arc<Clock> {
        Arc::new(Clock::default())
    }

    /// Seconds since the Unix epoch.
    pub fn now_unix(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        now + self.skew_secs.load(Ordering::Relaxed)
    }

    /// Moves this clock forward (tests).
    pub fn advance(&self, by: Duration) {
        self.skew_secs.fetch_add(by.as_secs(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_replaces_merges_and_removes() {
        let mut base = json!({"a": 1, "o": {"x": 1, "y": 2}, "gone": true});
        let over = json!({"a": 2, "o": {"y": 3, "z": 4}, "gone": null, "new": "n"});
        merge(base.as_object_mut().unwrap(), over.as_object().unwrap());
        assert_eq!(
            base,
            json!({"a": 2, "o": {"x": 1, "y": 3, "z": 4}, "new": "n"})
        );
    }

    #[test]
    fn clip_respects_char_boundaries() {
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(clip("héllo", 3), "hé");
        assert_eq!(clip("abc", 10), "abc");
    }

    #[test]
    fn token_hash_is_short_and_stable() {
        assert_eq!(token_hash("abc").len(), 8);
        assert_eq!(token_hash("abc"), token_hash("abc"));
        assert_ne!(token_hash("abc"), token_hash("abd"));
    }

    #[test]
    fn clock_advances() {
        let clock = Clock::default();
        let before = clock.now_unix();
        clock.advance(Duration::from_secs(3600));
        assert!(clock.now_unix() >= before + 3600);
    }
}

/// Sends every job with `send_one`: jobs to one device address one after the other, in the
/// order given (commit order), and different devices at once. Outcomes come back in job order.
pub async fn in_device_order<'a, F, Fut>(
    jobs: &'a [crate::channels::Job],
    send_one: F,
) -> Vec<Outcome>
where
    F: Fn(&'a crate::channels::Job) -> Fut,
    Fut: std::future::Future<Output = Outcome>,
{
    let mut by_address: std::collections::HashMap<&str, Vec<usize>> = Default::default();
    for (index, job) in jobs.iter().enumerate() {
        by_address.entry(&job.address).or_default().push(index);
    }
    let per_device = by_address.into_values().map(|indexes| {
        let send_one = &send_one;
        async move {
            let mut results = Vec::with_capacity(indexes.len());
            for index in indexes {
                results.push((index, send_one(&jobs[index]).await));
            }
            results
        }
    });
    let mut outcomes: Vec<Option<Outcome>> = vec![None; jobs.len()];
    for results in futures_util::future::join_all(per_device).await {
        for (index, outcome) in results {
            outcomes[index] = Some(outcome);
        }
    }
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or(Outcome::Dead {
                reason: "not sent".to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod order_tests {
    use std::sync::Mutex;

    use super::*;
    use crate::channels::Job;
    use crate::lsn::Lsn;

    fn job(id: i64, address: &str) -> Job {
        Job {
            row: Arc::new(OutboxRow {
                id,
                topic: String::new(),
                recipient: String::new(),
                payload: Arc::from("{}"),
                channels: None,
                collapse_key: None,
                created_at: String::new(),
                commit_lsn: Lsn(0),
            }),
            device_id: 0,
            address: Arc::from(address),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_device_in_order_devices_at_once() {
        let jobs = [job(1, "a"), job(2, "b"), job(3, "a"), job(4, "b")];
        let log = Mutex::new(Vec::new());
        let outcomes = in_device_order(&jobs, |job| {
            let log = &log;
            async move {
                log.lock().unwrap().push(format!("start {}", job.row.id));
                // The first job to each device is the slow one.
                let slow = job.row.id <= 2;
                tokio::time::sleep(Duration::from_millis(if slow { 50 } else { 1 })).await;
                log.lock().unwrap().push(format!("end {}", job.row.id));
                Outcome::Sent {
                    provider_ref: Some(job.row.id.to_string()),
                }
            }
        })
        .await;
        let refs: Vec<String> = outcomes
            .into_iter()
            .map(|o| match o {
                Outcome::Sent { provider_ref } => provider_ref.unwrap(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(refs, ["1", "2", "3", "4"], "outcomes in job order");
        let log = log.into_inner().unwrap();
        let at = |what: &str| log.iter().position(|l| l == what).unwrap();
        assert!(
            at("end 1") < at("start 3"),
            "device a in commit order: {log:?}"
        );
        assert!(
            at("end 2") < at("start 4"),
            "device b in commit order: {log:?}"
        );
        assert!(at("start 2") < at("end 1"), "devices at once: {log:?}");
    }
}
