//! Prometheus metrics, named with their units.

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Deliveries recorded, by channel and status.
pub const DELIVERIES_TOTAL: &str = "walpush_deliveries";
/// Bytes of WAL between the server's position and what walpush confirmed.
pub const REPLICATION_LAG_BYTES: &str = "walpush_replication_lag_bytes";
/// Outbox rows per batch.
pub const BATCH_ROWS: &str = "walpush_batch_rows";
/// Time from a batch closing to its ledger commit.
pub const BATCH_SECONDS: &str = "walpush_batch_seconds";

/// Labels of [`DELIVERIES_TOTAL`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// The channel name.
    pub channel: String,
    /// The ledger status the attempt ended in.
    pub status: String,
}

/// Every metric walpush exports, plus its health flags.
pub struct Metrics {
    registry: Registry,
    /// See [`DELIVERIES_TOTAL`].
    pub deliveries: Family<DeliveryLabels, Counter>,
    /// See [`REPLICATION_LAG_BYTES`].
    pub lag_bytes: Gauge,
    /// See [`BATCH_ROWS`].
    pub batch_rows: Histogram,
    /// See [`BATCH_SECONDS`].
    pub batch_seconds: Histogram,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            DELIVERIES_TOTAL,
            "Delivery attempts recorded in the ledger, by channel and resulting status",
            deliveries.clone(),
        );
        let lag_bytes = Gauge::default();
        registry.register(
            REPLICATION_LAG_BYTES,
            "WAL bytes between the server's sent position and walpush's confirmed position",
            lag_bytes.clone(),
        );
        let batch_rows = Histogram::new([1.0, 10.0, 100.0, 1000.0, 10000.0]);
        registry.register(BATCH_ROWS, "Outbox rows per batch", batch_rows.clone());
        let batch_seconds = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]);
        registry.register(
            BATCH_SECONDS,
            "Seconds from a batch closing to its ledger commit (fan-out, sends, ledger write)",
            batch_seconds.clone(),
        );
        Metrics {
            registry,
            deliveries,
            lag_bytes,
            batch_rows,
            batch_seconds,
            ready: AtomicBool::new(false),
        }
    }

    /// Counts one delivery in `status` on `channel`.
    pub fn delivered(&self, channel: &str, status: &str) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                channel: channel.to_owned(),
                status: status.to_owned(),
            })
            .inc();
    }

    /// Whether the engine is connected and streaming.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// See [`Metrics::set_ready`].
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_deliveries_by_channel_and_status() {
        let m = Metrics::new();
        m.delivered("hooks", "sent");
        m.delivered("hooks", "sent");
        m.lag_bytes.set(42);
        let text = m.render();
        assert!(
            text.contains(r#"walpush_deliveries_total{channel="hooks",status="sent"} 2"#),
            "{text}"
        );
        assert!(text.contains("walpush_replication_lag_bytes 42"), "{text}");
    }
}
