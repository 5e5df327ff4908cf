//! The device channels against local fakes that verify like APNs, FCM and a push service.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use walpush::channels::apns::{self, Apns};
use walpush::channels::fcm::Fcm;
use walpush::channels::webpush::WebPush;
use walpush::channels::{Channel, Job, Outcome};
use walpush::lsn::Lsn;
use walpush::outbox::OutboxRow;

use crate::support::apns::FakeApns;
use crate::support::fcm::FakeFcm;
use crate::support::webpush::{vapid_tokens, FakeWebPush};

const IPHONE: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

fn job(outbox_id: i64, device_id: i64, address: &str, payload: serde_json::Value) -> Job {
    Job {
        row: Arc::new(OutboxRow {
            id: outbox_id,
            topic: "order.shipped".to_owned(),
            recipient: "user-1".to_owned(),
            payload: Arc::from(payload.to_string()),
            channels: None,
            collapse_key: Some("order-7".to_owned()),
            created_at: "2026-12-03T18:40:00Z".to_owned(),
            commit_lsn: Lsn(0x16B3748),
        }),
        device_id,
        address: Arc::from(address),
    }
}

fn alert() -> serde_json::Value {
    json!({"title": "Shipped", "body": "Order 7 is on its way", "data": {"order": 7}, "ttl": 600})
}

fn too_large() -> serde_json::Value {
    json!({"title": "big", "body": "x".repeat(5000)})
}

fn is_retry_after(outcome: &Outcome, seconds: u64) -> bool {
    matches!(outcome, Outcome::Retry { after: Some(d), .. } if *d == Duration::from_secs(seconds))
}

#[tokio::test]
async fn apns_alert_and_background_pushes_carry_the_required_headers() {
    let fake = FakeApns::start().await;
    let channel = Apns::with_clock("ios", &fake.config(), fake.clock.clone()).unwrap();
    let background = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
    let jobs = [
        job(7, 1, IPHONE, alert()),
        job(8, 2, background, json!({"data": {"sync": 1}})),
    ];

    let outcomes = channel.send(&jobs).await;

    assert_eq!(
        outcomes,
        vec![
            Outcome::Sent {
                provider_ref: Some(apns::apns_id(7, 1))
            },
            Outcome::Sent {
                provider_ref: Some(apns::apns_id(8, 2))
            },
        ]
    );
    let received = fake.received();
    assert_eq!(received.len(), 2);
    let first = received.iter().find(|r| r.device_token == IPHONE).unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.headers["apns-push-type"], "alert");
    assert_eq!(first.headers["apns-priority"], "10");
    assert_eq!(first.headers["apns-topic"], crate::support::apns::TOPIC);
    assert_eq!(first.headers["apns-collapse-id"], "order-7");
    assert_eq!(first.headers["apns-id"], apns::apns_id(7, 1));
    let expiration: u64 = first.headers["apns-expiration"].parse().unwrap();
    assert!(expiration >= fake.clock.now_unix() + 590);
    assert_eq!(first.body["aps"]["alert"]["title"], "Shipped");
    assert_eq!(first.body["order"], 7);
    let second = received
        .iter()
        .find(|r| r.device_token == background)
        .unwrap();
    assert_eq!(
        (second.status, second.headers["apns-push-type"].as_str()),
        (200, "background")
    );
    assert_eq!(second.headers["apns-priority"], "5");
    // One provider token for both requests: never minted per request.
    assert_eq!(fake.provider_tokens().len(), 1);
}

