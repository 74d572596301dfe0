//! Source definitions: a PostgreSQL source's configuration (where to connect, with the
//! password from the environment or a file, never from the file itself and never logged),
//! its publication and slot, and the tables it mirrors, each mapped to a Freshet table;
//! and where a running source stands ([`SourceState`]) and where its definition comes from
//! ([`SourceOrigin`]), written into the admin API's `SourceInfo` in one place
//! ([`SourceInfoExt`]).

use freshet_proto::admin::v1::{
    SourceInfo, SourceOrigin as ProtoOrigin, SourceState as ProtoState,
};
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
    /// TLS to PostgreSQL: `disable`, `prefer` (the default: TLS when the server offers it,
    /// nothing verified), `require` (TLS, nothing verified), `verify-ca` (the server's
    /// certificate chains to `sslrootcert`) or `verify-full` (and names the host). May be
    /// given in the connection string instead (`sslmode=`), not differently in both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<String>,
    /// The CA certificate file (PEM) for `verify-ca` and `verify-full`; may be given in the
    /// connection string instead (`sslrootcert=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<String>,
    /// Answers a server that asks for the password in cleartext over a connection that is
    /// not encrypted (TCP without TLS). Off: such a connection is refused before the
    /// password is sent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_cleartext_password: bool,
}

/// How a source's connections to PostgreSQL use TLS (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server accepts it, plain TCP when it does not; nothing verified.
    Prefer,
    /// TLS or no connection; the certificate is not verified.
    Require,
    /// TLS with a certificate that chains to `sslrootcert`; the host name is not checked.
    VerifyCa,
    /// TLS with a certificate that chains to `sslrootcert` and names the host.
    VerifyFull,
}

impl SslMode {
    /// The values `sslmode` accepts.
    pub const NAMES: &str = "disable, prefer, require, verify-ca, verify-full";

