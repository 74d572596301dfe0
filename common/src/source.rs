//! Source definitions: a PostgreSQL source's configuration (where to connect, with the
//! password from the environment or a file, never from the file itself and never logged),
//! its publication and slot, and the tables it mirrors, each mapped to a Freshet table.

use serde::{Deserialize, Serialize};

/// One PostgreSQL source.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The source's name.
    pub name: String,
    /// The kind of source; only `postgres` exists.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// libpq-style connection string without the password (`host=... port=... user=... dbname=...`).
    pub connection: String,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the password.
    #[serde(default)]
    pub password_file: Option<String>,
    /// The publication (created `FOR TABLE ...` when missing).
    pub publication: String,
    /// The logical replication slot (created when missing).
    pub slot: String,
    /// Milliseconds between polls of the slot.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// Rows per snapshot batch.
    #[serde(default = "default_snapshot_batch_rows")]
    pub snapshot_batch_rows: usize,
    /// The tables to mirror.
    pub tables: Vec<SourceTable>,
}

fn default_kind() -> String {
    "postgres".into()
}

fn default_poll_ms() -> u64 {
    200
}

fn default_snapshot_batch_rows() -> usize {
    50_000
}

/// One mirrored table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceTable {
    /// The PostgreSQL table, `schema.table` (default schema `public`).
    pub source: String,
    /// The Freshet table's name.
    pub name: String,
    /// The Delta table's URI.
    pub uri: String,
    /// Partition columns (must be part of the primary key).
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// Target file size in bytes.
    #[serde(default)]
    pub target_file_size: Option<u64>,
}

impl SourceTable {
    /// `(schema, table)`.
    pub fn qualified(&self) -> (String, String) {
        match self.source.split_once('.') {
            Some((s, t)) => (s.to_string(), t.to_string()),
            None => ("public".to_string(), self.source.clone()),
        }
    }
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection string is printed without any password= part.
        f.debug_struct("SourceConfig")
            .field("name", &self.name)
            .field("connection", &redact(&self.connection))
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("publication", &self.publication)
            .field("slot", &self.slot)
            .field("tables", &self.tables)
            .finish()
    }
}

fn redact(conn: &str) -> String {
    conn.split_whitespace()
        .map(|kv| {
            if kv.to_ascii_lowercase().starts_with("password=") {
                "password=<redacted>"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
