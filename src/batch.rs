//! Batches: closing them by size and time, collapse keys, and fan-out to devices.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::channels::Job;
use crate::ledger::{Device, Record};
use crate::lsn::Lsn;
use crate::outbox::OutboxRow;
use crate::retry::Status;

/// Committed outbox rows handed to fan-out together.
#[derive(Debug, Default)]
pub struct Batch {
    /// The rows, in commit order.
    pub rows: Vec<Arc<OutboxRow>>,
    /// End LSN of the last transaction whose rows are all in this batch or earlier ones; the
    /// position recorded with the batch. `None` when the batch only holds part of a
    /// transaction: a transaction is never half-confirmed.
    pub confirm: Option<Lsn>,
    /// When the first row (or commit) arrived.
    pub opened: Option<Instant>,
}

/// Accumulates rows and closes a batch at `max_rows` rows or `max_wait` after its first row.
#[derive(Debug)]
pub struct Batcher {
    max_rows: usize,
    max_wait: Duration,
    current: Batch,
}

impl Batcher {
    /// A batcher with the `[batch]` limits.
    pub fn new(max_rows: usize, max_wait: Duration) -> Batcher {
        Batcher {
            max_rows: max_rows.max(1),
            max_wait,
            current: Batch::default(),
        }
    }

    /// Adds a row; returns the batch when this row filled it.
    pub fn push(&mut self, row: Arc<OutboxRow>) -> Option<Batch> {
        self.current.opened.get_or_insert_with(Instant::now);
        self.current.rows.push(row);
        (self.current.rows.len() >= self.max_rows).then(|| self.take_now())
    }

    /// A transaction ended at `end_lsn`: everything pushed so far is complete.
    pub fn commit(&mut self, end_lsn: Lsn) {
        // A commit with no rows still opens the window, so its position is saved and
        // confirmed promptly.
        self.current.opened.get_or_insert_with(Instant::now);
        self.current.confirm = Some(end_lsn);
    }

    /// When the open batch must close, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.current.opened.map(|opened| opened + self.max_wait)
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.current.opened.is_none()
    }

    /// Closes the open batch now (deadline reached, or shutting down).
    pub fn take(&mut self) -> Option<Batch> {
        (!self.is_empty()).then(|| self.take_now())
    }

    fn take_now(&mut self) -> Batch {
        let capacity = self.max_rows.min(4096);
        std::mem::replace(
            &mut self.current,
            Batch {
                rows: Vec::with_capacity(capacity),
                ..Batch::default()
            },
        )
    }
}

/// What fan-out decided for a batch.
#[derive(Debug, Default)]
pub struct Plan {
    /// Deliveries to send.
    pub jobs: Vec<Job>,
    /// The channel name of each job.
    pub channels: Vec<Arc<str>>,
    /// Deliveries decided without a send: collapsed, or dead before any attempt.
    pub settled: Vec<Record>,
}

