//! Test support: one PostgreSQL cluster per test run, a database per test, receivers.

#![allow(dead_code)]

pub mod apns;
pub mod fcm;
pub mod receiver;
pub mod tls;
pub mod webpush;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use walpush::channels::Registry;
use walpush::cluster::{Cluster, ClusterOptions};
use walpush::config::Config;
use walpush::engine::{Engine, EngineError};
use walpush::metrics::Metrics;

/// The shared cluster; taken and stopped when the test process exits.
static CLUSTER: Mutex<Option<Cluster>> = Mutex::new(None);
static CLUSTER_URL_BASE: OnceLock<(u16, String)> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

extern "C" fn stop_cluster() {
    if let Ok(mut guard) = CLUSTER.lock() {
        drop(guard.take());
    }
}

/// Starts (once) the shared cluster on its own runtime, so it outlives each test's runtime.
fn shared_port() -> u16 {
    CLUSTER_URL_BASE
        .get_or_init(|| {
            let cluster = std::thread::spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(Cluster::start(ClusterOptions::default()))
                    .map_err(std::io::Error::other)
            })
            .join()
            .expect("cluster thread")
            .expect("start the shared test cluster");
            let port = cluster.port();
            let url = cluster.url("postgres");
            *CLUSTER.lock().unwrap() = Some(cluster);
            // SAFETY: registering a plain extern "C" function with no captured state.
            unsafe { libc::atexit(stop_cluster) };
            (port, url)
        })
        .0
}

