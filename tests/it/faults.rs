//! Crashes and restarts: nothing lost, no ledger row doubled.

use std::collections::HashSet;
use std::process::{Child, Stdio};
use std::time::Duration;

use walpush::cluster::{Cluster, ClusterOptions};

use crate::support::receiver::Receiver;
use crate::support::{config_file, config_text, walpush, Running, TestDb, SECRET};

fn spawn_run(path: &std::path::Path) -> Child {
    walpush()
        .args(["run", "--config"])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn walpush run")
}

/// Inserts `txns` transactions of `per_txn` rows for `recipient`, retrying a transaction
/// that fails because the server is restarting. Returns every committed id.
async fn insert_steadily(
    url: String,
    recipient: &'static str,
    txns: usize,
    per_txn: usize,
) -> Vec<i64> {
    let mut ids = Vec::new();
    for _ in 0..txns {
        loop {
            let attempt = async {
                let mut client = walpush::ledger::connect(&url).await?;
                let tx = client.transaction().await?;
                let mut batch = Vec::new();
                for _ in 0..per_txn {
                    let id: i64 = tx
                        .query_one(
                            "INSERT INTO walpush.outbox (topic, recipient, payload) \
                             VALUES ('t', $1, '{\"title\": \"x\"}') RETURNING id",
                            &[&recipient],
                        )
                        .await?
                        .get(0);
                    batch.push(id);
                }
                tx.commit().await?;
                Ok::<_, tokio_postgres::Error>(batch)
            };
            match attempt.await {
                Ok(batch) => {
                    ids.extend(batch);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ids
}

async fn assert_every_pair_sent_once(db: &TestDb, hooks: &Receiver, ids: &[i64], devices: &[i64]) {
    let expected = (ids.len() * devices.len()) as i64;
    db.wait_count(
        "SELECT count(*) FROM walpush.deliveries WHERE status = 'sent'",
        expected,
    )
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM walpush.deliveries").await,
        expected
    );
    let pairs = db
        .count("SELECT count(DISTINCT (outbox_id, device_id)) FROM walpush.deliveries")
        .await;
    assert_eq!(pairs, expected, "one ledger row per pair");
    // Every pair reached the receiver; a repeat is only ever the same webhook-id again.
    let mut seen = HashSet::new();
    for request in hooks.requests() {
        seen.insert(request.webhook_id);
    }
    for id in ids {
        for device in devices {
            assert!(
                seen.contains(&format!("msg_{id}_{device}")),
                "pair ({id}, {device}) lost"
            );
        }
    }
    assert_eq!(hooks.rejected(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_loses_nothing_and_doubles_nothing() {
    let db = TestDb::new().await;
    let hooks = Receiver::start(SECRET).await;
    let d1 = db.add_device("lee", "hooks", &hooks.url("lee/1")).await;
    let d2 = db.add_device("lee", "hooks", &hooks.url("lee/2")).await;
    let (_dir, path) = config_file(&config_text(&db.url, ""));

    let mut first = spawn_run(&path);
    let producer = tokio::spawn(insert_steadily(db.url.clone(), "lee", 60, 5));
    // Kill it once it is demonstrably mid-stream.
    db.wait_count_at_least("SELECT count(*) FROM walpush.deliveries", 40)
        .await;
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(first.id() as i32, libc::SIGKILL) };
    first.wait().unwrap();

    let mut second = spawn_run(&path);
    let ids = producer.await.unwrap();
    assert_every_pair_sent_once(&db, &hooks, &ids, &[d1, d2]).await;

    // SIGTERM: a graceful stop exits 0.
    // SAFETY: as above.
    unsafe { libc::kill(second.id() as i32, libc::SIGTERM) };
    let status = second.wait().unwrap();
    assert!(status.success(), "graceful stop exits 0, got {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_stream_loses_nothing_and_doubles_nothing() {
    let cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    let db = TestDb::on(&cluster).await;
    let hooks = Receiver::start(SECRET).await;
    let d1 = db.add_device("max", "hooks", &hooks.url("max/1")).await;
    let d2 = db.add_device("max", "hooks", &hooks.url("max/2")).await;
    let engine = Running::start(&db, "").await;

    let producer = tokio::spawn(insert_steadily(db.url.clone(), "max", 60, 5));
    db.wait_count_at_least("SELECT count(*) FROM walpush.deliveries", 40)
        .await;
    cluster.restart().await.expect("restart PostgreSQL");

    let ids = producer.await.unwrap();
    assert_every_pair_sent_once(&db, &hooks, &ids, &[d1, d2]).await;
    engine.stop().await;
}
