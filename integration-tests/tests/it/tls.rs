//! TLS with real handshakes against a test CA made at test time (rcgen): coordinator
//! clients with the right, a wrong and no CA, an expired server certificate, workers that
//! take work only from clients with a certificate of the cluster's CA, a cycle over mutual
//! TLS, the `freshet` CLI over https, and certificate rotation without a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use freshet_common::config::{Config, TlsConfig};
use freshet_common::tls::{ClientTls, ServerTls};
use freshet_integration_tests::ca::Ca;
use freshet_integration_tests::*;
use freshet_proto::admin::v1::admin_service_client::AdminServiceClient;
use freshet_proto::admin::v1::{ListTablesRequest, TriggerCycleRequest};
use freshet_proto::ingest::v1::ingest_service_client::IngestServiceClient;
use freshet_proto::worker::v1::InfoRequest;
use freshet_proto::worker::v1::worker_service_client::WorkerServiceClient;
use tonic::transport::Endpoint;

/// The `[tls]` section of a cluster whose nodes all use `cert`/`key` of `ca`.
fn tls_config(ca: &Path, cert: &Path, key: &Path) -> TlsConfig {
    TlsConfig {
        cert_file: cert.display().to_string(),
        key_file: key.display().to_string(),
        ca_file: ca.display().to_string(),
        require_client_cert: false,
        ..Default::default()
    }
}

/// A TLS cluster (one coordinator, `workers` workers, one table "t") and its CA file.
async fn tls_cluster(dir: &Path, workers: usize) -> (Cluster, Ca, PathBuf) {
    let ca = Ca::new("freshet test CA");
    let ca_file = ca.write(dir, "cluster");
    let (cert, key) = ca.write_leaf(dir, "node", 1, false);
    let mut config = Config::default();
    config.tables = vec![table_config(dir, "t", false, 4096)];
    config.cycle.interval_ms = 3_600_000;
    config.cycle.trigger_changes = u64::MAX;
    config.catalog.uri = Some(dir.join("_catalog").display().to_string());
    config.tls = tls_config(&ca_file, &cert, &key);
    let c = Cluster::start_with(config, workers).await;
    assert!(c.endpoint.starts_with("https://"), "{}", c.endpoint);
    assert!(c.worker_endpoints.iter().all(|e| e.starts_with("https://")));
    (c, ca, ca_file)
}

