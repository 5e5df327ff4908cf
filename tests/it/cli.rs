//! The command line: exit codes, status, replay, dead deliveries, wal_level.

use std::process::Stdio;
use std::time::{Duration, Instant};

use walpush::cluster::{Cluster, ClusterOptions};

use crate::support::receiver::Receiver;
use crate::support::{config_file, config_text, walpush, Row, Running, TestDb, SECRET};

const PAYLOAD: &str = r#"{"title": "hello"}"#;

fn output(cmd: &mut std::process::Command) -> (i32, String, String) {
    let out = cmd.output().expect("run walpush");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_exits_2_and_names_the_key() {
    let (_dir, path) = config_file("[batch]\nmax_rowz = 5\n");
    let (code, _, stderr) = output(walpush().args(["status", "--config"]).arg(&path));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("max_rowz"), "{stderr}");

    let (_dir, path) = config_file(
        "database_url = \"postgres://u:hunter2@127.0.0.1:1/x\"\n\
         [[channels]]\nname = \"h\"\nkind = \"webhook\"\nsecret = \"plain\"\n",
    );
    let (code, _, stderr) = output(walpush().args(["run", "--config"]).arg(&path));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("channels[0].secret"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "no secret in errors: {stderr}");

    let (code, _, stderr) = output(walpush().args(["status"]));
    assert_eq!(code, 2, "no database URL anywhere: {stderr}");
    assert!(stderr.contains("database_url"), "{stderr}");

    let (code, _, stderr) = output(
        walpush()
            .args(["replay", "--from-lsn", "yesterday"])
            .env("WALPUSH_DATABASE_URL", "postgres://postgres@127.0.0.1:1/x"),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--from-lsn"), "{stderr}");

    let (code, _, _) = output(walpush().args(["frobnicate"]));
    assert_eq!(code, 2, "unknown command is a usage error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_fails_fast_and_says_how_to_fix_it() {
    let cluster = Cluster::start(ClusterOptions {
        wal_level: "replica".to_owned(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let url = cluster.url("postgres");
    let (_dir, path) = config_file(&config_text(&url, ""));

    // migrate creates the schema and warns that the slot needs wal_level=logical.
    let (code, _, stderr) = output(walpush().args(["migrate", "--config"]).arg(&path));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("wal_level"), "{stderr}");

    let started = Instant::now();
    let (code, _, stderr) = output(walpush().args(["run", "--config"]).arg(&path));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("wal_level is replica"), "{stderr}");
    assert!(stderr.contains("wal_level = 'logical'"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "fails within seconds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_status_reports_json() {
    let db = TestDb::new().await;
    let hooks = Receiver::start(SECRET).await;
    db.add_device("ida", "hooks", &hooks.url("ida")).await;
    let (_dir, path) = config_file(&config_text(&db.url, ""));
    for _ in 0..2 {
        let (code, stdout, stderr) = output(walpush().args(["migrate", "--config"]).arg(&path));
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("version 1"), "{stdout}");
    }

    let engine = Running::start(&db, "").await;
    db.insert(&[Row::new("ida", PAYLOAD), Row::new("ida", "3")])
        .await;
    db.wait_count("SELECT count(*) FROM walpush.deliveries", 2)
        .await;
    engine.stop().await;

    let (code, stdout, stderr) =
        output(walpush().args(["status", "--json", "--config"]).arg(&path));
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(status["slot"], db.name);
    assert!(status["confirmed_lsn"].as_str().unwrap().contains('/'));
    assert!(status["lag_bytes"].is_i64());
    assert_eq!(status["deliveries"]["sent"], 1);
    assert_eq!(status["deliveries"]["dead"], 1);
    assert_eq!(status["channels"]["hooks"]["sent"], 1);
    // After a graceful stop the slot is confirmed up to the ledger's position.
    let ledger: String = db
        .client()
        .await
        .query_one(
            "SELECT lsn::text FROM walpush.positions WHERE slot = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status["confirmed_lsn"], ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_resends_unsent_deliveries_and_with_redeliver_all() {
    let db = TestDb::new().await;
    let hooks = Receiver::start(SECRET).await;
    hooks.script("jo/a", &[(400, None)]);
    let a = db.add_device("jo", "hooks", &hooks.url("jo/a")).await;
    let b = db.add_device("jo", "hooks", &hooks.url("jo/b")).await;
    let engine = Running::start(&db, "").await;
    let ids = db.insert(&[Row::new("jo", PAYLOAD)]).await;
    db.wait_count("SELECT count(*) FROM walpush.deliveries", 2)
        .await;
    engine.stop().await;
    assert_eq!(db.delivery(ids[0], a).await.0, "dead");
    assert_eq!(db.delivery(ids[0], b).await.0, "sent");
    let lsn: String = db
        .client()
        .await
        .query_one("SELECT min(commit_lsn)::text FROM walpush.deliveries", &[])
        .await
        .unwrap()
        .get(0);
    let (_dir, path) = config_file(&config_text(&db.url, ""));
    let before = hooks.requests().len();

    // Dry run: says what it would send, sends nothing, changes nothing.
    let (code, stdout, stderr) = output(
        walpush()
            .args([
                "replay",
                "--from-lsn",
                &lsn,
                "--to-lsn",
                &lsn,
                "--dry-run",
                "--json",
            ])
            .arg("--config")
            .arg(&path),
    );
    assert_eq!(code, 0, "{stderr}");
    let preview: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(preview["deliveries"], 1, "{stdout}");
    assert_eq!(hooks.requests().len(), before);
    assert_eq!(db.delivery(ids[0], a).await.0, "dead");

    // Without --redeliver: only the dead one.
    let (code, _, stderr) = output(
        walpush()
            .args(["replay", "--from-lsn", &lsn, "--to-lsn", &lsn])
            .arg("--config")
            .arg(&path),
    );
    assert_eq!(code, 0, "{stderr}");
    let paths: Vec<String> = hooks.requests()[before..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(paths, vec!["jo/a"]);
    assert_eq!(db.delivery(ids[0], a).await, ("sent".to_owned(), 2, None));

    // With --redeliver: both, with the same webhook ids as before.
    let (code, _, stderr) = output(
        walpush()
            .args(["replay", "--from-lsn", &lsn, "--redeliver"])
            .arg("--config")
            .arg(&path),
    );
    assert_eq!(code, 0, "{stderr}");
    let requests = hooks.requests();
    assert_eq!(requests.len(), before + 3);
    let webhook_ids: Vec<&str> = requests[before + 1..]
        .iter()
        .map(|r| r.webhook_id.as_str())
        .collect();
    assert!(webhook_ids.contains(&format!("msg_{}_{a}", ids[0]).as_str()));
    assert!(webhook_ids.contains(&format!("msg_{}_{b}", ids[0]).as_str()));
    assert_eq!(
        db.count("SELECT count(*) FROM walpush.deliveries").await,
        2,
        "no new rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_deliveries_are_listed_and_requeued() {
    let db = TestDb::new().await;
    let hooks = Receiver::start(SECRET).await;
    hooks.script("kim", &[(422, None)]);
    let device = db.add_device("kim", "hooks", &hooks.url("kim")).await;
    let engine = Running::start(&db, "").await;
    let ids = db.insert(&[Row::new("kim", PAYLOAD)]).await;
    db.wait_count(
        "SELECT count(*) FROM walpush.deliveries WHERE status = 'dead'",
        1,
    )
    .await;

    let (code, stdout, stderr) =
        output(walpush().args(["dead", "list", "--json", "--database-url", &db.url]));
    assert_eq!(code, 0, "{stderr}");
    let list: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(list["dead"][0]["outbox_id"], ids[0]);
    assert_eq!(list["dead"][0]["last_error"], "webhook: HTTP 422");

    let (code, stdout, stderr) = output(
        walpush()
            .args([
                "dead",
                "retry",
                "--outbox-id",
                &ids[0].to_string(),
                "--database-url",
                &db.url,
            ])
            .stdout(Stdio::piped()),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("requeued 1"), "{stdout}");
    // The running engine's scheduler sends it now.
    db.wait_count(
        "SELECT count(*) FROM walpush.deliveries WHERE status = 'sent'",
        1,
    )
    .await;
    engine.stop().await;
    assert_eq!(db.delivery(ids[0], device).await.0, "sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_migrate_creates_the_schema_and_slot_itself() {
    let db = TestDb::unmigrated().await;
    let hooks = Receiver::start(SECRET).await;
    let (_dir, path) = config_file(&config_text(&db.url, ""));
    let mut child = walpush()
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    db.wait_count(
        &format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}' AND active",
            db.name
        ),
        1,
    )
    .await;
    db.add_device("ola", "hooks", &hooks.url("ola")).await;
    db.insert(&[Row::new("ola", PAYLOAD)]).await;
    db.wait_count(
        "SELECT count(*) FROM walpush.deliveries WHERE status = 'sent'",
        1,
    )
    .await;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert_eq!(hooks.accepted_events("ola").len(), 1);
}
