//! Freshet's one typed configuration: defaults < TOML file < `FRESHET__SECTION__KEY`
//! environment variables < command-line flags. Unknown keys are refused.
//! Every setting is documented in docs/configuration.md.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::table::TableConfig;

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Cluster mode: etcd membership and leader election.
    pub cluster: ClusterConfig,
    /// The coordinator's gRPC server (ingest and admin).
    pub server: ServerConfig,
    /// The merge cycle.
    pub cycle: CycleConfig,
    /// Ingest limits.
    pub ingest: IngestConfig,
    /// The worker's own settings.
    pub worker: WorkerConfig,
    /// Object storage options.
    pub storage: StorageConfig,
    /// Where tables created at run time are recorded.
    pub catalog: CatalogConfig,
    /// Logging.
    pub log: LogConfig,
    /// Tables defined in the file.
    pub tables: Vec<TableConfig>,
    /// Change-data-capture sources (PostgreSQL), run by the leader.
    pub sources: Vec<crate::source::SourceConfig>,
    /// Test-only switches; refused unless the process is started with
    /// `--allow-fault-injection`.
    pub testing: TestingConfig,
    /// Named credentials sources may use (`[secrets.<name>]`, see `secrets`).
    pub secrets: crate::secrets::Secrets,
    /// TLS of the gRPC servers and of the coordinator's worker clients (empty: plaintext).
    pub tls: TlsConfig,
    /// Tokens and roles of the ingest and admin APIs (none configured: open).
    pub auth: crate::auth::AuthConfig,
    /// Table maintenance on the leader: checkpoints, expired log cleanup, vacuum.
    pub maintenance: MaintenanceConfig,
    /// Background compaction of idle tables (docs/merge-on-read.md).
    pub compaction: CompactionConfig,
    /// Queries the coordinator answers (Flight SQL).
    pub query: QueryConfig,
}

/// Background compaction: file groups no change touches are folded back into key-sorted,
/// target-size files without deleted rows, while the table is idle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompactionConfig {
    /// Compact at all.
    pub enabled: bool,
    /// Least time between two compaction runs of a table, in milliseconds.
    pub interval_ms: u64,
    /// Input bytes one run rewrites at most (the most indebted groups first; at least one
    /// group). Bounds how long changes that arrive during a run wait.
    pub max_bytes_per_run: u64,
    /// Groups smaller than this share of the target file size are merged with small
    /// neighbours.
    pub small_fraction: f64,
    /// A one-file group with this share of its rows deleted is rewritten.
    pub fold_deleted_fraction: f64,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        CompactionConfig {
            enabled: true,
            interval_ms: 10_000,
            max_bytes_per_run: 256 * 1024 * 1024,
            small_fraction: 0.5,
            fold_deleted_fraction: 0.10,
        }
    }
}

impl CompactionConfig {
    /// Refuses fractions outside (0, 1] and a zero budget.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("small_fraction", self.small_fraction),
            ("fold_deleted_fraction", self.fold_deleted_fraction),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(Error::Config(format!(
                    "compaction.{name} = {v}: use a share in (0, 1]"
                )));
            }
        }
        if self.max_bytes_per_run == 0 {
            return Err(Error::Config(
                "compaction.max_bytes_per_run must be above 0".into(),
            ));
        }
        Ok(())
    }
}

/// Queries the coordinator answers (Flight SQL, `freshet query`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    /// Memory all running queries may hold together (sorts, joins, aggregations); a query
    /// that needs more fails with RESOURCE_EXHAUSTED instead of growing the coordinator,
    /// which also stages and commits changes.
    pub max_memory_bytes: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            max_memory_bytes: 512 * 1024 * 1024,
        }
    }
}

