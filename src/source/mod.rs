//! The source: slot and publication set-up, the replication stream, pgoutput decoding.

pub mod pgoutput;

use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::outbox::{OutboxLayout, OutboxRow, RowError};
use pgoutput::Message;

/// Why the source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The server cannot do logical decoding; retrying will not help.
    #[error(
        "wal_level is {0}, but logical replication needs wal_level=logical: run \
         ALTER SYSTEM SET wal_level = 'logical' (or set it in postgresql.conf) and restart \
         PostgreSQL"
    )]
    WalLevel(String),
    /// A SQL statement failed.
    #[error("sql")]
    Sql(#[from] tokio_postgres::Error),
    /// The replication connection failed.
    #[error("replication stream")]
    Replication(#[from] pgwire_replication::PgWireError),
    /// The stream carried a message that does not decode.
    #[error("pgoutput")]
    Decode(#[from] pgoutput::DecodeError),
    /// The database URL cannot be used for replication.
    #[error("database url: {0}")]
    Url(String),
}

impl SourceError {
    /// Whether reconnecting cannot help.
    pub fn is_fatal(&self) -> bool {
        matches!(self, SourceError::WalLevel(_) | SourceError::Url(_))
    }
}

/// Fails unless the server runs with `wal_level=logical`.
pub async fn check_wal_level(client: &Client) -> Result<(), SourceError> {
    let row = client.query_one("SHOW wal_level", &[]).await?;
    let level: String = row.get(0);
    if level == "logical" {
        Ok(())
    } else {
        Err(SourceError::WalLevel(level))
    }
}

/// Creates the publication on `walpush.outbox` (inserts only) unless it exists.
pub async fn ensure_publication(client: &Client, publication: &str) -> Result<bool, SourceError> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .is_some();
    if !exists {
        // The name was validated as a plain identifier by the config.
        let sql = format!(
            "CREATE PUBLICATION \"{publication}\" FOR TABLE walpush.outbox \
             WITH (publish = 'insert')"
        );
        match client.batch_execute(&sql).await {
            Ok(()) => tracing::info!(publication, "publication created"),
            // Another walpush created it meanwhile.
            Err(err) if is_duplicate(&err) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(!exists)
}

/// Creates the pgoutput slot unless it exists. Returns whether it was created.
pub async fn ensure_slot(client: &Client, slot: &str) -> Result<bool, SourceError> {
    if slot_state(client, slot).await?.is_some() {
        return Ok(false);
    }
    let created = client
        .query_one(
            "SELECT lsn FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await;
    match created {
        Ok(row) => {
            let lsn = Lsn::from(row.get::<_, PgLsn>(0));
            tracing::info!(slot, lsn = %lsn, "replication slot created");
            Ok(true)
        }
        Err(err) if is_duplicate(&err) => Ok(false),
        Err(err) => Err(err.into()),
    }
}

fn is_duplicate(err: &tokio_postgres::Error) -> bool {
    err.code().is_some_and(|code| {
        *code == tokio_postgres::error::SqlState::DUPLICATE_OBJECT
            || *code == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
    })
}

/// A slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotState {
    /// Where the slot's consumer confirmed up to.
    pub confirmed_flush: Option<Lsn>,
    /// The backend holding it, if any.
    pub active_pid: Option<i32>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`
    pub lag_bytes: Option<i64>,
}

/// Reads a slot's state; `None` when it does not exist.
pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, SourceError> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn, active_pid, \
             (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotState {
        confirmed_flush: r.get::<_, Option<PgLsn>>(0).map(Lsn::from),
        active_pid: r.get(1),
        lag_bytes: r.get(2),
    }))
}

/// Moves a slot that no session holds forward to `lsn` (never backwards).
pub async fn advance_slot(client: &Client, slot: &str, lsn: Lsn) -> Result<(), SourceError> {
    client
        .execute(
            "SELECT pg_replication_slot_advance(slot_name, $2) FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid IS NULL AND confirmed_flush_lsn < $2",
            &[&slot, &PgLsn::from(lsn)],
        )
        .await?;
    Ok(())
}

/// What the stream yields to the engine.
#[derive(Debug)]
pub enum Event {
    /// A committed outbox row (its whole transaction has committed).
    Row(OutboxRow),
    /// The transaction ended; everything before `end_lsn` has been yielded.
    Commit {
        /// The commit record's end: the position to confirm.
        end_lsn: Lsn,
    },
    /// The server's heartbeat: everything before `wal_end` has been sent.
    Keepalive {
        /// The server's sent position.
        wal_end: Lsn,
    },
}

/// The replication stream of one slot, decoded.
pub struct Stream {
    client: ReplicationClient,
    layout: Option<(u32, Arc<OutboxLayout>)>,
    commit_lsn: Lsn,
    in_transaction: bool,
}

impl Stream {
    /// Starts streaming `slot` from `start` and waits until the server accepted.
    pub async fn start(
        url: &str,
        slot: &str,
        publication: &str,
        start: Lsn,
    ) -> Result<Stream, SourceError> {
        let config = replication_config(url, slot, publication, start)?;
        let mut client = ReplicationClient::connect(config).await?;
        client.wait_started().await?;
        Ok(Stream {
            client,
            layout: None,
            commit_lsn: start,
            in_transaction: false,
        })
    }

    /// Whether a transaction's rows are being received.
    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// Reports `lsn` as durably processed; the slot may free WAL before it.
    pub fn confirm(&self, lsn: Lsn) {
        self.client.update_applied_lsn(lsn.into());
    }

    /// Ends the stream cleanly.
    pub async fn stop(mut self) {
        if let Err(err) = self.client.shutdown().await {
            tracing::debug!(error = %err, "replication stream ended with an error");
        }
    }

    /// The next event; `Ok(None)` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<Event>, SourceError> {
        loop {
            let Some(event) = self.client.recv().await? else {
                return Ok(None);
            };
            let event = match event {
                ReplicationEvent::Begin { final_lsn, .. } => {
                    self.begin(final_lsn.into());
                    None
                }
                ReplicationEvent::Commit { end_lsn, .. } => Some(self.commit(end_lsn.into())),
                ReplicationEvent::KeepAlive { wal_end, .. } => Some(Event::Keepalive {
                    wal_end: wal_end.into(),
                }),
                ReplicationEvent::XLogData { data, .. } => self.decode(&data)?,
                ReplicationEvent::Message { .. } => None,
                ReplicationEvent::StoppedAt { .. } => return Ok(None),
            };
            if let Some(event) = event {
                return Ok(Some(event));
            }
        }
    }

    fn begin(&mut self, final_lsn: Lsn) {
        self.commit_lsn = final_lsn;
        self.in_transaction = true;
    }

    fn commit(&mut self, end_lsn: Lsn) -> Event {
        self.in_transaction = false;
        Event::Commit { end_lsn }
    }

    fn decode(&mut self, data: &[u8]) -> Result<Option<Event>, SourceError> {
        Ok(match pgoutput::decode(data)? {
            Message::Begin(begin) => {
                self.begin(Lsn(begin.final_lsn));
                None
            }
            Message::Commit(commit) => Some(self.commit(Lsn(commit.end_lsn))),
            Message::Relation(rel) => {
                if rel.namespace == "walpush" && rel.name == "outbox" {
                    match OutboxLayout::from_relation(&rel) {
                        Ok(layout) => self.layout = Some((rel.id, Arc::new(layout))),
                        Err(err) => {
                            tracing::error!(error = %err, "walpush.outbox lacks a column");
                            self.layout = None;
                        }
                    }
                }
                None
            }
            Message::Insert { rel_id, new } => match &self.layout {
                Some((id, layout)) if *id == rel_id => match layout.row(&new, self.commit_lsn) {
                    Ok(row) => Some(Event::Row(row)),
                    Err(err) => {
                        skip_row(&err, self.commit_lsn);
                        None
                    }
                },
                _ => None,
            },
            // Not asked for (the publication publishes inserts only), or not about walpush:
            // skipped.
            Message::Update { .. }
            | Message::Delete { .. }
            | Message::Truncate { .. }
            | Message::Origin { .. }
            | Message::Type { .. }
            | Message::Message { .. } => None,
        })
    }
}

fn skip_row(err: &RowError, commit_lsn: Lsn) {
    tracing::error!(error = %err, lsn = %commit_lsn, "outbox row skipped: it cannot be read");
}

/// The replication connection settings for a `postgres://` URL.
fn replication_config(
    url: &str,
    slot: &str,
    publication: &str,
    start: Lsn,
) -> Result<ReplicationConfig, SourceError> {
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|_| SourceError::Url("not a PostgreSQL URL".to_owned()))?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => return Err(SourceError::Url("names no host".to_owned())),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = config.get_dbname().unwrap_or(&user).to_owned();
    let tls = match config.get_ssl_mode() {
        tokio_postgres::config::SslMode::Require => TlsConfig::require(),
        _ => TlsConfig::disabled(),
    };
    Ok(
        ReplicationConfig::new(host, user, password, database, slot, publication)
            .with_port(port)
            .with_tls(tls)
            .with_start_lsn(start.into())
            .with_status_interval(Duration::from_secs(1))
            .with_wakeup_interval(Duration::from_secs(5))
            .with_application_name("walpush"),
    )
}
