//! `cargo bench --bench pipeline [-- --quick] [-- --only backlog,latency,fanout,memory]`
//!
//! walpush against PostgreSQL's own decoder, on one throwaway cluster (fsync on,
//! `wal_level=logical`). Every scenario gets its own database, slot and publication; figures are
//! printed as a table and written to `target/bench/pipeline.json`. Nothing here asserts a
//! target: the numbers are measured and reported as they come.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Router;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};
use walpush::channels::Registry;
use walpush::cluster::{Cluster, ClusterOptions};
use walpush::config::Config;
use walpush::engine::{Engine, EngineError};
use walpush::metrics::Metrics;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const RECIPIENTS: usize = 20;
const FAN_DEVICES: usize = 10;
const PRODUCERS: usize = 8;
const DRAIN_DEADLINE: Duration = Duration::from_secs(900);

/// Sizes of one run.
#[derive(Debug, Clone)]
struct Options {
    quick: bool,
    only: Option<Vec<String>>,
    backlog_rows: usize,
    backlog_rows_per_tx: usize,
    latency_rate: u64,
    latency_secs: u64,
    fanout_rows: usize,
    memory_rows: usize,
    memory_rows_per_tx: usize,
}

/// The engine settings every throughput scenario uses.
#[derive(Debug, Clone, Copy)]
struct Settings {
    max_rows: usize,
    max_wait_ms: u64,
    events_per_request: usize,
    concurrency: usize,
}

const THROUGHPUT: Settings = Settings {
    max_rows: 5000,
    max_wait_ms: 10,
    events_per_request: 100,
    concurrency: 64,
};

const LATENCY: Settings = Settings {
    max_rows: 1000,
    max_wait_ms: 5,
    events_per_request: 100,
    concurrency: 64,
};

impl Options {
    fn parse() -> Result<Options> {
        let mut quick = false;
        let mut only = None;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => quick = true,
                // cargo passes `--bench` to every bench binary.
                "--bench" => {}
                "--only" => {
                    let list = args.next().context("--only needs a comma-separated list")?;
                    only = Some(list.split(',').map(str::to_owned).collect());
                }
                other => bail!(
                    "unknown argument {other:?}: use --quick and --only backlog,latency,fanout,memory"
                ),
            }
        }
        let mut options = Options {
            quick,
            only,
            backlog_rows: 200_000,
            backlog_rows_per_tx: 10,
            latency_rate: 1000,
            latency_secs: 20,
            fanout_rows: 20_000,
            memory_rows: 1_000_000,
            memory_rows_per_tx: 100,
        };
        if quick {
            options.backlog_rows = 20_000;
            options.latency_secs = 5;
            options.fanout_rows = 2_000;
            options.memory_rows = 50_000;
        }
        Ok(options)
    }

    fn runs(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == scenario))
    }
}

fn main() -> Result<()> {
    let options = Options::parse()?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(options))
}

