//! What coordinator, workers, the CLI and tests share: configuration, table definitions,
//! Delta log access, the staging-log format, the merge kernel and file statistics.

pub mod auth;
pub mod changes;
pub mod config;
pub mod delta;
pub mod dv;
pub mod error;
pub mod etcd;
pub mod faults;
pub mod http;
pub mod ipc;
pub mod key;
pub mod merge;
pub mod naming;
pub mod prefixes;
pub mod schema;
pub mod secrets;
pub mod server;
pub mod sink;
pub mod source;
pub mod staging;
pub mod stats;
pub mod storage;
pub mod table;
pub mod tls;

pub use error::{Error, Result};