    /// Parses libpq's name of a mode.
    pub fn parse(name: &str) -> Option<SslMode> {
        Some(match name {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// libpq's name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the server's certificate is verified against `sslrootcert`.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// A source's effective TLS settings (from its keys and its connection string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresTls {
    /// The mode; `prefer` when neither the keys nor the connection string name one.
    pub mode: SslMode,
    /// The CA certificate file; set exactly when the mode verifies.
    pub root_cert: Option<String>,
    /// See [`SourceConfig::allow_cleartext_password`].
    pub allow_cleartext_password: bool,
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
        self.postgres_tls()?;
        Ok(())
    }

    /// The source's TLS settings and its connection string without `sslmode=` and
    /// `sslrootcert=` (which Freshet applies itself). Each may be a key of the source or a
    /// setting of the connection string, not both with different values; `verify-ca` and
    /// `verify-full` need `sslrootcert`, which the other modes do not use.
    pub fn postgres_tls(&self) -> Result<(PostgresTls, String), String> {
        let mut info = Conninfo::parse(&self.connection)
            .map_err(|e| format!("source '{}': bad connection string: {e}", self.name))?;
        let from_string = (info.take("sslmode"), info.take("sslrootcert"));
        let pick = |key: &str, field: &Option<String>, conn: Option<String>| match (field, conn) {
            (Some(a), Some(b)) if *a != b => Err(format!(
                "source '{}': {key} is '{a}' but the connection string says {key}={b}; set it once",
                self.name
            )),
            (Some(a), _) => Ok(Some(a.clone())),
            (None, b) => Ok(b),
        };
        let mode = match pick("sslmode", &self.sslmode, from_string.0)? {
            None => SslMode::Prefer,
            Some(m) => SslMode::parse(&m).ok_or_else(|| {
                format!(
                    "source '{}': sslmode '{m}' is not one of {}",
                    self.name,
                    SslMode::NAMES
                )
            })?,
        };
        let root_cert = pick("sslrootcert", &self.sslrootcert, from_string.1)?;
        match (&root_cert, mode.verifies()) {
            (None, true) => {
                return Err(format!(
                    "source '{}': sslmode={} needs sslrootcert (the CA certificate file, PEM)",
                    self.name,
                    mode.as_str()
                ));
            }
            (Some(r), true) if r.trim().is_empty() => {
                return Err(format!("source '{}': sslrootcert is empty", self.name));
            }
            (Some(_), false) => {
                return Err(format!(
                    "source '{}': sslrootcert is only used with sslmode=verify-ca or verify-full (sslmode is {})",
                    self.name,
                    mode.as_str()
                ));
            }
            _ => {}
        }
        Ok((
            PostgresTls {
                mode,
                root_cert,
                allow_cleartext_password: self.allow_cleartext_password,
            },
            info.render(),
        ))
    }
}

/// A libpq connection string, as `key=value` settings or a `postgres://` URL, parsed just
/// enough to take settings out and write the rest back.
enum Conninfo {
    Pairs(Vec<(String, String)>),
    Url {
        base: String,
        params: Vec<(String, String)>,
    },
}

impl Conninfo {
    fn parse(text: &str) -> Result<Conninfo, String> {
        let t = text.trim();
        if t.starts_with("postgres://") || t.starts_with("postgresql://") {
            let (base, query) = t.split_once('?').unwrap_or((t, ""));
            let mut params = Vec::new();
            for kv in query.split('&').filter(|kv| !kv.is_empty()) {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                params.push((
                    crate::prefixes::percent_decode(k)?,
                    crate::prefixes::percent_decode(v)?,
                ));
            }
            return Ok(Conninfo::Url {
                base: base.to_string(),
                params,
            });
        }
        let mut pairs = Vec::new();
        let mut chars = t.chars().peekable();
        loop {
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            if chars.peek().is_none() {
                break;
            }
            let mut key = String::new();
            while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
                key.push(c);
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            if chars.next() != Some('=') {
                return Err(format!("missing '=' after '{key}'"));
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            let mut value = String::new();
            if chars.next_if_eq(&'\'').is_some() {
                loop {
                    match chars.next() {
                        None => return Err(format!("unterminated quoted value of '{key}'")),
                        Some('\'') => break,
                        Some('\\') => value.extend(chars.next()),
                        Some(c) => value.push(c),
                    }
                }
            } else {
                while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                    if c == '\\' {
                        value.extend(chars.next());
                    } else {
                        value.push(c);
                    }
                }
            }
            pairs.push((key, value));
        }
        Ok(Conninfo::Pairs(pairs))
    }

    /// Removes every `key` setting; returns the last one's value (libpq's rule).
    fn take(&mut self, key: &str) -> Option<String> {
        let list = match self {
            Conninfo::Pairs(p) => p,
            Conninfo::Url { params, .. } => params,
        };
        let last = list
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone());
        list.retain(|(k, _)| k != key);
        last
    }

    fn render(&self) -> String {
        match self {
            Conninfo::Pairs(pairs) => pairs
                .iter()
                .map(|(k, v)| {
                    if !v.is_empty()
                        && !v
                            .chars()
                            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
                    {
                        format!("{k}={v}")
                    } else {
                        format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
            Conninfo::Url { base, params } if params.is_empty() => base.clone(),
            Conninfo::Url { base, params } => {
                let q: Vec<String> = params
                    .iter()
                    .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
                    .collect();
                format!("{base}?{}", q.join("&"))
            }
        }
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("allow_cleartext_password", &self.allow_cleartext_password)
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

/// Where a CDC source stands (the admin API's `SourceInfo.state_code`, and its text
/// `SourceInfo.state`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SourceState {
    /// Connecting, mapping its tables.
    #[default]
    Starting,
    /// Copying tables.
    Snapshotting,
    /// Streaming its replication slot.
    Streaming,
    /// Failed; it retries.
    Error,
}

impl SourceState {
    /// The text form (`SourceInfo.state`, the CLI's output).
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Starting => "starting",
            SourceState::Snapshotting => "snapshotting",
            SourceState::Streaming => "streaming",
            SourceState::Error => "error",
        }
    }

    /// The state of a text form.
    pub fn parse(text: &str) -> Option<SourceState> {
        Some(match text {
            "starting" => SourceState::Starting,
            "snapshotting" => SourceState::Snapshotting,
            "streaming" => SourceState::Streaming,
            "error" => SourceState::Error,
            _ => return None,
        })
    }

    fn code(self) -> ProtoState {
        match self {
            SourceState::Starting => ProtoState::Starting,
            SourceState::Snapshotting => ProtoState::Snapshotting,
            SourceState::Streaming => ProtoState::Streaming,
            SourceState::Error => ProtoState::Error,
        }
    }

    fn from_code(code: ProtoState) -> Option<SourceState> {
        Some(match code {
            ProtoState::Unspecified => return None,
            ProtoState::Starting => SourceState::Starting,
            ProtoState::Snapshotting => SourceState::Snapshotting,
            ProtoState::Streaming => SourceState::Streaming,
            ProtoState::Error => SourceState::Error,
        })
    }
}

impl std::fmt::Display for SourceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a running source's definition comes from (`SourceInfo.origin_code`, and its text
/// `SourceInfo.origin`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum SourceOrigin {
    /// The configuration file.
    Config,
    /// Added at run time, recorded in the catalog.
    Catalog,
}

impl SourceOrigin {
    /// The text form (`SourceInfo.origin`, the CLI's output).
    pub fn as_str(self) -> &'static str {
        match self {
            SourceOrigin::Config => "config",
            SourceOrigin::Catalog => "catalog",
        }
    }

    /// The origin of a text form.
    pub fn parse(text: &str) -> Option<SourceOrigin> {
        Some(match text {
            "config" => SourceOrigin::Config,
            "catalog" => SourceOrigin::Catalog,
            _ => return None,
        })
    }

    fn code(self) -> ProtoOrigin {
        match self {
            SourceOrigin::Config => ProtoOrigin::Config,
            SourceOrigin::Catalog => ProtoOrigin::Catalog,
        }
    }

    fn from_code(code: ProtoOrigin) -> Option<SourceOrigin> {
        Some(match code {
            ProtoOrigin::Unspecified => return None,
            ProtoOrigin::Config => SourceOrigin::Config,
            ProtoOrigin::Catalog => SourceOrigin::Catalog,
        })
    }
}

impl std::fmt::Display for SourceOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The typed fields of the admin API's [`SourceInfo`]: the one place that writes an enum
/// together with its text form (which JSON output and older clients read), and reads the
/// enum back (from the text when an older server sent only that).
pub trait SourceInfoExt {
    /// Sets `state_code` and `state`.
    fn set_source_state(&mut self, state: SourceState);
    /// The state (`None`: neither form names one).
    fn source_state(&self) -> Option<SourceState>;
    /// Sets `origin_code` and `origin`.
    fn set_source_origin(&mut self, origin: SourceOrigin);
    /// The origin (`None`: neither form names one).
    fn source_origin(&self) -> Option<SourceOrigin>;
}

impl SourceInfoExt for SourceInfo {
    fn set_source_state(&mut self, state: SourceState) {
        self.set_state_code(state.code());
        self.state = state.as_str().to_string();
    }