async fn run(options: Options) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!("starting a throwaway cluster (fsync on, wal_level=logical)");
    let cluster = Cluster::start(ClusterOptions {
        fsync: true,
        // Same for both sides: checkpoints every few seconds would only add noise.
        settings: vec![("max_wal_size".into(), "8GB".into())],
        ..ClusterOptions::default()
    })
    .await
    .context("start the benchmark cluster")?;
    let receiver = Receiver::start().await?;

    let mut report = Report::default();
    if options.runs("backlog") {
        backlog(&cluster, &receiver, &options, &mut report).await?;
    }
    if options.runs("latency") {
        latency(&cluster, &receiver, &options, &mut report).await?;
    }
    if options.runs("fanout") {
        fanout(&cluster, &receiver, &options, &mut report).await?;
    }
    if options.runs("memory") {
        memory(&cluster, &receiver, &options, &mut report).await?;
    }

    let settings = |s: Settings| {
        json!({
            "batch.max_rows": s.max_rows,
            "batch.max_wait_ms": s.max_wait_ms,
            "max_events_per_request": s.events_per_request,
            "concurrency": s.concurrency,
        })
    };
    let document = json!({
        "quick": options.quick,
        "cores": cores,
        "postgres_bin": cluster.bin_dir().display().to_string(),
        "fsync": true,
        "settings": { "throughput": settings(THROUGHPUT), "latency": settings(LATENCY) },
        "scenarios": report.json,
    });
    let path = output_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&document)?)
        .with_context(|| format!("write {}", path.display()))?;

    println!();
    println!(
        "walpush pipeline benchmark ({}, {cores} cores, fsync on)",
        if options.quick { "quick" } else { "full" }
    );
    println!(
        "throughput settings: batch.max_rows={} max_wait_ms={} max_events_per_request={} \
         concurrency={}; latency: max_rows={} max_wait_ms={}",
        THROUGHPUT.max_rows,
        THROUGHPUT.max_wait_ms,
        THROUGHPUT.events_per_request,
        THROUGHPUT.concurrency,
        LATENCY.max_rows,
        LATENCY.max_wait_ms
    );
    println!();
    println!("| scenario | figure | measured | target |");
    println!("| --- | --- | --- | --- |");
    for line in &report.lines {
        println!("| {} | {} | {} | {} |", line.0, line.1, line.2, line.3);
    }
    println!();
    println!("written to {}", path.display());
    Ok(())
}

/// Where the JSON goes: `target/bench/pipeline.json` under the cargo target directory.
fn output_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench").join("pipeline.json")
}

