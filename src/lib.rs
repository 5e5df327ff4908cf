//! walpush: tails PostgreSQL logical replication and pushes outbox rows to devices.

pub mod batch;
pub mod channels;
pub mod cluster;
pub mod config;
pub mod ledger;
pub mod lsn;
pub mod outbox;
pub mod retry;
pub mod source;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod schema;
pub mod admin;
pub mod cli;
pub mod demo;
