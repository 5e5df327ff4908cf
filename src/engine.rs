//! The engine: wires source, batching, fan-out, channels and the ledger, and owns shutdown.
//!
//! Data flows one way. The source task reads the WAL and closes batches; the processor task
//! fans each batch out, sends it, and records the outcomes together with the new stream
//! position in one transaction; only then is the position confirmed to the slot. The retry
//! scheduler takes due `failed` rows from the ledger on its own connection, so a provider
//! that is down never holds the slot back.

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use chrono::Utc;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};
use tracing::Instrument;

use crate::batch::{self, Batch, Batcher};
use crate::channels::{self, Job, Registry};
use crate::config::Config;
use crate::ledger::{self, Due, Ledger, Record, Selection};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::retry::{Policy, Status};
use crate::source::{self, Event, SourceError, Stream};

/// Why the engine stopped.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// From the replication side.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A ledger statement failed.
    #[error("ledger")]
    Sql(#[from] tokio_postgres::Error),
    /// A task ended unexpectedly.
    #[error("{0}")]
    Task(String),
}

impl EngineError {
    /// Whether reconnecting cannot help.
    pub fn is_fatal(&self) -> bool {
        match self {
            EngineError::Source(err) => err.is_fatal(),
            EngineError::Sql(err) => schema_missing(err),
            EngineError::Task(_) => false,
        }
    }
}

fn schema_missing(err: &tokio_postgres::Error) -> bool {
    err.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
        || err.code() == Some(&tokio_postgres::error::SqlState::INVALID_SCHEMA_NAME)
}

/// A configured engine, ready to run.
pub struct Engine {
    config: Config,
    database_url: String,
    registry: Registry,
    metrics: Arc<Metrics>,
    policy: Policy,
}

#[derive(Debug, Clone, Copy)]
struct Progress {
    batches: u64,
    confirmed: Lsn,
}

impl Engine {
    /// An engine for `config`, writing to the database at `database_url`.
    pub fn new(
        config: Config,
        database_url: String,
        registry: Registry,
        metrics: Arc<Metrics>,
    ) -> Engine {
        let policy = Policy::new(&config.retry);
        Engine {
            config,
            database_url,
            registry,
            metrics,
            policy,
        }
    }

