//! The shared test harness: a whole Freshet cluster (coordinator + workers, real gRPC on
//! free loopback ports, local object storage in a temp dir) in one process, plus helpers to
//! read tables back and compare them with an in-memory model.

pub mod ca;
pub mod pg;
pub mod procs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use deltalake::datafusion::prelude::SessionContext;
use freshet_common::config::Config;
use freshet_common::table::TableConfig;
use freshet_coordinator::Coordinator;
use freshet_proto::admin::v1::admin_service_client::AdminServiceClient;
use freshet_proto::ingest::v1::IngestRequest;
use freshet_proto::ingest::v1::ingest_request::Payload;
use freshet_proto::ingest::v1::ingest_service_client::IngestServiceClient;
use freshet_worker::Worker;
use tonic::transport::Channel;

/// A running in-process cluster.
pub struct Cluster {
    /// The coordinator.
    pub coordinator: Arc<Coordinator>,
    /// Its gRPC endpoint.
    pub endpoint: String,
    /// The workers.
    pub workers: Vec<Arc<Worker>>,
    /// Worker endpoints.
    pub worker_endpoints: Vec<String>,
    /// The configuration it runs with.
    pub config: Config,
    sources: Option<Arc<dyn freshet_coordinator::SourceFactory>>,
    embedded: freshet_embedded::Embedded,
}

/// A test table: `id` int64 key, optional `region` partition (part of the key), `v` string, `n` int64.
pub fn table_config(
    dir: &Path,
    name: &str,
    partitioned: bool,
    target_file_size: u64,
) -> TableConfig {
    let mut columns = vec![freshet_common::schema::ColumnSpec {
        name: "id".into(),
        data_type: "int64".into(),
        nullable: false,
    }];
    if partitioned {
        columns.push(freshet_common::schema::ColumnSpec {
            name: "region".into(),
            data_type: "string".into(),
            nullable: false,
        });
    }
    columns.push(freshet_common::schema::ColumnSpec {
        name: "v".into(),
        data_type: "string".into(),
        nullable: true,
    });
    columns.push(freshet_common::schema::ColumnSpec {
        name: "n".into(),
        data_type: "int64".into(),
        nullable: true,
    });
    TableConfig {
        name: name.into(),
        uri: dir.join(name).display().to_string(),
        columns,
        primary_key: if partitioned {
            vec!["region".into(), "id".into()]
        } else {
            vec!["id".into()]
        },
        partition_by: if partitioned {
            vec!["region".into()]
        } else {
            vec![]
        },
        target_file_size: Some(target_file_size),
        merge_mode: None,
    }
}

impl Cluster {
    /// Starts `workers` workers and a coordinator serving `tables`. Cycles run only when
    /// triggered (the interval is an hour), so tests are deterministic.
    pub async fn start(data: &Path, tables: Vec<TableConfig>, workers: usize) -> Cluster {
        let mut config = Config::default();
        config.tables = tables;
        config.cycle.interval_ms = 3_600_000;
        config.cycle.trigger_changes = u64::MAX;
        config.cycle.orphan_grace_ms = 200;
        // No background commits between a test's own cycles (tests of compaction turn it on
        // or call `compact`).
        config.compaction.enabled = false;
        config.catalog.uri = Some(data.join("_catalog").display().to_string());
        Self::start_with(config, workers).await
    }

    /// Starts a cluster with a given config (worker endpoints are filled in).
    pub async fn start_with(config: Config, workers: usize) -> Cluster {
        Self::start_with_sources(config, workers, None).await
    }

    /// Starts a cluster whose coordinator runs sources (configured, catalogued, added).
    pub async fn start_with_sources(
        config: Config,
        workers: usize,
        sources: Option<Arc<dyn freshet_coordinator::SourceFactory>>,
    ) -> Cluster {
        freshet_common::server::init_logging(false);
        let e = freshet_embedded::Builder::new(config)
            .workers(workers)
            .worker_capacity(2)
            .sources(sources.clone())
            .start()
            .await
            .expect("embedded cluster starts");
        Cluster {
            coordinator: e.coordinator.clone(),
            endpoint: e.endpoint.clone(),
            workers: e.workers.clone(),
            worker_endpoints: e.worker_endpoints.clone(),
            config: e.config.clone(),
            sources,
            embedded: e,
        }
    }

    /// Stops everything (as a crash would, storage is left as it is).
    pub fn stop(&self) {
        self.embedded.stop();
    }

    /// Stops this cluster and starts a new one on the same storage and config.
    pub async fn restart(self) -> Cluster {
        self.stop();
        let mut config = self.config.clone();
        config.cycle.workers.clear();
        let n = self.workers.len();
        let sources = self.sources.clone();
        drop(self);
        Cluster::start_with_sources(config, n, sources).await
    }

    /// An ingest client.
    pub async fn ingest_client(&self) -> IngestServiceClient<Channel> {
        IngestServiceClient::connect(self.endpoint.clone())
            .await
            .unwrap()
    }

    /// An admin client.
    pub async fn admin_client(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::connect(self.endpoint.clone())
            .await
            .unwrap()
    }
}

/// Polls `check` every 100 ms until it returns `Some`, and returns that; panics naming
/// `what` after `timeout` (the tests' one deadline loop).
pub async fn wait_until<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// One change for the test tables: `Some((v, n))` upserts, `None` deletes.
pub type Change = (i64, Option<(String, i64)>);

