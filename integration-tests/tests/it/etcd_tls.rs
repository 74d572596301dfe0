//! etcd over TLS with client certificates and user/password authentication, against a real
//! etcd (Debian's etcd-server) and real coordinator and worker processes: a cluster runs
//! cycles; a wrong CA, a missing client certificate, a wrong password and an unknown user
//! fail the start with errors naming etcd and the cause; authentication tokens expiring
//! (`--auth-token-ttl=2`) and a rotated password do not stop the cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use freshet_integration_tests::ca::Ca;
use freshet_integration_tests::procs::{
    ETCD_ROOT_PASSWORD, Etcd, EtcdSecurity, ProcCluster, etcd_admin_client,
};
use freshet_integration_tests::{Change, apply, freshet_bin, read_table, request, table_config};
use freshet_proto::admin::v1::GetTableRequest;

const PASSWORD: &str = "freshet-secret";

/// Certificates of one test: the CA, etcd's server certificate, Freshet's client
/// certificate, and the password file.
struct Pki {
    ca_file: PathBuf,
    etcd: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    password_file: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    let ca = Ca::new("etcd test CA");
    let ca_file = ca.write(dir, "etcd");
    let etcd = ca.write_leaf(dir, "etcd-server", 1, false);
    let client = ca.write_leaf(dir, "freshet-client", 2, false);
    let password_file = dir.join("etcd-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    Pki {
        ca_file,
        etcd,
        client,
        password_file,
    }
}

/// TLS, client certificates, the user `freshet`; etcd's simple tokens living
/// `token_ttl` seconds without use.
fn security(p: &Pki, token_ttl: Option<u64>) -> EtcdSecurity {
    EtcdSecurity {
        ca_file: p.ca_file.clone(),
        cert_file: p.etcd.0.clone(),
        key_file: p.etcd.1.clone(),
        client_cert_auth: true,
        user: Some(("freshet".into(), PASSWORD.into())),
        auth_token_ttl_s: token_ttl,
        jwt_ttl_s: None,
    }
}

/// [`security`] with JWT tokens that expire `ttl` seconds after issue, used or not.
fn jwt_security(p: &Pki, ttl: u64) -> EtcdSecurity {
    EtcdSecurity {
        jwt_ttl_s: Some(ttl),
        ..security(p, None)
    }
}

/// The `[cluster]` lines of a complete secure configuration.
fn cluster_lines(p: &Pki) -> String {
    format!(
        "etcd_ca_file = \"{}\"\netcd_cert_file = \"{}\"\netcd_key_file = \"{}\"\netcd_user = \"freshet\"\netcd_password_file = \"{}\"\n",
        p.ca_file.display(),
        p.client.0.display(),
        p.client.1.display(),
        p.password_file.display()
    )
}

/// A secure process cluster (etcd with the security `sec` makes); returns it and its
/// certificates.
fn secure_cluster(extra: &str, sec: fn(&Pki) -> EtcdSecurity) -> (ProcCluster, Pki) {
    let mut keep = None;
    let c = ProcCluster::with_etcd(extra, |dir| {
        let p = pki(dir);
        let etcd = Etcd::start_secure(dir, sec(&p));
        let lines = cluster_lines(&p);
        keep = Some(p);
        (etcd, lines)
    });
    (c, keep.unwrap())
}