    fn source_state(&self) -> Option<SourceState> {
        ProtoState::try_from(self.state_code)
            .ok()
            .and_then(SourceState::from_code)
            .or_else(|| SourceState::parse(&self.state))
    }

    fn set_source_origin(&mut self, origin: SourceOrigin) {
        self.set_origin_code(origin.code());
        self.origin = origin.as_str().to_string();
    }

    fn source_origin(&self) -> Option<SourceOrigin> {
        ProtoOrigin::try_from(self.origin_code)
            .ok()
            .and_then(SourceOrigin::from_code)
            .or_else(|| SourceOrigin::parse(&self.origin))
    }
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
    fn source_info_carries_each_state_and_origin_as_enum_and_text() {
        for state in [
            SourceState::Starting,
            SourceState::Snapshotting,
            SourceState::Streaming,
            SourceState::Error,
        ] {
            let mut info = SourceInfo::default();
            info.set_source_state(state);
            assert_eq!(info.source_state(), Some(state));
            assert_eq!(info.state, state.as_str());
            // An older server sends the text only.
            let old = SourceInfo {
                state: state.as_str().into(),
                ..Default::default()
            };
            assert_eq!(old.source_state(), Some(state));
        }
        assert_eq!(SourceInfo::default().source_state(), None);
        for origin in [SourceOrigin::Config, SourceOrigin::Catalog] {
            let mut info = SourceInfo::default();
            info.set_source_origin(origin);
            assert_eq!(info.source_origin(), Some(origin));
            assert_eq!(info.origin, origin.as_str());
        }
        assert_eq!(SourceInfo::default().source_origin(), None);
    }

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

