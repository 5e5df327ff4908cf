//! SQL behind the operator commands: status, replay preview, dead deliveries.

use std::collections::BTreeMap;

use serde::Serialize;
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::source;

/// Every ledger status, so reports show zeros too.
pub const STATUSES: [&str; 5] = ["pending", "sent", "failed", "dead", "collapsed"];

/// What `walpush status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The slot name.
    pub slot: String,
    /// Whether the slot exists.
    pub slot_exists: bool,
    /// Whether a session holds it.
    pub active: bool,
    /// The slot's confirmed position.
    pub confirmed_lsn: Option<String>,
    /// WAL bytes after the confirmed position.
    pub lag_bytes: Option<i64>,
    /// The position recorded in the ledger.
    pub ledger_lsn: Option<String>,
    /// Deliveries by status.
    pub deliveries: BTreeMap<String, i64>,
    /// Deliveries by channel, then status.
    pub channels: BTreeMap<String, BTreeMap<String, i64>>,
}

/// Reads the status of `slot`.
pub async fn status(client: &Client, slot: &str) -> Result<Status, source::SourceError> {
    let state = source::slot_state(client, slot).await?;
    let ledger_lsn = client
        .query_opt(
            "SELECT lsn FROM walpush.positions WHERE slot = $1",
            &[&slot],
        )
        .await?
        .map(|r| Lsn::from(r.get::<_, PgLsn>(0)).to_string());
    let mut deliveries: BTreeMap<String, i64> =
        STATUSES.iter().map(|s| ((*s).to_owned(), 0)).collect();
    let mut channels: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    let rows = client
        .query(
            "SELECT channel, status, count(*) FROM walpush.deliveries GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await?;
    for row in rows {
        let channel: String = row.get(0);
        let status: String = row.get(1);
        let count: i64 = row.get(2);
        *deliveries.entry(status.clone()).or_default() += count;
        channels
            .entry(channel)
            .or_insert_with(|| STATUSES.iter().map(|s| ((*s).to_owned(), 0)).collect())
            .insert(status, count);
    }
    Ok(Status {
        slot: slot.to_owned(),
        slot_exists: state.is_some(),
        active: state.as_ref().is_some_and(|s| s.active_pid.is_some()),
        confirmed_lsn: state
            .as_ref()
            .and_then(|s| s.confirmed_flush)
            .map(|l| l.to_string()),
        lag_bytes: state.and_then(|s| s.lag_bytes),
        ledger_lsn,
        deliveries,
        channels,
    })
}

/// Deliveries replay would send, by channel then status.
pub async fn replay_preview(
    client: &Client,
    from: Lsn,
    to: Lsn,
    redeliver: bool,
) -> Result<BTreeMap<String, BTreeMap<String, i64>>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT channel, status, count(*) FROM walpush.deliveries \
             WHERE commit_lsn BETWEEN $1 AND $2 AND status <> 'collapsed' \
             AND ($3 OR status <> 'sent') GROUP BY 1, 2 ORDER BY 1, 2",
            &[&PgLsn::from(from), &PgLsn::from(to), &redeliver],
        )
        .await?;
    let mut out: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for row in rows {
        out.entry(row.get(0))
            .or_default()
            .insert(row.get(1), row.get(2));
    }
    Ok(out)
}

/// One dead delivery.
#[derive(Debug, Serialize)]
pub struct DeadDelivery {
    /// `outbox.id`
    pub outbox_id: i64,
    /// `devices.id`
    pub device_id: i64,
    /// The channel name.
    pub channel: String,
    /// Sends tried.
    pub attempts: i32,
    /// Why it is dead.
    pub last_error: Option<String>,
    /// The commit that carried the row.
    pub commit_lsn: String,
}

/// Dead deliveries, oldest outbox rows first.
pub async fn dead_list(
    client: &Client,
    outbox_id: Option<i64>,
    limit: i64,
) -> Result<Vec<DeadDelivery>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT outbox_id, device_id, channel, attempts, last_error, commit_lsn \
             FROM walpush.deliveries WHERE status = 'dead' \
             AND ($1::int8 IS NULL OR outbox_id = $1) \
             ORDER BY outbox_id, device_id LIMIT $2",
            &[&outbox_id, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| DeadDelivery {
            outbox_id: r.get(0),
            device_id: r.get(1),
            channel: r.get(2),
            attempts: r.get(3),
            last_error: r.get(4),
            commit_lsn: Lsn::from(r.get::<_, PgLsn>(5)).to_string(),
        })
        .collect())
}

/// Requeues dead deliveries (all, or one outbox row's) for the retry scheduler, with a fresh
/// attempt budget. Returns how many.
pub async fn dead_retry(
    client: &Client,
    outbox_id: Option<i64>,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "UPDATE walpush.deliveries SET status = 'failed', attempts = 0, \
             next_attempt_at = now(), updated_at = now() \
             WHERE status = 'dead' AND ($1::int8 IS NULL OR outbox_id = $1)",
            &[&outbox_id],
        )
        .await
}