/// Table maintenance, run by the leader per table between cycles (docs/maintenance.md).
/// The three Delta settings are written into a table that lacks them (one metadata
/// commit); a table's own `delta.*` property wins over them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceConfig {
    /// Run maintenance at all.
    pub enabled: bool,
    /// Time between maintenance runs of a table, in milliseconds.
    pub interval_ms: u64,
    /// A checkpoint every this many commits (`delta.checkpointInterval`).
    pub checkpoint_interval: u64,
    /// Log entries older than this (and older than the latest checkpoint) are deleted
    /// (`delta.logRetentionDuration`), e.g. "720h" (Delta's default, 30 days).
    pub log_retention: HumanDuration,
    /// Data files removed from the table longer ago than this are deleted by vacuum
    /// (`delta.deletedFileRetentionDuration`), e.g. "168h" (Delta's default, 7 days).
    /// Time travel to versions older than this fails; below 1 h a warning is logged.
    pub deleted_file_retention: HumanDuration,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            enabled: true,
            interval_ms: 60_000,
            checkpoint_interval: 10,
            log_retention: HumanDuration(std::time::Duration::from_secs(30 * 24 * 3600)),
            deleted_file_retention: HumanDuration(std::time::Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

impl MaintenanceConfig {
    /// Refuses an interval or checkpoint interval of 0.
    pub fn validate(&self) -> Result<()> {
        if self.interval_ms == 0 {
            return Err(Error::Config(
                "maintenance.interval_ms must be above 0".into(),
            ));
        }
        if self.checkpoint_interval == 0 {
            return Err(Error::Config(
                "maintenance.checkpoint_interval must be above 0".into(),
            ));
        }
        Ok(())
    }
}

/// A duration written as a number and a unit, or several: "500ms", "90s", "15m", "168h",
/// "30d", "1h30m".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub std::time::Duration);

impl HumanDuration {
    /// Parses "<number><unit>..." with units ms, s, m, h, d, w.
    pub fn parse(text: &str) -> std::result::Result<HumanDuration, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("empty duration".into());
        }
        let mut total = std::time::Duration::ZERO;
        let mut rest = t;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(format!(
                    "'{text}' is not a duration (e.g. 500ms, 90s, 15m, 168h, 30d)"
                ));
            }
            let n: u64 = rest[..digits]
                .parse()
                .map_err(|e| format!("'{text}': {e}"))?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let ms: u64 = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                "w" => 7 * 86_400_000,
                u => {
                    return Err(format!(
                        "'{text}': unknown unit '{u}' (ms, s, m, h, d or w)"
                    ));
                }
            };
            rest = &rest[unit_len..];
            total += std::time::Duration::from_millis(
                n.checked_mul(ms)
                    .ok_or_else(|| format!("'{text}' is too long"))?,
            );
        }
        Ok(HumanDuration(total))
    }
}

impl std::fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis() as u64;
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms > 0 && ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HumanDuration::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// TLS of every gRPC server and client of the process (docs/security.md, "TLS"). Empty
/// `cert_file` means plaintext: the explicit opt-out for local development.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain of this process (re-read when the file changes).
    pub cert_file: String,
    /// PEM private key of `cert_file` (re-read when the file changes).
    pub key_file: String,
    /// PEM CA bundle: clients verify servers with it, servers verify client certificates.
    pub ca_file: String,
    /// Coordinator: refuse clients without a certificate of `ca_file`. Workers in TLS mode
    /// always require one (they accept work only from coordinators).
    pub require_client_cert: bool,
    /// Coordinator: the name verified in every worker's certificate instead of the host of
    /// its advertised URL (in Kubernetes workers advertise pod IPs, which a certificate
    /// issued ahead of time cannot name). Empty: the advertised host.
    pub worker_server_name: String,
    /// Serve the HTTP port (`/metrics`, `/livez`, `/readyz`) over TLS too, with the same
    /// certificate and no client certificates (probes then use scheme HTTPS).
    pub http: bool,
}

impl TlsConfig {
    /// Whether TLS is on (a certificate is configured).
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }
}

/// Test-only switches (docs/configuration.md, "Testing"). Production configs never set them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TestingConfig {
    /// Faults injected into every object store of the process.
    pub store_faults: Option<crate::faults::FaultSpec>,
    /// Coordinator: abort the process at this point of every cycle (`after_rewrite`,
    /// `after_commit`), as a crash there would (the crash tests of real processes).
    pub crash_at: Option<String>,
    /// Worker: wait this long before each task (slow-worker tests).
    pub worker_delay_ms: Option<u64>,
}

