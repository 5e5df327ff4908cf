//! Channels: one module per provider kind behind one trait.
//!
//! Every channel reads the same way: render each job for the provider, send with bounded
//! concurrency, and classify each answer as an [`Outcome`]. The engine, the retry scheduler
//! and replay only ever see outcomes.

pub mod apns;
pub mod fcm;
pub mod push;
pub mod webhook;
pub mod webpush;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ChannelConfig, ChannelKind};
use crate::outbox::OutboxRow;

/// One delivery to send: an outbox row to one device.
#[derive(Debug, Clone)]
pub struct Job {
    /// The outbox row.
    pub row: Arc<OutboxRow>,
    /// `devices.id`
    pub device_id: i64,
    /// The device's address (token, subscription JSON, URL, ...).
    pub address: Arc<str>,
}

impl Job {
    /// The idempotency id of this delivery, stable across retries and replays.
    pub fn idempotency_id(&self) -> String {
        format!("msg_{}_{}", self.row.id, self.device_id)
    }
}

/// How a provider answered one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted; the provider's reference when it gives one.
    Sent {
        /// apns-id, FCM message name, Web Push Location, ...
        provider_ref: Option<String>,
    },
    /// Try again later, not before `after` when the provider said so.
    Retry {
        /// What went wrong, in words.
        reason: String,
        /// The provider's `Retry-After`, if any.
        after: Option<Duration>,
    },
    /// Will not be retried.
    Dead {
        /// Why, in words.
        reason: String,
    },
    /// The address is gone: the device is deactivated and the delivery is dead.
    Gone {
        /// The provider's verdict, e.g. `webhook: 410`.
        reason: String,
    },
    /// No answer at all (timeout, connection refused): retried like `Retry`, and the
    /// destination is given a rest before new rows are tried on it.
    Unreachable {
        /// What went wrong, in words.
        reason: String,
    },
    /// Not attempted, because the destination is resting after being unreachable; tried
    /// again after `after` without counting as an attempt.
    Deferred {
        /// Why, in words.
        reason: String,
        /// When to try.
        after: Duration,
    },
}

/// A boxed future, so channels can be held as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A configured destination kind.
pub trait Channel: Send + Sync {
    /// The configured name (`devices.channel`).
    fn name(&self) -> &str;

    /// The kind (`webhook`, `apns`, ...), for metrics.
    fn kind(&self) -> &'static str;

    /// Sends every job and returns one outcome per job, in the same order.
    fn send<'a>(&'a self, jobs: &'a [Job]) -> BoxFuture<'a, Vec<Outcome>>;

    /// Where a job goes, for resting an unreachable destination: channels with one provider
    /// endpoint keep the default (the whole channel rests).
    fn destination(&self, _job: &Job) -> String {
        String::new()
    }
}

/// A configured kind this build cannot deliver (e-mail, NATS): every delivery is dead with a
/// reason that says so, and the rest of the configuration works.
struct Unavailable {
    name: String,
    kind: &'static str,
}

impl Channel for Unavailable {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        self.kind
    }

    fn send<'a>(&'a self, jobs: &'a [Job]) -> BoxFuture<'a, Vec<Outcome>> {
        let reason = format!(
            "{}: this build of walpush cannot deliver this kind",
            self.kind
        );
        let outcomes = jobs
            .iter()
            .map(|_| Outcome::Dead {
                reason: reason.clone(),
            })
            .collect();
        Box::pin(std::future::ready(outcomes))
    }
}

/// A channel could not be set up from its configuration.
#[derive(Debug, thiserror::Error)]
#[error("channel {name}: {message}")]
pub struct SetupError {
    /// The channel's name.
    pub name: String,
    /// What is wrong.
    pub message: String,
}

/// The configured channels, by name.
#[derive(Clone, Default)]
pub struct Registry {
    by_name: HashMap<String, Arc<dyn Channel>>,
    resting: Arc<Resting>,
}

/// Destinations that did not answer, resting until a time: while one rests, first attempts
/// to it are deferred instead of waiting out a timeout on every batch, so a provider that is
/// down does not slow the replication stream. Retries still try it, and any answer ends
/// the rest.
#[derive(Default)]
struct Resting {
    until: std::sync::Mutex<HashMap<(String, String), (tokio::time::Instant, u32)>>,
}

/// The first rest after an unreachable destination; it doubles with each further miss.
const FIRST_REST: Duration = Duration::from_secs(1);
/// The longest rest.
const LONGEST_REST: Duration = Duration::from_secs(60);

impl Resting {
    /// Whether any destination rests (or rested and was not yet answered).
    fn any(&self) -> bool {
        self.until
            .lock()
            .map(|until| !until.is_empty())
            .unwrap_or(false)
    }

    fn remaining(&self, key: &(String, String)) -> Option<Duration> {
        let until = self.until.lock().ok()?;
        let (until, _) = until.get(key)?;
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        (!left.is_zero()).then_some(left)
    }

    fn record(&self, key: (String, String), outcome: &Outcome) {
        let Ok(mut until) = self.until.lock() else {
            return;
        };
        match outcome {
            Outcome::Unreachable { .. } => {
                let misses = until.get(&key).map_or(0, |(_, misses)| *misses) + 1;
                let rest = FIRST_REST
                    .saturating_mul(1 << (misses - 1).min(6))
                    .min(LONGEST_REST);
                until.insert(key, (tokio::time::Instant::now() + rest, misses));
            }
            Outcome::Deferred { .. } => {}
            _ => {
                until.remove(&key);
            }
        }
    }
}

