//! `freshet dev` as a newcomer meets it: the banner suggests only what exists, metrics are
//! served like the processes serve them, and output to a pipe carries no colour codes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use freshet_integration_tests::procs::{free_port, http_get};
use freshet_integration_tests::*;

#[test]
fn dev_without_demo_serves_metrics_and_suggests_nothing_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (free_port(), free_port());
    let mut child = Command::new(freshet_bin())
        .args(["dev", "--no-demo", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .env("FRESHET__SERVER__HTTP_LISTEN", format!("127.0.0.1:{http}"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut banner = Vec::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let done = line.contains("try:");
            banner.push(line);
            if done {
                break;
            }
        }
    }
    let text = banner.join("\n");
    assert!(text.contains("try:"), "no banner: {text}");
    assert!(
        text.contains(&format!("metrics: http://127.0.0.1:{http}/metrics")),
        "{text}"
    );
    assert!(
        !text.contains("orders"),
        "suggests a table that does not exist: {text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in piped output: {text:?}"
    );
    let metrics = wait_for(|| http_get(http, "/metrics"));
    assert!(metrics.contains("freshet_"), "{metrics}");
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `freshet dev --config FILE` runs the file's `[[sources]]`: a newcomer mirroring a local
/// PostgreSQL sees the table appear and follow the database.
#[test]
fn dev_runs_the_sources_of_its_config_file() {
    // One PostgreSQL test at a time (they share the test binary and two cores).
    let _serial = freshet_integration_tests::pg::SERIAL.blocking_lock();
    let pg = freshet_integration_tests::pg::Postgres::start();
    pg.psql("CREATE TABLE t (id bigint PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g;");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("freshet.toml");
    std::fs::write(
        &config,
        format!(
            "[cycle]\ninterval_ms = 200\n\n[[sources]]\nname = \"pg\"\nconnection = \"{}\"\npublication = \"freshet_pub\"\nslot = \"freshet_slot\"\npoll_ms = 100\n\n[[sources.tables]]\nsource = \"public.t\"\nname = \"t\"\nuri = \"{}\"\n",
            pg.conninfo(),
            dir.path().join("t").display()
        ),
    )
    .unwrap();
    let grpc = free_port();
    let mut child = Command::new(freshet_bin())
        .args(["dev", "--no-demo", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen", &format!("127.0.0.1:{grpc}"), "--config"])
        .arg(&config)
        .env(
            "FRESHET__SERVER__HTTP_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let uri = dir.path().join("t").display().to_string();
    let count = |uri: &str| -> i64 {
        if !std::path::Path::new(uri)
            .join("_delta_log/00000000000000000000.json")
            .exists()
        {
            return -1;
        }
        rt.block_on(async {
            let b = query(uri, "SELECT count(*) FROM t").await;
            arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b[0].column(0))
                .value(0)
        })
    };
    wait_for(|| (count(&uri) == 100).then_some(()));
    pg.psql("INSERT INTO t VALUES (1000, 'streamed');");
    wait_for(|| (count(&uri) == 101).then_some(()));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
}
