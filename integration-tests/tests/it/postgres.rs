//! The PostgreSQL source against a real PostgreSQL 15 (`wal_level=logical`, started by the
//! test): snapshot while a workload runs, streaming, key changes, deletes, TRUNCATE, a stop
//! and restart in the middle of streaming, and refused tables.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use freshet_common::source::{SourceInfoExt, SourceOrigin, SourceState};
use freshet_integration_tests::pg::Postgres;
use freshet_integration_tests::*;
use freshet_source_postgres::{SourceConfig, SourceTable};

use freshet_integration_tests::pg::SERIAL;

fn source(pg: &Postgres, dir: &std::path::Path, tables: &[&str]) -> SourceConfig {
    SourceConfig {
        name: "pg".into(),
        kind: "postgres".into(),
        connection: pg.conninfo(),
        password_env: None,
        password_file: None,
        password_secret: None,
        publication: "freshet_pub".into(),
        slot: "freshet_slot".into(),
        poll_ms: 100,
        snapshot_batch_rows: 20_000,
        heartbeat_ms: 300,
        sslmode: None,
        sslrootcert: None,
        allow_cleartext_password: false,
        tables: tables
            .iter()
            .map(|t| SourceTable {
                source: format!("public.{t}"),
                name: t.to_string(),
                uri: dir.join(t).display().to_string(),
                partition_by: vec![],
                target_file_size: Some(4 << 20),
            })
            .collect(),
    }
}

async fn cluster(dir: &std::path::Path) -> Cluster {
    let mut config = freshet_common::config::Config::default();
    config.cycle.interval_ms = 200;
    config.catalog.uri = Some(dir.join("_catalog").display().to_string());
    Cluster::start_with(config, 2).await
}

/// `id|rest` lines of the PostgreSQL table, ordered by id.
fn pg_rows(pg: &Postgres, sql: &str) -> BTreeMap<i64, String> {
    pg.psql(sql)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (id, rest) = l.split_once('|').unwrap();
            (id.parse().unwrap(), rest.to_string())
        })
        .collect()
}

/// The same shape from the Delta table (columns cast to text by DataFusion).
async fn delta_rows(uri: &str, sql: &str) -> BTreeMap<i64, String> {
    let mut out = BTreeMap::new();
    for b in query(uri, sql).await {
        let ids = b.column(0).as_primitive::<Int64Type>();
        let rest = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Utf8).unwrap();
        let rest = rest.as_string::<i32>();
        for i in 0..b.num_rows() {
            out.insert(ids.value(i), rest.value(i).to_string());
        }
    }
    out
}

