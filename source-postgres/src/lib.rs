//! The PostgreSQL CDC source: a consistent snapshot of each table, then logical
//! replication (`pgoutput` over the replication protocol, `START_REPLICATION ... LOGICAL`,
//! with the slot's flush position reported only after staging), staged into Freshet
//! exactly once under sequences derived from commit LSNs.

pub mod array;
pub mod assembly;
pub mod config;
pub mod copy;
pub mod error;
pub mod pgoutput;
pub mod schema;
pub mod source;
pub mod transport;
pub mod types;

pub use config::{SourceConfig, SourceTable};
pub use error::{Result, SourceError};
pub use source::{PostgresFactory, PostgresSource, SourceStatus, check, launch, start};
