//! The S3 path against a real S3-compatible server (moto, which honours conditional puts,
//! so commit races stay visible): staging, cycles, commits, a restart that recovers from
//! the staging log in the bucket, and reading the table back.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use freshet_integration_tests::procs::{free_port, http_get};
use freshet_integration_tests::*;
use rand::{Rng, SeedableRng};

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto_server() -> std::path::PathBuf {
    let venv = python().parent().unwrap().join("moto_server");
    assert!(
        venv.exists(),
        "{} is missing: `.venv/bin/pip install 'moto[server]'` (tools/test.sh does)",
        venv.display()
    );
    venv
}

fn start_moto() -> (Moto, u16) {
    let port = free_port();
    let child = Command::new(moto_server())
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let moto = Moto(child);
    let end = Instant::now() + Duration::from_secs(30);
    while http_get(port, "/").is_none() {
        assert!(Instant::now() < end, "moto did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Create the bucket (moto does not check signatures).
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "PUT /lake HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200"),
        "{out}"
    );
    (moto, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cycles_and_recovery_on_s3() {
    let (_moto, port) = start_moto();
    let options: freshet_common::storage::StorageOptions = [
        ("aws_endpoint", format!("http://127.0.0.1:{port}")),
        ("aws_access_key_id", "test".into()),
        ("aws_secret_access_key", "test".into()),
        ("aws_region", "us-east-1".into()),
        ("aws_allow_http", "true".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = table_config(dir.path(), "t", true, 32 * 1024);
    cfg.uri = "s3://lake/tables/t".into();
    let mut config = freshet_common::config::Config::default();
    config.tables = vec![cfg.clone()];
    config.cycle.interval_ms = 3_600_000;
    config.cycle.trigger_changes = u64::MAX;
    config.catalog.uri = Some("s3://lake/catalog".into());
    config.storage.options = options.clone();
    let c = Cluster::start_with(config, 2).await;

    let mut model = BTreeMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let seed: Vec<Change> = (0..2000).map(|k| (k, Some((format!("s{k}"), k)))).collect();
    let mut ingest = c.ingest_client().await;
    ingest.ingest(request("t", true, &seed)).await.unwrap();
    apply(&mut model, &seed);
    let rec = c.coordinator.trigger("t").await.unwrap();
    assert_eq!(rec.state, "committed", "{}", rec.error);
    for round in 0..4 {
        let batch: Vec<Change> = (0..300)
            .map(|i| {
                let k = rng.gen_range(0..2500);
                if rng.gen_bool(0.2) {
                    (k, None)
                } else {
                    (k, Some((format!("r{round}-{i}"), i)))
                }
            })
            .collect();
        ingest.ingest(request("t", true, &batch)).await.unwrap();
        apply(&mut model, &batch);
        let rec = c.coordinator.trigger("t").await.unwrap();
        assert_eq!(rec.state, "committed", "{}", rec.error);
    }
    // Staged but not applied when the coordinator goes away: the restart finds it in S3.
    let batch: Vec<Change> = (0..50).map(|k| (k * 7, None)).collect();
    ingest.ingest(request("t", true, &batch)).await.unwrap();
    apply(&mut model, &batch);
    let c = c.restart().await;
    let rec = c.coordinator.trigger("t").await.unwrap();
    assert_eq!(rec.state, "committed", "{}", rec.error);
    assert_eq!(rec.changes, 50);
    assert_eq!(read_table_with(&cfg.uri, &options).await, model);
    c.stop();
}
