//! Issue 12's abuse paths as regression tests: table URIs outside
//! `storage.allowed_prefixes` (coordinator and worker), a worker poisoned by a forged epoch,
//! and `source add` naming credentials that are not on the coordinator's allowlist.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Int8Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use freshet_common::config::Config;
use freshet_common::prefixes::AllowedPrefixes;
use freshet_common::schema::SchemaSpec;
use freshet_integration_tests::procs::ProcCluster;
use freshet_integration_tests::{
    Change, Cluster, apply, list_files, read_table, request, table_config,
};
use freshet_proto::admin::v1::{CreateTableRequest, GetLeaderRequest, GetTableRequest};
use freshet_proto::worker::v1::worker_service_client::WorkerServiceClient;
use freshet_proto::worker::v1::{InputFile, RewriteRequest, TableSpec};
use freshet_worker::Worker;

type Model = std::collections::BTreeMap<i64, (String, i64)>;

/// Every file and directory under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

fn create_request(cfg: &freshet_common::table::TableConfig) -> CreateTableRequest {
    let def = cfg.to_def().unwrap();
    CreateTableRequest {
        name: cfg.name.clone(),
        uri: cfg.uri.clone(),
        schema_json: SchemaSpec::from_arrow(&def.schema).to_json(),
        primary_key: cfg.primary_key.clone(),
        partition_by: cfg.partition_by.clone(),
        target_file_size: cfg.target_file_size.unwrap_or(0),
        merge_mode: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_outside_the_allowed_prefixes_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let mut config = Config::default();
    config.cycle.interval_ms = 3_600_000;
    config.catalog.uri = Some(dir.path().join("_catalog").display().to_string());
    config.storage.allowed_prefixes = vec![lake.display().to_string()];
    let c = Cluster::start_with(config, 1).await;
    let mut admin = c.admin_client().await;

    // Outside, next door (segment boundary), and escaping with `..`: refused, nothing made.
    let outside = dir.path().join("outside");
    let next_door = dir.path().join("lake2");
    let escape = format!("{}/../outside", lake.display());
    for uri in [
        outside.display().to_string(),
        next_door.display().to_string(),
        escape,
    ] {
        let mut cfg = table_config(dir.path(), "evil", false, 1 << 20);
        cfg.uri = uri.clone();
        let e = admin.create_table(create_request(&cfg)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{uri}: {e:?}");
        assert!(e.message().contains("allowed"), "{e:?}");
    }
    assert!(!outside.exists(), "a refused table created {outside:?}");
    assert!(!next_door.exists(), "a refused table created {next_door:?}");
    assert!(c.coordinator.table("evil").is_err());

    // Inside: created as before.
    let cfg = table_config(&lake, "good", false, 1 << 20);
    admin.create_table(create_request(&cfg)).await.unwrap();
    assert!(lake.join("good").join("_delta_log").exists());
    c.stop();
}

/// A valid write-only task for table `t` (id int64 key, v string) at `uri`.
fn write_task(uri: &str, epoch: u64, inputs: Vec<InputFile>) -> RewriteRequest {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("v", DataType::Utf8, true),
    ]));
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("id", Arc::new(Int64Array::from(vec![1i64, 2, 3]))),
        ("v", Arc::new(StringArray::from(vec!["a", "b", "c"]))),
        ("__op", Arc::new(Int8Array::from(vec![0i8; 3]))),
    ];
    let b = RecordBatch::try_from_iter(cols).unwrap();
    RewriteRequest {
        cycle_id: "c1".into(),
        task_id: 0,
        attempt: 1,
        epoch,
        table: Some(TableSpec {
            name: "t".into(),
            uri: uri.into(),
            schema_ipc: freshet_common::ipc::encode_schema(&schema).unwrap(),
            primary_key: vec!["id".into()],
            partition_columns: vec![],
        }),
        inputs,
        changes_ipc: freshet_common::ipc::encode(&b.schema(), &[b]).unwrap(),
        target_file_size: 1 << 20,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_a_uri_outside_its_prefixes_with_nothing_read_or_written() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let w = Worker::new("w", 1, Default::default());
    w.set_allowed_prefixes(AllowedPrefixes::new(&[lake.display().to_string()]).unwrap());
    let (l, addr) = freshet_worker::bind("127.0.0.1:0").await.unwrap();
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    tokio::spawn(freshet_worker::serve(w.clone(), l, 64 << 20, async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    let mut client = WorkerServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    // A write-only task into a directory outside: refused, the directory never appears.
    let outside = dir.path().join("outside");
    let e = client
        .rewrite(write_task(&outside.display().to_string(), 1, vec![]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(!outside.exists(), "the worker wrote to {outside:?}");

    // A task reading a file outside: refused before the read (not a Parquet error).
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("key.parquet"), b"not parquet: a secret").unwrap();
    let before = tree(dir.path());
    let input = InputFile {
        path: "key.parquet".into(),
        size: 21,
        deletion_vector: None,
        rewrite: false,
    };
    let e = client
        .rewrite(write_task(&secrets.display().to_string(), 1, vec![input]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert_eq!(tree(dir.path()), before, "a refused task changed files");

    // Inside the prefix the same task is done.
    let inside = lake.join("t");
    let resp = client
        .rewrite(write_task(&inside.display().to_string(), 1, vec![]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.rows_written, 3);
    let _ = stop.send(true);
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Waits until `table` has no pending changes on coordinator `leader`.
async fn wait_applied(c: &ProcCluster, leader: usize, table: &str, timeout: Duration) {
    let end = Instant::now() + timeout;
    loop {
        let t = c
            .admin(leader)
            .await
            .get_table(GetTableRequest { name: table.into() })
            .await
            .unwrap()
            .into_inner()
            .table
            .unwrap();
        if t.pending_changes == 0 {
            return;
        }
        assert!(
            Instant::now() < end,
            "{table}: {} changes still pending after {timeout:?}",
            t.pending_changes
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_epoch_is_refused_and_the_next_cycle_succeeds_on_that_worker() {
    let mut c = ProcCluster::new("[cycle]\ninterval_ms = 300\n");
    c.add_coordinator();
    c.add_worker(&[]);
    c.wait_ready(&c.coordinators[0], Duration::from_secs(60));
    let leader = c.wait_leader(&[], Duration::from_secs(30)).await;
    c.wait_workers(leader, 1, Duration::from_secs(30)).await;
    let cfg = table_config(&c.dir, "orders", false, 1 << 20);
    c.create_table(leader, &cfg).await;
    let seed: Vec<Change> = (0..100)
        .map(|k| (k, Some((format!("v0-{k}"), k))))
        .collect();
    c.ingest_acked(&request("orders", false, &seed), Duration::from_secs(30))
        .await;
    wait_applied(&c, leader, "orders", Duration::from_secs(60)).await;
    let epoch = c
        .admin(leader)
        .await
        .get_leader(GetLeaderRequest {})
        .await
        .unwrap()
        .into_inner()
        .epoch;

    // The poisoning requests: unauthenticated, straight to the worker.
    let mut worker = WorkerServiceClient::connect(c.workers[0].endpoint.clone())
        .await
        .unwrap();
    let mut refusals = Vec::new();
    for forged in [u64::MAX, epoch + 1] {
        let task = write_task(&cfg.uri, forged, vec![]);
        refusals.push((forged, worker.rewrite(task).await));
    }

    // The real leader's next cycle still runs on that (only) worker.
    let more: Vec<Change> = (0..100)
        .map(|k| (k, Some((format!("v1-{k}"), k))))
        .collect();
    c.ingest_acked(&request("orders", false, &more), Duration::from_secs(30))
        .await;
    wait_applied(&c, leader, "orders", Duration::from_secs(30)).await;
    let mut model = Model::new();
    apply(&mut model, &seed);
    apply(&mut model, &more);
    assert_eq!(read_table(&cfg.uri).await, model);

    for (forged, r) in refusals {
        let e = r.expect_err("a forged epoch must be refused");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{forged}: {e:?}");
        assert!(e.message().contains(&forged.to_string()), "{e:?}");
    }
    // Nothing the forged tasks asked for was written: only the cycles' files exist.
    let stray: Vec<_> = list_files(&c.dir.join("orders"))
        .into_iter()
        .filter(|f| f.contains("fr-c1-"))
        .collect();
    assert!(stray.is_empty(), "forged tasks wrote {stray:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_time_source_cannot_name_an_arbitrary_credential_and_nothing_reaches_its_host() {
    let dir = tempfile::tempdir().unwrap();
    let pg = freshet_integration_tests::pg::Postgres::start();
    pg.psql("CREATE TABLE items (id bigint PRIMARY KEY, v text);");
    // A credential of the coordinator's environment that a caller would like to steal.
    // SAFETY: set before this test starts anything that reads the environment; no other
    // test of this binary reads this variable.
    unsafe { std::env::set_var("AWS_SECRET_ACCESS_KEY", "leak-me") };
    // The would-be exfiltration target: a listener that must see no connection.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_port = trap.local_addr().unwrap().port();
    let mut config = Config::default();
    config.cycle.interval_ms = 200;
    config.catalog.uri = Some(dir.path().join("_catalog").display().to_string());
    let password_file = dir.path().join("pg-password");
    std::fs::write(&password_file, "unused-by-trust-auth\n").unwrap();
    config.secrets.insert(
        "pg_items".into(),
        freshet_common::secrets::SecretConfig {
            password_file: Some(password_file.display().to_string()),
            hosts: vec!["127.0.0.1".into()],
            ..Default::default()
        },
    );
    let c = Cluster::start_with_sources(
        config,
        1,
        Some(Arc::new(freshet_source_postgres::PostgresFactory)),
    )
    .await;
    let uri = dir.path().join("items").display().to_string();
    let def = |connection: &str, credential: &str| {
        freshet_common::source::SourceConfig::parse(&format!(
            "name = \"shop\"\nconnection = \"{connection}\"\npublication = \"freshet_pub\"\nslot = \"freshet_slot\"\n{credential}\n[[tables]]\nsource = \"public.items\"\nname = \"items\"\nuri = \"{uri}\"\n"
        ))
        .unwrap()
    };
    let trap_conn = format!("host=127.0.0.1 port={trap_port} user=postgres dbname=postgres");
    for (credential, names) in [
        ("password_env = \"AWS_SECRET_ACCESS_KEY\"", "password_env"),
        ("password_file = \"/etc/shadow\"", "password_file"),
        ("password_secret = \"aws\"", "password_secret 'aws'"),
    ] {
        let e = tokio::time::timeout(
            Duration::from_secs(10),
            c.coordinator.define_source(def(&trap_conn, credential)),
        )
        .await
        .expect("refused at once (a pre-check connecting to the trap would hang)")
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.to_string().contains(names), "{e}");
    }
    // A listed secret, sent to a host it is not for.
    let e = c
        .coordinator
        .define_source(def(
            &format!("host=localhost port={trap_port} user=postgres"),
            "password_secret = \"pg_items\"",
        ))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("localhost"), "{e}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        matches!(trap.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a refused source opened a connection"
    );
    assert!(c.coordinator.sources().is_empty());
    assert!(
        list_files(&dir.path().join("_catalog"))
            .iter()
            .all(|f| !f.contains("shop")),
        "nothing recorded in the catalog"
    );
    assert!(!Path::new(&uri).exists(), "no table created");
    // A listed secret for the database's host works end to end.
    c.coordinator
        .define_source(def(&pg.conninfo(), "password_secret = \"pg_items\""))
        .await
        .unwrap();
    pg.psql("INSERT INTO items VALUES (1, 'a'), (2, 'b');");
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        // The first commit, not just the directory: the local store writes a temporary file
        // there before renaming it into place.
        if Path::new(&uri)
            .join("_delta_log/00000000000000000000.json")
            .exists()
            && freshet_integration_tests::query(&uri, "select count(*) from t")
                .await
                .first()
                .map(|b| {
                    arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b.column(0))
                        .value(0)
                })
                == Some(2)
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "the source with a listed secret did not mirror"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    c.stop();
}
