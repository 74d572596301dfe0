//! What coordinators and workers share about etcd: connecting (TLS, client certificate and
//! user/password from `[cluster]`, a bounded wait, errors that name the endpoints, the
//! setting and the cause), the key layout, and the worker registration record.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use rustls::RootCertStore;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

use crate::config::ClusterConfig;
use crate::error::{Error, Result};
use crate::tls::read_certs;

/// A worker's registration, stored under `<prefix>workers/<id>` with the worker's lease.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// The worker's id.
    pub id: String,
    /// The URL coordinators dial.
    pub address: String,
    /// Tasks it runs at once.
    pub capacity: u32,
    /// Tasks running when the record was written.
    pub tasks_in_flight: u64,
    /// When the record was last written (ms since the epoch): the heartbeat.
    pub heartbeat_ms: i64,
    /// When the worker started (ms since the epoch).
    pub started_ms: i64,
}

/// The key prefix under which workers register.
pub fn workers_prefix(cluster: &ClusterConfig) -> String {
    format!("{}workers/", cluster.prefix())
}

/// The election name coordinators campaign on.
pub fn election_name(cluster: &ClusterConfig) -> String {
    format!("{}leader", cluster.prefix())
}

/// Connects to etcd and checks it answers, within `etcd_connect_timeout_ms`: the one place
/// every etcd client of a process is made (coordinators and workers share the client it
/// returns). With `etcd_ca_file` the connection is TLS (and presents `etcd_cert_file` when
/// set); with `etcd_user` it authenticates with the password read from
/// `etcd_password_file`. Errors name etcd, the endpoints, the setting and the cause.
///
/// Authentication tokens: etcd's simple tokens expire after `--auth-token-ttl` (300 s by
/// default) without use; the client re-authenticates on an "invalid auth token" answer
/// (etcd-client's `with_auto_token_refresh`) and retries the request once. The password is
/// re-read from its file every few seconds; a changed one is authenticated with and then
/// used for every later token (see [`follow_password_file`]).
pub async fn connect(cluster: &ClusterConfig) -> Result<Client> {
    cluster.validate()?;
    if cluster.etcd_endpoints.is_empty() {
        return Err(Error::Config("cluster.etcd_endpoints is empty".into()));
    }
    let timeout = Duration::from_millis(cluster.etcd_connect_timeout_ms.max(100));
    let endpoints = cluster.etcd_endpoints.join(", ");
    let mut options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout.max(Duration::from_secs(5)))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if let Some(tls) = tls_options(cluster)? {
        options = options.with_tls(tls);
    }
    let credentials = match cluster.etcd_user.is_empty() {
        true => None,
        false => {
            let password = read_password(Path::new(&cluster.etcd_password_file))?;
            options = options
                .with_user(cluster.etcd_user.clone(), password.clone())
                .with_auto_token_refresh(true);
            Some(password)
        }
    };
    if credentials.is_some() && !cluster.etcd_tls() {
        tracing::warn!(
            "cluster.etcd_user is set without cluster.etcd_ca_file: the etcd password and \
             tokens travel in plaintext"
        );
    }
    let tls_note = match cluster.etcd_tls() {
        true => format!(
            " over TLS (CA cluster.etcd_ca_file '{}')",
            cluster.etcd_ca_file
        ),
        false => String::new(),
    };
    let prefix = cluster.prefix();
    let fail = |e: etcd_client::Error| {
        let who = match cluster.etcd_user.is_empty() {
            true => "anonymous (no cluster.etcd_user; etcd takes the user from the client \
                     certificate's common name, if any)"
                .to_string(),
            false => format!("user '{}'", cluster.etcd_user),
        };
        match auth_failure(&e) {
            Some(AuthFailure::Authentication) => Error::Config(format!(
                "etcd at {endpoints} refused authentication as user '{}' (cluster.etcd_user, \
                 password from cluster.etcd_password_file '{}'): {}",
                cluster.etcd_user,
                cluster.etcd_password_file,
                describe(&e)
            )),
            Some(AuthFailure::Permission) => Error::Config(format!(
                "etcd at {endpoints} denied {who} access to the keys under '{prefix}' (grant \
                 the user a role with readwrite on that prefix): {}",
                describe(&e)
            )),
            None => Error::Config(format!(
                "cannot reach etcd at {endpoints} (cluster.etcd_endpoints){tls_note}: {}",
                describe(&e)
            )),
        }
    };
    let attempt = async {
        let mut client = Client::connect(cluster.etcd_endpoints.clone(), Some(options)).await?;
        client.status().await?;
        // Rights are checked now rather than at the first campaign or registration.
        client
            .get(
                prefix.clone(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?;
        Ok::<_, etcd_client::Error>(client)
    };
    let client = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(fail(e)),
        Err(_) => {
            return Err(Error::Config(format!(
                "cannot reach etcd at {endpoints} (cluster.etcd_endpoints){tls_note} within \
                 {timeout:?}: timed out"
            )));
        }
    };
    if let Some(password) = credentials {
        tokio::spawn(follow_password_file(
            client.clone(),
            cluster.etcd_user.clone(),
            PathBuf::from(&cluster.etcd_password_file),
            password,
        ));
    }
    Ok(client)
}

/// How often the password file is re-read.
const PASSWORD_POLL: Duration = Duration::from_secs(2);