/// The error and its causes on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn endpoint(url: &str) -> Endpoint {
    Endpoint::from_shared(url.to_string()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_admin_and_a_cycle_over_tls_and_mutual_tls_to_workers() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _ca, ca_file) = tls_cluster(dir.path(), 2).await;
    // A client that verifies the coordinator with the cluster's CA (no client certificate:
    // the coordinator does not require one unless tls.require_client_cert).
    let client = Arc::new(ClientTls::new(&ca_file, None).unwrap());
    let channel = client.connect(endpoint(&c.endpoint)).await.unwrap();
    let mut ingest = IngestServiceClient::new(channel.clone());
    let mut admin = AdminServiceClient::new(channel);
    let changes: Vec<Change> = (0..100).map(|k| (k, Some((format!("v{k}"), k)))).collect();
    ingest.ingest(request("t", false, &changes)).await.unwrap();
    // The cycle's tasks go to the workers over mutual TLS (they require the coordinator's
    // client certificate): the cycle commits only if that works.
    let rec = admin
        .trigger_cycle(TriggerCycleRequest { table: "t".into() })
        .await
        .unwrap()
        .into_inner()
        .cycle
        .unwrap();
    assert_eq!(rec.state, "committed", "{rec:?}");
    assert!(
        rec.tasks.iter().all(|t| t.worker.starts_with("https://")),
        "{rec:?}"
    );
    let mut model = BTreeMap::new();
    apply(&mut model, &changes);
    assert_eq!(read_table(&c.config.tables[0].uri).await, model);
    let tables = admin
        .list_tables(ListTablesRequest {})
        .await
        .unwrap()
        .into_inner()
        .tables;
    assert_eq!(tables[0].total_rows, 100);
    // Plaintext to a TLS coordinator fails.
    let plain = AdminServiceClient::connect(c.endpoint.replacen("https://", "http://", 1)).await;
    if let Ok(mut a) = plain {
        assert!(a.list_tables(ListTablesRequest {}).await.is_err());
    }
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_speaks_https_with_its_tls_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _ca, ca_file) = tls_cluster(dir.path(), 1).await;
    let bin = freshet_bin();
    let run = |args: Vec<String>, env: Vec<(&'static str, String)>| {
        let bin = bin.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(bin)
                    .args(args)
                    .env_remove("FRESHET_ENDPOINT")
                    .env_remove("FRESHET_TLS_CA")
                    .envs(env)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let ok = run(
        vec![
            "--endpoint".into(),
            c.endpoint.clone(),
            "--tls-ca".into(),
            ca_file.display().to_string(),
            "admin".into(),
            "tables".into(),
        ],
        vec![],
    )
    .await;
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(out.contains(" t "), "{out}");
    // The same through the environment.
    let ok = run(
        vec!["admin".into(), "leader".into()],
        vec![
            ("FRESHET_ENDPOINT", c.endpoint.clone()),
            ("FRESHET_TLS_CA", ca_file.display().to_string()),
        ],
    )
    .await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // https without a CA names the missing flag.
    let no_ca = run(
        vec![
            "--endpoint".into(),
            c.endpoint.clone(),
            "admin".into(),
            "tables".into(),
        ],
        vec![],
    )
    .await;
    assert!(!no_ca.status.success());
    let err = String::from_utf8_lossy(&no_ca.stderr);
    assert!(err.contains("--tls-ca"), "{err}");
    // A wrong CA fails the handshake, and says so.
    let other = Ca::new("another CA").write(dir.path(), "other");
    let wrong = run(
        vec![
            "--endpoint".into(),
            c.endpoint.clone(),
            "--tls-ca".into(),
            other.display().to_string(),
            "admin".into(),
            "tables".into(),
        ],
        vec![],
    )
    .await;
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        err.contains("TLS handshake") && err.contains("UnknownIssuer"),
        "{err}"
    );
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_an_expired_server_certificate_fails_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let (c, ca, ca_file) = tls_cluster(dir.path(), 1).await;
    let other = Ca::new("another CA").write(dir.path(), "other");
    let wrong = Arc::new(ClientTls::new(&other, None).unwrap());
    let e = wrong.connect(endpoint(&c.endpoint)).await.unwrap_err();
    let msg = chain(&e);
    assert!(
        msg.contains("TLS handshake") && msg.contains("invalid peer certificate: UnknownIssuer"),
        "{msg}"
    );
    c.stop();

    // A server (here a worker) with an expired certificate of the right CA.
    let (cert, key) = ca.write_leaf(dir.path(), "expired", 9, true);
    let tls = ServerTls::new(
        &cert,
        &key,
        Some(&ca_file),
        freshet_common::tls::ClientAuth::Required,
    )
    .unwrap();
    let (l, addr) = freshet_worker::bind("127.0.0.1:0").await.unwrap();
    let w = freshet_worker::Worker::new("expired", 1, Default::default());
    tokio::spawn(freshet_worker::serve_tls(
        w,
        l,
        1 << 20,
        Some(Arc::new(tls)),
        std::future::pending(),
    ));
    let (ccert, ckey) = ca.write_leaf(dir.path(), "client", 10, false);
    let client = Arc::new(ClientTls::new(&ca_file, Some((&ccert, &ckey))).unwrap());
    let e = client
        .connect(endpoint(&format!("https://{addr}")))
        .await
        .unwrap_err();
    let msg = chain(&e);
    assert!(
        msg.contains("invalid peer certificate: certificate expired"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_takes_work_only_from_clients_with_the_clusters_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let ca_file = ca.write(dir.path(), "cluster");
    let (cert, key) = ca.write_leaf(dir.path(), "worker", 1, false);
    let tls = ServerTls::worker(&tls_config(&ca_file, &cert, &key)).unwrap();
    let (l, addr) = freshet_worker::bind("127.0.0.1:0").await.unwrap();
    let w = freshet_worker::Worker::new("w", 1, Default::default());
    tokio::spawn(freshet_worker::serve_tls(
        w,
        l,
        1 << 20,
        tls,
        std::future::pending(),
    ));
    let url = format!("https://{addr}");

    // The cluster's CA but no client certificate: refused.
    let anonymous = Arc::new(ClientTls::new(&ca_file, None).unwrap());
    let refused = match anonymous.connect(endpoint(&url)).await {
        // TLS 1.3: the client may finish its side before the server refuses.
        Ok(ch) => WorkerServiceClient::new(ch)
            .info(InfoRequest {})
            .await
            .err()
            .map(|s| s.to_string()),
        Err(e) => Some(chain(&e)),
    };
    assert!(
        refused.is_some(),
        "a worker answered a client without a certificate"
    );

    // A certificate of another CA: refused.
    let other = Ca::new("another CA");
    let (ocert, okey) = other.write_leaf(dir.path(), "intruder", 2, false);
    let intruder = Arc::new(ClientTls::new(&ca_file, Some((&ocert, &okey))).unwrap());
    let refused = match intruder.connect(endpoint(&url)).await {
        Ok(ch) => WorkerServiceClient::new(ch)
            .info(InfoRequest {})
            .await
            .err()
            .map(|s| s.to_string()),
        Err(e) => Some(chain(&e)),
    };
    assert!(
        refused.is_some(),
        "a worker answered a client of another CA"
    );

    // A coordinator's certificate of the cluster's CA: served.
    let (ccert, ckey) = ca.write_leaf(dir.path(), "coordinator", 3, false);
    let coordinator = Arc::new(ClientTls::new(&ca_file, Some((&ccert, &ckey))).unwrap());
    let ch = coordinator.connect(endpoint(&url)).await.unwrap();
    let info = WorkerServiceClient::new(ch)
        .info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.worker_id, "w");
}