impl Registry {
    /// Builds every configured channel.
    pub fn from_config(channels: &[ChannelConfig]) -> Result<Registry, SetupError> {
        let mut registry = Registry::default();
        for cfg in channels {
            let channel: Arc<dyn Channel> = match &cfg.kind {
                ChannelKind::Webhook(w) => Arc::new(webhook::Webhook::new(&cfg.name, w)?),
                ChannelKind::Apns(a) => Arc::new(apns::Apns::new(&cfg.name, a)?),
                ChannelKind::Fcm(f) => Arc::new(fcm::Fcm::new(&cfg.name, f)?),
                ChannelKind::WebPush(w) => Arc::new(webpush::WebPush::new(&cfg.name, w)?),
                kind @ (ChannelKind::Email(_) | ChannelKind::Nats(_)) => {
                    tracing::error!(
                        channel = %cfg.name,
                        kind = kind.as_str(),
                        "channel kind not available in this build: its deliveries will be dead"
                    );
                    Arc::new(Unavailable {
                        name: cfg.name.clone(),
                        kind: kind.as_str(),
                    })
                }
            };
            registry.insert(channel);
        }
        Ok(registry)
    }

    /// Adds or replaces a channel.
    pub fn insert(&mut self, channel: Arc<dyn Channel>) {
        self.by_name.insert(channel.name().to_owned(), channel);
    }

    /// The channel called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Channel>> {
        self.by_name.get(name)
    }

    /// Whether no channel is configured.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Sends jobs grouped by channel, all channels at once; outcomes come back in job order.
/// Jobs for a channel that is not configured are dead.
pub async fn dispatch(
    registry: &Registry,
    channel_of: &[Arc<str>],
    jobs: Vec<Job>,
    first_attempts: bool,
) -> Vec<Outcome> {
    let mut outcomes = vec![None; channel_of.len()];
    // Destinations are only worked out while something rests or just went unreachable, so
    // the common path parses no address twice.
    let destination = |name: &str, channel: &Arc<dyn Channel>, job: &Job| {
        (name.to_owned(), channel.destination(job))
    };
    let mut groups: HashMap<&str, (Vec<usize>, Vec<Job>)> = HashMap::new();
    for (index, job) in jobs.into_iter().enumerate() {
        let name = &channel_of[index];
        if let (true, Some(channel)) =
            (first_attempts && registry.resting.any(), registry.get(name))
        {
            if let Some(after) = registry
                .resting
                .remaining(&destination(name, channel, &job))
            {
                outcomes[index] = Some(Outcome::Deferred {
                    reason: format!("{}: not attempted, destination unreachable", channel.kind()),
                    after,
                });
                continue;
            }
        }
        let entry = groups.entry(name).or_default();
        entry.0.push(index);
        entry.1.push(job);
    }
    let sends = groups
        .into_iter()
        .map(|(name, (indexes, jobs))| async move {
            let results = match registry.get(name) {
                Some(channel) => channel.send(&jobs).await,
                None => jobs.iter().map(|_| no_such_channel(name)).collect(),
            };
            (name, indexes, jobs, results)
        });
    for (name, indexes, jobs, results) in futures_util::future::join_all(sends).await {
        let channel = registry.get(name);
        for ((index, job), outcome) in indexes.into_iter().zip(&jobs).zip(results) {
            let unreachable = matches!(outcome, Outcome::Unreachable { .. });
            if let (true, Some(channel)) = (unreachable || registry.resting.any(), channel) {
                registry
                    .resting
                    .record(destination(name, channel, job), &outcome);
            }
            outcomes[index] = Some(outcome);
        }
    }
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or(Outcome::Dead {
                reason: "channel returned no outcome".to_owned(),
            })
        })
        .collect()
}

/// The outcome for a delivery to a channel name that is not configured.
pub fn no_such_channel(name: &str) -> Outcome {
    Outcome::Dead {
        reason: format!("no channel named {name:?} is configured"),
    }
}

/// Builds the shared HTTP client settings of an HTTPS channel: rustls with the web PKI roots
/// plus an optional extra root, HTTP/2 and HTTP/1.1 by ALPN, pooled connections.
pub fn http_client(
    name: &str,
    ca_file: Option<&Path>,
    timeout: Duration,
    concurrency: usize,
) -> Result<reqwest::Client, SetupError> {
    let setup = |message: String| SetupError {
        name: name.to_owned(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|err| setup(format!("cannot read ca_file {}: {err}", path.display())))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|err| setup(format!("bad PEM in ca_file: {err}")))?;
            roots
                .add(cert)
                .map_err(|err| setup(format!("bad certificate in ca_file: {err}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(setup(format!(
                "ca_file {} holds no certificate",
                path.display()
            )));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| setup(format!("tls: {err}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_max_idle_per_host(concurrency)
        .pool_idle_timeout(Duration::from_secs(90))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .user_agent(concat!("walpush/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|err| setup(format!("http client: {err}")))
}

/// Reads a `Retry-After` header given in seconds (HTTP dates are treated as absent).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Classifies a transport error (no HTTP answer): retried, and the destination rests.
pub fn transport_error(kind: &str, err: &reqwest::Error) -> Outcome {
    let what = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    // The error's Display can hold the URL, which may hold credentials: keep only the kind.
    Outcome::Unreachable {
        reason: format!("{kind}: {what}"),
    }
}
