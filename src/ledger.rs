//! The delivery ledger: every SQL statement that touches the walpush schema at run time.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_postgres::types::{PgLsn, ToSql};
use tokio_postgres::{Client, GenericClient, NoTls, Statement};

use crate::lsn::Lsn;
use crate::outbox::OutboxRow;
use crate::retry::{Status, Verdict};

/// Opens a SQL connection with `application_name=walpush` and drives it on a task.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if config.get_application_name().is_none() {
        config.application_name("walpush");
    }
    config.connect_timeout(std::time::Duration::from_secs(10));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "sql connection closed");
        }
    });
    Ok(client)
}

/// One ledger row, as written.
#[derive(Debug, Clone)]
pub struct Record {
    /// `outbox.id`
    pub outbox_id: i64,
    /// `devices.id`
    pub device_id: i64,
    /// The channel name.
    pub channel: Arc<str>,
    /// The status.
    pub status: Status,
    /// Sends tried so far.
    pub attempts: i32,
    /// When a `failed` delivery is tried again.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The reason, in words.
    pub last_error: Option<String>,
    /// The provider's reference.
    pub provider_ref: Option<String>,
    /// The commit that carried the outbox row.
    pub commit_lsn: Lsn,
    /// When it was accepted.
    pub sent_at: Option<DateTime<Utc>>,
}

impl Record {
    /// The record of attempt number `attempts` that ended in `verdict`.
    pub fn attempted(
        outbox_id: i64,
        device_id: i64,
        channel: Arc<str>,
        commit_lsn: Lsn,
        attempts: i32,
        verdict: Verdict,
        now: DateTime<Utc>,
    ) -> Record {
        let next_attempt_at = verdict
            .retry_in
            .and_then(|wait| chrono::Duration::from_std(wait).ok())
            .map(|wait| now + wait);
        Record {
            outbox_id,
            device_id,
            channel,
            sent_at: (verdict.status == Status::Sent).then_some(now),
            status: verdict.status,
            attempts,
            next_attempt_at,
            last_error: verdict.error,
            provider_ref: verdict.provider_ref,
            commit_lsn,
        }
    }

    /// A record that needs no send (collapsed, or dead before any attempt).
    pub fn unsent(
        outbox_id: i64,
        device_id: i64,
        channel: Arc<str>,
        commit_lsn: Lsn,
        status: Status,
        reason: Option<String>,
    ) -> Record {
        Record {
            outbox_id,
            device_id,
            channel,
            status,
            attempts: 0,
            next_attempt_at: None,
            last_error: reason,
            provider_ref: None,
            commit_lsn,
            sent_at: None,
        }
    }
}

/// An active device of a recipient.
#[derive(Debug, Clone)]
pub struct Device {
    /// `devices.id`
    pub id: i64,
    /// `devices.recipient`
    pub recipient: String,
    /// `devices.channel`
    pub channel: Arc<str>,
    /// `devices.address`
    pub address: Arc<str>,
}

/// A delivery taken again by the retry scheduler or by replay.
#[derive(Debug, Clone)]
pub struct Due {
    /// `outbox.id`
    pub outbox_id: i64,
    /// `devices.id`
    pub device_id: i64,
    /// The channel name.
    pub channel: Arc<str>,
    /// Sends tried so far.
    pub attempts: i32,
    /// The commit that carried the row.
    pub commit_lsn: Lsn,
    /// The device's address and whether it is still active; `None` when it was deleted.
    pub device: Option<(Arc<str>, bool)>,
    /// The outbox row; `None` when the application deleted it.
    pub row: Option<Arc<OutboxRow>>,
}

/// Which deliveries to take again.
#[derive(Debug, Clone, Copy)]
pub enum Selection {
    /// `failed` rows whose `next_attempt_at` has come.
    Due,
    /// Rows whose commit LSN is in `[from, to]`, after the key `after` (for paging); with
    /// `redeliver` also the `sent` ones. Collapsed rows are never replayed.
    Replay {
        /// Inclusive lower bound.
        from: Lsn,
        /// Inclusive upper bound.
        to: Lsn,
        /// Also rows already sent.
        redeliver: bool,
        /// Paging key `(outbox_id, device_id)`.
        after: (i64, i64),
    },
}

const DUE_COLUMNS: &str = "d.outbox_id, d.device_id, d.channel, d.attempts, d.commit_lsn, \
    v.address, v.active, o.id, o.topic, o.recipient, o.payload::text, o.channels, \
    o.collapse_key, to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
    FROM walpush.deliveries d \
    LEFT JOIN walpush.devices v ON v.id = d.device_id \
    LEFT JOIN walpush.outbox o ON o.id = d.outbox_id";

/// The run-time statements, prepared once per connection.
pub struct Ledger {
    client: Client,
    slot: String,
    insert: Statement,
    update: Statement,
    deactivate: Statement,
    save_position: Statement,
    devices: Statement,
}