#[tokio::test]
async fn apns_answers_deactivate_retry_or_kill_deliveries() {
    let fake = FakeApns::start().await;
    let channel = Apns::with_clock("ios", &fake.config(), fake.clock.clone()).unwrap();
    let tokens = [
        "aa".repeat(32),
        "bb".repeat(32),
        "cc".repeat(32),
        "dd".repeat(32),
    ];
    fake.answer(&tokens[0], 410, "Unregistered", None);
    fake.answer(&tokens[1], 400, "BadDeviceToken", None);
    fake.answer(&tokens[2], 429, "TooManyRequests", Some(30));
    fake.answer(&tokens[3], 503, "ServiceUnavailable", None);
    let mut jobs: Vec<Job> = tokens.iter().map(|t| job(1, 1, t, alert())).collect();
    jobs.push(job(2, 2, IPHONE, too_large()));

    let outcomes = channel.send(&jobs).await;

    assert_eq!(
        outcomes[0],
        Outcome::Gone {
            reason: "apns: Unregistered".to_owned()
        }
    );
    assert_eq!(
        outcomes[1],
        Outcome::Gone {
            reason: "apns: BadDeviceToken".to_owned()
        }
    );
    assert!(is_retry_after(&outcomes[2], 30), "{:?}", outcomes[2]);
    assert!(matches!(outcomes[3], Outcome::Retry { .. }));
    let Outcome::Dead { reason } = &outcomes[4] else {
        panic!("{:?}", outcomes[4])
    };
    assert!(reason.contains("over the 4096-byte limit"), "{reason}");
    // The oversized payload never left walpush.
    assert_eq!(fake.received().len(), 4);
}

#[tokio::test]
async fn apns_provider_token_is_replaced_after_forty_minutes() {
    let fake = FakeApns::start().await;
    let channel = Apns::with_clock("ios", &fake.config(), fake.clock.clone()).unwrap();
    let send = || {
        let (channel, jobs) = (&channel, [job(1, 1, IPHONE, alert())]);
        async move { channel.send(&jobs).await }
    };

    assert!(matches!(send().await[0], Outcome::Sent { .. }));
    fake.clock.advance(Duration::from_secs(39 * 60));
    assert!(matches!(send().await[0], Outcome::Sent { .. }));
    assert_eq!(fake.provider_tokens().len(), 1);

    fake.clock.advance(Duration::from_secs(2 * 60));
    assert!(matches!(send().await[0], Outcome::Sent { .. }));
    assert_eq!(fake.provider_tokens().len(), 2);
    assert!(fake.received().iter().all(|r| r.status == 200));
}

#[tokio::test]
async fn apns_expired_provider_token_answer_mints_a_new_token_and_sends_again() {
    let fake = FakeApns::start().await;
    let clock = walpush::channels::push::Clock::system();
    let channel = Apns::with_clock("ios", &fake.config(), clock.clone()).unwrap();
    assert!(matches!(
        channel.send(&[job(1, 1, IPHONE, alert())]).await[0],
        Outcome::Sent { .. }
    ));

    // Apple's clock runs ahead of the channel's: the cached token, fresh by the channel's
    // reckoning (30 minutes), is an hour old for APNs and refused as expired.
    fake.clock.advance(Duration::from_secs(3700));
    clock.advance(Duration::from_secs(1800));
    let outcomes = channel.send(&[job(2, 1, IPHONE, alert())]).await;

    assert!(matches!(outcomes[0], Outcome::Sent { .. }), "{outcomes:?}");
    let received = fake.received();
    let answers: Vec<_> = received
        .iter()
        .map(|r| (r.status, r.reason.as_deref()))
        .collect();
    assert_eq!(
        answers,
        vec![
            (200, None),
            (403, Some("ExpiredProviderToken")),
            (200, None)
        ]
    );
    assert_eq!(received[0].jwt, received[1].jwt);
    assert_ne!(received[1].jwt, received[2].jwt);
}

