//! Arrow Flight SQL on the coordinator's listener (docs/query.md): SQL over the served
//! tables at their committed versions, catalog metadata, prepared statements, refused
//! writes, tokens, and the Python ADBC Flight SQL driver as a generic client.

use std::collections::BTreeMap;
use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int64Type, Schema};
use arrow_flight::FlightInfo;
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{CommandGetDbSchemas, CommandGetTables, SqlInfo};
use freshet_common::auth::{AuthConfig, TokenEntry, sha256_hex};
use freshet_common::config::Config;
use freshet_integration_tests::*;
use futures::TryStreamExt;
use tonic::Code;
use tonic::transport::Channel;

async fn client(c: &Cluster) -> FlightSqlServiceClient<Channel> {
    let ch = Channel::from_shared(c.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    FlightSqlServiceClient::new(ch)
}

/// Every batch of every endpoint of `info`.
async fn fetch(
    f: &mut FlightSqlServiceClient<Channel>,
    info: FlightInfo,
) -> Result<Vec<RecordBatch>, FlightError> {
    let mut out = Vec::new();
    for ep in info.endpoint {
        let stream = f.do_get(ep.ticket.expect("ticket")).await?;
        out.extend(stream.try_collect::<Vec<_>>().await?);
    }
    Ok(out)
}

async fn sql(
    f: &mut FlightSqlServiceClient<Channel>,
    q: &str,
) -> Result<Vec<RecordBatch>, FlightError> {
    let info = f.execute(q.to_string(), None).await?;
    fetch(f, info).await
}

fn single_i64(batches: &[RecordBatch]) -> i64 {
    let rows: Vec<i64> = batches
        .iter()
        .flat_map(|b| {
            let a = b.column(0).as_primitive::<Int64Type>();
            (0..a.len()).map(|i| a.value(i)).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(rows.len(), 1, "one row expected: {rows:?}");
    rows[0]
}

fn code(e: &FlightError) -> Code {
    match e {
        FlightError::Tonic(s) => s.code(),
        other => panic!("not a gRPC status: {other:?}"),
    }
}

/// Two committed cycles into `orders` (upserts, then updates and deletes); the model.
async fn load(c: &Cluster) -> BTreeMap<i64, (String, i64)> {
    let mut model = BTreeMap::new();
    let mut ingest = c.ingest_client().await;
    let first: Vec<Change> = (0..200).map(|i| (i, Some((format!("v{i}"), i)))).collect();
    ingest
        .ingest(request("orders", false, &first))
        .await
        .unwrap();
    apply(&mut model, &first);
    c.coordinator.trigger("orders").await.unwrap();
    let second: Vec<Change> = (0..200)
        .step_by(3)
        .map(|i| {
            if i % 2 == 0 {
                (i, None)
            } else {
                (i, Some((format!("w{i}"), i * 10)))
            }
        })
        .collect();
    ingest
        .ingest(request("orders", false, &second))
        .await
        .unwrap();
    apply(&mut model, &second);
    c.coordinator.trigger("orders").await.unwrap();
    model
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_queries_committed_tables_lists_them_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(
        dir.path(),
        vec![
            table_config(dir.path(), "orders", false, 4096),
            table_config(dir.path(), "users", false, 4096),
        ],
        2,
    )
    .await;
    let model = load(&c).await;
    let mut f = client(&c).await;

    // count(*) and a filtered aggregate give the model's answers.
    let n = single_i64(&sql(&mut f, "SELECT count(*) FROM orders").await.unwrap());
    assert_eq!(n, model.len() as i64);
    let want: i64 = model
        .iter()
        .filter(|(k, _)| **k >= 100)
        .map(|(_, (_, n))| *n)
        .sum();
    let got = single_i64(
        &sql(&mut f, "SELECT sum(n) FROM orders WHERE id >= 100")
            .await
            .unwrap(),
    );
    assert_eq!(got, want);
    // Fully qualified names and the whole rows (streamed in batches).
    let rows = sql(
        &mut f,
        "SELECT id, v FROM freshet.public.orders ORDER BY id",
    )
    .await
    .unwrap();
    let mut seen = BTreeMap::new();
    for b in &rows {
        let ids = b.column(0).as_primitive::<Int64Type>();
        let vs = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Utf8).unwrap();
        let vs = vs.as_string::<i32>();
        for i in 0..b.num_rows() {
            seen.insert(ids.value(i), vs.value(i).to_string());
        }
    }
    let want: BTreeMap<i64, String> = model.iter().map(|(k, (v, _))| (*k, v.clone())).collect();
    assert_eq!(seen, want);

    // Staged but uncommitted changes are not visible: the committed version is served.
    c.ingest_client()
        .await
        .ingest(request("orders", false, &[(10_000, Some(("x".into(), 1)))]))
        .await
        .unwrap();
    let n = single_i64(&sql(&mut f, "SELECT count(*) FROM orders").await.unwrap());
    assert_eq!(n, model.len() as i64);

    // GetTables lists the served tables, with their schemas.
    let info = f
        .get_tables(CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: None,
            table_name_filter_pattern: None,
            table_types: vec![],
            include_schema: true,
        })
        .await
        .unwrap();
    let batches = fetch(&mut f, info).await.unwrap();
    let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let names = b.column_by_name("table_name").unwrap().as_string::<i32>();
    let names: Vec<&str> = (0..names.len()).map(|i| names.value(i)).collect();
    assert_eq!(names, vec!["orders", "users"]);
    let catalogs = b.column_by_name("catalog_name").unwrap().as_string::<i32>();
    assert_eq!(catalogs.value(0), "freshet");
    let schemas = b.column_by_name("table_schema").unwrap().as_binary::<i32>();
    let s = Schema::try_from(arrow_flight::IpcMessage(schemas.value(0).to_vec().into())).unwrap();
    let cols: Vec<&str> = s.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(cols, vec!["id", "v", "n"]);
    // A name pattern filters.
    let info = f
        .get_tables(CommandGetTables {
            table_name_filter_pattern: Some("us%".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let batches = fetch(&mut f, info).await.unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    // Catalogs, schemas and SqlInfo.
    let info = f.get_catalogs().await.unwrap();
    let batches = fetch(&mut f, info).await.unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    let info = f
        .get_db_schemas(CommandGetDbSchemas::default())
        .await
        .unwrap();
    let batches = fetch(&mut f, info).await.unwrap();
    let s = batches[0]
        .column_by_name("db_schema_name")
        .unwrap()
        .as_string::<i32>();
    assert_eq!(s.value(0), "public");
    let info = f
        .get_sql_info(vec![
            SqlInfo::FlightSqlServerName,
            SqlInfo::FlightSqlServerReadOnly,
        ])
        .await
        .unwrap();
    let batches = fetch(&mut f, info).await.unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);

    // A prepared statement, without and with a parameter, then closed.
    let mut p = f
        .prepare("SELECT count(*) FROM orders WHERE id < 100".into(), None)
        .await
        .unwrap();
    assert_eq!(p.dataset_schema().unwrap().fields().len(), 1);
    let info = p.execute().await.unwrap();
    let got = single_i64(&fetch(&mut f, info).await.unwrap());
    assert_eq!(got, model.range(..100).count() as i64);
    p.close().await.unwrap();
    let mut p = f
        .prepare("SELECT n FROM orders WHERE id = $1".into(), None)
        .await
        .unwrap();
    let key = *model.keys().find(|k| **k % 3 == 1).unwrap();
    let param = RecordBatch::try_from_iter(vec![(
        "$1",
        std::sync::Arc::new(arrow::array::Int64Array::from(vec![key])) as _,
    )])
    .unwrap();
    p.set_parameters(param).unwrap();
    let info = p.execute().await.unwrap();
    let got = single_i64(&fetch(&mut f, info).await.unwrap());
    assert_eq!(got, model[&key].1);
    p.close().await.unwrap();

    // Writes are refused, naming what is not supported; nothing changes.
    for q in [
        "INSERT INTO orders VALUES (1, 'x', 1)",
        "CREATE TABLE x (a INT)",
        "DROP TABLE orders",
    ] {
        let e = sql(&mut f, q).await.unwrap_err();
        assert_eq!(code(&e), Code::Unimplemented, "{q}: {e}");
        assert!(e.to_string().contains("read-only"), "{q}: {e}");
    }
    let e = f
        .execute_update("INSERT INTO orders VALUES (1, 'x', 1)".into(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    let e = f
        .prepare("INSERT INTO orders VALUES (1, 'x', 1)".into(), None)
        .await
        .expect_err("refused");
    assert!(e.to_string().contains("read-only"), "{e}");
    // A query error is an error, not a hang.
    let e = sql(&mut f, "SELECT * FROM nope").await.unwrap_err();
    assert_eq!(code(&e), Code::InvalidArgument, "{e}");
    let n = single_i64(&sql(&mut f, "SELECT count(*) FROM orders").await.unwrap());
    assert_eq!(n, model.len() as i64);
    c.stop();
}

fn token(name: &str, secret: &str, roles: &[&str]) -> TokenEntry {
    TokenEntry {
        name: name.into(),
        sha256: sha256_hex(secret.as_bytes()),
        roles: roles.iter().map(|r| r.to_string()).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_needs_a_read_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        tables: vec![table_config(dir.path(), "orders", false, 4096)],
        ..Default::default()
    };
    config.cycle.interval_ms = 3_600_000;
    config.cycle.trigger_changes = u64::MAX;
    config.catalog.uri = Some(dir.path().join("_catalog").display().to_string());
    config.auth = AuthConfig {
        tokens: vec![
            token("ops", "admin-secret", &["admin"]),
            token("dashboard", "read-secret", &["read"]),
            token("orders-app", "orders-secret", &["ingest:orders"]),
        ],
        ..Default::default()
    };
    let c = Cluster::start_with(config, 1).await;
    let q = "SELECT count(*) FROM orders";

    let mut f = client(&c).await;
    let e = f.execute(q.into(), None).await.unwrap_err();
    assert_eq!(code(&e), Code::Unauthenticated, "{e}");
    let e = f.get_catalogs().await.unwrap_err();
    assert_eq!(code(&e), Code::Unauthenticated, "{e}");
    f.set_token("wrong".into());
    let e = f.execute(q.into(), None).await.unwrap_err();
    assert_eq!(code(&e), Code::Unauthenticated, "{e}");
    // An ingest-only token may not read.
    f.set_token("orders-secret".into());
    let e = f.execute(q.into(), None).await.unwrap_err();
    assert_eq!(code(&e), Code::PermissionDenied, "{e}");
    // A read token (and admin) works, for planning and for the ticket.
    for secret in ["read-secret", "admin-secret"] {
        f.set_token(secret.into());
        assert_eq!(single_i64(&sql(&mut f, q).await.unwrap()), 0);
    }
    // The ticket is checked too: fetched without a token, it is refused.
    f.set_token("read-secret".into());
    let info = f.execute(q.into(), None).await.unwrap();
    f.clear_token();
    let e = fetch(&mut f, info).await.unwrap_err();
    assert_eq!(code(&e), Code::Unauthenticated, "{e}");
    c.stop();
}

/// The Python ADBC Flight SQL driver (a generic client) counts the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adbc_flight_sql_driver_counts_rows() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(
        dir.path(),
        vec![table_config(dir.path(), "t", false, 4096)],
        1,
    )
    .await;
    let changes: Vec<Change> = (0..500).map(|i| (i, Some((format!("v{i}"), i)))).collect();
    let mut ingest = c.ingest_client().await;
    ingest.ingest(request("t", false, &changes)).await.unwrap();
    c.coordinator.trigger("t").await.unwrap();
    let deletes: Vec<Change> = (0..500).step_by(5).map(|i| (i, None)).collect();
    ingest.ingest(request("t", false, &deletes)).await.unwrap();
    c.coordinator.trigger("t").await.unwrap();
    let mut model = BTreeMap::new();
    apply(&mut model, &changes);
    apply(&mut model, &deletes);

    let uri = c.endpoint.replace("http://", "grpc://");
    let out = run_python(
        dir.path(),
        r#"
import sys
import adbc_driver_flightsql.dbapi as flightsql
with flightsql.connect(sys.argv[1], autocommit=True) as conn:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM t")
        print(cur.fetchone()[0])
        cur.execute("SELECT sum(n) FROM t WHERE id < 100")
        print(cur.fetchone()[0])
"#,
        &uri,
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], model.len().to_string(), "{out}");
    let want: i64 = model.range(..100).map(|(_, (_, n))| *n).sum();
    assert_eq!(lines[1], want.to_string(), "{out}");
    c.stop();
}

async fn run_python(dir: &Path, script: &str, arg: &str) -> String {
    let path = dir.join("flight_client.py");
    std::fs::write(&path, script).unwrap();
    let out = tokio::process::Command::new(python())
        .arg(&path)
        .arg(arg)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `freshet query` asks the coordinator over Flight SQL (writes refused there, no fallback
/// message); `--via-flight=false` and `--version` read the tables locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshet_query_goes_through_flight_sql() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(
        dir.path(),
        vec![table_config(dir.path(), "orders", false, 4096)],
        1,
    )
    .await;
    let model = load(&c).await;
    let run = |args: Vec<String>| {
        let out = std::process::Command::new(freshet_bin())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let args = |extra: &[&str], sql: &str| {
        let mut v: Vec<String> = vec!["query".into(), "-o".into(), "csv".into()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend([
            "--endpoint".to_string(),
            c.endpoint.clone(),
            sql.to_string(),
        ]);
        v
    };
    let want = format!("c\n{}", model.len());
    let (ok, out, err) = run(args(&[], "select count(*) as c from orders"));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), want);
    assert!(!err.contains("does not serve Flight SQL"), "{err}");
    let (ok, _, err) = run(args(&[], "insert into orders values (1, 'x', 1)"));
    assert!(!ok);
    assert!(err.contains("read-only"), "{err}");
    let (ok, out, err) = run(args(
        &["--via-flight=false"],
        "select count(*) as c from orders",
    ));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), want);
    let (ok, out, err) = run(args(
        &["--version", "1"],
        "select count(*) as c from orders",
    ));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "c\n200");
    c.stop();
}