impl Ledger {
    /// Prepares the statements on `client` for the position of `slot`.
    pub async fn new(client: Client, slot: &str) -> Result<Ledger, tokio_postgres::Error> {
        let insert = client
            .prepare(
                "INSERT INTO walpush.deliveries (outbox_id, device_id, channel, status, attempts, \
                 next_attempt_at, last_error, provider_ref, commit_lsn, sent_at) \
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::text[], $4::text[], $5::int4[], \
                 $6::timestamptz[], $7::text[], $8::text[], $9::pg_lsn[], $10::timestamptz[]) \
                 ON CONFLICT (outbox_id, device_id) DO NOTHING",
            )
            .await?;
        let update = client
            .prepare(
                "UPDATE walpush.deliveries d SET status = u.status, attempts = u.attempts, \
                 next_attempt_at = u.next_attempt_at, last_error = u.last_error, \
                 provider_ref = coalesce(u.provider_ref, d.provider_ref), \
                 sent_at = coalesce(u.sent_at, d.sent_at), updated_at = now() \
                 FROM unnest($1::int8[], $2::int8[], $3::text[], $4::int4[], $5::timestamptz[], \
                 $6::text[], $7::text[], $8::timestamptz[]) \
                 AS u(outbox_id, device_id, status, attempts, next_attempt_at, last_error, \
                 provider_ref, sent_at) \
                 WHERE d.outbox_id = u.outbox_id AND d.device_id = u.device_id",
            )
            .await?;
        let deactivate = client
            .prepare(
                "UPDATE walpush.devices v SET active = false, deactivated_reason = g.reason, \
                 updated_at = now() FROM unnest($1::int8[], $2::text[]) AS g(id, reason) \
                 WHERE v.id = g.id AND v.active",
            )
            .await?;
        let save_position = client
            .prepare(
                "INSERT INTO walpush.positions (slot, lsn) VALUES ($1, $2) \
                 ON CONFLICT (slot) DO UPDATE SET lsn = greatest(walpush.positions.lsn, \
                 EXCLUDED.lsn), updated_at = now()",
            )
            .await?;
        let devices = client
            .prepare(
                "SELECT id, recipient, channel, address FROM walpush.devices \
                 WHERE active AND recipient = ANY($1)",
            )
            .await?;
        Ok(Ledger {
            client,
            slot: slot.to_owned(),
            insert,
            update,
            deactivate,
            save_position,
            devices,
        })
    }

    /// The connection, for statements outside the hot path.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The end LSN of the last transaction fully recorded for this slot.
    pub async fn position(&self) -> Result<Option<Lsn>, tokio_postgres::Error> {
        let row = self
            .client
            .query_opt(
                "SELECT lsn FROM walpush.positions WHERE slot = $1",
                &[&self.slot],
            )
            .await?;
        Ok(row.map(|r| Lsn::from(r.get::<_, PgLsn>(0))))
    }