/// Fans rows out to their recipients' active devices.
///
/// Rows with the same `(recipient, collapse_key)` keep only the newest (the last in commit
/// order); the others are `collapsed`. A delivery to a channel name that `configured` does not
/// know is `dead`; so is one whose payload is not a JSON object.
pub fn plan(
    rows: &[Arc<OutboxRow>],
    devices: &[Device],
    configured: impl Fn(&str) -> bool,
) -> Plan {
    let mut by_recipient: HashMap<&str, Vec<&Device>> = HashMap::new();
    for device in devices {
        by_recipient
            .entry(&device.recipient)
            .or_default()
            .push(device);
    }

    let mut newest: HashMap<(&str, &str), i64> = HashMap::new();
    for row in rows {
        if let Some(key) = &row.collapse_key {
            newest.insert((&row.recipient, key), row.id);
        }
    }
    let collapsed: HashSet<i64> = rows
        .iter()
        .filter(|row| match &row.collapse_key {
            Some(key) => newest.get(&(row.recipient.as_str(), key.as_str())) != Some(&row.id),
            None => false,
        })
        .map(|row| row.id)
        .collect();

    let mut plan = Plan::default();
    for row in rows {
        let Some(targets) = by_recipient.get(row.recipient.as_str()) else {
            continue;
        };
        for device in targets.iter().filter(|d| row.wants(&d.channel)) {
            let settle = |status, reason: Option<String>| {
                Record::unsent(
                    row.id,
                    device.id,
                    device.channel.clone(),
                    row.commit_lsn,
                    status,
                    reason,
                )
            };
            if collapsed.contains(&row.id) {
                plan.settled.push(settle(Status::Collapsed, None));
            } else if !configured(&device.channel) {
                let reason = format!("no channel named {:?} is configured", &*device.channel);
                plan.settled.push(settle(Status::Dead, Some(reason)));
            } else if !row.payload_is_object() {
                let reason = "payload is not a JSON object".to_owned();
                plan.settled.push(settle(Status::Dead, Some(reason)));
            } else {
                plan.jobs.push(Job {
                    row: row.clone(),
                    device_id: device.id,
                    address: device.address.clone(),
                });
                plan.channels.push(device.channel.clone());
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        id: i64,
        recipient: &str,
        collapse: Option<&str>,
        channels: Option<&[&str]>,
    ) -> Arc<OutboxRow> {
        Arc::new(OutboxRow {
            id,
            topic: "t".to_owned(),
            recipient: recipient.to_owned(),
            payload: Arc::from("{}"),
            channels: channels.map(|c| c.iter().map(|s| s.to_string()).collect()),
            collapse_key: collapse.map(str::to_owned),
            created_at: String::new(),
            commit_lsn: Lsn(id as u64),
        })
    }

    fn device(id: i64, recipient: &str, channel: &str) -> Device {
        Device {
            id,
            recipient: recipient.to_owned(),
            channel: Arc::from(channel),
            address: Arc::from(format!("http://127.0.0.1/{id}").as_str()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_closes_at_max_rows() {
        let mut b = Batcher::new(2, Duration::from_millis(10));
        assert!(b.push(row(1, "a", None, None)).is_none());
        let batch = b.push(row(2, "a", None, None)).expect("full");
        assert_eq!(batch.rows.len(), 2);
        assert_eq!(batch.confirm, None, "no commit seen yet");
        assert!(b.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_closes_max_wait_after_its_first_row() {
        let mut b = Batcher::new(100, Duration::from_millis(10));
        assert_eq!(b.deadline(), None);
        let start = Instant::now();
        b.push(row(1, "a", None, None));
        tokio::time::advance(Duration::from_millis(7)).await;
        b.push(row(2, "a", None, None));
        b.commit(Lsn(99));
        // The window runs from the first row, not the last.
        assert_eq!(b.deadline(), Some(start + Duration::from_millis(10)));
        tokio::time::sleep_until(b.deadline().unwrap()).await;
        let batch = b.take().expect("open batch");
        assert_eq!(batch.rows.len(), 2);
        assert_eq!(batch.confirm, Some(Lsn(99)));
        assert!(b.take().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_split_transaction_is_not_confirmed_until_its_commit() {
        let mut b = Batcher::new(2, Duration::from_millis(10));
        b.push(row(1, "a", None, None));
        b.commit(Lsn(10));
        // Second transaction: three rows, split across batches.
        let first = b.push(row(2, "a", None, None)).expect("full");
        assert_eq!(first.confirm, Some(Lsn(10)));
        assert!(b.push(row(3, "a", None, None)).is_none());
        let second = b.push(row(4, "a", None, None)).expect("full");
        assert_eq!(second.confirm, None, "transaction still open");
        b.commit(Lsn(20));
        let last = b.take().expect("a commit opens a batch");
        assert!(last.rows.is_empty());
        assert_eq!(last.confirm, Some(Lsn(20)));
    }

    #[test]
    fn fan_out_reaches_every_active_device_on_the_named_channels() {
        let rows = [
            row(1, "a", None, None),
            row(2, "a", None, Some(&["ios"])),
            row(3, "z", None, None),
        ];
        let devices = [
            device(10, "a", "hooks"),
            device(11, "a", "ios"),
            device(12, "b", "hooks"),
        ];
        let plan = plan(&rows, &devices, |_| true);
        let pairs: Vec<(i64, i64)> = plan.jobs.iter().map(|j| (j.row.id, j.device_id)).collect();
        assert_eq!(pairs, vec![(1, 10), (1, 11), (2, 11)]);
        assert_eq!(&*plan.channels[0], "hooks");
        assert!(plan.settled.is_empty());
    }

    #[test]
    fn collapse_keeps_the_newest_per_recipient_and_key() {
        let rows = [
            row(1, "a", Some("k"), None),
            row(2, "b", Some("k"), None),
            row(3, "a", Some("k"), None),
            row(4, "a", Some("other"), None),
        ];
        let devices = [device(10, "a", "hooks"), device(20, "b", "hooks")];
        let plan = plan(&rows, &devices, |_| true);
        let sent: Vec<i64> = plan.jobs.iter().map(|j| j.row.id).collect();
        assert_eq!(sent, vec![2, 3, 4]);
        assert_eq!(plan.settled.len(), 1);
        assert_eq!(plan.settled[0].outbox_id, 1);
        assert_eq!(plan.settled[0].status, Status::Collapsed);
    }

    #[test]
    fn unknown_channels_and_bad_payloads_are_dead_with_a_reason() {
        let mut bad = (*row(2, "a", None, None)).clone();
        bad.payload = Arc::from("\"text\"");
        let rows = [row(1, "a", None, None), Arc::new(bad)];
        let devices = [device(10, "a", "hooks"), device(11, "a", "pager")];
        let plan = plan(&rows, &devices, |name| name == "hooks");
        assert_eq!(plan.jobs.len(), 1);
        let reasons: Vec<(i64, i64, Status, String)> = plan
            .settled
            .iter()
            .map(|r| {
                (
                    r.outbox_id,
                    r.device_id,
                    r.status,
                    r.last_error.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            reasons,
            vec![
                (
                    1,
                    11,
                    Status::Dead,
                    "no channel named \"pager\" is configured".to_owned()
                ),
                (
                    2,
                    10,
                    Status::Dead,
                    "payload is not a JSON object".to_owned()
                ),
                (
                    2,
                    11,
                    Status::Dead,
                    "no channel named \"pager\" is configured".to_owned()
                ),
            ]
        );
    }
}