/// The coordinator's gRPC server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the coordinator listens on.
    pub listen: String,
    /// URL other nodes and clients use to reach this coordinator (default `http://<listen>`).
    pub advertise: Option<String>,
    /// Address of the HTTP server for `/metrics`, `/livez` and `/readyz` (empty: none).
    pub http_listen: String,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:50051".into(),
            advertise: None,
            http_listen: "127.0.0.1:9090".into(),
            max_message_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Cluster mode: etcd membership and leader election.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The cluster's name: etcd keys live under `/freshet/<name>/`.
    pub name: String,
    /// etcd endpoints (`http://host:2379`); empty means no etcd (static workers, one coordinator).
    pub etcd_endpoints: Vec<String>,
    /// Lease time-to-live of leaders and workers, in seconds.
    pub lease_ttl_s: u64,
    /// Time to wait for etcd at start, in milliseconds.
    pub etcd_connect_timeout_ms: u64,
    /// PEM CA bundle that etcd's server certificate is verified with. Setting it turns TLS
    /// on: endpoints are then `https://` (or have no scheme). Empty: plaintext.
    pub etcd_ca_file: String,
    /// PEM client certificate presented to etcd (its `--client-cert-auth`); needs
    /// `etcd_key_file` and `etcd_ca_file`.
    pub etcd_cert_file: String,
    /// PEM private key of `etcd_cert_file`.
    pub etcd_key_file: String,
    /// etcd user (etcd's RBAC, `auth enable`); needs `etcd_password_file`. Empty: anonymous.
    pub etcd_user: String,
    /// File holding the password of `etcd_user` (one trailing newline ignored). Re-read
    /// while running, so a rotated password is picked up; never configured inline.
    pub etcd_password_file: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            name: "freshet".into(),
            etcd_endpoints: Vec::new(),
            lease_ttl_s: 10,
            etcd_connect_timeout_ms: 5000,
            etcd_ca_file: String::new(),
            etcd_cert_file: String::new(),
            etcd_key_file: String::new(),
            etcd_user: String::new(),
            etcd_password_file: String::new(),
        }
    }
}

impl ClusterConfig {
    /// The etcd key prefix of this cluster.
    pub fn prefix(&self) -> String {
        format!("/freshet/{}/", self.name)
    }

    /// Whether etcd is reached over TLS (`etcd_ca_file` set).
    pub fn etcd_tls(&self) -> bool {
        !self.etcd_ca_file.is_empty()
    }