#[tokio::test]
async fn apns_wrong_signing_key_is_a_dead_configuration_fault() {
    let fake = FakeApns::start().await;
    let other = tempfile::tempdir().unwrap();
    let mut config = fake.config();
    config.key_file = other.path().join("other.p8");
    std::fs::write(
        &config.key_file,
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let channel = Apns::new("ios", &config).unwrap();

    let outcomes = channel.send(&[job(1, 1, IPHONE, alert())]).await;

    assert_eq!(
        outcomes,
        vec![Outcome::Dead {
            reason: "apns: HTTP 403 InvalidProviderToken".into()
        }]
    );
}

#[tokio::test]
async fn fcm_message_reaches_the_device_and_the_access_token_is_cached_then_refreshed() {
    let fake = FakeFcm::start().await;
    let channel = Fcm::with_clock("android", &fake.config(), fake.clock.clone()).unwrap();
    let jobs = [
        job(7, 1, "android-token-1", alert()),
        job(7, 2, "android-token-2", alert()),
    ];

    let outcomes = channel.send(&jobs).await;

    for outcome in &outcomes {
        let Outcome::Sent {
            provider_ref: Some(name),
        } = outcome
        else {
            panic!("{outcome:?}")
        };
        assert!(
            name.starts_with("projects/walpush-test/messages/"),
            "{name}"
        );
    }
    let received = fake.received();
    assert_eq!(received.len(), 2);
    assert!(received
        .iter()
        .any(|r| r.token == "android-token-2" && r.status == 200));
    let message = &received[0].message;
    assert_eq!(
        message["notification"],
        json!({"title": "Shipped", "body": "Order 7 is on its way"})
    );
    assert_eq!(message["data"], json!({"order": "7"}));
    assert_eq!(
        message["android"],
        json!({"collapse_key": "order-7", "ttl": "600s", "priority": "high"})
    );
    assert_eq!(fake.token_requests(), 1);

    // The token lives an hour; shortly before it ends a new one is fetched.
    fake.clock.advance(Duration::from_secs(50 * 60));
    assert!(matches!(
        channel.send(&jobs[..1]).await[0],
        Outcome::Sent { .. }
    ));
    assert_eq!(fake.token_requests(), 1);
    fake.clock.advance(Duration::from_secs(6 * 60));
    assert!(matches!(
        channel.send(&jobs[..1]).await[0],
        Outcome::Sent { .. }
    ));
    assert_eq!(fake.token_requests(), 2);
}

#[tokio::test]
async fn fcm_rejected_access_token_is_replaced_once() {
    let fake = FakeFcm::start().await;
    let channel = Fcm::with_clock("android", &fake.config(), fake.clock.clone()).unwrap();
    assert!(matches!(
        channel.send(&[job(1, 1, "t1", alert())]).await[0],
        Outcome::Sent { .. }
    ));
    fake.revoke_access_tokens();

    let outcomes = channel.send(&[job(2, 1, "t1", alert())]).await;

    assert!(matches!(outcomes[0], Outcome::Sent { .. }), "{outcomes:?}");
    let statuses: Vec<u16> = fake.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 401, 200]);
    assert_eq!(fake.token_requests(), 2);
}

#[tokio::test]
async fn fcm_errors_deactivate_retry_or_kill_deliveries() {
    let fake = FakeFcm::start().await;
    let channel = Fcm::with_clock("android", &fake.config(), fake.clock.clone()).unwrap();
    fake.answer("gone", 404, "UNREGISTERED", None);
    fake.answer("other-sender", 403, "SENDER_ID_MISMATCH", None);
    fake.answer("busy", 429, "QUOTA_EXCEEDED", Some(17));
    fake.answer("down", 503, "UNAVAILABLE", None);
    let jobs = [
        job(1, 1, "gone", alert()),
        job(1, 2, "other-sender", alert()),
        job(1, 3, "busy", alert()),
        job(1, 4, "down", alert()),
        // An override FCM does not know: refused by FCM as INVALID_ARGUMENT.
        job(
            1,
            5,
            "fine",
            json!({"title": "t", "fcm": {"no_such_field": 1}}),
        ),
        job(1, 6, "fine", too_large()),
    ];

    let outcomes = channel.send(&jobs).await;

    assert_eq!(
        outcomes[0],
        Outcome::Gone {
            reason: "fcm: UNREGISTERED".to_owned()
        }
    );
    assert_eq!(
        outcomes[1],
        Outcome::Gone {
            reason: "fcm: SENDER_ID_MISMATCH".to_owned()
        }
    );
    assert!(is_retry_after(&outcomes[2], 17), "{:?}", outcomes[2]);
    assert!(matches!(outcomes[3], Outcome::Retry { .. }));
    assert!(
        matches!(&outcomes[4], Outcome::Dead { reason } if reason.contains("INVALID_ARGUMENT"))
    );
    assert!(matches!(
        &outcomes[5],
        Outcome::Dead { reason } if reason.contains("over the 4096-byte limit")
    ));
    assert_eq!(fake.received().len(), 5);
}

