//! Building a PostgreSQL connection from a source's configuration (the configuration
//! types live in `freshet_common::source`, so the coordinator's config file can hold them).

pub use freshet_common::source::{SourceConfig, SourceTable};

use crate::error::{Result, SourceError};

/// Checks a source's names and builds its tokio-postgres configuration (with the password).
pub fn pg_config(source: &SourceConfig) -> Result<tokio_postgres::Config> {
    source.pg_config_inner()
}

trait PgConfig {
    fn pg_config_inner(&self) -> Result<tokio_postgres::Config>;
}

impl PgConfig for SourceConfig {
    fn pg_config_inner(&self) -> Result<tokio_postgres::Config> {
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
        if self.kind != "postgres" {
            return Err(SourceError::Config(format!(
                "source '{}': unknown kind '{}' (only postgres)",
                self.name, self.kind
            )));
        }
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
            kind: "postgres".into(),
            connection: "host=h user=u dbname=d".into(),
            password_env: Some("FRESHET_TEST_NO_SUCH_VAR".into()),
            password_file: None,
            publication: "pub".into(),
            slot: "slot".into(),
            poll_ms: 100,
            snapshot_batch_rows: 10,
            heartbeat_ms: 10_000,
            tables: vec![SourceTable {
                source: "public.t".into(),
                name: "t".into(),
                uri: "/tmp/t".into(),
                partition_by: vec![],
                target_file_size: None,
            }],
        };
        let e = pg_config(&c).unwrap_err().to_string();
        assert!(e.contains("FRESHET_TEST_NO_SUCH_VAR"), "{e}");
        c.connection = "host=h password=hunter2".into();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(
            pg_config(&c)
                .unwrap_err()
                .to_string()
                .contains("password_env")
        );
        c.connection = "host=h".into();
        c.slot = "bad-slot;".into();
        assert!(pg_config(&c).unwrap_err().to_string().contains("slot"));
        assert_eq!(c.tables[0].qualified(), ("public".into(), "t".into()));
    }
}