/// The certificate a server presents on a new connection.
async fn presented_certificate(addr: &str, ca_file: &Path) -> Vec<u8> {
    let client = ClientTls::new(ca_file, None).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(client.config())
        .connect(name, tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_to_new_connections_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (c, ca, ca_file) = tls_cluster(dir.path(), 1).await;
    let addr = c.endpoint.trim_start_matches("https://").to_string();
    let first = std::fs::read_to_string(dir.path().join("node.pem")).unwrap();
    assert_eq!(
        presented_certificate(&addr, &ca_file).await,
        pem_der(&first)
    );
    // An open connection from before the rotation.
    let client = Arc::new(ClientTls::new(&ca_file, None).unwrap());
    let mut before = AdminServiceClient::new(client.connect(endpoint(&c.endpoint)).await.unwrap());

    // Rotate in place, as cert-manager does: a new certificate (serial 2) and key.
    let (cert, key) = ca.leaf(2, false);
    std::fs::write(dir.path().join("node.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("node-key.pem"), &key).unwrap();
    assert_eq!(presented_certificate(&addr, &ca_file).await, pem_der(&cert));
    assert_ne!(pem_der(&cert), pem_der(&first));

    // New connections work end to end (coordinator and, for the cycle, workers with the
    // rotated client and server certificates); the old connection still works too.
    let mut after = AdminServiceClient::new(client.connect(endpoint(&c.endpoint)).await.unwrap());
    let mut ingest = IngestServiceClient::new(client.connect(endpoint(&c.endpoint)).await.unwrap());
    ingest
        .ingest(request("t", false, &[(1, Some(("x".into(), 1)))]))
        .await
        .unwrap();
    let rec = after
        .trigger_cycle(TriggerCycleRequest { table: "t".into() })
        .await
        .unwrap()
        .into_inner()
        .cycle
        .unwrap();
    assert_eq!(rec.state, "committed", "{rec:?}");
    before.list_tables(ListTablesRequest {}).await.unwrap();

    // A half-written rotation (a key that does not fit) keeps the last good pair.
    std::fs::write(dir.path().join("node-key.pem"), ca.leaf(3, false).1).unwrap();
    assert_eq!(presented_certificate(&addr, &ca_file).await, pem_der(&cert));
    c.stop();
}

/// In Kubernetes workers advertise pod IPs, which no certificate issued ahead of time names;
/// the coordinator then verifies one fixed name (`tls.worker_server_name`) in every worker's
/// certificate instead of the dialled host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_verified_by_the_configured_name_when_they_advertise_an_ip() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let ca_file = ca.write(dir.path(), "cluster");
    // The worker's certificate names only "freshet-worker", not 127.0.0.1.
    let (wcert, wkey) = ca.leaf_for(&["freshet-worker"], 1, false);
    let (wc, wk) = (dir.path().join("w.pem"), dir.path().join("w-key.pem"));
    std::fs::write(&wc, wcert).unwrap();
    std::fs::write(&wk, wkey).unwrap();
    let tls = ServerTls::worker(&tls_config(&ca_file, &wc, &wk)).unwrap();
    let (l, addr) = freshet_worker::bind("127.0.0.1:0").await.unwrap();
    let w = freshet_worker::Worker::new("w", 1, Default::default());
    tokio::spawn(freshet_worker::serve_tls(
        w,
        l,
        1 << 20,
        tls,
        std::future::pending(),
    ));
    let url = format!("https://{addr}");
    let (ccert, ckey) = ca.write_leaf(dir.path(), "coordinator", 2, false);

    // Verified against the dialled IP: the certificate does not name it.
    let mut cfg = tls_config(&ca_file, &ccert, &ckey);
    let by_host = ClientTls::from_config(&cfg).unwrap().unwrap();
    let e = by_host.connect(endpoint(&url)).await.unwrap_err();
    let msg = chain(&e);
    assert!(msg.contains("not valid for name"), "{msg}");

    // With worker_server_name: served.
    cfg.worker_server_name = "freshet-worker".into();
    let by_name = ClientTls::from_config(&cfg).unwrap().unwrap();
    let ch = by_name.connect(endpoint(&url)).await.unwrap();
    let info = WorkerServiceClient::new(ch)
        .info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.worker_id, "w");

    // A certificate of the same CA for another name is still refused.
    cfg.worker_server_name = "freshet-coordinator".into();
    let other = ClientTls::from_config(&cfg).unwrap().unwrap();
    assert!(other.connect(endpoint(&url)).await.is_err());
}

/// A follower names the leader by its advertised address, which in Kubernetes is a pod IP
/// no certificate names; the CLI verifies the leader by the host name the user gave (the
/// name every coordinator's certificate carries) and so follows the hint over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_follows_a_leader_hint_over_tls_verifying_the_name_it_was_given() {
    use freshet_integration_tests::procs::ProcCluster;
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let ca_file = ca.write(certs.path(), "cluster");
    // Coordinators' certificate: "localhost" only; they advertise https://127.0.0.1:port.
    let (cert, key) = ca.leaf_for(&["localhost"], 1, false);
    let (c, k) = (certs.path().join("c.pem"), certs.path().join("c-key.pem"));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    let mut cluster = ProcCluster::new(&format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n",
        c.display(),
        k.display(),
        ca_file.display()
    ));
    cluster.add_coordinator();
    cluster.add_coordinator();
    let port = |i: usize| {
        cluster.coordinators[i]
            .endpoint
            .rsplit(':')
            .next()
            .unwrap()
            .to_string()
    };
    let cli = |port: &str, args: &[&str]| {
        std::process::Command::new(freshet_bin())
            .arg("--endpoint")
            .arg(format!("https://localhost:{port}"))
            .arg("--tls-ca")
            .arg(&ca_file)
            .args(args)
            .env_remove("FRESHET_TOKEN")
            .output()
            .unwrap()
    };
    // Find a follower that names the leader.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let follower = 'found: loop {
        for i in 0..2 {
            let o = cli(&port(i), &["admin", "leader", "-o", "json"]);
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout)
                && v["is_leader"] == false
                && v["leader"]
                    .as_str()
                    .is_some_and(|l| l.starts_with("https://127.0.0.1:"))
            {
                break 'found i;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no follower naming a leader"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    // A leader-only command through the follower follows the hint (an IP) over TLS.
    let o = cli(&port(follower), &["admin", "tables"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("is a follower; using the leader"), "{err}");
}

/// `tls.http`: the HTTP port (`/metrics`, `/livez`, `/readyz`) speaks TLS with the process's
/// certificate, HTTP/1.1, without client certificates (probes have none); plaintext fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_serves_metrics_and_probes_over_tls_when_asked() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let ca_file = ca.write(dir.path(), "cluster");
    let (cert, key) = ca.write_leaf(dir.path(), "node", 1, false);
    let mut cfg = tls_config(&ca_file, &cert, &key);
    assert!(
        ServerTls::http(&cfg).unwrap().is_none(),
        "off unless tls.http"
    );
    cfg.http = true;
    let tls = ServerTls::http(&cfg).unwrap();
    let ready: freshet_common::http::ReadyCheck = Arc::new(|| Box::pin(async { Ok(()) }));
    let registry = Arc::new(prometheus_client::registry::Registry::default());
    let addr = freshet_common::http::serve("127.0.0.1:0", registry, ready, tls)
        .await
        .unwrap();

    // HTTPS with the cluster's CA and no client certificate: answered.
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&ca_file).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.ok();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Plaintext HTTP gets no answer.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        plain.read_to_end(&mut buf),
    )
    .await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("200"),
        "plaintext was answered"
    );
}