/// A fresh database on the shared cluster, with the walpush schema migrated.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let db = TestDb::unmigrated().await;
        db.migrate().await;
        db
    }

    /// A fresh database with nothing in it.
    pub async fn unmigrated() -> TestDb {
        let port = shared_port();
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect(&format!("postgres://postgres@127.0.0.1:{port}/postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let url = format!("postgres://postgres@127.0.0.1:{port}/{name}");
        TestDb { name, url }
    }

    /// A database on another cluster (for tests that restart or reconfigure the server).
    pub async fn on(cluster: &Cluster) -> TestDb {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        cluster
            .create_database(&name)
            .await
            .expect("create database");
        let db = TestDb {
            url: cluster.url(&name),
            name,
        };
        db.migrate().await;
        db
    }

    pub async fn migrate(&self) {
        let mut client = self.client().await;
        walpush::schema::migrate(&mut client)
            .await
            .expect("migrate");
        walpush::source::ensure_publication(&client, "walpush")
            .await
            .expect("publication");
        // Slot names are cluster-wide: each test database gets its own.
        walpush::source::ensure_slot(&client, &self.name)
            .await
            .expect("slot");
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    pub async fn add_device(&self, recipient: &str, channel: &str, address: &str) -> i64 {
        self.client()
            .await
            .query_one(
                "INSERT INTO walpush.devices (recipient, channel, address) VALUES ($1, $2, $3) \
                 RETURNING id",
                &[&recipient, &channel, &address],
            )
            .await
            .expect("insert device")
            .get(0)
    }

    /// Inserts outbox rows in one transaction; returns their ids.
    pub async fn insert(&self, rows: &[Row<'_>]) -> Vec<i64> {
        let mut client = self.client().await;
        let tx = client.transaction().await.unwrap();
        let mut ids = Vec::new();
        for row in rows {
            let payload: serde_json::Value = serde_json::from_str(row.payload).unwrap();
            let id: i64 = tx
                .query_one(
                    "INSERT INTO walpush.outbox (topic, recipient, payload, channels, collapse_key) \
                     VALUES ($1, $2, $3, $4, $5) RETURNING id",
                    &[&row.topic, &row.recipient, &payload, &row.channels, &row.collapse_key],
                )
                .await
                .expect("insert outbox row")
                .get(0);
            ids.push(id);
        }
        tx.commit().await.unwrap();
        ids
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .expect(sql)
            .get(0)
    }

    /// Polls `sql` (one bigint) until it equals `expected`, for up to 60 s.
    pub async fn wait_count(&self, sql: &str, expected: i64) {
        let client = self.client().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let got: i64 = client.query_one(sql, &[]).await.expect(sql).get(0);
            if got == expected {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let ledger: Vec<String> = client
                    .query(
                        "SELECT format('%s/%s %s %s %s', outbox_id, device_id, channel, status, \
                         coalesce(last_error, '')) FROM walpush.deliveries ORDER BY 1",
                        &[],
                    )
                    .await
                    .map(|rows| rows.iter().map(|r| r.get(0)).collect())
                    .unwrap_or_default();
                panic!("waited 60s for {sql:?} = {expected}, last saw {got}; ledger: {ledger:#?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until outbox row `outbox_id` has `count` ledger rows.
    pub async fn wait_deliveries(&self, outbox_id: i64, count: i64) {
        let sql = format!("SELECT count(*) FROM walpush.deliveries WHERE outbox_id = {outbox_id}");
        self.wait_count(&sql, count).await;
    }

    /// Polls `sql` (one bigint) until it is at least `floor`, for up to 60 s.
    pub async fn wait_count_at_least(&self, sql: &str, floor: i64) {
        let client = self.client().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let got: i64 = client.query_one(sql, &[]).await.expect(sql).get(0);
            if got >= floor {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited 60s for {sql:?} >= {floor}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `(status, attempts, last_error)` of one delivery.
    pub async fn delivery(&self, outbox_id: i64, device_id: i64) -> (String, i32, Option<String>) {
        let row = self
            .client()
            .await
            .query_one(
                "SELECT status, attempts, last_error FROM walpush.deliveries \
                 WHERE outbox_id = $1 AND device_id = $2",
                &[&outbox_id, &device_id],
            )
            .await
            .expect("delivery row");
        (row.get(0), row.get(1), row.get(2))
    }
}

/// An outbox row to insert.
#[derive(Clone, Copy)]
pub struct Row<'a> {
    pub topic: &'a str,
    pub recipient: &'a str,
    pub payload: &'a str,
    pub channels: Option<&'a [&'a str]>,
    pub collapse_key: Option<&'a str>,
}

impl<'a> Row<'a> {
    pub fn new(recipient: &'a str, payload: &'a str) -> Row<'a> {
        Row {
            topic: "test.event",
            recipient,
            payload,
            channels: None,
            collapse_key: None,
        }
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    walpush::ledger::connect(url)
        .await
        .expect("connect to the test cluster")
}

/// A webhook channel config block for a walpush config file.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

pub fn config_text(url: &str, extra: &str) -> String {
    let slot = url.rsplit('/').next().unwrap_or("walpush");
    format!(
        "database_url = \"{url}\"\nslot = \"{slot}\"\n\
         [batch]\nmax_rows = 100\nmax_wait_ms = 5\n\
         [retry]\nmax_attempts = 4\ninitial_backoff_ms = 50\nmax_backoff_ms = 200\n\
         [http]\nlisten = \"127.0.0.1:0\"\n\
         [[channels]]\nname = \"hooks\"\nkind = \"webhook\"\nsecret = \"{SECRET}\"\n\
         timeout_ms = 2000\n{extra}"
    )
}

/// Writes a config file into a temporary folder.
pub fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walpush.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// The engine running in this process.
pub struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), EngineError>>,
    pub metrics: Arc<Metrics>,
}

impl Running {
    pub async fn start(db: &TestDb, extra_config: &str) -> Running {
        init_logs();
        let text = config_text(&db.url, extra_config);
        let config = Config::parse(&text, std::path::Path::new(".")).expect("test config");
        let registry = Registry::from_config(&config.channels).expect("channels");
        let metrics = Arc::new(Metrics::new());
        let (stop, stop_rx) = watch::channel(false);
        let engine = Engine::new(config, db.url.clone(), registry, metrics.clone());
        let task = tokio::spawn(async move { engine.run(stop_rx).await });
        Running {
            stop,
            task,
            metrics,
        }
    }

    /// Graceful stop; the engine must return Ok.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("engine stops within 30s")
            .expect("engine task")
            .expect("engine returns ok");
    }
}

/// Engine logs in test output, filtered by `RUST_LOG` (off unless set).
pub fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// The `walpush` binary.
pub fn walpush() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_walpush"));
    cmd.env_remove("DATABASE_URL")
        .env_remove("WALPUSH_DATABASE_URL");
    cmd
}