    /// Runs until `shutdown` turns true, then finishes the batch in hand, records it, confirms
    /// the slot and returns. Connection failures are retried with backoff, resuming from the
    /// recorded position; only faults a reconnect cannot cure are returned.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), EngineError> {
        let backoff = || {
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(10))
                .with_jitter()
                .without_max_times()
                .build()
        };
        let mut delays = backoff();
        loop {
            let started = Instant::now();
            let span = tracing::info_span!("session", slot = %self.config.slot);
            let result = self.session(&mut shutdown).instrument(span).await;
            self.metrics.set_ready(false);
            match result {
                Ok(()) => return Ok(()),
                Err(err) if err.is_fatal() => return Err(err),
                Err(err) => {
                    if started.elapsed() > Duration::from_secs(30) {
                        delays = backoff();
                    }
                    let wait = delays.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(
                        error = %error_chain(&err),
                        retry_in_ms = wait.as_millis() as u64,
                        "engine interrupted, reconnecting"
                    );
                    tokio::select! {
                        _ = sleep(wait) => {}
                        _ = stopped(&mut shutdown) => return Ok(()),
                    }
                }
            }
        }
    }

    async fn session(&self, shutdown: &mut watch::Receiver<bool>) -> Result<(), EngineError> {
        let slot = &self.config.slot;
        let mut client = ledger::connect(&self.database_url).await?;
        source::check_wal_level(&client).await?;
        // Idempotent and cheap: a walpush started before anyone ran `migrate` still works.
        crate::schema::migrate(&mut client).await?;
        source::ensure_publication(&client, &self.config.publication).await?;
        source::ensure_slot(&client, slot).await?;
        let ledger = Ledger::new(client, slot).await?;
        let position = ledger.position().await?.unwrap_or_default();
        let recorded = ledger.recorded_after(position).await?;

        let mut stream =
            Stream::start(&self.database_url, slot, &self.config.publication, position).await?;
        tracing::info!(slot, lsn = %position, "streaming");
        self.metrics.set_ready(true);

        let (batch_tx, batch_rx) = mpsc::channel::<Batch>(2);
        let (progress_tx, mut progress_rx) = watch::channel(Progress {
            batches: 0,
            confirmed: position,
        });
        let lookups = Ledger::new(ledger::connect(&self.database_url).await?, slot).await?;
        let processor = Processor {
            lookups,
            registry: self.registry.clone(),
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
            recorded,
            resume_at: position,
        };
        let mut processor = tokio::spawn(
            processor
                .run(ledger, batch_rx, progress_tx)
                .instrument(tracing::info_span!("processor")),
        );
        let scheduler = tokio::spawn(
            scheduler(
                self.database_url.clone(),
                slot.clone(),
                self.registry.clone(),
                self.policy.clone(),
                self.metrics.clone(),
                self.config.retry.initial_backoff_ms,
            )
            .instrument(tracing::info_span!("scheduler")),
        );
        let _scheduler = AbortOnDrop(scheduler);

        let mut batcher = Batcher::new(self.config.batch.max_rows, self.config.batch.max_wait());
        let mut sent = 0u64;
        let mut confirmed = position;
        let outcome: Result<(), EngineError> = loop {
            let deadline = batcher.deadline();
            // Shutdown is checked first so a busy stream cannot starve it; confirmations next,
            // so the slot advances as soon as the ledger has committed.
            tokio::select! {
                biased;
                _ = stopped(shutdown) => break Ok(()),
                changed = progress_rx.changed() => {
                    if changed.is_err() {
                        break Err(join_error(&mut processor).await);
                    }
                    let progress = *progress_rx.borrow_and_update();
                    if progress.confirmed > confirmed {
                        confirmed = progress.confirmed;
                        stream.confirm(confirmed);
                    }
                }
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    if let Some(batch) = batcher.take() {
                        sent += 1;
                        if batch_tx.send(batch).await.is_err() {
                            break Err(join_error(&mut processor).await);
                        }
                    }
                }
                event = stream.next() => match event {
                    Ok(Some(Event::Row(row))) => {
                        if let Some(batch) = batcher.push(Arc::new(row)) {
                            sent += 1;
                            if batch_tx.send(batch).await.is_err() {
                                break Err(join_error(&mut processor).await);
                            }
                        }
                    }
                    Ok(Some(Event::Commit { end_lsn })) => batcher.commit(end_lsn),
                    Ok(Some(Event::Keepalive { wal_end })) => {
                        self.metrics.lag_bytes.set(wal_end.0.saturating_sub(confirmed.0) as i64);
                        // Idle: everything the server sent is recorded, so its position can be
                        // confirmed and WAL written by other tables does not pile up.
                        let idle = batcher.is_empty()
                            && !stream.in_transaction()
                            && progress_rx.borrow().batches == sent;
                        if idle && wal_end > confirmed {
                            confirmed = wal_end;
                            stream.confirm(confirmed);
                        }
                    }
                    Ok(None) => break Err(EngineError::Task("replication stream ended".into())),
                    Err(err) => break Err(err.into()),
                },
            }
        };

        if outcome.is_err() {
            processor.abort();
            return outcome;
        }

        // Graceful stop: the batch in hand goes through the processor, then the stream is
        // confirmed up to what the ledger holds and closed.
        if let Some(batch) = batcher.take() {
            let _ = batch_tx.send(batch).await;
        }
        drop(batch_tx);
        let last = match processor.await {
            Ok(Ok(lsn)) => lsn,
            Ok(Err(err)) => return Err(err),
            Err(err) => return Err(EngineError::Task(format!("processor: {err}"))),
        };
        stream.confirm(last.max(confirmed));
        stream.stop().await;
        let client = ledger::connect(&self.database_url).await?;
        if let Err(err) = source::advance_slot(&client, slot, last).await {
            tracing::warn!(error = %error_chain(&err), "could not confirm the slot on shutdown");
        }
        tracing::info!(slot, lsn = %last, "stopped");
        Ok(())
    }
}

/// Resolves once `shutdown` turns true; never, if its sender is gone.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn join_error(task: &mut JoinHandle<Result<Lsn, EngineError>>) -> EngineError {
    match task.await {
        Ok(Err(err)) => err,
        Ok(Ok(_)) => EngineError::Task("processor stopped".into()),
        Err(err) => EngineError::Task(format!("processor: {err}")),
    }
}

/// Formats an error with its sources, for logs and the command line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Fans batches out and sends them; a writer task records each batch's outcomes and position
/// in one transaction.
///
/// The two overlap: while batch N's ledger transaction commits, batch N+1 is fanned out and
/// sent. Sends stay in batch order (so per-device order holds), commits stay in batch order
/// (so the position only moves forward over recorded batches), and the slot is confirmed by
/// the writer's progress only. The price is the crash window: up to two batches can have been
/// sent and not yet recorded.
struct Processor {
    /// Device lookups; the writer has its own connection.
    lookups: Ledger,
    registry: Registry,
    policy: Policy,
    metrics: Arc<Metrics>,
    /// Outbox ids of a split transaction recorded before the last restart.
    recorded: std::collections::HashSet<i64>,
    /// Rows from commits before this were recorded before the last restart.
    resume_at: Lsn,
}