    /// Refuses settings that do not fit together, naming the key: a certificate without
    /// its key (or the other way round) or without a CA, a user without a password file
    /// (or the other way round), an `https://` endpoint without `etcd_ca_file` or an
    /// `http://` one with it, etcd security settings without endpoints, a lease TTL below
    /// 2 s. Files are read when connecting (common/src/etcd.rs).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let set = |v: &str| !v.is_empty();
        if self.etcd_endpoints.is_empty() {
            for (key, value) in [
                ("etcd_ca_file", &self.etcd_ca_file),
                ("etcd_cert_file", &self.etcd_cert_file),
                ("etcd_key_file", &self.etcd_key_file),
                ("etcd_user", &self.etcd_user),
                ("etcd_password_file", &self.etcd_password_file),
            ] {
                if set(value) {
                    return bad(format!(
                        "cluster.{key} is set but cluster.etcd_endpoints is empty (no etcd)"
                    ));
                }
            }
            return Ok(());
        }
        if self.lease_ttl_s < 2 {
            return bad(format!(
                "cluster.lease_ttl_s is {}; it must be at least 2",
                self.lease_ttl_s
            ));
        }
        let pairs = [
            (
                "etcd_cert_file",
                &self.etcd_cert_file,
                "etcd_key_file",
                &self.etcd_key_file,
            ),
            (
                "etcd_user",
                &self.etcd_user,
                "etcd_password_file",
                &self.etcd_password_file,
            ),
        ];
        for (a, va, b, vb) in pairs {
            for (x, vx, y, vy) in [(a, va, b, vb), (b, vb, a, va)] {
                if set(vx) && !set(vy) {
                    return bad(format!("cluster.{x} is set but cluster.{y} is not"));
                }
            }
        }
        if set(&self.etcd_cert_file) && !self.etcd_tls() {
            return bad(
                "cluster.etcd_cert_file is set but cluster.etcd_ca_file is not: a client \
                 certificate needs TLS, which etcd_ca_file turns on"
                    .into(),
            );
        }
        for e in &self.etcd_endpoints {
            let lower = e.to_ascii_lowercase();
            if lower.starts_with("https://") && !self.etcd_tls() {
                return bad(format!(
                    "cluster.etcd_endpoints has '{e}' (https) but cluster.etcd_ca_file is not \
                     set: TLS to etcd needs the CA that signed etcd's certificate"
                ));
            }
            if lower.starts_with("http://") && self.etcd_tls() {
                return bad(format!(
                    "cluster.etcd_endpoints has '{e}' (plaintext http) but cluster.etcd_ca_file \
                     is set: use https:// endpoints with TLS"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::ClusterConfig;

    fn cluster(f: impl FnOnce(&mut ClusterConfig)) -> Result<(), String> {
        let mut c = ClusterConfig {
            etcd_endpoints: vec!["https://etcd:2379".into()],
            etcd_ca_file: "/ca.pem".into(),
            ..Default::default()
        };
        f(&mut c);
        c.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn complete_etcd_security_settings_pass() {
        cluster(|_| {}).unwrap();
        cluster(|c| {
            c.etcd_cert_file = "/c.pem".into();
            c.etcd_key_file = "/k.pem".into();
            c.etcd_user = "freshet".into();
            c.etcd_password_file = "/pw".into();
            c.etcd_endpoints.push("etcd-1:2379".into());
        })
        .unwrap();
        // Plaintext and anonymous stays possible (development), and no etcd at all.
        cluster(|c| {
            c.etcd_ca_file.clear();
            c.etcd_endpoints = vec!["http://127.0.0.1:2379".into()];
            c.etcd_user = "u".into();
            c.etcd_password_file = "/pw".into();
        })
        .unwrap();
        ClusterConfig::default().validate().unwrap();
    }

    #[test]
    fn half_configured_etcd_security_is_refused_naming_the_key() {
        let cases: Vec<(Box<dyn FnOnce(&mut ClusterConfig)>, &str)> = vec![
            (
                Box::new(|c| c.etcd_cert_file = "/c".into()),
                "cluster.etcd_key_file is not",
            ),
            (
                Box::new(|c| c.etcd_key_file = "/k".into()),
                "cluster.etcd_cert_file is not",
            ),
            (
                Box::new(|c| c.etcd_user = "u".into()),
                "cluster.etcd_password_file is not",
            ),
            (
                Box::new(|c| c.etcd_password_file = "/p".into()),
                "cluster.etcd_user is not",
            ),
            (
                Box::new(|c| {
                    c.etcd_ca_file.clear();
                    c.etcd_cert_file = "/c".into();
                    c.etcd_key_file = "/k".into();
                    c.etcd_endpoints = vec!["etcd:2379".into()];
                }),
                "cluster.etcd_ca_file is not",
            ),
            (
                Box::new(|c| c.etcd_ca_file.clear()),
                "'https://etcd:2379' (https) but cluster.etcd_ca_file is not set",
            ),
            (
                Box::new(|c| c.etcd_endpoints.push("HTTP://other:2379".into())),
                "'HTTP://other:2379' (plaintext http) but cluster.etcd_ca_file is set",
            ),
            (
                Box::new(|c| c.etcd_endpoints.clear()),
                "cluster.etcd_ca_file is set but cluster.etcd_endpoints is empty",
            ),
            (Box::new(|c| c.lease_ttl_s = 1), "cluster.lease_ttl_s is 1"),
        ];
        for (f, want) in cases {
            let e = cluster(f).unwrap_err();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
    }

    #[test]
    fn etcd_keys_parse_from_toml() {
        let c = crate::config::Config::from_toml(
            "[cluster]\netcd_endpoints = [\"https://e:2379\"]\netcd_ca_file = \"/ca\"\n\
             etcd_cert_file = \"/c\"\netcd_key_file = \"/k\"\netcd_user = \"freshet\"\n\
             etcd_password_file = \"/pw\"\n",
        )
        .unwrap();
        assert_eq!(c.cluster.etcd_user, "freshet");
        assert_eq!(c.cluster.etcd_password_file, "/pw");
        c.cluster.validate().unwrap();
        // No inline password.
        let e = crate::config::Config::from_toml("[cluster]\netcd_password = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("etcd_password"), "{e}");
    }
}

/// `http://<addr>` unless the address already names a scheme.
pub fn url_of(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// The merge cycle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CycleConfig {
    /// Time between cycles of a table, in milliseconds.
    pub interval_ms: u64,
    /// Start a cycle sooner once this many changes are pending.
    pub trigger_changes: u64,
    /// Attempts per task before the cycle fails.
    pub max_attempts: u32,
    /// Time a worker gets for one task, in milliseconds.
    pub task_timeout_ms: u64,
    /// Age after which files of abandoned tasks are deleted, in milliseconds.
    pub orphan_grace_ms: u64,
    /// Cycle records kept for the admin API.
    pub history: usize,
    /// Static worker endpoints (`http://host:port`); embedded mode fills these in.
    pub workers: Vec<String>,
    /// Most staged changes (bytes in memory) one cycle takes, so a backlog is worked off in
    /// bounded cycles (never more than half of `server.max_message_bytes`, so every task's
    /// request fits in a message); what is left goes into the next cycle at once.
    pub max_changes_bytes: u64,
}

impl Default for CycleConfig {
    fn default() -> Self {
        CycleConfig {
            interval_ms: 1000,
            trigger_changes: 100_000,
            max_attempts: 3,
            task_timeout_ms: 300_000,
            orphan_grace_ms: 3_600_000,
            history: 1000,
            workers: Vec::new(),
            max_changes_bytes: 128 * 1024 * 1024,
        }
    }
}

/// Ingest limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Most rows in one batch.
    pub max_batch_rows: usize,
    /// Most bytes in one batch, both as sent and once decoded.
    pub max_batch_bytes: usize,
    /// Most bytes (decoded, in memory) staged but not yet applied, per table: beyond it
    /// ingest is refused (RESOURCE_EXHAUSTED) and a CDC source waits; recovery keeps at most
    /// this much in memory and reads the rest when a cycle takes it.
    pub max_pending_bytes: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_batch_rows: 1_000_000,
            max_batch_bytes: 64 * 1024 * 1024,
            max_pending_bytes: 256 * 1024 * 1024,
        }
    }
}

/// The worker's own settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Address the worker listens on.
    pub listen: String,
    /// URL the coordinator uses to reach this worker (default `http://<listen>`).
    pub advertise: Option<String>,
    /// Address of the worker's HTTP server for `/metrics`, `/livez`, `/readyz` (empty: none).
    pub http_listen: String,
    /// Tasks the worker runs at once.
    pub capacity: u32,
    /// The worker's id (default: a random one).
    pub id: Option<String>,
    /// On SIGTERM, how long in-flight tasks may take to finish, in milliseconds.
    pub shutdown_grace_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            listen: "127.0.0.1:50061".into(),
            advertise: None,
            http_listen: "127.0.0.1:9091".into(),
            capacity: 2,
            id: None,
            shutdown_grace_ms: 30_000,
        }
    }
}

/// Object storage options, passed to every store (for example `aws_endpoint`,
/// `aws_region`). Credentials are better left to the standard `AWS_*` variables.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// object_store options (key -> value).
    pub options: HashMap<String, String>,
    /// Attempts per coordinator request to the object store (the coordinator retries
    /// itself, re-checking its leader lease before every write attempt).
    pub max_attempts: u32,
    /// Longest one coordinator request may take, in milliseconds (also never longer than
    /// what is left of the leader lease).
    pub request_timeout_ms: u64,
    /// URI prefixes every table must lie under (`s3://lake/shop`, `/data/lake`); empty
    /// allows anything (local development only). Checked by coordinators and workers before
    /// any I/O.
    pub allowed_prefixes: Vec<String>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            options: HashMap::new(),
            max_attempts: 4,
            request_timeout_ms: 10_000,
            allowed_prefixes: Vec::new(),
        }
    }
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach logs: values of keys that look secret are redacted.
        let redacted: HashMap<&String, &str> = self
            .options
            .iter()
            .map(|(k, v)| {
                let lk = k.to_ascii_lowercase();
                let secret = ["secret", "key", "token", "password", "credential"]
                    .iter()
                    .any(|s| lk.contains(s))
                    && !lk.ends_with("key_id");
                (k, if secret { "<redacted>" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("StorageConfig")
            .field("options", &redacted)
            .field("max_attempts", &self.max_attempts)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("allowed_prefixes", &self.allowed_prefixes)
            .finish()
    }
}

/// Where tables created at run time are recorded.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    /// A directory URI (`file://`, `s3://`, or a local path); none means run-time tables
    /// live only as long as the process.
    pub uri: Option<String>,
}

/// Logging.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// JSON log lines instead of text.
    pub json: bool,
}

