//! A PostgreSQL source's configuration: where to connect (the password from the
//! environment or a file, never from the file itself and never logged), the publication and
//! slot, and the tables to mirror, each mapped to a Freshet table.

use serde::{Deserialize, Serialize};

use crate::error::{Result, SourceError};

/// One PostgreSQL source.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The source's name.
    pub name: String,
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

impl SourceConfig {
    /// Checks names and builds the tokio-postgres configuration (with the password).
    pub fn pg_config(&self) -> Result<tokio_postgres::Config> {
        let ident = |what: &str, v: &str| {
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                Err(SourceError::Config(format!(
                    "source '{}': {what} '{v}' must be letters, digits and _",
                    self.name
                )))
            } else {
                Ok(())
            }
        };
        ident("slot", &self.slot)?;
        ident("publication", &self.publication)?;
        if self.tables.is_empty() {
            return Err(SourceError::Config(format!(
                "source '{}' has no tables",
                self.name
            )));
        }
        if self.connection.to_ascii_lowercase().contains("password=") {
            return Err(SourceError::Config(format!(
                "source '{}': put the password in password_env or password_file, not in the connection string",
                self.name
            )));
        }
        let mut c: tokio_postgres::Config = self.connection.parse().map_err(|e| {
            SourceError::Config(format!(
                "source '{}': bad connection string: {e}",
                self.name
            ))
        })?;
        if let Some(var) = &self.password_env {
            let p = std::env::var(var).map_err(|_| {
                SourceError::Config(format!(
                    "source '{}': password_env names {var}, which is not set",
                    self.name
                ))
            })?;
            c.password(p);
        } else if let Some(file) = &self.password_file {
            let p = std::fs::read_to_string(file).map_err(|e| {
                SourceError::Config(format!("source '{}': password_file {file}: {e}", self.name))
            })?;
            c.password(p.trim_end_matches(['\n', '\r']));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show_and_names_are_checked() {
        let mut c = SourceConfig {
            name: "pg".into(),
            connection: "host=h user=u dbname=d".into(),
            password_env: Some("FRESHET_TEST_NO_SUCH_VAR".into()),
            password_file: None,
            publication: "pub".into(),
            slot: "slot".into(),
            poll_ms: 100,
            snapshot_batch_rows: 10,
            tables: vec![SourceTable {
                source: "public.t".into(),
                name: "t".into(),
                uri: "/tmp/t".into(),
                partition_by: vec![],
                target_file_size: None,
            }],
        };
        let e = c.pg_config().unwrap_err().to_string();
        assert!(e.contains("FRESHET_TEST_NO_SUCH_VAR"), "{e}");
        c.connection = "host=h password=hunter2".into();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(
            c.pg_config()
                .unwrap_err()
                .to_string()
                .contains("password_env")
        );
        c.connection = "host=h".into();
        c.slot = "bad-slot;".into();
        assert!(c.pg_config().unwrap_err().to_string().contains("slot"));
        assert_eq!(c.tables[0].qualified(), ("public".into(), "t".into()));
    }
}