/// A sent batch waiting for its ledger transaction.
struct Sent {
    records: Vec<Record>,
    gone: Vec<(i64, String)>,
    confirm: Option<Lsn>,
    rows: usize,
    started: Instant,
}

impl Processor {
    async fn run(
        mut self,
        writer: Ledger,
        mut batches: mpsc::Receiver<Batch>,
        progress: watch::Sender<Progress>,
    ) -> Result<Lsn, EngineError> {
        // Capacity 1: at most one sent batch waits while another commits.
        let (sent_tx, sent_rx) = mpsc::channel::<Sent>(1);
        let metrics = self.metrics.clone();
        // Aborted with the processor when a session ends on an error.
        let mut writer = AbortOnDrop(tokio::spawn(
            write(writer, sent_rx, progress, metrics).instrument(tracing::info_span!("writer")),
        ));
        let joined = |result: Result<Result<Lsn, EngineError>, tokio::task::JoinError>| {
            result.unwrap_or_else(|err| Err(EngineError::Task(format!("writer: {err}"))))
        };
        loop {
            // A writer that fails ends the processor at once, even while no batch comes.
            let batch = tokio::select! {
                batch = batches.recv() => batch,
                result = &mut writer.0 => return joined(result),
            };
            let Some(batch) = batch else { break };
            let sent = self.send(&batch).await?;
            if sent_tx.send(sent).await.is_err() {
                break;
            }
        }
        drop(sent_tx);
        joined((&mut writer.0).await)
    }

    async fn send(&mut self, batch: &Batch) -> Result<Sent, EngineError> {
        let started = Instant::now();
        let rows: Vec<Arc<crate::outbox::OutboxRow>> = batch
            .rows
            .iter()
            .filter(|row| row.commit_lsn >= self.resume_at && !self.recorded.contains(&row.id))
            .cloned()
            .collect();
        let mut records = Vec::new();
        let mut gone = Vec::new();
        if !rows.is_empty() {
            let mut recipients: Vec<&str> = rows.iter().map(|r| r.recipient.as_str()).collect();
            recipients.sort_unstable();
            recipients.dedup();
            let devices = self.lookups.devices(&recipients).await?;
            let plan = batch::plan(&rows, &devices, |name| self.registry.get(name).is_some());
            for record in &plan.settled {
                self.metrics
                    .delivered(&record.channel, record.status.as_str());
            }
            records = plan.settled;
            let first = vec![0; plan.jobs.len()];
            let (sent, found_gone) = attempt(
                &self.registry,
                &self.policy,
                &self.metrics,
                plan.jobs,
                plan.channels,
                first,
            )
            .await;
            records.extend(sent);
            gone = found_gone;
        }
        Ok(Sent {
            records,
            gone,
            confirm: batch.confirm,
            rows: rows.len(),
            started,
        })
    }
}

/// Records sent batches in order and reports each committed position.
async fn write(
    mut ledger: Ledger,
    mut sent: mpsc::Receiver<Sent>,
    progress: watch::Sender<Progress>,
    metrics: Arc<Metrics>,
) -> Result<Lsn, EngineError> {
    let mut state = *progress.borrow();
    while let Some(batch) = sent.recv().await {
        if !batch.records.is_empty() || batch.confirm.is_some() {
            ledger
                .commit_batch(&batch.records, &batch.gone, batch.confirm)
                .await?;
        }
        metrics.batch_rows.observe(batch.rows as f64);
        metrics
            .batch_seconds
            .observe(batch.started.elapsed().as_secs_f64());
        tracing::debug!(
            rows = batch.rows,
            deliveries = batch.records.len(),
            "batch recorded"
        );
        if let Some(lsn) = batch.confirm {
            state.confirmed = state.confirmed.max(lsn);
        }
        state.batches += 1;
        progress.send_replace(state);
    }
    Ok(state.confirmed)
}

