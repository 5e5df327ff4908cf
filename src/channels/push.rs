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