    #[test]
    fn tls_settings_from_keys_or_the_connection_string() {
        let with = |extra: &str, conn: &str| {
            SourceConfig::parse(&ONE.replace(
                "connection = \"host=db user=freshet dbname=shop\"",
                &format!("connection = \"{conn}\"\n{extra}"),
            ))
        };
        let conn = "host=db user=freshet dbname=shop";
        // The default: prefer, no CA, cleartext refused.
        let (t, rest) = with("", conn).unwrap().postgres_tls().unwrap();
        assert_eq!(
            t,
            PostgresTls {
                mode: SslMode::Prefer,
                root_cert: None,
                allow_cleartext_password: false
            }
        );
        assert_eq!(rest, conn);
        // Keys.
        let s = with(
            "sslmode = \"verify-full\"\nsslrootcert = \"/etc/ca.pem\"\nallow_cleartext_password = true",
            conn,
        )
        .unwrap();
        let (t, _) = s.postgres_tls().unwrap();
        assert_eq!(
            (t.mode, t.root_cert.as_deref(), t.allow_cleartext_password),
            (SslMode::VerifyFull, Some("/etc/ca.pem"), true)
        );
        // The connection string, taken out of what tokio-postgres sees (quoted values too).
        let (t, rest) = with(
            "",
            "host=db sslmode=verify-ca sslrootcert='/etc/my ca.pem' user=freshet",
        )
        .unwrap()
        .postgres_tls()
        .unwrap();
        assert_eq!(
            (t.mode, t.root_cert.as_deref()),
            (SslMode::VerifyCa, Some("/etc/my ca.pem"))
        );
        assert_eq!(rest, "host=db user=freshet");
        // The same in both places is fine, different values are not.
        assert!(with("sslmode = \"require\"", "host=db sslmode=require").is_ok());
        let e = with("sslmode = \"require\"", "host=db sslmode=disable").unwrap_err();
        assert!(e.contains("sslmode") && e.contains("set it once"), "{e}");
        // URLs.
        let (t, rest) = with(
            "",
            "postgresql://u@db:5432/shop?sslmode=verify-full&sslrootcert=%2Fca.pem&application_name=x",
        )
        .unwrap()
        .postgres_tls()
        .unwrap();
        assert_eq!(
            (t.mode, t.root_cert.as_deref()),
            (SslMode::VerifyFull, Some("/ca.pem"))
        );
        assert_eq!(rest, "postgresql://u@db:5432/shop?application_name=x");
        // Bad values are refused when the source is parsed, naming the key.
        let e = with("sslmode = \"bogus\"", conn).unwrap_err();
        assert!(
            e.contains("sslmode 'bogus'") && e.contains("verify-full"),
            "{e}"
        );
        let e = with("", "host=db sslmode=bogus").unwrap_err();
        assert!(e.contains("sslmode 'bogus'"), "{e}");
        let e = with("sslmode = \"verify-full\"", conn).unwrap_err();
        assert!(e.contains("needs sslrootcert"), "{e}");
        let e = with("", "host=db sslmode=verify-ca").unwrap_err();
        assert!(e.contains("needs sslrootcert"), "{e}");
        let e = with("sslrootcert = \"/ca.pem\"", conn).unwrap_err();
        assert!(e.contains("sslrootcert is only used"), "{e}");
        let e = with("allow_cleartext_passwords = true", conn).unwrap_err();
        assert!(e.contains("allow_cleartext_passwords"), "{e}");
        let e = with("", "host=db sslrootcert='/x").unwrap_err();
        assert!(e.contains("unterminated"), "{e}");
    }
}
