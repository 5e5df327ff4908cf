//! `walpush demo`: the whole path on a throwaway cluster, with a built-in signed-webhook receiver.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use tokio::sync::watch;

use crate::channels::{webhook, Registry};
use crate::cluster::{Cluster, ClusterOptions};
use crate::config::{ChannelConfig, ChannelKind, Config, WebhookConfig};
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::{admin, ledger, schema, source};

/// A fixed demo secret: the receiver and the channel share it; nothing real is signed with it.
const SECRET: &str = "whsec_ZGVtby1zZWNyZXQtZm9yLXdhbHB1c2gtZGVtbw==";

#[derive(Default)]
struct Received {
    /// `(outbox_id, device)` → when it first arrived.
    first: HashMap<(i64, String), Instant>,
    requests: usize,
    rejected: usize,
}

/// Runs the demo and prints its report.
pub async fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    println!("walpush demo: starting a throwaway PostgreSQL cluster (wal_level=logical)");
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .context("cannot start PostgreSQL (is it installed?)")?;
    let result = demo(&cluster).await;
    cluster.stop().await.ok();
    drop(cluster);
    result?;
    println!(
        "cluster stopped and removed; demo took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn demo(cluster: &Cluster) -> anyhow::Result<()> {
    let url = cluster.url("postgres");
    let mut client = ledger::connect(&url).await?;
    schema::migrate(&mut client).await?;
    source::ensure_publication(&client, "walpush").await?;
    source::ensure_slot(&client, "walpush").await?;
    println!("migrated; slot walpush created on port {}", cluster.port());

    // The receiver verifies every signature as Standard Webhooks says.
    let received = Arc::new(Mutex::new(Received::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver_url = format!("http://{}", listener.local_addr()?);
    let app = Router::new()
        .route("/hooks/{device}", post(receive))
        .with_state(received.clone());
    let receiver = tokio::spawn(async move { axum::serve(listener, app).await });

    let devices = [
        ("alice", "phone"),
        ("alice", "laptop"),
        ("bob", "phone"),
        ("carol", "tablet"),
    ];
    for (recipient, device) in devices {
        client
            .execute(
                "INSERT INTO walpush.devices (recipient, channel, address) VALUES ($1, 'hooks', $2)",
                &[&recipient, &format!("{receiver_url}/hooks/{recipient}-{device}")],
            )
            .await?;
    }

    let config = Config {
        batch: crate::config::BatchConfig {
            max_rows: 1000,
            max_wait_ms: 5,
        },
        channels: vec![ChannelConfig {
            name: "hooks".to_owned(),
            kind: ChannelKind::Webhook(WebhookConfig {
                secret: SECRET.to_owned(),
                max_events_per_request: 1,
                timeout_ms: 5000,
                concurrency: 16,
                ca_file: None,
            }),
        }],
        ..Config::default()
    };
    let registry = Registry::from_config(&config.channels)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let engine = Engine::new(config, url.clone(), registry, Arc::new(Metrics::new()));
    let engine = tokio::spawn(async move { engine.run(stop_rx).await });

    // Four committed transactions and one rolled back.
    let mut committed_at: HashMap<i64, Instant> = HashMap::new();
    let recipients = ["alice", "bob", "carol"];
    for tx_no in 0..4 {
        let tx = client.transaction().await?;
        let mut ids = Vec::new();
        for n in 0..5 {
            let recipient = recipients[(tx_no + n) % recipients.len()];
            let payload = serde_json::json!({
                "title": format!("Order {tx_no}-{n} shipped"),
                "body": "It is on its way",
                "data": { "order": format!("{tx_no}-{n}") }
            });
            let row = tx
                .query_one(
                    "INSERT INTO walpush.outbox (topic, recipient, payload) \
                     VALUES ('order.shipped', $1, $2) RETURNING id",
                    &[&recipient, &payload],
                )
                .await?;
            ids.push(row.get::<_, i64>(0));
        }
        tx.commit().await?;
        let now = Instant::now();
        committed_at.extend(ids.into_iter().map(|id| (id, now)));
    }
    let tx = client.transaction().await?;
    let rolled_back: i64 = tx
        .query_one(
            "INSERT INTO walpush.outbox (topic, recipient, payload) \
             VALUES ('order.cancelled', 'alice', '{\"title\": \"never\"}') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    tx.rollback().await?;
    println!("inserted 20 rows in 4 transactions, and 1 row in a transaction rolled back");

    let expected: i64 = client
        .query_one(
            "SELECT count(*) FROM walpush.outbox o JOIN walpush.devices d \
             ON d.recipient = o.recipient",
            &[],
        )
        .await?
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let recorded: i64 = client
            .query_one("SELECT count(*) FROM walpush.deliveries", &[])
            .await?
            .get(0);
        if recorded >= expected {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {recorded} of {expected} deliveries recorded after 30s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let _ = stop_tx.send(true);
    engine.await??;
    receiver.abort();

    let status = admin::status(&client, "walpush").await?;
    let received = received
        .lock()
        .map_err(|_| anyhow::anyhow!("receiver poisoned"))?;
    let mut latencies: Vec<Duration> = received
        .first
        .iter()
        .filter_map(|((id, _), at)| {
            committed_at
                .get(id)
                .map(|c| at.saturating_duration_since(*c))
        })
        .collect();
    latencies.sort();
    let pct = |p: f64| {
        let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies
            .get(index)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let leaked = received.first.keys().any(|(id, _)| *id == rolled_back);

    println!();
    println!("report");
    println!("  outbox rows committed:     {}", committed_at.len());
    println!(
        "  rolled-back row delivered: {}",
        if leaked { "YES (bug)" } else { "no" }
    );
    println!(
        "  webhook requests received: {} ({} rejected)",
        received.requests, received.rejected
    );
    println!("  distinct deliveries:       {}", received.first.len());
    let by_status: Vec<String> = status
        .deliveries
        .iter()
        .filter(|(_, c)| **c > 0)
        .map(|(s, c)| format!("{s}={c}"))
        .collect();
    println!("  ledger by status:          {}", by_status.join(" "));
    println!("  commit-to-receipt p50:     {:.1} ms", pct(0.5));
    println!("  commit-to-receipt p99:     {:.1} ms", pct(0.99));
    println!(
        "  slot confirmed at:         {}",
        status.confirmed_lsn.unwrap_or_default()
    );
    if leaked || received.rejected > 0 || (received.first.len() as i64) < expected {
        bail!("the demo did not deliver as expected");
    }
    Ok(())
}

async fn receive(
    State(received): State<Arc<Mutex<Received>>>,
    Path(device): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let now = Instant::now();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let verified = match (
        webhook::secret_key(SECRET),
        header("webhook-timestamp").parse::<u64>(),
    ) {
        (Some(key), Ok(timestamp)) => {
            let expected = webhook::sign(&key, header("webhook-id"), timestamp, &body);
            header("webhook-signature")
                .split(' ')
                .any(|sig| sig == expected)
        }
        _ => false,
    };
    let id = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["id"].as_str().and_then(|s| s.parse::<i64>().ok()));
    let Ok(mut received) = received.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    received.requests += 1;
    match (verified, id) {
        (true, Some(id)) => {
            received.first.entry((id, device)).or_insert(now);
            StatusCode::NO_CONTENT
        }
        _ => {
            received.rejected += 1;
            StatusCode::UNAUTHORIZED
        }
    }
}
