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
    /// A named secret of the coordinator's configuration (`[secrets.<name>]`) holding the
    /// password: the only way for a source added at run time (see `secrets`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<String>,
    /// The publication (created `FOR TABLE ...` when missing).
    pub publication: String,
    /// The logical replication slot (created when missing).
    pub slot: String,
    /// Milliseconds between standby status updates on the replication stream (the slot's
    /// confirmed position is reported to PostgreSQL at most this often) and between
    /// refreshes of the source's status (lag). The name is from when the slot was polled.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// Milliseconds between heartbeats: while the mirrored tables are idle, the slot is
    /// still confirmed past the server's other WAL this often, so PostgreSQL can recycle it.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
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

fn default_heartbeat_ms() -> u64 {
    10_000
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

impl SourceConfig {
    /// Parses one source definition from TOML: the keys of a `[[sources]]` entry, either
    /// bare or inside exactly one `[[sources]]` (so a snippet of the configuration file
    /// works as it is).
    pub fn parse(text: &str) -> Result<SourceConfig, String> {
        let value: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let one = match value.get("sources") {
            Some(toml::Value::Array(list)) if value.len() == 1 => match list.as_slice() {
                [one] => one.clone(),
                _ => {
                    return Err(format!(
                        "expected one source, the text defines {}",
                        list.len()
                    ));
                }
            },
            _ => toml::Value::Table(value),
        };
        let config: SourceConfig = one.try_into().map_err(|e: toml::de::Error| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what can be checked without the database.
    pub fn validate(&self) -> Result<(), String> {
        let ident = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !ident(&self.name) {
            return Err(format!(
                "source name '{}' must be 1-63 letters, digits, '_' or '-'",
                self.name
            ));
        }
        if self.kind != "postgres" {
            return Err(format!(
                "source '{}': unknown kind '{}' (only 'postgres')",
                self.name, self.kind
            ));
        }
        // Slot names: lower-case letters, digits and underscores (PostgreSQL's rule).
        let slot_ok = !self.slot.is_empty()
            && self.slot.len() <= 63
            && self
                .slot
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !slot_ok {
            return Err(format!(
                "source '{}': slot '{}' must be lower-case letters, digits and '_'",
                self.name, self.slot
            ));
        }
        if !ident(&self.publication) {
            return Err(format!(
                "source '{}': publication '{}' must be letters, digits, '_' or '-'",
                self.name, self.publication
            ));
        }
        if self.tables.is_empty() {
            return Err(format!("source '{}' lists no tables", self.name));
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &self.tables {
            if !seen.insert(t.name.as_str()) {
                return Err(format!(
                    "source '{}': table '{}' is listed twice",
                    self.name, t.name
                ));
            }
        }
        Ok(())
    }
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
            .field("password_secret", &self.password_secret)
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

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = r#"
name = "shop"
connection = "host=db user=freshet dbname=shop"
publication = "freshet_shop"
slot = "freshet_shop"
[[tables]]
source = "public.orders"
name = "orders"
uri = "/lake/orders"
"#;

    #[test]
    fn parses_bare_or_wrapped_and_names_what_is_wrong() {
        let a = SourceConfig::parse(ONE).unwrap();
        assert_eq!(a.tables[0].name, "orders");
        assert_eq!(a.heartbeat_ms, 10_000);
        let wrapped = format!(
            "[[sources]]\n{}",
            ONE.replace("[[tables]]", "[[sources.tables]]")
        );
        assert_eq!(SourceConfig::parse(&wrapped).unwrap().name, "shop");
        let e = SourceConfig::parse(&ONE.replace("slot = \"freshet_shop\"", "slot = \"Bad-Slot\""))
            .unwrap_err();
        assert!(e.contains("Bad-Slot"), "{e}");
        let e = SourceConfig::parse(&ONE.replace("publication =", "publicaton =")).unwrap_err();
        assert!(e.contains("publicaton"), "{e}");
        let e = SourceConfig::parse(&format!(
            "{ONE}\n[[tables]]\nsource = \"x\"\nname = \"orders\"\nuri = \"/y\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
    }
}