    /// Outbox ids already recorded from commits after `lsn`: the part of a transaction that a
    /// batch split and recorded before a crash, which must not be sent again on restart.
    pub async fn recorded_after(&self, lsn: Lsn) -> Result<HashSet<i64>, tokio_postgres::Error> {
        let rows = self
            .client
            .query(
                "SELECT DISTINCT outbox_id FROM walpush.deliveries WHERE commit_lsn > $1",
                &[&PgLsn::from(lsn)],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Active devices of these recipients.
    pub async fn devices(&self, recipients: &[&str]) -> Result<Vec<Device>, tokio_postgres::Error> {
        let rows = self.client.query(&self.devices, &[&recipients]).await?;
        Ok(rows
            .iter()
            .map(|r| Device {
                id: r.get(0),
                recipient: r.get(1),
                channel: Arc::from(r.get::<_, &str>(2)),
                address: Arc::from(r.get::<_, &str>(3)),
            })
            .collect())
    }

    /// Writes a batch's ledger rows, the devices found gone and the new position in one
    /// transaction. Rows already present are left as they are.
    pub async fn commit_batch(
        &mut self,
        records: &[Record],
        gone: &[(i64, String)],
        position: Option<Lsn>,
    ) -> Result<(), tokio_postgres::Error> {
        let tx = self.client.transaction().await?;
        if !records.is_empty() {
            let c = Columns::of(records);
            let lsns: Vec<PgLsn> = records.iter().map(|r| r.commit_lsn.into()).collect();
            let params: [&(dyn ToSql + Sync); 10] = [
                &c.outbox_ids,
                &c.device_ids,
                &c.channels,
                &c.statuses,
                &c.attempts,
                &c.next_attempt_at,
                &c.last_errors,
                &c.provider_refs,
                &lsns,
                &c.sent_at,
            ];
            tx.execute(&self.insert, &params).await?;
        }
        deactivate(&tx, &self.deactivate, gone).await?;
        if let Some(lsn) = position {
            tx.execute(&self.save_position, &[&self.slot, &PgLsn::from(lsn)])
                .await?;
        }
        tx.commit().await
    }

    /// Takes deliveries again under row locks (`FOR UPDATE SKIP LOCKED`, so a concurrent
    /// replay or scheduler never takes the same row), lets `send` attempt them, and records
    /// what it returns in the same transaction. Returns how many rows were taken.
    pub async fn resend<F>(
        &mut self,
        selection: Selection,
        limit: i64,
        send: F,
    ) -> Result<Vec<Due>, tokio_postgres::Error>
    where
        F: AsyncFnOnce(&[Due]) -> (Vec<Record>, Vec<(i64, String)>),
    {
        let tx = self.client.transaction().await?;
        let rows = match selection {
            Selection::Due => {
                let sql = format!(
                    "SELECT {DUE_COLUMNS} WHERE d.status = 'failed' AND d.next_attempt_at <= now() \
                     ORDER BY d.next_attempt_at LIMIT $1 FOR UPDATE OF d SKIP LOCKED"
                );
                tx.query(&sql, &[&limit]).await?
            }
            Selection::Replay {
                from,
                to,
                redeliver,
                after,
            } => {
                let sql = format!(
                    "SELECT {DUE_COLUMNS} WHERE d.commit_lsn BETWEEN $1 AND $2 \
                     AND d.status <> 'collapsed' AND ($3 OR d.status <> 'sent') \
                     AND (d.outbox_id, d.device_id) > ($4, $5) \
                     ORDER BY d.outbox_id, d.device_id LIMIT $6 FOR UPDATE OF d SKIP LOCKED"
                );
                let params: [&(dyn ToSql + Sync); 6] = [
                    &PgLsn::from(from),
                    &PgLsn::from(to),
                    &redeliver,
                    &after.0,
                    &after.1,
                    &limit,
                ];
                tx.query(&sql, &params).await?
            }
        };
        let due: Vec<Due> = rows.iter().map(due_from_row).collect();
        if due.is_empty() {
            tx.commit().await?;
            return Ok(due);
        }
        let (records, gone) = send(&due).await;
        if !records.is_empty() {
            let c = Columns::of(&records);
            let params: [&(dyn ToSql + Sync); 8] = [
                &c.outbox_ids,
                &c.device_ids,
                &c.statuses,
                &c.attempts,
                &c.next_attempt_at,
                &c.last_errors,
                &c.provider_refs,
                &c.sent_at,
            ];
            tx.execute(&self.update, &params).await?;
        }
        deactivate(&tx, &self.deactivate, &gone).await?;
        tx.commit().await?;
        Ok(due)
    }
}

async fn deactivate(
    tx: &impl GenericClient,
    statement: &Statement,
    gone: &[(i64, String)],
) -> Result<(), tokio_postgres::Error> {
    if gone.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = gone.iter().map(|g| g.0).collect();
    let reasons: Vec<&str> = gone.iter().map(|g| g.1.as_str()).collect();
    tx.execute(statement, &[&ids, &reasons]).await?;
    Ok(())
}

/// Records as column arrays for `unnest`.
struct Columns<'a> {
    outbox_ids: Vec<i64>,
    device_ids: Vec<i64>,
    channels: Vec<&'a str>,
    statuses: Vec<&'static str>,
    attempts: Vec<i32>,
    next_attempt_at: Vec<Option<DateTime<Utc>>>,
    last_errors: Vec<Option<&'a str>>,
    provider_refs: Vec<Option<&'a str>>,
    sent_at: Vec<Option<DateTime<Utc>>>,
}

impl<'a> Columns<'a> {
    fn of(records: &'a [Record]) -> Columns<'a> {
        Columns {
            outbox_ids: records.iter().map(|r| r.outbox_id).collect(),
            device_ids: records.iter().map(|r| r.device_id).collect(),
            channels: records.iter().map(|r| &*r.channel).collect(),
            statuses: records.iter().map(|r| r.status.as_str()).collect(),
            attempts: records.iter().map(|r| r.attempts).collect(),
            next_attempt_at: records.iter().map(|r| r.next_attempt_at).collect(),
            last_errors: records.iter().map(|r| r.last_error.as_deref()).collect(),
            provider_refs: records.iter().map(|r| r.provider_ref.as_deref()).collect(),
            sent_at: records.iter().map(|r| r.sent_at).collect(),
        }
    }
}

fn due_from_row(r: &tokio_postgres::Row) -> Due {
    let commit_lsn = Lsn::from(r.get::<_, PgLsn>(4));
    let device = r.get::<_, Option<&str>>(5).map(|address| {
        (
            Arc::from(address),
            r.get::<_, Option<bool>>(6).unwrap_or(false),
        )
    });
    let row = r.get::<_, Option<i64>>(7).map(|id| {
        Arc::new(OutboxRow {
            id,
            topic: r.get(8),
            recipient: r.get(9),
            payload: Arc::from(r.get::<_, &str>(10)),
            channels: r.get(11),
            collapse_key: r.get(12),
            created_at: r.get(13),
            commit_lsn,
        })
    });
    Due {
        outbox_id: r.get(0),
        device_id: r.get(1),
        channel: Arc::from(r.get::<_, &str>(2)),
        attempts: r.get(3),
        commit_lsn,
        device,
        row,
    }
}
