//! `freshet source remove` against a real PostgreSQL: the source stops, its replication
//! slot (which would keep WAL forever) and publication are dropped, it is forgotten across
//! restarts, and its tables stay served.

use std::sync::Arc;

use arrow::array::Array;
use std::time::Duration;

use freshet_integration_tests::pg::Postgres;
use freshet_integration_tests::*;
use freshet_proto::admin::v1::{AddSourceRequest, ListSourcesRequest, RemoveSourceRequest};

fn definition(pg: &Postgres, dir: &std::path::Path) -> String {
    format!(
        "name = \"pg\"\nconnection = \"{}\"\npublication = \"freshet_pub\"\nslot = \"freshet_slot\"\npoll_ms = 100\nheartbeat_ms = 300\n\
         [[tables]]\nsource = \"public.t\"\nname = \"t\"\nuri = \"{}\"\n",
        pg.conninfo(),
        dir.join("t").display()
    )
}

async fn sources(c: &Cluster) -> Vec<String> {
    c.admin_client()
        .await
        .list_sources(ListSourcesRequest {})
        .await
        .unwrap()
        .into_inner()
        .sources
        .into_iter()
        .map(|s| s.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_source_releases_its_slot_and_publication_and_stays_removed() {
    // One PostgreSQL test at a time (they share the test binary and two cores).
    let _serial = freshet_integration_tests::pg::SERIAL.lock().await;
    let pg = Postgres::start();
    pg.psql("CREATE TABLE t (id bigint PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');");
    let dir = tempfile::tempdir().unwrap();
    let mut config = freshet_common::config::Config::default();
    config.cycle.interval_ms = 200;
    config.catalog.uri = Some(dir.path().join("_catalog").display().to_string());
    let factory: Arc<dyn freshet_coordinator::SourceFactory> =
        Arc::new(freshet_source_postgres::PostgresFactory);
    let c = Cluster::start_with_sources(config, 1, Some(factory)).await;
    let mut admin = c.admin_client().await;
    admin
        .add_source(AddSourceRequest {
            definition: definition(&pg, dir.path()),
        })
        .await
        .unwrap();
    let uri = dir.path().join("t").display().to_string();
    wait_until("the snapshot", Duration::from_secs(60), || async {
        (std::path::Path::new(&uri)
            .join("_delta_log/00000000000000000000.json")
            .exists()
            && read_table_rows(&uri).await == 1)
            .then_some(())
    })
    .await;
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots").trim(),
        "1"
    );

    // Unknown: NOT_FOUND, nothing dropped.
    let e = admin
        .remove_source(RemoveSourceRequest {
            name: "nope".into(),
            keep_publication: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots").trim(),
        "1"
    );

    // The CLI removes it.
    let out = std::process::Command::new(freshet_bin())
        .args(["--endpoint", &c.endpoint, "source", "remove", "pg"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots").trim(),
        "0"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM pg_publication").trim(), "0");
    assert!(sources(&c).await.is_empty());
    // The table stays served; changes in PostgreSQL no longer arrive.
    assert!(c.coordinator.table("t").is_ok());
    pg.psql("INSERT INTO t VALUES (2, 'b');");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(read_table_rows(&uri).await, 1);

    // A restarted coordinator does not start it again (no slot re-created).
    let c = c.restart().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(sources(&c).await.is_empty());
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots").trim(),
        "0"
    );
    c.stop();
}

async fn read_table_rows(uri: &str) -> usize {
    query(uri, "SELECT count(*) AS n FROM t")
        .await
        .first()
        .map(|b| {
            arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b.column(0)).value(0)
                as usize
        })
        .unwrap_or(0)
}

/// The `id,a` rows of PostgreSQL's `t` and of the Delta table, as text lines.
async fn both(pg: &Postgres, uri: &str) -> (String, String) {
    let want = pg.psql("SELECT id || ',' || a FROM t ORDER BY id");
    let got = if std::path::Path::new(uri)
        .join("_delta_log/00000000000000000000.json")
        .exists()
    {
        let batches = query(
            uri,
            "SELECT CAST(id AS VARCHAR) || ',' || a AS r FROM t ORDER BY id",
        )
        .await;
        let mut lines = Vec::new();
        for b in &batches {
            let col = arrow::array::AsArray::as_string_view_opt(b.column(0))
                .map(|a| {
                    (0..a.len())
                        .map(|i| a.value(i).to_string())
                        .collect::<Vec<_>>()
                })
                .or_else(|| {
                    arrow::array::AsArray::as_string_opt::<i32>(b.column(0))
                        .map(|a| (0..a.len()).map(|i| a.value(i).to_string()).collect())
                })
                .unwrap_or_default();
            lines.extend(col);
        }
        lines.join("\n")
    } else {
        String::new()
    };
    (want.trim().to_string(), got.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_paused_by_an_incompatible_change_is_copied_again_and_streams_on() {
    // One PostgreSQL test at a time (they share the test binary and two cores).
    let _serial = freshet_integration_tests::pg::SERIAL.lock().await;
    let pg = Postgres::start();
    pg.psql(
        "CREATE TABLE t (id bigint PRIMARY KEY, a text, b text);
         INSERT INTO t SELECT g, 'a' || g, 'b' || g FROM generate_series(1, 500) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut config = freshet_common::config::Config::default();
    config.cycle.interval_ms = 200;
    config.catalog.uri = Some(dir.path().join("_catalog").display().to_string());
    let factory: Arc<dyn freshet_coordinator::SourceFactory> =
        Arc::new(freshet_source_postgres::PostgresFactory);
    let c = Cluster::start_with_sources(config, 1, Some(factory)).await;
    c.admin_client()
        .await
        .add_source(AddSourceRequest {
            definition: definition(&pg, dir.path()),
        })
        .await
        .unwrap();
    let uri = dir.path().join("t").display().to_string();
    wait_until("the snapshot", Duration::from_secs(60), || async {
        let (want, got) = both(&pg, &uri).await;
        (want == got).then_some(())
    })
    .await;

    // Dropping a column cannot be mirrored: the table pauses.
    pg.psql("ALTER TABLE t DROP COLUMN b; UPDATE t SET a = 'changed' WHERE id = 1;");
    wait_until("the table to pause", Duration::from_secs(60), || async {
        let t = c.coordinator.table("t").ok()?;
        c.coordinator
            .table_info(&t)
            .await
            .ok()?
            .paused
            .then_some(())
    })
    .await;

    // Resync: copied again under the new shape, then streaming goes on.
    let out = std::process::Command::new(freshet_bin())
        .args(["--endpoint", &c.endpoint, "source", "resync", "t"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg.psql("INSERT INTO t VALUES (1000, 'after'); DELETE FROM t WHERE id = 2;");
    wait_until(
        "the table to equal PostgreSQL again",
        Duration::from_secs(90),
        || async {
            let (want, got) = both(&pg, &uri).await;
            (want == got).then_some(())
        },
    )
    .await;
    let t = c.coordinator.table("t").unwrap();
    assert!(
        t.def.schema.field_with_name("b").is_err(),
        "the dropped column is gone"
    );
    assert!(!c.coordinator.table_info(&t).await.unwrap().paused);
    c.stop();
}

/// A coordinator process exports each source's lag, state and progress on /metrics.
#[test]
fn source_lag_and_state_are_metrics() {
    use freshet_integration_tests::procs::{free_port, http_get};
    // One PostgreSQL test at a time (they share the test binary and two cores).
    let _serial = freshet_integration_tests::pg::SERIAL.blocking_lock();
    let pg = Postgres::start();
    pg.psql("CREATE TABLE t (id bigint PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');");
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (free_port(), free_port());
    let config = dir.path().join("freshet.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\n\n\
             [cycle]\ninterval_ms = 200\nworkers = [\"http://127.0.0.1:{}\"]\n\n{}",
            free_port(),
            definition(&pg, dir.path())
                .replacen("name = \"pg\"", "[[sources]]\nname = \"pg\"", 1)
                .replace("[[tables]]", "[[sources.tables]]")
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("c.log")).unwrap();
    let mut child = std::process::Command::new(freshet_bin())
        .args(["coordinator", "--config"])
        .arg(&config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let text = loop {
        if let Some(m) = http_get(http, "/metrics")
            && m.contains("freshet_source_state{source=\"pg\"")
            && m.contains("freshet_source_lag_bytes{source=\"pg\"}")
        {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no source metrics: {}",
            std::fs::read_to_string(dir.path().join("c.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        text.contains("freshet_source_lag_milliseconds{source=\"pg\"}"),
        "{text}"
    );
    assert!(
        text.contains("freshet_source_snapshot_rows{source=\"pg\"}"),
        "{text}"
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}