/// Sends jobs through their channels and turns each outcome into its ledger record;
/// `previous_attempts[i]` is how often job `i` was tried before. Returns the records and the
/// devices found gone.
async fn attempt(
    registry: &Registry,
    policy: &Policy,
    metrics: &Metrics,
    jobs: Vec<Job>,
    names: Vec<Arc<str>>,
    previous_attempts: Vec<i32>,
) -> (Vec<Record>, Vec<(i64, String)>) {
    let first_attempts = previous_attempts.iter().all(|&p| p == 0);
    let outcomes = channels::dispatch(registry, &names, jobs.clone(), first_attempts).await;
    let now = Utc::now();
    let mut records = Vec::with_capacity(jobs.len());
    let mut gone = Vec::new();
    let tries = jobs.iter().zip(names).zip(outcomes).zip(previous_attempts);
    for (((job, channel), outcome), previous) in tries {
        // A deferred delivery was not attempted.
        let tried = !matches!(outcome, channels::Outcome::Deferred { .. });
        let attempts = previous + i32::from(tried);
        let verdict = policy.verdict(outcome, attempts.max(1) as u32);
        if verdict.gone {
            let reason = verdict.error.clone().unwrap_or_default();
            tracing::warn!(
                channel = %channel,
                device_id = job.device_id,
                reason = %reason,
                "device deactivated"
            );
            gone.push((job.device_id, reason));
        }
        if verdict.status == Status::Failed {
            tracing::warn!(
                channel = %channel,
                outbox_id = job.row.id,
                device_id = job.device_id,
                attempts,
                reason = verdict.error.as_deref().unwrap_or(""),
                "delivery failed, retry scheduled"
            );
        }
        metrics.delivered(&channel, verdict.status.as_str());
        let (outbox_id, lsn) = (job.row.id, job.row.commit_lsn);
        records.push(Record::attempted(
            outbox_id,
            job.device_id,
            channel,
            lsn,
            attempts,
            verdict,
            now,
        ));
    }
    (records, gone)
}

/// Attempts deliveries taken again from the ledger (by the scheduler or by replay).
pub async fn resend(
    registry: &Registry,
    policy: &Policy,
    metrics: &Metrics,
    due: &[Due],
) -> (Vec<Record>, Vec<(i64, String)>) {
    let mut records = Vec::new();
    let mut jobs = Vec::new();
    let mut names = Vec::new();
    let mut previous = Vec::new();
    for d in due {
        let reason = match (&d.row, &d.device) {
            (None, _) => Some("the outbox row no longer exists".to_owned()),
            (_, None) => Some("the device no longer exists".to_owned()),
            (_, Some((_, false))) => Some("the device is inactive".to_owned()),
            (Some(row), _) if !row.payload_is_object() => {
                Some("payload is not a JSON object".to_owned())
            }
            _ if registry.get(&d.channel).is_none() => {
                Some(format!("no channel named {:?} is configured", &*d.channel))
            }
            _ => None,
        };
        match (reason, &d.row, &d.device) {
            (None, Some(row), Some((address, _))) => {
                jobs.push(Job {
                    row: row.clone(),
                    device_id: d.device_id,
                    address: address.clone(),
                });
                names.push(d.channel.clone());
                previous.push(d.attempts);
            }
            (reason, _, _) => {
                let reason = reason.unwrap_or_default();
                metrics.delivered(&d.channel, Status::Dead.as_str());
                records.push(Record::unsent(
                    d.outbox_id,
                    d.device_id,
                    d.channel.clone(),
                    d.commit_lsn,
                    Status::Dead,
                    Some(reason),
                ));
                if let Some(last) = records.last_mut() {
                    last.attempts = d.attempts;
                }
            }
        }
    }
    let (sent, gone) = attempt(registry, policy, metrics, jobs, names, previous).await;
    records.extend(sent);
    (records, gone)
}

/// Takes due `failed` deliveries and tries them again, on its own connection.
async fn scheduler(
    url: String,
    slot: String,
    registry: Registry,
    policy: Policy,
    metrics: Arc<Metrics>,
    initial_backoff_ms: u64,
) -> Result<(), EngineError> {
    const PAGE: i64 = 500;
    let poll = Duration::from_millis((initial_backoff_ms / 4).clamp(20, 1000));
    let client = ledger::connect(&url).await?;
    let mut ledger = Ledger::new(client, &slot).await?;
    loop {
        let taken = ledger
            .resend(Selection::Due, PAGE, async |due: &[Due]| {
                resend(&registry, &policy, &metrics, due).await
            })
            .await;
        match taken {
            Ok(taken) if taken.len() as i64 == PAGE => continue,
            Ok(_) => sleep(poll).await,
            Err(err) => {
                // The session notices a dead database on its own; keep trying quietly.
                tracing::warn!(error = %error_chain(&err), "retry scheduler failed");
                sleep(Duration::from_secs(1)).await;
                match ledger::connect(&url).await {
                    Ok(client) => ledger = Ledger::new(client, &slot).await?,
                    Err(err) => tracing::debug!(error = %err, "scheduler reconnect failed"),
                }
            }
        }
    }
}