/// The region of a key in partitioned test tables.
pub fn region_of(id: i64) -> String {
    ["eu", "us", "apac"][(id.rem_euclid(3)) as usize].to_string()
}

/// An Arrow IPC ingest request for the test tables.
pub fn request(table: &str, partitioned: bool, changes: &[Change]) -> IngestRequest {
    let ids: Vec<i64> = changes.iter().map(|c| c.0).collect();
    let mut cols: Vec<(&str, ArrayRef)> = vec![("id", Arc::new(Int64Array::from(ids.clone())))];
    if partitioned {
        cols.push((
            "region",
            Arc::new(StringArray::from(
                ids.iter().map(|i| region_of(*i)).collect::<Vec<_>>(),
            )),
        ));
    }
    cols.push((
        "v",
        Arc::new(StringArray::from(
            changes
                .iter()
                .map(|c| c.1.as_ref().map(|x| x.0.clone()))
                .collect::<Vec<_>>(),
        )),
    ));
    cols.push((
        "n",
        Arc::new(Int64Array::from(
            changes
                .iter()
                .map(|c| c.1.as_ref().map(|x| x.1))
                .collect::<Vec<_>>(),
        )),
    ));
    cols.push((
        "op",
        Arc::new(StringArray::from(
            changes
                .iter()
                .map(|c| if c.1.is_some() { "upsert" } else { "delete" })
                .collect::<Vec<_>>(),
        )),
    ));
    let b = RecordBatch::try_from_iter(cols).unwrap();
    IngestRequest {
        table: table.into(),
        payload: Some(Payload::ArrowIpc(
            freshet_common::ipc::encode(&b.schema(), &[b.clone()]).unwrap(),
        )),
        op_column: "op".into(),
        ..Default::default()
    }
}

/// Applies changes to the model.
pub fn apply(model: &mut BTreeMap<i64, (String, i64)>, changes: &[Change]) {
    for (k, v) in changes {
        match v {
            Some(v) => {
                model.insert(*k, v.clone());
            }
            None => {
                model.remove(k);
            }
        }
    }
}

/// Reads a test table back with DataFusion (latest version) as the model's shape.
pub async fn read_table(uri: &str) -> BTreeMap<i64, (String, i64)> {
    read_table_with(uri, &Default::default()).await
}

/// [`read_table`] with object-store options.
pub async fn read_table_with(
    uri: &str,
    options: &freshet_common::storage::StorageOptions,
) -> BTreeMap<i64, (String, i64)> {
    let batches = query_with(uri, options, "select id, v, n from t order by id").await;
    let mut out = BTreeMap::new();
    for b in batches {
        let ids = b.column(0).as_primitive::<Int64Type>();
        let vs = arrow::compute::cast(b.column(1), &DataType::Utf8).unwrap();
        let vs = vs.as_string::<i32>();
        let ns = b.column(2).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            let prev = out.insert(ids.value(i), (vs.value(i).to_string(), ns.value(i)));
            assert!(
                prev.is_none(),
                "key {} appears twice in the table",
                ids.value(i)
            );
        }
    }
    out
}

/// Runs SQL over the table at `uri`, registered as `t`.
pub async fn query(uri: &str, sql: &str) -> Vec<RecordBatch> {
    query_with(uri, &Default::default(), sql).await
}

/// Runs SQL over the table at `uri` (with object-store options), registered as `t`.
pub async fn query_with(
    uri: &str,
    options: &freshet_common::storage::StorageOptions,
    sql: &str,
) -> Vec<RecordBatch> {
    let url = deltalake::ensure_table_uri(uri).unwrap();
    let table = deltalake::DeltaTableBuilder::from_url(url)
        .unwrap()
        .with_storage_options(options.clone())
        .load()
        .await
        .unwrap();
    let ctx = SessionContext::new();
    table.update_datafusion_session(&ctx.state()).unwrap();
    ctx.register_table("t", table.table_provider().await.unwrap())
        .unwrap();
    ctx.sql(sql).await.unwrap().collect().await.unwrap()
}

/// Every file under `dir` (recursively), relative to it.
pub fn list_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(base, &p, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The actions of one Delta commit, parsed from its JSON log file.
pub fn commit_actions(table_dir: &Path, version: i64) -> Vec<serde_json::Value> {
    let p = table_dir
        .join("_delta_log")
        .join(format!("{version:020}.json"));
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Paths removed by a commit.
pub fn removed_paths(table_dir: &Path, version: i64) -> Vec<String> {
    let mut v: Vec<String> = commit_actions(table_dir, version)
        .iter()
        .filter_map(|a| {
            a.get("remove")
                .and_then(|r| r["path"].as_str())
                .map(String::from)
        })
        .collect();
    v.sort();
    v
}

/// The built `freshet` binary (built by `cargo build --bins` before the tests).
pub fn freshet_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("freshet");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bins` first",
        bin.display()
    );
    bin
}

/// The Python with the `deltalake` package (from `FRESHET_PYTHON`, else `.venv/bin/python`).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("FRESHET_PYTHON") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let p = root.join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run `python3 -m venv .venv && .venv/bin/pip install deltalake pyarrow` (or set FRESHET_PYTHON)",
        p.display()
    );
    p
}

/// A schema helper for tests that build their own batches.
pub fn schema(fields: Vec<Field>) -> Arc<Schema> {
    Arc::new(Schema::new(fields))
}

/// Whether an array is all null.
pub fn all_null(a: &dyn Array) -> bool {
    a.null_count() == a.len()
}