/// Queries share `query.max_memory_bytes`: one that needs more (a sort of the whole table)
/// fails with RESOURCE_EXHAUSTED naming the setting, and the coordinator goes on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_over_the_memory_limit_is_refused_and_the_coordinator_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.tables = vec![table_config(dir.path(), "t", false, 1 << 20)];
    config.cycle.interval_ms = 3_600_000;
    config.cycle.trigger_changes = u64::MAX;
    config.catalog.uri = Some(dir.path().join("_catalog").display().to_string());
    config.query.max_memory_bytes = 1 << 20;
    let c = Cluster::start_with(config, 1).await;
    let rows: Vec<Change> = (0..40_000)
        .map(|i| (i, Some((format!("{i:0>60}"), i))))
        .collect();
    c.ingest_client()
        .await
        .ingest(request("t", false, &rows))
        .await
        .unwrap();
    c.coordinator.trigger("t").await.unwrap();
    let mut f = client(&c).await;
    let e = sql(&mut f, "SELECT id, v FROM t ORDER BY v DESC, id")
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("query.max_memory_bytes"), "{msg}");
    // The coordinator still answers, within the limit.
    assert_eq!(
        single_i64(&sql(&mut f, "SELECT count(*) FROM t").await.unwrap()),
        40_000
    );
    c.stop();
}