#[tokio::test]
async fn webpush_message_is_encrypted_for_the_browser_and_vapid_signed() {
    let fake = FakeWebPush::start().await;
    let channel = WebPush::with_clock("browser", &fake.config(), fake.clock.clone()).unwrap();
    let browser = fake.subscribe("b1");

    let outcomes = channel.send(&[job(7, 3, &browser, alert())]).await;

    let Outcome::Sent {
        provider_ref: Some(location),
    } = &outcomes[0]
    else {
        panic!("{outcomes:?}")
    };
    assert!(location.starts_with(&format!("{}/message/", fake.url)));
    let received = fake.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        (received[0].subscription.as_str(), received[0].status),
        ("b1", 201)
    );
    let plaintext = received[0].plaintext.as_ref().expect("decrypted");
    assert_eq!(plaintext["title"], "Shipped");
    assert_eq!(plaintext["id"], "msg_7_3");
    assert_eq!(plaintext["data"]["order"], 7);
    assert_eq!(received[0].headers["ttl"], "600");
    assert_eq!(received[0].headers["urgency"], "high");
    assert_eq!(received[0].headers["topic"], "order-7");
    assert_eq!(received[0].headers["content-encoding"], "aes128gcm");
}

#[tokio::test]
async fn webpush_vapid_token_is_cached_then_replaced_and_pkcs8_keys_work() {
    let fake = FakeWebPush::start().await;
    let mut config = fake.config();
    config.vapid_private_key_file = fake.vapid_pkcs8_file.clone();
    let channel = WebPush::with_clock("browser", &config, fake.clock.clone()).unwrap();
    let browser = fake.subscribe("b1");
    let send = || {
        let (channel, jobs) = (&channel, [job(1, 1, &browser, alert())]);
        async move { channel.send(&jobs).await }
    };

    assert!(matches!(send().await[0], Outcome::Sent { .. }));
    assert!(matches!(send().await[0], Outcome::Sent { .. }));
    assert_eq!(vapid_tokens(&fake.received()).len(), 1);
    fake.clock.advance(Duration::from_secs(11 * 3600 + 1));
    assert!(matches!(send().await[0], Outcome::Sent { .. }));
    assert_eq!(vapid_tokens(&fake.received()).len(), 2);
}

#[tokio::test]
async fn webpush_answers_and_malformed_subscriptions() {
    let fake = FakeWebPush::start().await;
    let channel = WebPush::with_clock("browser", &fake.config(), fake.clock.clone()).unwrap();
    let (gone, busy, huge) = (
        fake.subscribe("gone"),
        fake.subscribe("busy"),
        fake.subscribe("huge"),
    );
    fake.answer("gone", 410, None);
    fake.answer("busy", 429, Some(5));
    fake.answer("huge", 413, None);
    let unknown = fake
        .subscribe("unknown")
        .replace("/push/unknown", "/push/never-subscribed");
    let ok = fake.subscribe("ok");
    let jobs = [
        job(1, 1, &gone, alert()),
        job(1, 2, &busy, alert()),
        job(1, 3, &huge, alert()),
        job(1, 4, &unknown, alert()),
        job(
            1,
            5,
            r#"{"endpoint": "https://push.example/x", "keys": {"p256dh": "nope"}}"#,
            alert(),
        ),
        job(1, 6, "not json at all", alert()),
        job(1, 7, &ok, too_large()),
    ];

    let outcomes = channel.send(&jobs).await;

    assert_eq!(
        outcomes[0],
        Outcome::Gone {
            reason: "webpush: 410".to_owned()
        }
    );
    assert!(is_retry_after(&outcomes[1], 5), "{:?}", outcomes[1]);
    assert!(matches!(outcomes[2], Outcome::Dead { .. }));
    assert_eq!(
        outcomes[3],
        Outcome::Gone {
            reason: "webpush: 404".to_owned()
        }
    );
    assert!(matches!(
        &outcomes[4],
        Outcome::Dead { reason } if reason.contains("malformed subscription")
    ));
    assert!(matches!(
        &outcomes[5],
        Outcome::Dead { reason } if reason.contains("malformed subscription")
    ));
    assert!(matches!(&outcomes[6], Outcome::Dead { reason } if reason.contains("byte limit")));
    assert_eq!(fake.received().len(), 4);
}

#[tokio::test]
async fn webpush_key_the_browser_did_not_subscribe_with_is_refused() {
    let fake = FakeWebPush::start().await;
    let other = FakeWebPush::start().await;
    let mut config = fake.config();
    config.vapid_private_key_file = other.vapid_key_file.clone();
    let channel = WebPush::new("browser", &config).unwrap();

    let outcomes = channel
        .send(&[job(1, 1, &fake.subscribe("b"), alert())])
        .await;

    assert_eq!(
        outcomes,
        vec![Outcome::Dead {
            reason: "webpush: HTTP 403".to_owned()
        }]
    );
}

