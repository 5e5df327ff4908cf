//! walpush: tails PostgreSQL logical replication and pushes outbox rows to devices.

pub mod admin;
pub mod batch;
pub mod channels;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod engine;
pub mod http;
pub mod ledger;
pub mod lsn;
pub mod metrics;
pub mod outbox;
pub mod retry;
pub mod schema;
pub mod source;
