//! End to end through the engine: SQL INSERT to a verified webhook and one ledger row.

use std::time::Duration;

use crate::support::receiver::Receiver;
use crate::support::{Row, Running, TestDb, SECRET};

const PAYLOAD: &str = r#"{"title": "hello", "data": {"n": 1}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_rows_arrive_signed_and_rolled_back_rows_never_do() {
    let db = TestDb::new().await;
    let hooks = Receiver::start(SECRET).await;
    let phone = db
        .add_device("alice", "hooks", &hooks.url("alice/phone"))
        .await;
    let laptop = db
        .add_device("alice", "hooks", &hooks.url("alice/laptop"))
        .await;
    db.add_device("bob", "hooks", &hooks.url("bob")).await;
    let engine = Running::start(&db, "").await;

    let ids = db
        .insert(&[Row::new("alice", PAYLOAD), Row::new("bob", PAYLOAD)])
        .await;
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    let rolled_back: i64 = tx
        .query_one(
            "INSERT INTO walpush.outbox (topic, recipient, payload) \
             VALUES ('never', 'alice', '{}') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.rollback().await.unwrap();
    // A later commit proves the stream moved past the rolled-back one.
    let later = db.insert(&[Row::new("bob", PAYLOAD)]).await;

    db.wait_count(
        "SELECT count(*) FROM walpush.deliveries WHERE status = 'sent'",
        4,
    )
    .await;
    engine.stop().await;

    assert_eq!(hooks.rejected(), 0, "every signature verifies");
    let requests = hooks.requests();
    assert_eq!(requests.len(), 4);
    let rolled_back = rolled_back.to_string();
    assert!(requests
        .iter()
        .all(|r| r.body["id"].as_str() != Some(rolled_back.as_str())));
    let phone_events = hooks.accepted_events("alice/phone");
    assert_eq!(phone_events.len(), 1);
    let event = &phone_events[0];
    assert_eq!(event["id"], ids[0].to_string());
    assert_eq!(event["type"], "test.event");
    assert_eq!(event["recipient"], "alice");
    assert_eq!(event["data"]["data"]["n"], 1);
    assert!(event["lsn"].as_str().unwrap().contains('/'));
    assert!(event["timestamp"].as_str().unwrap().ends_with('Z'));
    // webhook-id is the pair's stable id.
    let phone_request = requests.iter().find(|r| r.path == "alice/phone").unwrap();
    assert_eq!(phone_request.webhook_id, format!("msg_{}_{phone}", ids[0]));
    assert_eq!(hooks.accepted_events("alice/laptop").len(), 1);
    assert_eq!(hooks.accepted_events("bob").len(), 2);

    // One ledger row per pair, with the commit LSN the event carried.
    assert_eq!(db.count("SELECT count(*) FROM walpush.deliveries").await, 4);
    let lsn: String = db
        .client()
        .await
        .query_one(
            "SELECT commit_lsn::text FROM walpush.deliveries WHERE outbox_id = $1 AND device_id = $2",
            &[&ids[0], &laptop],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(event["lsn"], lsn);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM walpush.deliveries WHERE outbox_id = {}",
            later[0]
        ))
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_one_collapse_key_in_a_batch_send_only_the_newest() {
    let db = TestDb::new().await;
    let hooks = Receiver::start(SECRET).await;
    db.add_device("carol", "hooks", &hooks.url("carol")).await;
    let engine = Running::start(&db, "").await;

    let mut first = Row::new("carol", r#"{"title": "old"}"#);
    first.collapse_key = Some("score");
    let mut second = Row::new("carol", r#"{"title": "new"}"#);
    second.collapse_key = Some("score");
    let other = Row::new("carol", r#"{"title": "other"}"#);
    let ids = db.insert(&[first, other, second]).await;

    db.wait_count("SELECT count(*) FROM walpush.deliveries", 3)
        .await;
    engine.stop().await;

    let titles: Vec<String> = hooks
        .accepted_events("carol")
        .iter()
        .map(|e| e["data"]["title"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(titles, vec!["other", "new"]);
    let status: String = db
        .client()
        .await
        .query_one(
            "SELECT status FROM walpush.deliveries WHERE outbox_id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "collapsed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_payload_or_unknown_channel_is_dead_and_the_rest_goes_on() {
    let db = TestDb::new().await;
    let hooks = Receiver::start(SECRET).await;
    let hook = db.add_device("dave", "hooks", &hooks.url("dave")).await;
    let pager = db.add_device("dave", "pager", "555-0100").await;
    let engine = Running::start(&db, "").await;

    let ids = db
        .insert(&[Row::new("dave", "[1, 2]"), Row::new("dave", PAYLOAD)])
        .await;
    db.wait_count("SELECT count(*) FROM walpush.deliveries", 4)
        .await;
    engine.stop().await;

    let (status, _, reason) = db.delivery(ids[0], hook).await;
    assert_eq!(status, "dead");
    assert_eq!(reason.as_deref(), Some("payload is not a JSON object"));
    let (status, _, reason) = db.delivery(ids[1], pager).await;
    assert_eq!(status, "dead");
    assert_eq!(
        reason.as_deref(),
        Some("no channel named \"pager\" is configured")
    );
    let (status, attempts, _) = db.delivery(ids[1], hook).await;
    assert_eq!((status.as_str(), attempts), ("sent", 1));
    assert_eq!(hooks.accepted_events("dave").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_503s_then_success_is_sent_after_three_attempts() {
    let db = TestDb::new().await;
    let hooks = Receiver::start(SECRET).await;
    hooks.script("erin", &[(503, None), (503, None)]);
    let device = db.add_device("erin", "hooks", &hooks.url("erin")).await;
    let engine = Running::start(&db, "").await;

    let ids = db.insert(&[Row::new("erin", PAYLOAD)]).await;
    db.wait_count(
        "SELECT count(*) FROM walpush.deliveries WHERE status = 'sent'",
        1,
    )
    .await;
    engine.stop().await;

    let (status, attempts, _) = db.delivery(ids[0], device).await;
    assert_eq!((status.as_str(), attempts), ("sent", 3));
    let statuses: Vec<u16> = hooks.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 503, 204]);
    // The same idempotency id on every attempt.
    let ids: Vec<String> = hooks
        .requests()
        .iter()
        .map(|r| r.webhook_id.clone())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_the_slot_is_not_held_back() {
    let db = TestDb::new().await;
    let hooks = Receiver::start(SECRET).await;
    hooks.script("fay", &[(429, Some(2))]);
    let device = db.add_device("fay", "hooks", &hooks.url("fay")).await;
    let engine = Running::start(&db, "").await;

    let ids = db.insert(&[Row::new("fay", PAYLOAD)]).await;
    db.wait_count(
        "SELECT count(*) FROM walpush.deliveries WHERE status = 'failed'",
        1,
    )
    .await;
    let wait: f64 = db
        .client()
        .await
        .query_one(
            "SELECT extract(epoch FROM next_attempt_at - updated_at)::float8 \
             FROM walpush.deliveries WHERE outbox_id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        (1.5..=2.5).contains(&wait),
        "next attempt {wait}s after the 429, not ~2s"
    );
    // While the retry waits, later rows still flow.
    let later = db.insert(&[Row::new("fay", PAYLOAD)]).await;
    db.wait_count(
        &format!(
            "SELECT count(*) FROM walpush.deliveries WHERE outbox_id = {} AND status = 'sent'",
            later[0]
        ),
        1,
    )
    .await;
    db.wait_count(
        "SELECT count(*) FROM walpush.deliveries WHERE status = 'sent'",
        2,
    )
    .await;
    engine.stop().await;
    let (status, attempts, _) = db.delivery(ids[0], device).await;
    assert_eq!((status.as_str(), attempts), ("sent", 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_deactivates_the_device_and_later_rows_skip_it() {
    let db = TestDb::new().await;
    let hooks = Receiver::start(SECRET).await;
    hooks.script("gus/old", &[(410, None)]);
    let old = db.add_device("gus", "hooks", &hooks.url("gus/old")).await;
    let new = db.add_device("gus", "hooks", &hooks.url("gus/new")).await;
    let engine = Running::start(&db, "").await;

    let first = db.insert(&[Row::new("gus", PAYLOAD)]).await;
    db.wait_count("SELECT count(*) FROM walpush.deliveries", 2)
        .await;
    let second = db.insert(&[Row::new("gus", PAYLOAD)]).await;
    db.wait_deliveries(second[0], 1).await;
    engine.stop().await;

    let (status, _, reason) = db.delivery(first[0], old).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("dead", Some("webhook: 410"))
    );
    let row = db
        .client()
        .await
        .query_one(
            "SELECT active, deactivated_reason FROM walpush.devices WHERE id = $1",
            &[&old],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0));
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("webhook: 410")
    );
    assert_eq!(db.delivery(second[0], new).await.0, "sent");
    assert_eq!(hooks.accepted_events("gus/old").len(), 0);
    assert_eq!(
        hooks
            .requests()
            .iter()
            .filter(|r| r.path == "gus/old")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_to_one_url_are_batched_into_arrays() {
    let db = TestDb::new().await;
    let hooks = Receiver::start(SECRET).await;
    db.add_device("hal", "hooks", &hooks.url("hal")).await;
    let engine = Running::start(&db, "max_events_per_request = 3\n").await;

    let rows: Vec<Row> = (0..5).map(|_| Row::new("hal", PAYLOAD)).collect();
    let ids = db.insert(&rows).await;
    db.wait_count(
        "SELECT count(*) FROM walpush.deliveries WHERE status = 'sent'",
        5,
    )
    .await;
    engine.stop().await;

    let requests = hooks.requests();
    assert_eq!(requests.len(), 2, "5 events in arrays of at most 3");
    assert!(requests.iter().all(|r| r.body.is_array()));
    let got: Vec<String> = hooks
        .accepted_events("hal")
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    let want: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    assert_eq!(got, want, "in commit order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_are_served() {
    let db = TestDb::new().await;
    let hooks = Receiver::start(SECRET).await;
    db.add_device("ivy", "hooks", &hooks.url("ivy")).await;
    let engine = Running::start(&db, "").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(walpush::http::serve(
        listener,
        engine.metrics.clone(),
        stop_rx,
    ));

    db.insert(&[Row::new("ivy", PAYLOAD)]).await;
    db.wait_count(
        "SELECT count(*) FROM walpush.deliveries WHERE status = 'sent'",
        1,
    )
    .await;

    let http = walpush::channels::http_client("test", None, Duration::from_secs(5), 2).unwrap();
    let get = |path: &str| http.get(format!("{base}{path}")).send();
    let health = get("/healthz").await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200, "streaming");
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"walpush_deliveries_total{channel="hooks",status="sent"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("walpush_replication_lag_bytes"),
        "{metrics}"
    );
    assert!(metrics.contains("walpush_batch_seconds_count"), "{metrics}");
    assert!(!metrics.contains("MfKQ9r8G"), "no secret in metrics");
    let metrics_handle = engine.metrics.clone();
    engine.stop().await;
    assert!(!metrics_handle.is_ready(), "not ready after stop");
    assert_eq!(get("/readyz").await.unwrap().status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_destination_rests_instead_of_slowing_every_batch() {
    let db = TestDb::new().await;
    let hooks = Receiver::start(SECRET).await;
    // Accepts connections and never answers, like a host behind a dropped route.
    let blackhole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let blackhole_url = format!("http://{}/hook", blackhole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = blackhole.accept().await {
            held.push(socket);
        }
    });
    let stuck = db.add_device("pia", "slow", &blackhole_url).await;
    let fine = db.add_device("pia", "hooks", &hooks.url("pia")).await;
    let slow = format!(
        "[[channels]]\nname = \"slow\"\nkind = \"webhook\"\nsecret = \"{SECRET}\"\n\
         timeout_ms = 300\n"
    );
    let engine = Running::start(&db, &slow).await;

    let first = db.insert(&[Row::new("pia", PAYLOAD)]).await;
    db.wait_count(
        &format!(
            "SELECT count(*) FROM walpush.deliveries WHERE outbox_id = {} AND device_id = {stuck} \
             AND last_error = 'webhook: timed out'",
            first[0]
        ),
        1,
    )
    .await;
    // The next row does not wait out another timeout: its delivery to the resting
    // destination is deferred without an attempt, the healthy device gets it at once.
    let second = db.insert(&[Row::new("pia", PAYLOAD)]).await;
    db.wait_deliveries(second[0], 2).await;
    engine.stop().await;

    let (status, attempts, reason) = db.delivery(second[0], stuck).await;
    assert_eq!((status.as_str(), attempts), ("failed", 0));
    assert_eq!(
        reason.as_deref(),
        Some("webhook: not attempted, destination unreachable")
    );
    assert_eq!(db.delivery(second[0], fine).await.0, "sent");
    assert_eq!(db.delivery(first[0], fine).await.0, "sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_this_build_cannot_deliver_is_dead_with_a_reason_and_the_rest_goes_on() {
    let db = TestDb::new().await;
    let hooks = Receiver::start(SECRET).await;
    let mail = db.add_device("quinn", "mail", "quinn@example.com").await;
    let hook = db.add_device("quinn", "hooks", &hooks.url("quinn")).await;
    let extra = "[[channels]]\nname = \"mail\"\nkind = \"email\"\n\
                 smtp_url = \"smtp://127.0.0.1:2525\"\nfrom = \"Ex <no@example.com>\"\n";
    let engine = Running::start(&db, extra).await;
    let ids = db.insert(&[Row::new("quinn", PAYLOAD)]).await;
    db.wait_count("SELECT count(*) FROM walpush.deliveries", 2)
        .await;
    engine.stop().await;

    let (status, attempts, reason) = db.delivery(ids[0], mail).await;
    assert_eq!((status.as_str(), attempts), ("dead", 1));
    assert_eq!(
        reason.as_deref(),
        Some("email: this build of walpush cannot deliver this kind")
    );
    assert_eq!(db.delivery(ids[0], hook).await.0, "sent");
}
