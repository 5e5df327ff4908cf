//! Integration tests: one binary, against a real PostgreSQL and local receivers.

mod support;

mod cli;
mod engine;
mod faults;
mod push;
