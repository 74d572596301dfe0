//! The cross-component tests, one module per subject, built as one test binary: a debug
//! binary linking deltalake, DataFusion and tonic is ~350 MB, and one per file filled the
//! CI machine's disk at link time. Tests with process-wide side effects (`security`, which
//! sets an environment variable) or that want the machine to themselves (`chaos`) stay in
//! their own binaries beside this directory.
//!
//! Run one subject with `cargo test -p freshet-integration-tests --test it postgres::`.

mod admin;
mod auth;
mod backlog;
mod bad_input;
mod cluster;
mod compaction;
mod cycle;
mod deletion_vectors;
mod dev;
mod e2e;
mod etcd_tls;
mod explain;
mod faults;
mod flight;
mod fresh_read;
mod lifecycle;
mod maintenance;
mod memory;
mod pg_tls;
mod postgres;
mod readers;
mod recovery;
mod router;
mod s3;
mod source_lifecycle;
mod tls;