/// Waits until the source has confirmed the server's WAL position as of this call (so every
/// transaction committed before is staged) and the tables have nothing pending.
async fn caught_up(
    pg: &Postgres,
    c: &Cluster,
    src: &freshet_source_postgres::PostgresSource,
    tables: &[&str],
) {
    let target = freshet_source_postgres::pgoutput::parse_lsn(
        pg.psql("SELECT pg_current_wal_insert_lsn()").trim(),
    )
    .unwrap();
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let s = src.status();
        assert_ne!(s.state, SourceState::Error, "source failed: {}", s.error);
        // A table being re-opened (schema change) counts as pending.
        let pending: u64 = tables
            .iter()
            .map(|t| {
                c.coordinator
                    .table(t)
                    .map(|t| t.pending.lock().unwrap().rows())
                    .unwrap_or(1)
            })
            .sum();
        if s.state == SourceState::Streaming && s.polled_lsn >= target && pending == 0 {
            return;
        }
        assert!(
            Instant::now() < end,
            "source not caught up to {target:X}: {s:?}, pending {pending}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const ORDERS_PG: &str = "SELECT id, concat_ws(',', region, amount::text, coalesce(note, 'NULL'), qty::text) FROM orders ORDER BY id";
const ORDERS_DELTA: &str = "SELECT id, concat_ws(',', region, CAST(amount AS VARCHAR), coalesce(note, 'NULL'), CAST(qty AS VARCHAR)) FROM t ORDER BY id";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_under_load_then_streaming_equals_postgres() {
    let _serial = SERIAL.lock().await;
    let pg = Postgres::start();
    pg.psql(
        "CREATE TABLE orders (id bigint PRIMARY KEY, region text NOT NULL, amount numeric(12,2), note text, qty int);
         INSERT INTO orders SELECT g, (ARRAY['eu','us','apac'])[1 + g % 3], (g % 10000) / 100.0, CASE WHEN g % 7 = 0 THEN NULL ELSE 'n' || g END, g % 50
         FROM generate_series(1, 200000) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;

    // A workload runs during and after the snapshot.
    let running = Arc::new(AtomicBool::new(true));
    let pg_port = pg.port;
    let psql = pg.psql_bin();
    let r = running.clone();
    let load = std::thread::spawn(move || {
        let mut round = 0i64;
        while r.load(Ordering::SeqCst) || round < 30 {
            let sql = format!(
                "BEGIN;
                 UPDATE orders SET qty = qty + 1, note = 'u{round}' WHERE id % 97 = {m};
                 DELETE FROM orders WHERE id BETWEEN {d} AND {d} + 20;
                 INSERT INTO orders SELECT g, 'eu', 1.25, 'new{round}', 1 FROM generate_series({i}, {i} + 50) g ON CONFLICT (id) DO UPDATE SET qty = 0;
                 COMMIT;",
                m = round % 97,
                d = 1000 + round * 997,
                i = 300_000 + round * 40,
            );
            freshet_integration_tests::pg::run_sql(&psql, pg_port, &sql);
            round += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let src =
        freshet_source_postgres::start(source(&pg, dir.path(), &["orders"]), c.coordinator.clone())
            .await
            .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    running.store(false, Ordering::SeqCst);
    load.join().unwrap();
    caught_up(&pg, &c, &src, &["orders"]).await;
    let uri = dir.path().join("orders").display().to_string();
    let want = pg_rows(&pg, ORDERS_PG);
    let got = delta_rows(&uri, ORDERS_DELTA).await;
    assert_eq!(got.len(), want.len(), "row counts differ");
    for (k, v) in &want {
        assert_eq!(got.get(k), Some(v), "row {k} differs");
    }
    // The slot never confirms past what is staged: its position is at most the latest WAL.
    let info = c
        .coordinator
        .table_info(&c.coordinator.table("orders").unwrap())
        .await
        .unwrap();
    assert!(
        info.freshness_window > 0 && info.freshness_p50_ms <= info.freshness_p99_ms,
        "{info:?}"
    );
    let s = src.status();
    assert!(s.snapshot_rows >= 200_000, "{s:?}");
    assert!(s.transactions >= 1, "{s:?}");
    src.stop();
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_changes_deletes_truncate_and_a_restart_mid_stream() {
    let _serial = SERIAL.lock().await;
    let pg = Postgres::start();
    pg.psql(
        "CREATE TABLE orders (id bigint PRIMARY KEY, region text NOT NULL, amount numeric(12,2), note text, qty int);
         INSERT INTO orders SELECT g, 'eu', 1.00, 'n' || g, g FROM generate_series(1, 1000) g;
         CREATE TABLE nokey (a int, b text);",
    );
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;

    // A table without a primary key is refused with a clear error.
    let e =
        freshet_source_postgres::start(source(&pg, dir.path(), &["nokey"]), c.coordinator.clone())
            .await
            .err()
            .expect("a table without a key must be refused");
    assert!(e.to_string().contains("no primary key"), "{e}");

    let src =
        freshet_source_postgres::start(source(&pg, dir.path(), &["orders"]), c.coordinator.clone())
            .await
            .unwrap();
    caught_up(&pg, &c, &src, &["orders"]).await;
    // Key change = delete + insert; deletes; a transaction with several changes per key.
    pg.psql(
        "UPDATE orders SET id = 5000 WHERE id = 1;
         DELETE FROM orders WHERE id BETWEEN 10 AND 19;
         BEGIN; UPDATE orders SET qty = -1 WHERE id = 2; UPDATE orders SET qty = -2 WHERE id = 2; COMMIT;",
    );
    caught_up(&pg, &c, &src, &["orders"]).await;
    let uri = dir.path().join("orders").display().to_string();
    assert_eq!(
        delta_rows(&uri, ORDERS_DELTA).await,
        pg_rows(&pg, ORDERS_PG)
    );
    assert!(pg_rows(&pg, ORDERS_PG).contains_key(&5000));

    // Stop in the middle of streaming: changes committed meanwhile are picked up after the
    // restart from the slot's confirmed position; nothing is lost or doubled.
    pg.psql("UPDATE orders SET note = 'before-stop' WHERE id % 3 = 0;");
    src.stop();
    let c = c.restart().await;
    pg.psql("UPDATE orders SET note = 'while-down' WHERE id % 5 = 0; INSERT INTO orders VALUES (7000, 'us', 9.99, 'x', 1);");
    let src =
        freshet_source_postgres::start(source(&pg, dir.path(), &["orders"]), c.coordinator.clone())
            .await
            .unwrap();
    caught_up(&pg, &c, &src, &["orders"]).await;
    assert_eq!(
        delta_rows(&uri, ORDERS_DELTA).await,
        pg_rows(&pg, ORDERS_PG)
    );

    // TRUNCATE empties the Delta table in one commit; later inserts land after it.
    let version_before = c
        .coordinator
        .table_info(&c.coordinator.table("orders").unwrap())
        .await
        .unwrap()
        .version;
    pg.psql("BEGIN; INSERT INTO orders VALUES (8000, 'eu', 1, 'gone', 1); TRUNCATE orders; INSERT INTO orders VALUES (9000, 'eu', 2.50, 'after', 3); COMMIT;");
    caught_up(&pg, &c, &src, &["orders"]).await;
    let rows = delta_rows(&uri, ORDERS_DELTA).await;
    assert_eq!(rows, pg_rows(&pg, ORDERS_PG));
    assert_eq!(rows.len(), 1);
    let n = query(&uri, "SELECT count(*) FROM t").await;
    assert_eq!(n[0].column(0).as_primitive::<Int64Type>().value(0), 1);
    let table_dir = std::path::Path::new(&uri);
    let truncates: Vec<i64> = ((version_before + 1)..=version_before + 3)
        .filter(|v| {
            table_dir
                .join("_delta_log")
                .join(format!("{v:020}.json"))
                .exists()
        })
        .filter(|v| {
            commit_actions(table_dir, *v)
                .iter()
                .any(|a| a["commitInfo"]["freshet.metrics"]["truncate"] == true)
        })
        .collect();
    assert_eq!(truncates.len(), 1, "one truncate commit");

    // A lost replication connection is an error: the source retries and streams on from
    // the slot's confirmed position, nothing lost or doubled.
    let retries = src.status().retries;
    pg.psql(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'freshet_slot' AND active_pid IS NOT NULL",
    );
    pg.psql("INSERT INTO orders VALUES (9001, 'us', 3.25, 'after a lost connection', 4); UPDATE orders SET qty = 5 WHERE id = 9000;");
    let end = Instant::now() + Duration::from_secs(30);
    // The error shows, then the retry streams again.
    while src.status().retries == retries || src.status().state != SourceState::Streaming {
        assert!(Instant::now() < end, "no retry: {:?}", src.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    caught_up(&pg, &c, &src, &["orders"]).await;
    let rows = delta_rows(&uri, ORDERS_DELTA).await;
    assert_eq!(rows, pg_rows(&pg, ORDERS_PG));
    assert_eq!(rows.len(), 2);
    src.stop();
    c.stop();
}

/// The highest staging sequence that is durable for the table: staged segments and the
/// Delta log's txn version.
fn durable_sequence(table_dir: &std::path::Path) -> u64 {
    let mut best = 0u64;
    if let Ok(rd) = std::fs::read_dir(table_dir.join("_freshet/staging")) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if let Some((_, last)) = n.trim_end_matches(".arrow").split_once('-') {
                best = best.max(last.parse().unwrap_or(0));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(table_dir.join("_delta_log")) {
        for e in rd.flatten() {
            if !e.file_name().to_string_lossy().ends_with(".json") {
                continue;
            }
            for l in std::fs::read_to_string(e.path()).unwrap().lines() {
                let a: serde_json::Value = serde_json::from_str(l).unwrap();
                if let Some(v) = a["txn"]["version"].as_u64() {
                    best = best.max(v);
                }
            }
        }
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_mid_stream_converges_and_the_slot_never_runs_ahead() {
    let _serial = SERIAL.lock().await;
    use freshet_integration_tests::procs::ProcCluster;
    use freshet_proto::admin::v1::{GetTableRequest, ListSourcesRequest};
    let pg = Postgres::start();
    pg.psql(
        "CREATE TABLE orders (id bigint PRIMARY KEY, region text NOT NULL, amount numeric(12,2), note text, qty int);
         INSERT INTO orders SELECT g, 'eu', 1.00, 'n' || g, g FROM generate_series(1, 20000) g;",
    );
    let tmp = tempfile::tempdir().unwrap();
    let uri = tmp.path().join("orders").display().to_string();
    let mut c = ProcCluster::new(&format!(
        "[cycle]\ninterval_ms = 200\n\n[[sources]]\nname = \"pg\"\nconnection = \"{}\"\npublication = \"freshet_pub\"\nslot = \"freshet_slot\"\npoll_ms = 100\n\n[[sources.tables]]\nsource = \"public.orders\"\nname = \"orders\"\nuri = \"{uri}\"\ntarget_file_size = 1048576\n",
        pg.conninfo()
    ));
    c.add_worker(&[]);
    c.add_coordinator();
    let leader = c.wait_leader(&[], Duration::from_secs(60)).await;

    // A workload of small transactions; the coordinator is killed while it streams.
    let running = Arc::new(AtomicBool::new(true));
    let r = running.clone();
    let port = pg.port;
    let psql = pg.psql_bin();
    let load = std::thread::spawn(move || {
        let mut i = 0i64;
        while r.load(Ordering::SeqCst) {
            let sql = format!(
                "BEGIN; UPDATE orders SET qty = qty + 1, note = 'w{i}' WHERE id % 50 = {m}; DELETE FROM orders WHERE id = {d}; INSERT INTO orders VALUES ({n}, 'us', 2.50, 'ins{i}', {i}); COMMIT;",
                m = i % 50,
                d = 1 + i * 3,
                n = 100_000 + i
            );
            freshet_integration_tests::pg::run_sql(&psql, port, &sql);
            i += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    // Let the snapshot finish and streaming run for a while.
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let s = c
            .admin(leader)
            .await
            .list_sources(ListSourcesRequest {})
            .await
            .unwrap()
            .into_inner()
            .sources;
        if s.first().is_some_and(|s| {
            s.source_state() == Some(SourceState::Streaming) && s.transactions >= 20
        }) {
            break;
        }
        assert!(Instant::now() < end, "source not streaming: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.coordinators[leader].proc.kill9();
    // The slot's confirmed position is never past a transaction that is not durably staged.
    let confirmed = pg.psql(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'freshet_slot'",
    );
    let confirmed = freshet_source_postgres::pgoutput::parse_lsn(confirmed.trim()).unwrap();
    let durable_commit = durable_sequence(std::path::Path::new(&uri)) >> 16;
    assert!(
        confirmed <= durable_commit + 256,
        "slot confirmed {confirmed:X} but the last durable commit is {durable_commit:X}"
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = c.add_coordinator();
    let leader = c.wait_leader(&[leader], Duration::from_secs(60)).await;
    assert_eq!(leader, again);
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.store(false, Ordering::SeqCst);
    load.join().unwrap();

    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let s = c
            .admin(leader)
            .await
            .list_sources(ListSourcesRequest {})
            .await
            .unwrap()
            .into_inner()
            .sources;
        let t = c
            .admin(leader)
            .await
            .get_table(GetTableRequest {
                name: "orders".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .table
            .unwrap();
        let s = s.first().cloned().unwrap_or_default();
        assert_ne!(s.source_state(), Some(SourceState::Error), "{s:?}");
        if s.source_state() == Some(SourceState::Streaming)
            && s.lag_bytes == 0
            && t.pending_changes == 0
        {
            let want = pg_rows(&pg, ORDERS_PG);
            let got = delta_rows(&uri, ORDERS_DELTA).await;
            if got == want {
                break;
            }
        }
        assert!(
            Instant::now() < end,
            "did not converge: {s:?}, pending {}",
            t.pending_changes
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The CLI shows the source.
    let out = std::process::Command::new(freshet_bin())
        .args([
            "--endpoint",
            &c.coordinators[leader].endpoint,
            "source",
            "list",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("freshet_slot") && text.contains("streaming"),
        "{text}"
    );
}

/// Array columns of the `types` table: (column, PostgreSQL expression rendering one
/// element `x` as Arrow displays it on the Delta side).
const ARRAY_COLUMNS: &[(&str, &str)] = &[
    ("arr", "x::text"),
    ("ai8", "x::text"),
    ("atx", "x"),
    ("anum", "x::text"),
    ("af8", "x::text"),
    ("ab", "x::text"),
    ("atz", "to_char(x, 'YYYY-MM-DD\"T\"HH24:MI:SS.US')"),
    ("adt", "x::text"),
    ("aby", "encode(x, 'hex')"),
    ("amood", "x::text"),
];

/// Separates rendered array elements, and stands for a NULL element (characters no test
/// value holds, so that the string 'NULL' and a NULL element differ).
const ELEM_SEP: &str = "\u{241f}";
const ELEM_NULL: &str = "\u{2205}";

/// `id -> [e1␟e2␟∅]` (NULL for a NULL array) from PostgreSQL, element by element in
/// array order (lower bounds other than 1 do not show).
fn pg_array_rows(pg: &Postgres, col: &str, elem: &str) -> BTreeMap<i64, String> {
    pg_rows(
        pg,
        &format!(
            "SET TIME ZONE 'UTC'; SELECT id, CASE WHEN {col} IS NULL THEN 'NULL' ELSE '[' || \
             coalesce((SELECT string_agg(coalesce({elem}, '{ELEM_NULL}'), '{ELEM_SEP}' ORDER BY o) \
             FROM unnest({col}) WITH ORDINALITY AS u(x, o)), '') || ']' END FROM types ORDER BY id"
        ),
    )
}

/// The same rendering of a Delta list column (timestamps as PostgreSQL's `to_char` above,
/// binary as hex).
async fn delta_array_rows(uri: &str, col: &str) -> BTreeMap<i64, String> {
    use arrow::array::Array;
    let fmt = arrow::util::display::FormatOptions::default()
        .with_null(ELEM_NULL)
        .with_timestamp_tz_format(Some("%Y-%m-%dT%H:%M:%S%.6f"));
    let mut out = BTreeMap::new();
    for b in query(uri, &format!("SELECT id, {col} FROM t ORDER BY id")).await {
        let ids = b.column(0).as_primitive::<Int64Type>();
        let lists = b.column(1).as_list::<i32>();
        for i in 0..b.num_rows() {
            let text = if lists.is_null(i) {
                "NULL".to_string()
            } else {
                let items = lists.value(i);
                let f = arrow::util::display::ArrayFormatter::try_new(&items, &fmt).unwrap();
                let elems: Vec<String> = (0..items.len()).map(|j| f.value(j).to_string()).collect();
                format!("[{}]", elems.join(ELEM_SEP))
            };
            out.insert(ids.value(i), text);
        }
    }
    out
}

/// Rendered arrays equal, floats compared as numbers (PostgreSQL and Arrow spell them
/// differently: `1e+308` / `1e308`, `Infinity` / `inf`).
fn same_array_text(float: bool, a: &str, b: &str) -> bool {
    if !float || a == b {
        return a == b;
    }
    let parse = |s: &str| -> Option<Vec<Option<f64>>> {
        let inner = s.strip_prefix('[')?.strip_suffix(']')?;
        inner
            .split(ELEM_SEP)
            .filter(|e| !e.is_empty())
            .map(|e| match e {
                ELEM_NULL => Some(None),
                "Infinity" | "inf" => Some(Some(f64::INFINITY)),
                "-Infinity" | "-inf" => Some(Some(f64::NEG_INFINITY)),
                e => e.parse::<f64>().ok().map(Some),
            })
            .collect()
    };
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => {
            x.len() == y.len()
                && x.iter().zip(&y).all(|(p, q)| match (p, q) {
                    (Some(p), Some(q)) => (p.is_nan() && q.is_nan()) || p == q,
                    (p, q) => p == q,
                })
        }
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_with_nulls_and_extremes() {
    let _serial = SERIAL.lock().await;
    let pg = Postgres::start();
    pg.psql(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE types (id bigint PRIMARY KEY, i2 int2, i4 int4, i8 int8, dec numeric(38,10), num numeric,
           r real, d double precision, b bool, t text, vc varchar(10), ch char(3), u uuid, dt date, tm time,
           ts timestamp, tz timestamptz, by bytea, j json, jb jsonb, e mood, arr int[],
           ai8 int8[], atx text[], anum numeric(10,2)[], af8 float8[], ab bool[], atz timestamptz[],
           adt date[], aby bytea[], amood mood[]);
         INSERT INTO types VALUES
           (1, -32768, -2147483648, -9223372036854775808, -9999999999999999999999999999.9999999999, 123456789012345678901234567890.123456789,
            -3.4e38, -1.7976931348623157e308, false, 'tab\there ünïcødé \"q\" \\', 'ten chars!', 'ab', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '0001-01-01', '00:00:00', '1970-01-01 00:00:00', '1970-01-01 00:00:00+00', '\\x00ff10', '{\"a\": [1, 2]}', '{\"b\": null}', 'sad', '[0:2]={1,NULL,3}',
            '{-9223372036854775808,9223372036854775807,NULL}', ARRAY['a b', 'x\"y', NULL, 'NULL', '', 'c,d', '{}', 'back\\slash', ' lead', 'ünï'],
            '{1.50,-0.01,NULL,99999999.99}', '{1.5,-0.25,NULL,1e308,Infinity,-Infinity,NaN}', '{t,f,NULL}',
            '{\"2024-06-30 12:34:56.789012+02\",NULL,\"1970-01-01 00:00:00+00\"}', '{0001-01-01,9999-12-31,NULL}',
            ARRAY['\\x00ff'::bytea, NULL, '\\x'], '{happy,NULL,sad}'),
           (2, 32767, 2147483647, 9223372036854775807, 9999999999999999999999999999.9999999999, 0.000000000000000001,
            3.4e38, 1.7976931348623157e308, true, '', 'x', 'xyz', '00000000-0000-0000-0000-000000000000',
            '9999-12-31', '23:59:59.999999', '2262-04-11 23:47:16.854775', '2024-06-30 12:34:56.789012+02', '\\x', '[]', '{}', 'happy', '{}',
            '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}'),
           (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
            NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);",
    );
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let src =
        freshet_source_postgres::start(source(&pg, dir.path(), &["types"]), c.coordinator.clone())
            .await
            .unwrap();
    caught_up(&pg, &c, &src, &["types"]).await;
    // More rows through streaming (not the snapshot): row 4 as row 2, row 5 as row 1
    // (arrays with every kind of element), then an update of row 5's arrays (a rewrite of
    // an existing row holding lists).
    pg.psql("INSERT INTO types SELECT 4, i2, i4, i8, dec, num, r, d, b, t, vc, ch, u, dt, tm, ts, tz, by, j, jb, e, arr,
               ai8, atx, anum, af8, ab, atz, adt, aby, amood FROM types WHERE id = 2;
             INSERT INTO types (id, arr, ai8, atx, anum, af8, ab, atz, adt, aby, amood)
               SELECT 5, arr, ai8, atx, anum, af8, ab, atz, adt, aby, amood FROM types WHERE id = 1;");
    caught_up(&pg, &c, &src, &["types"]).await;
    pg.psql(
        r#"UPDATE types SET atx = '{"up, dated",NULL,"\\"}', af8 = '{}', atz = NULL WHERE id = 5;"#,
    );
    caught_up(&pg, &c, &src, &["types"]).await;
    let uri = dir.path().join("types").display().to_string();

    // The Delta types.
    let url = deltalake::ensure_table_uri(&uri).unwrap();
    let table = deltalake::DeltaTable::try_from_url(url).await.unwrap();
    let schema = table.snapshot().unwrap().snapshot().arrow_schema();
    let ty = |n: &str| schema.field_with_name(n).unwrap().data_type().to_string();
    assert_eq!(ty("i2"), "Int16");
    assert_eq!(ty("i4"), "Int32");
    assert_eq!(ty("i8"), "Int64");
    assert_eq!(ty("dec"), "Decimal128(38, 10)");
    assert_eq!(ty("num"), "Utf8");
    assert_eq!(ty("r"), "Float32");
    assert_eq!(ty("d"), "Float64");
    assert_eq!(ty("b"), "Boolean");
    assert_eq!(ty("dt"), "Date32");
    assert!(
        ty("ts").starts_with("Timestamp(µs") || ty("ts").starts_with("Timestamp(Microsecond"),
        "{}",
        ty("ts")
    );
    assert!(ty("tz").contains("UTC"), "{}", ty("tz"));
    assert_eq!(ty("by"), "Binary");
    // Arrays are lists whose item field is exactly what the table definition declares
    // (same name, nullability and element type), or merges would see two schemas.
    let list = |t: arrow::datatypes::DataType| freshet_common::schema::list_of(t);
    let tz_utc = arrow::datatypes::DataType::Timestamp(
        arrow::datatypes::TimeUnit::Microsecond,
        Some("UTC".into()),
    );
    use arrow::datatypes::DataType as T;
    for (col, want) in [
        ("arr", list(T::Int32)),
        ("ai8", list(T::Int64)),
        ("atx", list(T::Utf8)),
        ("anum", list(T::Decimal128(10, 2))),
        ("af8", list(T::Float64)),
        ("ab", list(T::Boolean)),
        ("atz", list(tz_utc)),
        ("adt", list(T::Date32)),
        ("aby", list(T::Binary)),
        ("amood", list(T::Utf8)),
    ] {
        assert_eq!(
            schema.field_with_name(col).unwrap().data_type(),
            &want,
            "column {col}"
        );
    }

    // Values: every column compared as PostgreSQL's text form (times in UTC) with Delta's.
    let pg_text = |col: &str, expr: &str| -> BTreeMap<i64, String> {
        pg_rows(
            &pg,
            &format!(
                "SET TIME ZONE 'UTC'; SELECT id, coalesce({expr}, 'NULL') FROM types ORDER BY id"
            ),
        )
        .into_iter()
        .map(|(k, v)| (k, v))
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .map(|(k, v)| (k, format!("{col}={v}")))
        .collect()
    };
    let delta_text = |col: &'static str, expr: &'static str| {
        let uri = uri.clone();
        async move {
            delta_rows(
                &uri,
                &format!("SELECT id, coalesce({expr}, 'NULL') FROM t ORDER BY id"),
            )
            .await
            .into_iter()
            .map(|(k, v)| (k, format!("{col}={v}")))
            .collect::<BTreeMap<_, _>>()
        }
    };
    let checks: Vec<(&str, &str, &'static str)> = vec![
        ("i2", "i2::text", "CAST(i2 AS VARCHAR)"),
        ("i4", "i4::text", "CAST(i4 AS VARCHAR)"),
        ("i8", "i8::text", "CAST(i8 AS VARCHAR)"),
        ("dec", "dec::text", "CAST(dec AS VARCHAR)"),
        ("num", "num::text", "num"),
        ("b", "b::text", "CAST(b AS VARCHAR)"),
        ("t", "t", "t"),
        ("vc", "vc", "vc"),
        // char(n) keeps its blank padding, as PostgreSQL outputs it (COPY and pgoutput alike).
        ("ch", "rpad(ch::text, 3)", "ch"),
        ("u", "u::text", "u"),
        ("dt", "dt::text", "CAST(dt AS VARCHAR)"),
        ("tm", "tm::text", "tm"),
        (
            "ts",
            "to_char(ts, 'YYYY-MM-DD\"T\"HH24:MI:SS.US')",
            "to_char(ts, '%Y-%m-%dT%H:%M:%S%.6f')",
        ),
        (
            "tz",
            "to_char(tz, 'YYYY-MM-DD\"T\"HH24:MI:SS.US')",
            "to_char(tz, '%Y-%m-%dT%H:%M:%S%.6f')",
        ),
        ("by", "encode(by, 'hex')", "encode(by, 'hex')"),
        ("j", "j::text", "j"),
        ("jb", "jb::text", "jb"),
        ("e", "e::text", "e"),
    ];
    for (col, pg_expr, delta_expr) in checks {
        let want = pg_text(col, pg_expr);
        let got = delta_text(col, delta_expr).await;
        assert_eq!(got, want, "column {col}");
    }
    // Floats compared as numbers (text forms differ between the two).
    let floats = pg_rows(
        &pg,
        "SELECT id, coalesce(r::float8::text, 'NULL') || '|' || coalesce(d::text, 'NULL') FROM types ORDER BY id",
    );
    let got = delta_rows(&uri, "SELECT id, coalesce(CAST(CAST(r AS DOUBLE) AS VARCHAR), 'NULL') || '|' || coalesce(CAST(d AS VARCHAR), 'NULL') FROM t ORDER BY id").await;
    for (k, v) in floats {
        let (a, b) = v.split_once('|').unwrap();
        let (x, y) = got[&k].split_once('|').unwrap();
        for (p, q) in [(a, x), (b, y)] {
            if p == "NULL" {
                assert_eq!(q, "NULL");
            } else {
                let (p, q): (f64, f64) = (p.parse().unwrap(), q.parse().unwrap());
                assert!((p - q).abs() <= p.abs() * 1e-7, "row {k}: {p} vs {q}");
            }
        }
    }
    // Arrays element by element, snapshot rows (1-3) and streamed rows (4, 5) alike.
    for (col, elem) in ARRAY_COLUMNS {
        let want = pg_array_rows(&pg, col, elem);
        let got = delta_array_rows(&uri, col).await;
        assert_eq!(got.len(), want.len(), "column {col}: {got:?} vs {want:?}");
        for (k, w) in &want {
            assert!(
                same_array_text(*col == "af8", &got[k], w),
                "column {col}, row {k}: Delta {} vs PostgreSQL {w}",
                got[k]
            );
        }
    }
    src.stop();
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_column_evolves_the_table_and_an_incompatible_change_pauses_it() {
    let _serial = SERIAL.lock().await;
    let pg = Postgres::start();
    pg.psql(
        "CREATE TABLE evo (id bigint PRIMARY KEY, a text NOT NULL);
         INSERT INTO evo SELECT g, 'a' || g FROM generate_series(1, 100) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let src =
        freshet_source_postgres::start(source(&pg, dir.path(), &["evo"]), c.coordinator.clone())
            .await
            .unwrap();
    caught_up(&pg, &c, &src, &["evo"]).await;
    // In one transaction: a change under the old shape, the new column, changes using it.
    pg.psql(
        "BEGIN; UPDATE evo SET a = 'before' WHERE id = 50; ALTER TABLE evo ADD COLUMN b int;
         UPDATE evo SET b = id * 10 WHERE id <= 10; INSERT INTO evo VALUES (1000, 'new', 5); COMMIT;
         DELETE FROM evo WHERE id = 3;",
    );
    caught_up(&pg, &c, &src, &["evo"]).await;
    let uri = dir.path().join("evo").display().to_string();
    let want = pg_rows(
        &pg,
        "SELECT id, a || ',' || coalesce(b::text, 'NULL') FROM evo ORDER BY id",
    );
    let got = delta_rows(
        &uri,
        "SELECT id, a || ',' || coalesce(CAST(b AS VARCHAR), 'NULL') FROM t ORDER BY id",
    )
    .await;
    assert_eq!(got, want);
    let t = c.coordinator.table("evo").unwrap();
    let b = t.def.schema.field_with_name("b").unwrap();
    assert!(b.is_nullable() && *b.data_type() == arrow::datatypes::DataType::Int32);

    // A column added with a default that existing rows take cannot be mirrored without
    // rewriting every row: the table is paused and the source says why.
    pg.psql("ALTER TABLE evo ADD COLUMN c int NOT NULL DEFAULT 7; UPDATE evo SET a = 'after' WHERE id = 1;");
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let s = src.status();
        if s.state == SourceState::Error {
            assert!(
                s.error.contains("default") && s.error.contains("evo"),
                "{}",
                s.error
            );
            break;
        }
        assert!(Instant::now() < end, "the source did not stop: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let info = c
        .coordinator
        .table_info(&c.coordinator.table("evo").unwrap())
        .await
        .unwrap();
    assert!(info.paused, "the table was not paused");
    // Nothing under the new shape was written.
    assert_eq!(
        delta_rows(&uri, "SELECT id, a FROM t WHERE id = 1").await[&1],
        "a1"
    );
    src.stop();
    c.stop();
}

/// Waits until `src` stops with an error; returns it.
async fn stopped_with_error(src: &freshet_source_postgres::PostgresSource) -> String {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let s = src.status();
        if s.state == SourceState::Error {
            return s.error;
        }
        assert!(Instant::now() < end, "the source did not stop: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_column_pauses_the_table() {
    let _serial = SERIAL.lock().await;
    let pg = Postgres::start();
    pg.psql(
        "CREATE TABLE d1 (id bigint PRIMARY KEY, a text, n int);
         INSERT INTO d1 SELECT g, 'a' || g, g FROM generate_series(1, 50) g;
         CREATE TABLE d2 (id bigint PRIMARY KEY, a text, n int);
         INSERT INTO d2 SELECT g, 'a' || g, g FROM generate_series(1, 50) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let d1_uri = dir.path().join("d1").display().to_string();
    let d2_uri = dir.path().join("d2").display().to_string();
    let cols_pg = "SELECT id, a || ',' || coalesce(n::text, 'NULL') || ',' || coalesce(c::text, 'NULL') FROM d1 ORDER BY id";
    let cols_delta = "SELECT id, a || ',' || coalesce(CAST(n AS VARCHAR), 'NULL') || ',' || coalesce(CAST(c AS VARCHAR), 'NULL') FROM t ORDER BY id";

    // A shorter shape replayed from the slot after a restart is an older one, not a drop:
    // changes made before a column was added, streamed after the Delta table has it.
    let src =
        freshet_source_postgres::start(source(&pg, dir.path(), &["d1"]), c.coordinator.clone())
            .await
            .unwrap();
    caught_up(&pg, &c, &src, &["d1"]).await;
    src.stop();
    pg.psql("UPDATE d1 SET a = 'old shape' WHERE id = 1");
    pg.psql("ALTER TABLE d1 ADD COLUMN c int");
    pg.psql("UPDATE d1 SET c = 5 WHERE id = 2");
    let src =
        freshet_source_postgres::start(source(&pg, dir.path(), &["d1"]), c.coordinator.clone())
            .await
            .unwrap();
    caught_up(&pg, &c, &src, &["d1"]).await;
    assert_eq!(delta_rows(&d1_uri, cols_delta).await, pg_rows(&pg, cols_pg));

    // Dropping the last column of a table with changes already streamed in this session.
    pg.psql("ALTER TABLE d1 DROP COLUMN c; UPDATE d1 SET a = 'after the drop' WHERE id = 2;");
    let e = stopped_with_error(&src).await;
    assert!(e.contains("d1") && e.contains("dropped: c"), "{e}");
    let info = c
        .coordinator
        .table_info(&c.coordinator.table("d1").unwrap())
        .await
        .unwrap();
    assert!(info.paused, "d1 was not paused");
    // Nothing under the new shape was written: the dropped column keeps its value.
    assert_eq!(
        delta_rows(&d1_uri, cols_delta).await[&2],
        "a2,2,5",
        "d1 was written under the new shape"
    );
    src.stop();

    // Dropping the last column of a table with nothing streamed in this session yet.
    let mut cfg = source(&pg, dir.path(), &["d2"]);
    cfg.name = "other".into();
    cfg.slot = "other_slot".into();
    cfg.publication = "other_pub".into();
    let src = freshet_source_postgres::start(cfg, c.coordinator.clone())
        .await
        .unwrap();
    caught_up(&pg, &c, &src, &["d2"]).await;
    pg.psql("ALTER TABLE d2 DROP COLUMN n; UPDATE d2 SET a = 'after the drop' WHERE id = 3;");
    let e = stopped_with_error(&src).await;
    assert!(e.contains("d2") && e.contains("dropped: n"), "{e}");
    let info = c
        .coordinator
        .table_info(&c.coordinator.table("d2").unwrap())
        .await
        .unwrap();
    assert!(info.paused, "d2 was not paused");
    assert_eq!(
        delta_rows(
            &d2_uri,
            "SELECT id, a || ',' || CAST(n AS VARCHAR) FROM t WHERE id = 3"
        )
        .await[&3],
        "a3,3"
    );
    src.stop();
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toasted_values_keep_their_value() {
    let _serial = SERIAL.lock().await;
    let pg = Postgres::start();
    pg.psql(
        "CREATE TABLE big (id bigint PRIMARY KEY, payload text, n int);
         ALTER TABLE big ALTER COLUMN payload SET STORAGE EXTERNAL;
         INSERT INTO big SELECT g, repeat(md5(g::text), 1000), 0 FROM generate_series(1, 20) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let src =
        freshet_source_postgres::start(source(&pg, dir.path(), &["big"]), c.coordinator.clone())
            .await
            .unwrap();
    caught_up(&pg, &c, &src, &["big"]).await;
    // Streamed: a new row, then updates that leave the 32 KB payloads untouched (pgoutput
    // sends them as 'unchanged'), and one that changes a payload.
    pg.psql("INSERT INTO big VALUES (100, repeat('z', 40000), 0);");
    pg.psql("UPDATE big SET n = n + 1; UPDATE big SET payload = repeat('y', 30000) WHERE id = 2; UPDATE big SET n = 7 WHERE id = 2;");
    caught_up(&pg, &c, &src, &["big"]).await;
    let uri = dir.path().join("big").display().to_string();
    let want = pg_rows(
        &pg,
        "SELECT id, md5(payload) || ',' || length(payload) || ',' || n FROM big ORDER BY id",
    );
    let got = delta_rows(&uri, "SELECT id, md5(payload) || ',' || CAST(length(payload) AS VARCHAR) || ',' || CAST(n AS VARCHAR) FROM t ORDER BY id").await;
    assert_eq!(got, want);
    src.stop();
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_keeps_unchanged_toasted_values() {
    let _serial = SERIAL.lock().await;
    let pg = Postgres::start();
    // REPLICA IDENTITY DEFAULT: an update that changes the key sends the old key only.
    pg.psql(
        "CREATE TABLE big (id bigint PRIMARY KEY, payload text, n int);
         ALTER TABLE big ALTER COLUMN payload SET STORAGE EXTERNAL;
         INSERT INTO big SELECT g, repeat(md5(g::text), 1000), 0 FROM generate_series(1, 20) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let src =
        freshet_source_postgres::start(source(&pg, dir.path(), &["big"]), c.coordinator.clone())
            .await
            .unwrap();
    caught_up(&pg, &c, &src, &["big"]).await;
    let uri = dir.path().join("big").display().to_string();
    let pg_sql =
        "SELECT id, md5(payload) || ',' || length(payload) || ',' || n FROM big ORDER BY id";
    let delta_sql = "SELECT id, md5(payload) || ',' || CAST(length(payload) AS VARCHAR) || ',' || CAST(n AS VARCHAR) FROM t ORDER BY id";
    // Key changes leaving the 32 KB payloads untouched (pgoutput: 'unchanged'): alone, with
    // another column, followed by another update in the same transaction, and one whose
    // row is deleted by a later transaction.
    pg.psql("UPDATE big SET id = id + 1000 WHERE id <= 5");
    pg.psql("UPDATE big SET id = 2000, n = 9 WHERE id = 6");
    pg.psql("BEGIN; UPDATE big SET id = 3000 WHERE id = 7; UPDATE big SET n = 1 WHERE id = 3000; COMMIT;");
    pg.psql("UPDATE big SET id = 4000 WHERE id = 8");
    pg.psql("DELETE FROM big WHERE id = 4000");
    caught_up(&pg, &c, &src, &["big"]).await;
    assert_eq!(delta_rows(&uri, delta_sql).await, pg_rows(&pg, pg_sql));

    // A key change whose transaction is decoded while it is not yet visible to other
    // sessions (its commit record is written, it waits for a synchronous standby): the
    // value must still be the row's, not a missing row's.
    pg.hold_synchronous_commits();
    let held = pg.spawn_synchronous("UPDATE big SET id = 5000 WHERE id = 9");
    let end = Instant::now() + Duration::from_secs(30);
    while pg.held_commits() == 0 {
        assert!(Instant::now() < end, "the commit was not held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Time for the stream to receive and handle it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.release_held_commits();
    held.join().unwrap();
    caught_up(&pg, &c, &src, &["big"]).await;
    assert_eq!(delta_rows(&uri, delta_sql).await, pg_rows(&pg, pg_sql));
    src.stop();
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_committed_but_still_running_at_the_snapshot_is_not_lost() {
    let _serial = SERIAL.lock().await;
    let pg = Postgres::start();
    pg.psql(
        "CREATE TABLE seam (id bigint PRIMARY KEY, v text, n int);
         INSERT INTO seam SELECT g, 'v' || g, g FROM generate_series(1, 100) g;",
    );
    // The slot exists already (as for a table added to a running source), so that nothing
    // but the snapshot's own wait runs between the source's start and the copy.
    pg.psql("SELECT pg_create_logical_replication_slot('freshet_slot', 'pgoutput')");
    pg.hold_synchronous_commits();
    // An older transaction keeps the snapshot waiting for a while.
    let older = pg.spawn_synchronous(
        "SET synchronous_commit = off; BEGIN; SELECT pg_current_xact_id(); SELECT pg_sleep(4); COMMIT;",
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let src =
        freshet_source_postgres::start(source(&pg, dir.path(), &["seam"]), c.coordinator.clone())
            .await
            .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while src.status().state != SourceState::Snapshotting {
        assert!(Instant::now() < end, "{:?}", src.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // While the snapshot waits: a transaction writes its commit record, then waits for the
    // absent synchronous standby, still running.
    let held = pg.spawn_synchronous(
        "INSERT INTO seam VALUES (1000, 'held', 1); UPDATE seam SET v = 'held' WHERE id = 1;",
    );
    while pg.held_commits() == 0 {
        assert!(Instant::now() < end, "the commit was not held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    older.join().unwrap();
    // The table is copied (or the copy waits for the held transaction).
    let end = Instant::now() + Duration::from_secs(5);
    while src.status().state != SourceState::Streaming && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pg.held_commits(), 1);
    pg.release_held_commits();
    held.join().unwrap();
    caught_up(&pg, &c, &src, &["seam"]).await;
    let uri = dir.path().join("seam").display().to_string();
    assert_eq!(
        delta_rows(&uri, KV_DELTA).await,
        pg_rows(&pg, &KV_PG.replace("{t}", "seam"))
    );
    src.stop();

    // A table added later, while a transaction that changed it is held before its copy
    // starts: the copy waits for it (it is committed in the WAL, before any position the
    // copy could start from), then holds its changes.
    pg.psql(
        "CREATE TABLE seam2 (id bigint PRIMARY KEY, v text, n int);
         INSERT INTO seam2 SELECT g, 'v' || g, g FROM generate_series(1, 100) g;",
    );
    pg.hold_synchronous_commits();
    let held = pg.spawn_synchronous("UPDATE seam2 SET v = 'held' WHERE id <= 10;");
    let end = Instant::now() + Duration::from_secs(30);
    while pg.held_commits() == 0 {
        assert!(Instant::now() < end, "the commit was not held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let src = freshet_source_postgres::start(
        source(&pg, dir.path(), &["seam", "seam2"]),
        c.coordinator.clone(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        src.status().state,
        SourceState::Snapshotting,
        "{:?}",
        src.status()
    );
    pg.release_held_commits();
    held.join().unwrap();
    caught_up(&pg, &c, &src, &["seam", "seam2"]).await;
    let uri = dir.path().join("seam2").display().to_string();
    assert_eq!(
        delta_rows(&uri, KV_DELTA).await,
        pg_rows(&pg, &KV_PG.replace("{t}", "seam2"))
    );
    src.stop();
    c.stop();
}

/// One source definition in TOML, as `freshet source add` sends it.
fn definition(pg: &Postgres, dir: &std::path::Path, tables: &[&str]) -> String {
    let mut s = format!(
        "name = \"pg\"\nconnection = \"{}\"\npublication = \"freshet_pub\"\nslot = \"freshet_slot\"\npoll_ms = 100\nheartbeat_ms = 300\nsnapshot_batch_rows = 5000\n",
        pg.conninfo()
    );
    for t in tables {
        s.push_str(&format!(
            "[[tables]]\nsource = \"public.{t}\"\nname = \"{t}\"\nuri = \"{}\"\n",
            dir.join(t).display()
        ));
    }
    s
}

/// Waits until the Delta table holds exactly PostgreSQL's rows.
async fn converges(pg: &Postgres, pg_sql: &str, uri: &str, delta_sql: &str, what: &str) {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let want = pg_rows(pg, pg_sql);
        let got = if std::path::Path::new(uri)
            .join("_delta_log/00000000000000000000.json")
            .exists()
        {
            delta_rows(uri, delta_sql).await
        } else {
            BTreeMap::new()
        };
        if got == want {
            return;
        }
        if Instant::now() > end {
            let differ: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(*v))
                .take(5)
                .collect();
            panic!(
                "{what}: Delta has {} rows, PostgreSQL {}; first differing: {differ:?}",
                got.len(),
                want.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn source_info(c: &Cluster) -> Vec<freshet_proto::admin::v1::SourceInfo> {
    c.admin_client()
        .await
        .list_sources(freshet_proto::admin::v1::ListSourcesRequest {})
        .await
        .unwrap()
        .into_inner()
        .sources
}

// Newlines and tabs in values are translated so each row stays on one psql line.
const KV_PG: &str = "SELECT id, coalesce(translate(v, '\n\t', '~^'), 'NULL') || ',' || n::text FROM {t} ORDER BY id";
const KV_DELTA: &str = "SELECT id, coalesce(translate(v, '\n\t', '~^'), 'NULL') || ',' || CAST(n AS VARCHAR) FROM t ORDER BY id";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_added_at_run_time_copies_an_added_table_on_its_own_and_survives_a_restart() {
    let _serial = SERIAL.lock().await;
    let pg = Postgres::start();
    // Values with tabs, newlines and backslashes cross COPY's text escaping.
    pg.psql(
        "CREATE TABLE a (id bigint PRIMARY KEY, v text, n int);
         INSERT INTO a SELECT g, 'a' || g || E'\\t|\\n|\\\\', g FROM generate_series(1, 30000) g;
         CREATE TABLE b (id bigint PRIMARY KEY, v text, n int);
         INSERT INTO b SELECT g, CASE WHEN g % 5 = 0 THEN NULL ELSE 'b' || g || E'\\\\N' END, g FROM generate_series(1, 20000) g;
         CREATE TABLE nokey (x int);",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut config = freshet_common::config::Config::default();
    config.cycle.interval_ms = 200;
    config.catalog.uri = Some(dir.path().join("_catalog").display().to_string());
    let factory: Arc<dyn freshet_coordinator::SourceFactory> =
        Arc::new(freshet_source_postgres::PostgresFactory);
    let c = Cluster::start_with_sources(config, 2, Some(factory)).await;
    let mut admin = c.admin_client().await;
    let add = |def: String| freshet_proto::admin::v1::AddSourceRequest { definition: def };

    // Refused definitions name what is wrong and change nothing.
    let e = admin
        .add_source(add(definition(&pg, dir.path(), &["nokey"])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("nokey"), "{}", e.message());
    let e = admin
        .add_source(add(
            definition(&pg, dir.path(), &["a"]).replace("slot =", "slott =")
        ))
        .await
        .unwrap_err();
    assert!(e.message().contains("slott"), "{}", e.message());
    assert!(source_info(&c).await.is_empty());
    assert!(!dir.path().join("_catalog/sources").exists());
    assert!(c.coordinator.table("nokey").is_err());
    let slots = pg.psql("SELECT count(*) FROM pg_replication_slots");
    assert_eq!(slots.trim(), "0");

    // Mirror `a` (with the CLI), then add `b` to the same source while both tables change.
    let file = dir.path().join("source.toml");
    std::fs::write(&file, definition(&pg, dir.path(), &["a"])).unwrap();
    let out = std::process::Command::new(freshet_bin())
        .args(["--endpoint", &c.endpoint, "source", "add", "--file"])
        .arg(&file)
        .args(["--output", "json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let added: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(added[0]["origin"], "catalog", "{text}");
    assert_eq!(added[0]["tables"], serde_json::json!(["a"]), "{text}");
    let a_uri = dir.path().join("a").display().to_string();
    let a_pg = KV_PG.replace("{t}", "a");
    converges(&pg, &a_pg, &a_uri, KV_DELTA, "a after its snapshot").await;

    let running = Arc::new(AtomicBool::new(true));
    let (port, psql) = (pg.port, pg.psql_bin());
    let r = running.clone();
    let load = std::thread::spawn(move || {
        let mut round = 0i64;
        while r.load(Ordering::SeqCst) || round < 20 {
            let sql = format!(
                "BEGIN;
                 UPDATE a SET n = n + 1 WHERE id % 50 = {m};
                 UPDATE b SET n = n + 1, v = 'u{round}' WHERE id % 50 = {m};
                 DELETE FROM b WHERE id BETWEEN {d} AND {d} + 5;
                 INSERT INTO b SELECT g, 'new', {round} FROM generate_series({i}, {i} + 9) g;
                 INSERT INTO a VALUES ({i}, 'new', {round});
                 COMMIT;",
                m = round % 50,
                d = 100 + round * 300,
                i = 100_000 + round * 10,
            );
            freshet_integration_tests::pg::run_sql(&psql, port, &sql);
            round += 1;
            std::thread::sleep(Duration::from_millis(40));
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replaced = admin
        .add_source(add(definition(&pg, dir.path(), &["a", "b"])))
        .await
        .unwrap()
        .into_inner()
        .source
        .unwrap();
    assert_eq!(replaced.tables, vec!["a".to_string(), "b".to_string()]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.store(false, Ordering::SeqCst);
    load.join().unwrap();
    let b_uri = dir.path().join("b").display().to_string();
    let b_pg = KV_PG.replace("{t}", "b");
    converges(&pg, &b_pg, &b_uri, KV_DELTA, "b, added later").await;
    converges(&pg, &a_pg, &a_uri, KV_DELTA, "a, streaming on").await;
    let info = source_info(&c).await;
    assert_eq!(info.len(), 1, "{info:?}");
    // Only `b` was copied (about 20k rows); `a` (30k) streamed on from the slot.
    assert!(
        info[0].snapshot_rows >= 19_000 && info[0].snapshot_rows < 25_000,
        "{info:?}"
    );
    assert_eq!(
        info[0].source_state(),
        Some(SourceState::Streaming),
        "{info:?}"
    );

    // A restarted coordinator runs the catalogued source again and streams on.
    let c = c.restart().await;
    pg.psql("UPDATE b SET v = 'after restart' WHERE id % 3 = 0; DELETE FROM a WHERE id < 100;");
    converges(&pg, &b_pg, &b_uri, KV_DELTA, "b after a restart").await;
    converges(&pg, &a_pg, &a_uri, KV_DELTA, "a after a restart").await;
    let info = source_info(&c).await;
    assert_eq!(
        info[0].source_origin(),
        Some(SourceOrigin::Catalog),
        "{info:?}"
    );
    assert_eq!(
        info[0].snapshot_rows, 0,
        "nothing is copied again: {info:?}"
    );
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tables_do_not_hold_wal_and_a_failing_source_retries_until_it_works() {
    let _serial = SERIAL.lock().await;
    let pg = Postgres::start();
    pg.psql(
        "CREATE TABLE hb (id bigint PRIMARY KEY, v text, n int);
         INSERT INTO hb VALUES (1, 'x', 1);
         CREATE TABLE noise (id bigserial PRIMARY KEY, pad text);",
    );
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let src =
        freshet_source_postgres::start(source(&pg, dir.path(), &["hb"]), c.coordinator.clone())
            .await
            .unwrap();
    caught_up(&pg, &c, &src, &["hb"]).await;
    // Only tables outside the publication change: the slot must still move past their WAL.
    pg.psql("INSERT INTO noise (pad) SELECT repeat('x', 200) FROM generate_series(1, 20000)");
    let after = freshet_source_postgres::pgoutput::parse_lsn(
        pg.psql("SELECT pg_current_wal_insert_lsn()").trim(),
    )
    .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let confirmed = freshet_source_postgres::pgoutput::parse_lsn(
            pg.psql("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'freshet_slot'")
                .trim(),
        )
        .unwrap();
        if confirmed >= after {
            assert_eq!(src.status().confirmed_lsn, confirmed);
            break;
        }
        assert!(
            Instant::now() < end,
            "the slot stays at {confirmed:X}, behind {after:X}: {:?}",
            src.status()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And a change after the heartbeat is not skipped.
    pg.psql("INSERT INTO hb VALUES (2, 'after heartbeat', 2)");
    let hb_pg = KV_PG.replace("{t}", "hb");
    let hb_uri = dir.path().join("hb").display().to_string();
    converges(&pg, &hb_pg, &hb_uri, KV_DELTA, "hb after the heartbeat").await;
    src.stop();

    // A source whose table does not exist yet reports the error and retries.
    let mut cfg = source(&pg, dir.path(), &["later"]);
    cfg.name = "later".into();
    cfg.slot = "later_slot".into();
    cfg.publication = "later_pub".into();
    let later = freshet_source_postgres::launch(cfg, c.coordinator.clone());
    let end = Instant::now() + Duration::from_secs(20);
    while later.status().state != SourceState::Error {
        assert!(Instant::now() < end, "{:?}", later.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        later.status().error.contains("later"),
        "{:?}",
        later.status()
    );
    pg.psql(
        "CREATE TABLE later (id bigint PRIMARY KEY, v text, n int);
         INSERT INTO later SELECT g, 'l', g FROM generate_series(1, 100) g;",
    );
    let later_pg = KV_PG.replace("{t}", "later");
    let later_uri = dir.path().join("later").display().to_string();
    converges(
        &pg,
        &later_pg,
        &later_uri,
        KV_DELTA,
        "a source that retried",
    )
    .await;
    let s = later.status();
    assert!(s.retries >= 1 && s.error.is_empty(), "{s:?}");
    later.stop();
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_after_the_xid_wraps_around_are_mirrored() {
    let _serial = SERIAL.lock().await;
    let mut pg = Postgres::start();
    // Epoch 7, a few thousand xids before the 32-bit counter wraps.
    pg.set_next_xid(7, 0xffff_f000);
    let full_xid = |pg: &Postgres| -> u64 {
        pg.psql("SELECT pg_current_xact_id()")
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(full_xid(&pg) >> 32, 7);
    pg.psql(
        "CREATE TABLE wrap (id bigint PRIMARY KEY, v text, n int);
         INSERT INTO wrap SELECT g, 'v' || g, g FROM generate_series(1, 100) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let src =
        freshet_source_postgres::start(source(&pg, dir.path(), &["wrap"]), c.coordinator.clone())
            .await
            .unwrap();
    caught_up(&pg, &c, &src, &["wrap"]).await;
    // A change before the wrap, then past it: the snapshot's xids are of epoch 7, these of 8.
    pg.psql("UPDATE wrap SET n = -1 WHERE id = 1");
    pg.psql(
        "DO $$ BEGIN FOR i IN 1..5000 LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$",
    );
    assert_eq!(full_xid(&pg) >> 32, 8, "the xid counter did not wrap");
    pg.psql(
        "INSERT INTO wrap VALUES (1000, 'after the wrap', 1);
         UPDATE wrap SET v = 'updated after the wrap' WHERE id <= 10;
         DELETE FROM wrap WHERE id BETWEEN 20 AND 29;",
    );
    caught_up(&pg, &c, &src, &["wrap"]).await;
    let uri = dir.path().join("wrap").display().to_string();
    let want = pg_rows(&pg, &KV_PG.replace("{t}", "wrap"));
    assert_eq!(delta_rows(&uri, KV_DELTA).await, want);
    src.stop();
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transaction_is_staged_in_chunks_and_applied_in_one_commit() {
    let _serial = SERIAL.lock().await;
    let pg = Postgres::start();
    pg.psql("CREATE TABLE big (id bigint PRIMARY KEY, payload text);");
    let dir = tempfile::tempdir().unwrap();
    let mut config = freshet_common::config::Config::default();
    config.cycle.interval_ms = 200;
    // Small rounds: the transaction is applied in several rounds of one cycle.
    config.cycle.max_changes_bytes = 16 * 1024 * 1024;
    config.catalog.uri = Some(dir.path().join("_catalog").display().to_string());
    let c = Cluster::start_with(config, 2).await;
    let src =
        freshet_source_postgres::start(source(&pg, dir.path(), &["big"]), c.coordinator.clone())
            .await
            .unwrap();
    caught_up(&pg, &c, &src, &["big"]).await;
    let uri = dir.path().join("big").display().to_string();
    let version_before =
        deltalake::DeltaTable::try_from_url(deltalake::ensure_table_uri(&uri).unwrap())
            .await
            .unwrap()
            .version()
            .unwrap();
    // ~70 MB of changes in one transaction; later statements change rows of earlier chunks.
    pg.psql(
        "BEGIN;
         INSERT INTO big SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, 60000) g;
         UPDATE big SET payload = 'u' || id WHERE id % 3 = 0;
         DELETE FROM big WHERE id % 7 = 0;
         COMMIT;",
    );
    caught_up(&pg, &c, &src, &["big"]).await;
    let want = pg_rows(&pg, "SELECT id, md5(payload) FROM big ORDER BY id");
    assert_eq!(want.len(), 60000 - 60000 / 7);
    assert_eq!(
        delta_rows(&uri, "SELECT id, md5(payload) FROM t ORDER BY id").await,
        want
    );
    // One commit holds the whole transaction, staged as several chunks.
    let table_dir = dir.path().join("big");
    let mut commits = Vec::new();
    let mut v = version_before + 1;
    while table_dir.join(format!("_delta_log/{v:020}.json")).exists() {
        let info = commit_actions(&table_dir, v as i64)
            .into_iter()
            .find_map(|a| a.get("commitInfo").cloned())
            .unwrap();
        commits.push(info);
        v += 1;
    }
    assert_eq!(
        commits.len(),
        1,
        "the transaction is in one Delta version: {commits:?}"
    );
    let m = &commits[0]["freshet.metrics"];
    let (first, last) = (
        m["firstSequence"].as_u64().unwrap(),
        m["lastSequence"].as_u64().unwrap(),
    );
    assert!(
        last - first >= 3,
        "staged in chunks: sequences {first}..{last}"
    );
    assert_eq!(
        m["changes"].as_u64().unwrap(),
        60000 + 20000 + 60000 / 7,
        "every change of the transaction, once"
    );
    src.stop();
    c.stop();
}