/// Re-reads the password file every [`PASSWORD_POLL`]; when it holds a new password,
/// authenticates with it and, if etcd accepts it, makes it the one every later token
/// refresh uses. A password etcd refuses (the file was rotated before etcd was) is retried
/// at every poll, while the current token and password keep working. Runs as long as the
/// process (the client it holds is the process's one).
async fn follow_password_file(
    mut client: Client,
    user: String,
    path: PathBuf,
    mut current: String,
) {
    let mut refused: Option<String> = None;
    loop {
        tokio::time::sleep(PASSWORD_POLL).await;
        let password = match read_password(&path) {
            Ok(p) => p,
            Err(e) => {
                if refused.as_deref() != Some("") {
                    tracing::warn!(error = %e, "etcd password file unreadable; keeping the current password");
                    refused = Some(String::new());
                }
                continue;
            }
        };
        if password == current {
            refused = None;
            continue;
        }
        match client
            .update_user(Some((user.clone(), password.clone())))
            .await
        {
            Ok(()) => {
                tracing::info!(user = %user, file = %path.display(), "etcd password changed; re-authenticated");
                current = password;
                refused = None;
            }
            Err(e) => {
                if refused.as_ref() != Some(&password) {
                    tracing::warn!(
                        user = %user,
                        file = %path.display(),
                        error = %describe(&e),
                        "etcd refused the new password from cluster.etcd_password_file; \
                         keeping the current one and retrying"
                    );
                    refused = Some(password);
                }
            }
        }
    }
}

/// The password in `path` (cluster.etcd_password_file); one trailing newline is dropped.
fn read_password(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Config(format!(
            "cannot read the etcd password file '{}' (cluster.etcd_password_file): {e}",
            path.display()
        ))
    })?;
    let password = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(Error::Config(format!(
            "the etcd password file '{}' (cluster.etcd_password_file) is empty",
            path.display()
        )));
    }
    Ok(password.to_string())
}

/// The TLS options of `cluster` (None: plaintext), with every file read and checked now so
/// that a bad one fails the start naming the file and the setting.
fn tls_options(cluster: &ClusterConfig) -> Result<Option<TlsOptions>> {
    if !cluster.etcd_tls() {
        return Ok(None);
    }
    let ca_path = Path::new(&cluster.etcd_ca_file);
    let mut roots = RootCertStore::empty();
    for c in read_certs("cluster.etcd_ca_file", ca_path)? {
        roots.add(c).map_err(|e| {
            Error::Config(format!(
                "cluster.etcd_ca_file file '{}': not a usable CA certificate: {e}",
                ca_path.display()
            ))
        })?;
    }
    let ca_pem = read_file("cluster.etcd_ca_file", ca_path)?;
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca_pem));
    if !cluster.etcd_cert_file.is_empty() {
        let (cert_path, key_path) = (
            Path::new(&cluster.etcd_cert_file),
            Path::new(&cluster.etcd_key_file),
        );
        let chain = read_certs("cluster.etcd_cert_file", cert_path)?;
        let key_pem = read_file("cluster.etcd_key_file", key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            Error::Config(format!(
                "cluster.etcd_key_file file '{}': no usable PEM private key: {e}",
                key_path.display()
            ))
        })?;
        let provider = rustls::crypto::ring::default_provider();
        CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            Error::Config(format!(
                "cluster.etcd_key_file file '{}': does not fit the certificate in '{}' \
                 (cluster.etcd_cert_file): {e}",
                key_path.display(),
                cert_path.display()
            ))
        })?;
        let cert_pem = read_file("cluster.etcd_cert_file", cert_path)?;
        tls = tls.identity(Identity::from_pem(cert_pem, key_pem));
    }
    Ok(Some(tls))
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::Config(format!("cannot read {key} file '{}': {e}", path.display())))
}

enum AuthFailure {
    /// Wrong password, unknown user, auth not enabled.
    Authentication,
    /// Authenticated, but without rights on the cluster's keys.
    Permission,
}

/// Whether etcd refused the credentials or the rights rather than being unreachable.
fn auth_failure(e: &etcd_client::Error) -> Option<AuthFailure> {
    let etcd_client::Error::GRpcStatus(s) = e else {
        return None;
    };
    let m = s.message();
    if !m.starts_with("etcdserver:") {
        return None;
    }
    if m.contains("permission denied") {
        Some(AuthFailure::Permission)
    } else if m.contains("authentication")
        || m.contains("user name")
        || m.contains("invalid auth token")
    {
        Some(AuthFailure::Authentication)
    } else {
        None
    }
}

/// An etcd error with its causes (a TLS failure is only in the source chain of a
/// "transport error"), without tonic's metadata dump.
pub fn describe(e: &etcd_client::Error) -> String {
    let mut out = match e {
        etcd_client::Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    };
    // etcd-client's error does not chain its causes (say the TLS error inside a status).
    let mut source = match e {
        etcd_client::Error::GRpcStatus(s) => std::error::Error::source(s),
        etcd_client::Error::TransportError(t) => std::error::Error::source(t),
        etcd_client::Error::IoError(io) => std::error::Error::source(io),
        _ => None,
    };
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Whether etcd answers now (for readiness).
pub async fn ping(client: &Client) -> std::result::Result<(), String> {
    let mut c = client.clone();
    match tokio::time::timeout(Duration::from_secs(2), c.status()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("etcd: {e}")),
        Err(_) => Err("etcd: no answer within 2s".into()),
    }
}