const ENV_PREFIX: &str = "FRESHET__";

impl Config {
    /// Loads the file (if any), then applies `FRESHET__SECTION__KEY` variables from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let mut value = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| Error::Config(format!("cannot read {}: {e}", p.display())))?;
                toml::from_str::<toml::Value>(&text)
                    .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?
            }
            None => toml::Value::Table(Default::default()),
        };
        for (k, v) in env {
            let Some(rest) = k.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            set_path(&mut value, &path, parse_env_value(&v))
                .map_err(|e| Error::Config(format!("environment variable {k}: {e}")))?;
        }
        let config: Config = value
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(e.to_string()))?;
        Ok(config)
    }

    /// Parses a TOML string (no environment).
    pub fn from_toml(text: &str) -> Result<Config> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }
}

fn parse_env_value(v: &str) -> toml::Value {
    // Numbers, booleans and arrays parse as TOML; anything else is a string.
    toml::from_str::<toml::Table>(&format!("x = {v}"))
        .ok()
        .and_then(|mut t| t.remove("x"))
        .unwrap_or_else(|| toml::Value::String(v.to_string()))
}

fn set_path(
    value: &mut toml::Value,
    path: &[String],
    v: toml::Value,
) -> std::result::Result<(), String> {
    let (first, rest) = path.split_first().ok_or("empty key")?;
    let table = value.as_table_mut().ok_or("not a table")?;
    if rest.is_empty() {
        table.insert(first.clone(), v);
        Ok(())
    } else {
        let entry = table
            .entry(first.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        set_path(entry, rest, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.toml");
        std::fs::write(&p, "[cycle]\ninterval_ms = 500\n").unwrap();
        let c = Config::load(
            Some(&p),
            vec![("FRESHET__CYCLE__MAX_ATTEMPTS".into(), "7".into())],
        )
        .unwrap();
        assert_eq!(c.cycle.interval_ms, 500);
        assert_eq!(c.cycle.max_attempts, 7);
        std::fs::write(&p, "[cycle]\nintervall_ms = 500\n").unwrap();
        let e = Config::load(Some(&p), vec![]).unwrap_err().to_string();
        assert!(e.contains("intervall_ms"), "{e}");
    }

    #[test]
    fn maintenance_durations_parse_and_bad_ones_name_the_key() {
        let c = Config::from_toml(
            "[maintenance]\ndeleted_file_retention = \"1h30m\"\nlog_retention = \"500ms\"\n",
        )
        .unwrap();
        assert_eq!(
            c.maintenance.deleted_file_retention.0,
            std::time::Duration::from_secs(5400)
        );
        assert_eq!(c.maintenance.log_retention.to_string(), "500ms");
        assert_eq!(c.maintenance.checkpoint_interval, 10);
        assert_eq!(
            Config::default()
                .maintenance
                .deleted_file_retention
                .to_string(),
            "7d"
        );
        for bad in ["7 days", "h", "12x", ""] {
            let e = Config::from_toml(&format!(
                "[maintenance]\ndeleted_file_retention = \"{bad}\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("deleted_file_retention"), "{bad}: {e}");
        }
        let mut m = MaintenanceConfig::default();
        m.checkpoint_interval = 0;
        assert!(m.validate().is_err());
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let mut c = Config::default();
        c.storage
            .options
            .insert("aws_secret_access_key".into(), "hunter2".into());
        c.storage
            .options
            .insert("aws_access_key_id".into(), "AKIA".into());
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("AKIA"));
    }
}