async fn wait_applied(c: &ProcCluster, leader: usize, table: &str, timeout: Duration) {
    let end = Instant::now() + timeout;
    loop {
        let pending = async {
            c.admin(leader)
                .await
                .get_table(GetTableRequest { name: table.into() })
                .await
                .ok()?
                .into_inner()
                .table
                .map(|t| t.pending_changes)
        }
        .await;
        if pending == Some(0) {
            return;
        }
        assert!(
            Instant::now() < end,
            "{table}: changes still pending ({pending:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn batch(tag: &str, keys: std::ops::Range<i64>) -> Vec<Change> {
    keys.map(|k| (k, Some((format!("{tag}-{k}"), k)))).collect()
}

/// Ingests `changes` through any coordinator and waits until the leader applied them.
async fn ingest_and_apply(
    c: &ProcCluster,
    leader: usize,
    model: &mut BTreeMap<i64, (String, i64)>,
    changes: &[Change],
) {
    c.ingest_acked(&request("orders", true, changes), Duration::from_secs(60))
        .await;
    apply(model, changes);
    wait_applied(c, leader, "orders", Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_cycles_with_etcd_over_tls_client_certificate_and_password() {
    let (mut c, _pki) = secure_cluster("[cycle]\ninterval_ms = 300\n", |p| security(p, None));
    c.add_coordinator();
    c.add_worker(&[]);
    c.wait_ready(&c.coordinators[0], Duration::from_secs(60));
    let leader = c.wait_leader(&[], Duration::from_secs(30)).await;
    c.wait_workers(leader, 1, Duration::from_secs(30)).await;
    let cfg = table_config(&c.dir, "orders", true, 64 * 1024);
    c.create_table(leader, &cfg).await;
    let mut model = BTreeMap::new();
    ingest_and_apply(&c, leader, &mut model, &batch("a", 0..2000)).await;
    ingest_and_apply(&c, leader, &mut model, &batch("b", 1000..3000)).await;
    assert_eq!(read_table(&cfg.uri).await, model);
    // The records really are in this etcd, under the user's prefix.
    let mut admin = etcd_admin_client(
        &c.etcd.endpoint,
        &security(&_pki, None),
        Some(("root", ETCD_ROOT_PASSWORD)),
    )
    .await
    .unwrap();
    let workers = admin
        .get(
            "/freshet/test/workers/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(workers.kvs().len(), 1);
}

/// Starts `role` with `config` and expects it to fail at start; returns its stderr.
fn start_fails(dir: &Path, role: &str, config: &str) -> String {
    let p = dir.join(format!("{role}-bad.toml"));
    std::fs::write(&p, config).unwrap();
    let stderr = dir.join(format!("{role}-bad.stderr"));
    let mut child = Command::new(freshet_bin())
        .args([
            role,
            "--config",
            &p.display().to_string(),
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "",
        ])
        .env_remove("RUST_BACKTRACE")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{role} still running 30 s after start with a bad configuration:\n{config}\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !status.success(),
        "{role} started with a bad configuration:\n{config}"
    );
    std::fs::read_to_string(&stderr).unwrap()
}

/// A secure etcd alone (no Freshet processes) and a function making configurations for it.
struct Lone {
    dir: tempfile::TempDir,
    etcd: Etcd,
    pki: Pki,
}

impl Lone {
    fn new() -> Lone {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let etcd = Etcd::start_secure(dir.path(), security(&pki, None));
        Lone { dir, etcd, pki }
    }

    /// A configuration with `[cluster]` lines `lines` (the endpoint is added).
    fn config(&self, lines: &str) -> String {
        format!(
            "[cluster]\netcd_endpoints = [\"{}\"]\netcd_connect_timeout_ms = 3000\n{lines}\n[catalog]\nuri = \"{}\"\n",
            self.etcd.endpoint,
            self.dir.path().join("catalog").display()
        )
    }

    fn fails(&self, role: &str, lines: &str) -> String {
        let e = start_fails(self.dir.path(), role, &self.config(lines));
        eprintln!("{role}: {}", e.trim());
        e
    }
}

#[test]
fn a_wrong_ca_or_a_missing_client_certificate_fails_at_start_naming_etcd_and_the_cause() {
    let l = Lone::new();
    let good = cluster_lines(&l.pki);
    // etcd's certificate is not signed by the configured CA.
    let other = Ca::new("some other CA").write(l.dir.path(), "other");
    let wrong_ca = good.replace(
        &l.pki.ca_file.display().to_string(),
        &other.display().to_string(),
    );
    for role in ["coordinator", "worker"] {
        let e = l.fails(role, &wrong_ca);
        assert!(
            e.contains("cannot reach etcd")
                && e.contains(&l.etcd.endpoint)
                && e.contains("cluster.etcd_ca_file")
                && e.contains(&other.display().to_string())
                && e.contains("UnknownIssuer"),
            "{role}: {e}"
        );
    }
    // etcd requires a client certificate (--client-cert-auth).
    let no_cert: String = good
        .lines()
        .filter(|l| !l.starts_with("etcd_cert_file") && !l.starts_with("etcd_key_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    let e = l.fails("coordinator", &no_cert);
    assert!(
        e.contains("cannot reach etcd") && e.contains(&l.etcd.endpoint),
        "{e}"
    );
    // A client certificate of another CA.
    let stranger = Ca::new("stranger").write_leaf(l.dir.path(), "stranger", 9, false);
    let e = l.fails(
        "worker",
        &good
            .replace(
                &l.pki.client.0.display().to_string(),
                &stranger.0.display().to_string(),
            )
            .replace(
                &l.pki.client.1.display().to_string(),
                &stranger.1.display().to_string(),
            ),
    );
    assert!(
        e.contains("cannot reach etcd") && e.contains(&l.etcd.endpoint),
        "{e}"
    );
    // Plaintext against the TLS port, and half-configured settings, named.
    let plain = l.config("").replace("https://", "http://").replace(
        "etcd_connect_timeout_ms = 3000",
        "etcd_connect_timeout_ms = 2000",
    );
    let e = start_fails(l.dir.path(), "coordinator", &plain);
    assert!(e.contains("cannot reach etcd"), "{e}");
    let e = l.fails("coordinator", "");
    assert!(
        e.contains("cluster.etcd_ca_file is not set") && e.contains("https"),
        "{e}"
    );
    let e = l.fails(
        "worker",
        &good
            .lines()
            .filter(|l| !l.starts_with("etcd_key_file"))
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    );
    assert!(
        e.contains("cluster.etcd_cert_file is set but cluster.etcd_key_file is not"),
        "{e}"
    );
    // Unreadable and malformed files are named.
    let e = l.fails(
        "coordinator",
        &good.replace(&l.pki.ca_file.display().to_string(), "/nonexistent/ca.pem"),
    );
    assert!(
        e.contains("cluster.etcd_ca_file") && e.contains("/nonexistent/ca.pem"),
        "{e}"
    );
    let e = l.fails(
        "coordinator",
        &good.replace(
            &l.pki.client.1.display().to_string(),
            &l.pki.etcd.1.display().to_string(),
        ),
    );
    assert!(
        e.contains("cluster.etcd_key_file") && e.contains("does not fit"),
        "{e}"
    );
}

#[test]
fn a_wrong_password_or_an_unknown_user_fails_at_start_with_an_authentication_error() {
    let l = Lone::new();
    let good = cluster_lines(&l.pki);
    let wrong = l.dir.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-password").unwrap();
    let wrong_password = good.replace(
        &l.pki.password_file.display().to_string(),
        &wrong.display().to_string(),
    );
    for role in ["coordinator", "worker"] {
        let e = l.fails(role, &wrong_password);
        assert!(
            e.contains("etcd at")
                && e.contains("refused authentication as user 'freshet'")
                && e.contains("cluster.etcd_password_file")
                && e.contains("authentication failed"),
            "{role}: {e}"
        );
    }
    let e = l.fails(
        "coordinator",
        &good.replace("etcd_user = \"freshet\"", "etcd_user = \"nobody\""),
    );
    assert!(
        e.contains("refused authentication as user 'nobody'")
            && e.contains("authentication failed"),
        "{e}"
    );
    // No user at all: the client certificate's name is not a user with rights.
    let anonymous: String = good
        .lines()
        .filter(|l| !l.starts_with("etcd_user") && !l.starts_with("etcd_password_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    let e = l.fails("coordinator", &anonymous);
    assert!(
        e.contains("etcd at") && e.contains("denied anonymous") && e.contains("permission denied"),
        "{e}"
    );
    // A password file that cannot be read, or a user without one.
    let e = l.fails(
        "worker",
        &good.replace(
            &l.pki.password_file.display().to_string(),
            "/nonexistent/pw",
        ),
    );
    assert!(
        e.contains("cluster.etcd_password_file") && e.contains("/nonexistent/pw"),
        "{e}"
    );
    let e = l.fails(
        "worker",
        &good
            .lines()
            .filter(|l| !l.starts_with("etcd_password_file"))
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    );
    assert!(
        e.contains("cluster.etcd_user is set but cluster.etcd_password_file is not"),
        "{e}"
    );
}

/// Waits until `client`'s token has expired (etcd answers "invalid auth token"): proof that
/// this etcd expires tokens as configured.
async fn assert_tokens_expire(c: &ProcCluster, sec: &EtcdSecurity, idle: Duration) {
    let mut raw = etcd_admin_client(&c.etcd.endpoint, sec, Some(("freshet", PASSWORD)))
        .await
        .unwrap();
    raw.get("/freshet/x", None).await.unwrap();
    tokio::time::sleep(idle).await;
    let e = raw.get("/freshet/x", None).await.unwrap_err().to_string();
    assert!(e.contains("invalid auth token"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_tokens_do_not_stop_leader_election_membership_or_cycles() {
    // JWT tokens live 2 s whether used or not (simple tokens are extended by every use, so
    // a busy process never sees one expire): every process re-authenticates all the time.
    let (mut c, pki) = secure_cluster("[cycle]\ninterval_ms = 300\n", |p| jwt_security(p, 2));
    assert_tokens_expire(&c, &jwt_security(&pki, 2), Duration::from_secs(4)).await;

    c.add_coordinator();
    c.add_coordinator();
    c.add_worker(&[]);
    let first = c.wait_leader(&[], Duration::from_secs(60)).await;
    c.wait_workers(first, 1, Duration::from_secs(30)).await;
    let cfg = table_config(&c.dir, "orders", true, 64 * 1024);
    c.create_table(first, &cfg).await;
    let mut model = BTreeMap::new();
    ingest_and_apply(&c, first, &mut model, &batch("a", 0..1000)).await;

    // Several token lifetimes of idling: the follower's campaign, the leader's lease and
    // watch and the worker's registration outlive their tokens.
    tokio::time::sleep(Duration::from_secs(10)).await;
    ingest_and_apply(&c, first, &mut model, &batch("b", 500..1500)).await;
    c.wait_workers(first, 1, Duration::from_secs(5)).await;

    // The leader goes; the follower, campaigning for many token lifetimes, takes over, and
    // the worker verifies the new epoch in etcd.
    c.coordinators[first].proc.kill9();
    let second = c.wait_leader(&[first], Duration::from_secs(60)).await;
    assert_ne!(first, second);
    c.wait_workers(second, 1, Duration::from_secs(30)).await;
    ingest_and_apply(&c, second, &mut model, &batch("c", 1000..2000)).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    ingest_and_apply(&c, second, &mut model, &batch("d", 1500..2500)).await;
    assert_eq!(read_table(&cfg.uri).await, model);
    for n in c.coordinators.iter().chain(&c.workers) {
        let log = n.proc.log_text();
        assert!(!log.contains("lease expired"), "{}: {log}", n.proc.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_password_is_read_from_the_file_without_a_restart() {
    // Simple tokens living 2 s without use.
    let (mut c, pki) = secure_cluster("[cycle]\ninterval_ms = 300\n", |p| security(p, Some(2)));
    let sec = security(&pki, Some(2));
    assert_tokens_expire(&c, &sec, Duration::from_secs(5)).await;
    c.add_coordinator();
    c.add_worker(&[]);
    let leader = c.wait_leader(&[], Duration::from_secs(60)).await;
    c.wait_workers(leader, 1, Duration::from_secs(30)).await;
    let cfg = table_config(&c.dir, "orders", true, 64 * 1024);
    c.create_table(leader, &cfg).await;
    let mut model = BTreeMap::new();
    ingest_and_apply(&c, leader, &mut model, &batch("a", 0..1000)).await;

    // The new password is written to the file first (Kubernetes updates the Secret), then
    // changed in etcd (which invalidates the user's tokens); the processes authenticate
    // with the new one without a restart.
    let new_password = "rotated-secret";
    std::fs::write(&pki.password_file, format!("{new_password}\n")).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut root = etcd_admin_client(&c.etcd.endpoint, &sec, Some(("root", ETCD_ROOT_PASSWORD)))
        .await
        .unwrap();
    root.user_change_password("freshet", new_password)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    ingest_and_apply(&c, leader, &mut model, &batch("b", 500..1500)).await;
    for n in c.coordinators.iter().chain(&c.workers) {
        let log = n.proc.log_text();
        assert!(
            log.contains("etcd password changed; re-authenticated"),
            "{}: {log}",
            n.proc.name
        );
    }
    // A restarted process starts with the new password from the file.
    c.workers[0].proc.kill9();
    c.add_worker(&[]);
    c.wait_workers(leader, 1, Duration::from_secs(30)).await;
    ingest_and_apply(&c, leader, &mut model, &batch("c", 1000..2000)).await;
    assert_eq!(read_table(&cfg.uri).await, model);
}
