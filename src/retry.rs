//! Retry policy: exponential backoff with jitter, `Retry-After` honoured, dead after a limit.

use std::time::Duration;

use rand::Rng;

use crate::channels::Outcome;
use crate::config::RetryConfig;

/// The status a delivery ends an attempt in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Recorded, not yet attempted.
    Pending,
    /// Accepted by the provider.
    Sent,
    /// A retry is scheduled.
    Failed,
    /// Will not be retried.
    Dead,
    /// Superseded by a newer row with the same collapse key.
    Collapsed,
}

impl Status {
    /// The ledger's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Sent => "sent",
            Status::Failed => "failed",
            Status::Dead => "dead",
            Status::Collapsed => "collapsed",
        }
    }
}

/// What the ledger records after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The new status.
    pub status: Status,
    /// When to try again (`failed` only).
    pub retry_in: Option<Duration>,
    /// The reason, for anything but `sent`.
    pub error: Option<String>,
    /// The provider's reference, for `sent`.
    pub provider_ref: Option<String>,
    /// Whether the device must be deactivated.
    pub gone: bool,
}

/// Backoff settings.
#[derive(Debug, Clone)]
pub struct Policy {
    max_attempts: u32,
    initial: Duration,
    max: Duration,
}

/// Longest `Retry-After` walpush honours; longer answers are capped here.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

impl Policy {
    /// From the `[retry]` section.
    pub fn new(cfg: &RetryConfig) -> Policy {
        Policy {
            max_attempts: cfg.max_attempts.max(1),
            initial: Duration::from_millis(cfg.initial_backoff_ms.max(1)),
            max: Duration::from_millis(cfg.max_backoff_ms.max(cfg.initial_backoff_ms)),
        }
    }

    /// The upper bound of the wait after `attempts` failed attempts (1-based), before jitter.
    pub fn ceiling(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(32);
        self.initial
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max)
    }

    /// The wait after `attempts` failed attempts: "equal jitter", between half the ceiling
    /// and the ceiling, so retries of one outage spread out but never come back at once.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let ceiling = self.ceiling(attempts);
        let half = ceiling / 2;
        let spread = ceiling.saturating_sub(half).as_millis() as u64;
        let jitter = if spread == 0 {
            0
        } else {
            rand::rng().random_range(0..=spread)
        };
        half + Duration::from_millis(jitter)
    }

    /// Turns an outcome of attempt number `attempts` (1-based) into what the ledger records.
    pub fn verdict(&self, outcome: Outcome, attempts: u32) -> Verdict {
        match outcome {
            Outcome::Sent { provider_ref } => Verdict {
                status: Status::Sent,
                retry_in: None,
                error: None,
                provider_ref,
                gone: false,
            },
            Outcome::Dead { reason } => dead(reason, false),
            Outcome::Gone { reason } => dead(reason, true),
            Outcome::Unreachable { reason } => self.verdict(
                Outcome::Retry {
                    reason,
                    after: None,
                },
                attempts,
            ),
            Outcome::Deferred { reason, after } => Verdict {
                status: Status::Failed,
                retry_in: Some(after),
                error: Some(reason),
                provider_ref: None,
                gone: false,
            },
            Outcome::Retry { reason, .. } if attempts >= self.max_attempts => dead(
                format!("gave up after {attempts} attempts: {reason}"),
                false,
            ),
            Outcome::Retry { reason, after } => {
                let wait = match after {
                    Some(after) => after.min(MAX_RETRY_AFTER),
                    None => self.backoff(attempts),
                };
                Verdict {
                    status: Status::Failed,
                    retry_in: Some(wait),
                    error: Some(reason),
                    provider_ref: None,
                    gone: false,
                }
            }
        }
    }
}

fn dead(reason: String, gone: bool) -> Verdict {
    Verdict {
        status: Status::Dead,
        retry_in: None,
        error: Some(reason),
        provider_ref: None,
        gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::new(&RetryConfig {
            max_attempts: 4,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
        })
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let p = policy();
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.ceiling(2), Duration::from_millis(200));
        assert_eq!(p.ceiling(4), Duration::from_millis(800));
        assert_eq!(p.ceiling(5), Duration::from_millis(1000));
        assert_eq!(p.ceiling(500), Duration::from_millis(1000));
    }

    #[test]
    fn jitter_stays_between_half_and_the_ceiling() {
        let p = policy();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let wait = p.backoff(3);
            assert!(wait >= Duration::from_millis(200) && wait <= Duration::from_millis(400));
            seen.insert(wait);
        }
        assert!(seen.len() > 10, "no jitter: {seen:?}");
    }

    #[test]
    fn retry_after_wins_over_backoff() {
        let p = policy();
        let v = p.verdict(
            Outcome::Retry {
                reason: "429".to_owned(),
                after: Some(Duration::from_secs(30)),
            },
            1,
        );
        assert_eq!(v.status, Status::Failed);
        assert_eq!(v.retry_in, Some(Duration::from_secs(30)));
    }

    #[test]
    fn the_last_attempt_is_dead() {
        let p = policy();
        let retry = Outcome::Retry {
            reason: "HTTP 503".to_owned(),
            after: None,
        };
        assert_eq!(p.verdict(retry.clone(), 3).status, Status::Failed);
        let v = p.verdict(retry, 4);
        assert_eq!(v.status, Status::Dead);
        assert_eq!(
            v.error.as_deref(),
            Some("gave up after 4 attempts: HTTP 503")
        );
    }

    #[test]
    fn unreachable_is_retried_and_deferred_waits_as_told() {
        let p = policy();
        let v = p.verdict(
            Outcome::Unreachable {
                reason: "webhook: timed out".to_owned(),
            },
            1,
        );
        assert_eq!(v.status, Status::Failed);
        assert!(v.retry_in.unwrap() <= Duration::from_millis(100));
        let v = p.verdict(
            Outcome::Unreachable {
                reason: "x".to_owned(),
            },
            4,
        );
        assert_eq!(v.status, Status::Dead, "unreachable to the end is dead");
        let after = Duration::from_millis(1500);
        let v = p.verdict(
            Outcome::Deferred {
                reason: "resting".to_owned(),
                after,
            },
            4,
        );
        assert_eq!((v.status, v.retry_in), (Status::Failed, Some(after)));
    }

    #[test]
    fn gone_is_dead_and_deactivates() {
        let v = policy().verdict(
            Outcome::Gone {
                reason: "webhook: 410".to_owned(),
            },
            1,
        );
        assert_eq!(v.status, Status::Dead);
        assert!(v.gone);
    }
}