#[derive(Default)]
struct Report {
    lines: Vec<(String, String, String, String)>,
    json: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    fn line(&mut self, scenario: &str, figure: &str, measured: String, target: &str) {
        self.lines.push((
            scenario.to_owned(),
            figure.to_owned(),
            measured,
            target.to_owned(),
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// Rows/s for pg_recvlogical and walpush draining the same backlog from two slots.
async fn backlog(
    cluster: &Cluster,
    receiver: &Arc<Receiver>,
    options: &Options,
    report: &mut Report,
) -> Result<()> {
    let rows = options.backlog_rows;
    let db = Db::create(cluster, "backlog", true).await?;
    db.add_devices(receiver, "r", RECIPIENTS, 1).await?;
    eprintln!(
        "backlog: committing {rows} rows in {}-row transactions",
        options.backlog_rows_per_tx
    );
    let commit = db
        .commit_rows("r", RECIPIENTS, rows, options.backlog_rows_per_tx)
        .await?;
    let end = db.current_lsn().await?;
    let wal_bytes = db.wal_bytes_since_slot(&db.baseline_slot()).await?;

    eprintln!("backlog: pg_recvlogical draining the baseline slot to {end}");
    let baseline = pg_recvlogical(cluster, &db, &end).await?;
    let baseline_rate = rows as f64 / baseline.as_secs_f64();

    eprintln!("backlog: walpush draining its slot");
    let drained = drain_in_process(&db, receiver, THROUGHPUT, rows as u64).await?;
    let walpush_rate = rows as f64 / drained.elapsed.as_secs_f64();
    let ratio = walpush_rate / baseline_rate;

    report.line("backlog", "rows", rows.to_string(), "");
    report.line(
        "backlog",
        "pg_recvlogical rows/s",
        format!("{baseline_rate:.0}"),
        "",
    );
    report.line(
        "backlog",
        "walpush rows/s (ledger + webhook)",
        format!("{walpush_rate:.0}"),
        "",
    );
    report.line(
        "backlog",
        "walpush batch time ÷ drain time (batches; over 100% = overlapped)",
        format!(
            "{:.0}% of the drain ({})",
            100.0 * drained.busy.0 / drained.elapsed.as_secs_f64(),
            drained.busy.1
        ),
        "",
    );
    report.line(
        "backlog",
        "ratio walpush / pg_recvlogical",
        format!("{ratio:.2}"),
        "≥ 0.8",
    );
    report.json.insert(
        "backlog".into(),
        json!({
            "rows": rows,
            "rows_per_transaction": options.backlog_rows_per_tx,
            "recipients": RECIPIENTS,
            "wal_bytes": wal_bytes,
            "commit_seconds": commit.as_secs_f64(),
            "pg_recvlogical_seconds": baseline.as_secs_f64(),
            "pg_recvlogical_rows_per_second": baseline_rate,
            "walpush_seconds": drained.elapsed.as_secs_f64(),
            "walpush_rows_per_second": walpush_rate,
            "walpush_requests": drained.requests,
            "walpush_batches": drained.busy.1,
            "walpush_processor_busy_seconds": drained.busy.0,
            "ratio": ratio,
        }),
    );
    Ok(())
}

/// Commit-to-receipt latency with rows committed one per transaction at a steady rate.
async fn latency(
    cluster: &Cluster,
    receiver: &Arc<Receiver>,
    options: &Options,
    report: &mut Report,
) -> Result<()> {
    let db = Db::create(cluster, "latency", false).await?;
    db.add_devices(receiver, "r", RECIPIENTS, 1).await?;
    let total = (options.latency_rate * options.latency_secs) as usize;
    let engine = Running::start(&db, LATENCY)?;
    engine.wait_ready().await?;
    receiver.reset(true);

    eprintln!(
        "latency: {total} rows at {} rows/s, one per transaction, {PRODUCERS} connections",
        options.latency_rate
    );
    let (commits, produced_in) = produce_paced(&db, total, options.latency_rate).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while receiver.events() < total as u64 {
        if Instant::now() > deadline {
            bail!(
                "latency: received {} of {total} events within 120 s",
                receiver.events()
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
    engine.stop().await?;

    let receipts = receiver.take_receipts();
    let mut samples: Vec<Duration> = commits
        .iter()
        .filter_map(|(id, committed)| {
            receipts
                .get(id)
                .map(|received| received.saturating_duration_since(*committed))
        })
        .collect();
    if samples.len() != total {
        bail!(
            "latency: {} of {total} rows have a receipt time",
            samples.len()
        );
    }
    samples.sort_unstable();
    let ms = |p: f64| percentile(&samples, p).as_secs_f64() * 1000.0;
    let rate = total as f64 / produced_in.as_secs_f64();
    report.line(
        "latency",
        "offered rows/s (achieved)",
        format!("{} ({rate:.0})", options.latency_rate),
        "",
    );
    report.line(
        "latency",
        "commit-to-receipt p50 / p95 / p99 ms",
        format!("{:.1} / {:.1} / {:.1}", ms(50.0), ms(95.0), ms(99.0)),
        "p99 ≤ 25",
    );
    report.line("latency", "max ms", format!("{:.1}", ms(100.0)), "");
    report.json.insert(
        "latency".into(),
        json!({
            "rows": total,
            "offered_rows_per_second": options.latency_rate,
            "achieved_rows_per_second": rate,
            "p50_ms": ms(50.0),
            "p95_ms": ms(95.0),
            "p99_ms": ms(99.0),
            "max_ms": ms(100.0),
            "measured_from": "the producer receiving its COMMIT acknowledgement",
            "measured_to": "the receiver reading the request body",
        }),
    );
    Ok(())
}

/// One recipient with ten webhook devices: deliveries/s.
async fn fanout(
    cluster: &Cluster,
    receiver: &Arc<Receiver>,
    options: &Options,
    report: &mut Report,
) -> Result<()> {
    let rows = options.fanout_rows;
    let deliveries = (rows * FAN_DEVICES) as u64;
    let db = Db::create(cluster, "fanout", false).await?;
    db.add_devices(receiver, "fan", 1, FAN_DEVICES).await?;
    eprintln!("fanout: committing {rows} rows for one recipient with {FAN_DEVICES} devices");
    db.commit_rows("fan", 1, rows, options.backlog_rows_per_tx)
        .await?;

    eprintln!("fanout: walpush draining {deliveries} deliveries");
    let drained = drain_in_process(&db, receiver, THROUGHPUT, deliveries).await?;
    let rate = deliveries as f64 / drained.elapsed.as_secs_f64();
    report.line(
        "fan-out",
        "deliveries/s (1 row → 10 devices)",
        format!("{rate:.0}"),
        "≥ 100000",
    );
    report.json.insert(
        "fanout".into(),
        json!({
            "rows": rows,
            "devices": FAN_DEVICES,
            "deliveries": deliveries,
            "seconds": drained.elapsed.as_secs_f64(),
            "deliveries_per_second": rate,
            "requests": drained.requests,
            "batches": drained.busy.1,
            "processor_busy_seconds": drained.busy.0,
        }),
    );
    Ok(())
}

/// Peak RSS of the `walpush run` binary draining a large backlog.
async fn memory(
    cluster: &Cluster,
    receiver: &Arc<Receiver>,
    options: &Options,
    report: &mut Report,
) -> Result<()> {
    let rows = options.memory_rows;
    let db = Db::create(cluster, "memory", false).await?;
    db.add_devices(receiver, "r", RECIPIENTS, 1).await?;
    eprintln!(
        "memory: committing {rows} rows in {}-row transactions",
        options.memory_rows_per_tx
    );
    db.commit_rows("r", RECIPIENTS, rows, options.memory_rows_per_tx)
        .await?;

    let dir = tempfile::tempdir()?;
    let config = dir.path().join("walpush.toml");
    std::fs::write(&config, config_text(&db, THROUGHPUT))?;
    let log = std::fs::File::create(dir.path().join("walpush.log"))?;
    receiver.reset(false);
    eprintln!("memory: walpush run (child process) draining {rows} rows");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_walpush"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env_remove("DATABASE_URL")
        .env_remove("WALPUSH_DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("start walpush run")?;
    let pid = child.id().context("walpush child has no pid")?;
    let waited = wait_drained(&db, receiver, rows as u64, started).await;
    let (peak_kb, rss_kb) = proc_memory(pid)?;
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .context("walpush did not stop within 60 s of SIGTERM")??;
    let elapsed = waited?;
    if !status.success() {
        bail!("walpush run exited with {status}");
    }
    let rate = rows as f64 / elapsed.as_secs_f64();
    report.line(
        "memory",
        &format!("peak RSS (VmHWM) draining {rows} rows"),
        format!("{:.1} MB", peak_kb as f64 / 1024.0),
        "≤ 64 MB",
    );
    report.line(
        "memory",
        "walpush run rows/s (child process)",
        format!("{rate:.0}"),
        "",
    );
    report.json.insert(
        "memory".into(),
        json!({
            "rows": rows,
            "rows_per_transaction": options.memory_rows_per_tx,
            "measured": "VmHWM of the `walpush run` child process",
            "peak_rss_kib": peak_kb,
            "final_rss_kib": rss_kb,
            "seconds": elapsed.as_secs_f64(),
            "rows_per_second": rate,
        }),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The database side

/// A scenario's database, with the walpush schema, publication and slot.
struct Db {
    name: String,
    url: String,
    client: tokio_postgres::Client,
}

impl Db {
    /// Creates the database, migrates, lets walpush create its slot and, with `baseline`,
    /// creates a second pgoutput slot at the same point.
    async fn create(cluster: &Cluster, name: &str, baseline: bool) -> Result<Db> {
        let name = format!("bench_{name}");
        cluster.create_database(&name).await?;
        let url = cluster.url(&name);
        let mut client = walpush::ledger::connect(&url).await?;
        walpush::schema::migrate(&mut client).await?;
        walpush::source::ensure_publication(&client, "walpush").await?;
        let db = Db { name, url, client };
        walpush::source::ensure_slot(&db.client, &db.walpush_slot()).await?;
        if baseline {
            db.client
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&db.baseline_slot()],
                )
                .await
                .context("create the baseline slot")?;
        }
        Ok(db)
    }

    fn walpush_slot(&self) -> String {
        format!("{}_walpush", self.name)
    }

    fn baseline_slot(&self) -> String {
        format!("{}_baseline", self.name)
    }

    /// `per_recipient` webhook devices for each of `recipients` recipients `{prefix}{i}`, each
    /// at its own URL on the receiver.
    async fn add_devices(
        &self,
        receiver: &Receiver,
        prefix: &str,
        recipients: usize,
        per_recipient: usize,
    ) -> Result<()> {
        for r in 0..recipients {
            for d in 0..per_recipient {
                let address = format!("http://{}/{}/{prefix}{r}/{d}", receiver.addr, self.name);
                self.client
                    .execute(
                        "INSERT INTO walpush.devices (recipient, channel, address) \
                         VALUES ($1, 'hooks', $2)",
                        &[&format!("{prefix}{r}"), &address],
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Commits `rows` outbox rows in transactions of `per_tx`, spread over the recipients
    /// `{prefix}0..{prefix}{recipients}`, from several connections at once.
    async fn commit_rows(
        &self,
        prefix: &str,
        recipients: usize,
        rows: usize,
        per_tx: usize,
    ) -> Result<Duration> {
        let started = Instant::now();
        let transactions = rows.div_ceil(per_tx);
        let mut tasks = Vec::new();
        for worker in 0..PRODUCERS {
            let url = self.url.clone();
            let prefix = prefix.to_owned();
            tasks.push(tokio::spawn(async move {
                let client = walpush::ledger::connect(&url).await?;
                let insert = client
                    .prepare(
                        "INSERT INTO walpush.outbox (topic, recipient, payload) \
                         SELECT 'order.shipped', $4::text || (($1::int8 + g) % $3::int8), \
                         jsonb_build_object('title', 'Your order shipped', \
                         'body', 'Order ' || ($1::int8 + g) || ' is on its way', \
                         'data', jsonb_build_object('order_id', $1::int8 + g)) \
                         FROM generate_series(0::int8, $2::int8 - 1) AS g",
                    )
                    .await?;
                for tx in (worker..transactions).step_by(PRODUCERS) {
                    let first = (tx * per_tx) as i64;
                    let count = per_tx.min(rows - tx * per_tx) as i64;
                    client
                        .execute(&insert, &[&first, &count, &(recipients as i64), &prefix])
                        .await?;
                }
                Ok::<_, tokio_postgres::Error>(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        Ok(started.elapsed())
    }

    async fn current_lsn(&self) -> Result<String> {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?;
        Ok(row.get(0))
    }

    async fn wal_bytes_since_slot(&self, slot: &str) -> Result<i64> {
        let row = self
            .client
            .query_one(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        Ok(row.get(0))
    }

    async fn sent(&self) -> Result<i64> {
        let row = self
            .client
            .query_one(
                "SELECT count(*) FROM walpush.deliveries WHERE status = 'sent'",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }
}

/// Runs `pg_recvlogical` on the baseline slot up to `end`; returns how long it ran.
async fn pg_recvlogical(cluster: &Cluster, db: &Db, end: &str) -> Result<Duration> {
    let program = cluster.bin_dir().join("pg_recvlogical");
    let started = Instant::now();
    let run = tokio::process::Command::new(&program)
        .args(["-d", &db.url, "--slot", &db.baseline_slot(), "--start"])
        .args(["-o", "proto_version=1", "-o", "publication_names=walpush"])
        .args(["--endpos", end, "--no-loop", "-f", "/dev/null"])
        .kill_on_drop(true)
        .status();
    let status = tokio::time::timeout(DRAIN_DEADLINE, run)
        .await
        .context("pg_recvlogical did not reach the end LSN in time")?
        .with_context(|| format!("run {}", program.display()))?;
    let elapsed = started.elapsed();
    if !status.success() {
        bail!("pg_recvlogical exited with {status}");
    }
    Ok(elapsed)
}

/// Outbox ids with the time their commit was acknowledged.
type Commits = Vec<(i64, Instant)>;

/// Commits one row per transaction at `rate` rows/s; returns each row's commit time.
async fn produce_paced(db: &Db, total: usize, rate: u64) -> Result<(Commits, Duration)> {
    let started = Instant::now();
    let interval = Duration::from_secs(1) / rate as u32;
    let mut tasks: Vec<JoinHandle<Result<Commits>>> = Vec::new();
    for worker in 0..PRODUCERS {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            let client = walpush::ledger::connect(&url).await?;
            let insert = client
                .prepare(
                    "INSERT INTO walpush.outbox (topic, recipient, payload) \
                     VALUES ('order.shipped', $1, jsonb_build_object('title', 'Your order \
                     shipped', 'data', jsonb_build_object('order_id', $2::int8))) RETURNING id",
                )
                .await?;
            let mut commits = Vec::with_capacity(total / PRODUCERS + 1);
            for k in (worker..total).step_by(PRODUCERS) {
                sleep_until(started + interval * k as u32).await;
                let recipient = format!("r{}", k % RECIPIENTS);
                let row = client
                    .query_one(&insert, &[&recipient, &(k as i64)])
                    .await?;
                // The statement runs in its own transaction: its answer means committed.
                commits.push((row.get::<_, i64>(0), Instant::now()));
            }
            Ok(commits)
        }));
    }
    let mut commits = Vec::with_capacity(total);
    for task in tasks {
        commits.extend(task.await??);
    }
    Ok((commits, started.elapsed()))
}

// ---------------------------------------------------------------------------------------------
// The walpush side

fn config_text(db: &Db, s: Settings) -> String {
    format!(
        "database_url = \"{url}\"\nslot = \"{slot}\"\n\
         [batch]\nmax_rows = {rows}\nmax_wait_ms = {wait}\n\
         [http]\nlisten = \"127.0.0.1:0\"\n\
         [[channels]]\nname = \"hooks\"\nkind = \"webhook\"\nsecret = \"{SECRET}\"\n\
         max_events_per_request = {events}\nconcurrency = {concurrency}\ntimeout_ms = 10000\n",
        url = db.url,
        slot = db.walpush_slot(),
        rows = s.max_rows,
        wait = s.max_wait_ms,
        events = s.events_per_request,
        concurrency = s.concurrency,
    )
}

/// The engine running in this process, as the tests run it.
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), EngineError>>,
    metrics: Arc<Metrics>,
}

impl Running {
    fn start(db: &Db, settings: Settings) -> Result<Running> {
        let config = Config::parse(&config_text(db, settings), Path::new("."))?;
        let registry = Registry::from_config(&config.channels)?;
        let metrics = Arc::new(Metrics::new());
        let (stop, stop_rx) = watch::channel(false);
        let engine = Engine::new(config, db.url.clone(), registry, metrics.clone());
        let task = tokio::spawn(async move { engine.run(stop_rx).await });
        Ok(Running {
            stop,
            task,
            metrics,
        })
    }

    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.metrics.is_ready() {
            if Instant::now() > deadline || self.task.is_finished() {
                bail!("the engine did not start streaming");
            }
            sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .context("the engine did not stop within 60 s")???;
        Ok(())
    }
}

struct Drained {
    elapsed: Duration,
    requests: u64,
    /// `(sum, count)` of `walpush_batch_seconds`: how long the processor spent on batches.
    busy: (f64, u64),
}

/// The sum and count of the engine's `walpush_batch_seconds` histogram.
fn batch_seconds(metrics: &Metrics) -> (f64, u64) {
    let text = metrics.render();
    let value = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().parse::<f64>().ok())
            .unwrap_or_default()
    };
    (
        value("walpush_batch_seconds_sum"),
        value("walpush_batch_seconds_count") as u64,
    )
}

/// Starts the engine and times it until `expected` deliveries are `sent` in the ledger.
async fn drain_in_process(
    db: &Db,
    receiver: &Receiver,
    settings: Settings,
    expected: u64,
) -> Result<Drained> {
    receiver.reset(false);
    let started = Instant::now();
    let engine = Running::start(db, settings)?;
    let elapsed = wait_drained(db, receiver, expected, started).await?;
    let requests = receiver.requests.load(Ordering::Relaxed);
    let busy = batch_seconds(&engine.metrics);
    engine.stop().await?;
    Ok(Drained {
        elapsed,
        requests,
        busy,
    })
}

/// Waits until the receiver has seen `expected` events, then until the ledger records them all
/// as `sent`; returns the time since `started`. The receiver is polled first because it costs
/// nothing, while counting the ledger competes with walpush for the same two cores.
async fn wait_drained(
    db: &Db,
    receiver: &Receiver,
    expected: u64,
    started: Instant,
) -> Result<Duration> {
    let deadline = started + DRAIN_DEADLINE;
    while receiver.events() < expected {
        if Instant::now() > deadline {
            bail!("received {} of {expected} events", receiver.events());
        }
        sleep(Duration::from_millis(5)).await;
    }
    loop {
        let sent = db.sent().await?;
        if sent as u64 >= expected {
            return Ok(started.elapsed());
        }
        if Instant::now() > deadline {
            bail!("the ledger has {sent} of {expected} deliveries sent");
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// `(VmHWM, VmRSS)` of a process, in KiB.
fn proc_memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
    };
    match (field("VmHWM:"), field("VmRSS:")) {
        (Some(peak), Some(rss)) => Ok((peak, rss)),
        _ => bail!("no VmHWM/VmRSS in /proc/{pid}/status"),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// The receiver

/// A minimal webhook receiver: answers 204 and counts events; it does not check signatures
/// (the integration tests do).
struct Receiver {
    addr: SocketAddr,
    events: AtomicU64,
    requests: AtomicU64,
    track: AtomicBool,
    receipts: Mutex<HashMap<i64, Instant>>,
}

#[derive(Deserialize)]
struct EventId {
    id: String,
}

impl Receiver {
    async fn start() -> Result<Arc<Receiver>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let receiver = Arc::new(Receiver {
            addr: listener.local_addr()?,
            events: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            track: AtomicBool::new(false),
            receipts: Mutex::new(HashMap::new()),
        });
        let app = Router::new().fallback(receive).with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(receiver)
    }

    fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    fn reset(&self, track: bool) {
        self.events.store(0, Ordering::Relaxed);
        self.requests.store(0, Ordering::Relaxed);
        self.receipts.lock().expect("receipts lock").clear();
        self.track.store(track, Ordering::Relaxed);
    }

    fn take_receipts(&self) -> HashMap<i64, Instant> {
        self.track.store(false, Ordering::Relaxed);
        std::mem::take(&mut *self.receipts.lock().expect("receipts lock"))
    }
}

async fn receive(State(receiver): State<Arc<Receiver>>, body: Bytes) -> StatusCode {
    let received = Instant::now();
    let events: Vec<EventId> = if body.first() == Some(&b'[') {
        serde_json::from_slice(&body).unwrap_or_default()
    } else {
        serde_json::from_slice(&body)
            .map(|e| vec![e])
            .unwrap_or_default()
    };
    if events.is_empty() {
        return StatusCode::BAD_REQUEST;
    }
    if receiver.track.load(Ordering::Relaxed) {
        let mut receipts = receiver.receipts.lock().expect("receipts lock");
        for event in &events {
            if let Ok(id) = event.id.parse::<i64>() {
                receipts.entry(id).or_insert(received);
            }
        }
    }
    receiver.requests.fetch_add(1, Ordering::Relaxed);
    receiver
        .events
        .fetch_add(events.len() as u64, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}