const IPHONE_TOKEN: &str = "a1b2c3d4e5f6a1b2c3d4e5f6a1b2c3d4e5f6a1b2c3d4e5f6a1b2c3d4e5f6a1b2";

/// The seed's promise end to end: one INSERT reaches a person's iPhone, Android phone and
/// browser (and their webhook) once each, through the engine and the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_outbox_row_reaches_an_iphone_an_android_phone_and_a_browser_once_each() {
    use crate::support::receiver::Receiver;
    use crate::support::{Row, Running, TestDb, SECRET};

    let apns = FakeApns::start().await;
    let fcm = FakeFcm::start().await;
    let browser = FakeWebPush::start().await;
    let hooks = Receiver::start(SECRET).await;
    let db = TestDb::new().await;
    let iphone = db.add_device("nia", "ios", IPHONE_TOKEN).await;
    let android = db
        .add_device("nia", "android", "fcm-registration-token-1")
        .await;
    let laptop = db
        .add_device("nia", "browser", &browser.subscribe("nia-laptop"))
        .await;
    let hook = db.add_device("nia", "hooks", &hooks.url("nia")).await;

    let a = apns.config();
    let f = fcm.config();
    let w = browser.config();
    let extra = format!(
        "[[channels]]\nname = \"ios\"\nkind = \"apns\"\nendpoint = {:?}\nkey_file = {:?}\n\
         key_id = {:?}\nteam_id = {:?}\ntopic = {:?}\nca_file = {:?}\n\
         [[channels]]\nname = \"android\"\nkind = \"fcm\"\nendpoint = {:?}\n\
         service_account_file = {:?}\nca_file = {:?}\n\
         [[channels]]\nname = \"browser\"\nkind = \"webpush\"\nvapid_private_key_file = {:?}\n\
         subject = {:?}\nca_file = {:?}\n",
        a.endpoint,
        a.key_file.display().to_string(),
        a.key_id,
        a.team_id,
        a.topic,
        a.ca_file.unwrap().display().to_string(),
        f.endpoint,
        f.service_account_file.display().to_string(),
        f.ca_file.unwrap().display().to_string(),
        w.vapid_private_key_file.display().to_string(),
        w.subject,
        w.ca_file.unwrap().display().to_string(),
    );
    let engine = Running::start(&db, &extra).await;
    let ids = db
        .insert(&[Row::new(
            "nia",
            r#"{"title": "Order shipped", "body": "On its way"}"#,
        )])
        .await;
    db.wait_count(
        "SELECT count(*) FROM walpush.deliveries WHERE status = 'sent'",
        4,
    )
    .await;
    engine.stop().await;

    assert_eq!(db.count("SELECT count(*) FROM walpush.deliveries").await, 4);
    for device in [iphone, android, laptop, hook] {
        assert_eq!(
            db.delivery(ids[0], device).await.0,
            "sent",
            "device {device}"
        );
    }
    let to_iphone = apns.received();
    assert_eq!(to_iphone.len(), 1);
    assert_eq!(to_iphone[0].device_token, IPHONE_TOKEN);
    assert_eq!(to_iphone[0].body["aps"]["alert"]["title"], "Order shipped");
    let to_android = fcm.received();
    assert_eq!(to_android.len(), 1);
    assert_eq!(to_android[0].token, "fcm-registration-token-1");
    let to_browser = browser.received();
    assert_eq!(to_browser.len(), 1);
    let plaintext = to_browser[0]
        .plaintext
        .as_ref()
        .expect("the fake decrypted the push");
    assert!(
        plaintext.to_string().contains("Order shipped"),
        "{plaintext}"
    );
    assert_eq!(hooks.accepted_events("nia").len(), 1);
    // APNs and Web Push answers carry a provider reference into the ledger.
    let refs = db
        .count(&format!(
            "SELECT count(*) FROM walpush.deliveries WHERE outbox_id = {} \
             AND provider_ref IS NOT NULL",
            ids[0]
        ))
        .await;
    assert!(refs >= 2, "apns-id and Location recorded, got {refs}");
}
