//! The PostgreSQL CDC source: a consistent snapshot of each table, then logical
//! replication (`pgoutput`, read from the slot with `pg_logical_slot_peek_binary_changes`
//! and confirmed with `pg_replication_slot_advance` only after staging), staged into
//! Freshet exactly once under sequences derived from commit LSNs.

pub mod array;
pub mod config;
pub mod copy;
pub mod error;
pub mod pgoutput;
pub mod schema;
pub mod source;
pub mod types;

pub use config::{SourceConfig, SourceTable};
pub use error::{Result, SourceError};
pub use source::{PostgresFactory, PostgresSource, SourceStatus, check, launch, start};
