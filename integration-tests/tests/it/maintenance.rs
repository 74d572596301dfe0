//! Table maintenance on the leader (docs/maintenance.md): checkpoints every
//! `checkpoint_interval` commits written by the commit path once maintenance wrote the
//! setting into the table, expired log cleanup, and vacuum that deletes only files no
//! retained version references, never the staging log or `_freshet/` objects, and keeps
//! storage bounded. (A deposed leader deleting nothing: `coordinator::maintenance` unit
//! test `a_deposed_leader_deletes_nothing_and_the_leader_vacuums_only_expired_files`.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Int64Type};
use deltalake::datafusion::prelude::SessionContext;
use freshet_common::config::{Config, HumanDuration};
use freshet_common::table::TableConfig;
use freshet_coordinator::metrics::TableLabel;
use freshet_integration_tests::*;
use freshet_proto::admin::v1::{GetMaintenanceRequest, MaintenanceRun};

type Model = BTreeMap<i64, (String, i64)>;

/// A cluster whose cycles run only when triggered, with the given maintenance settings.
async fn cluster(
    dir: &Path,
    table: TableConfig,
    interval_ms: u64,
    deleted_file_retention: Duration,
    log_retention: Duration,
) -> Cluster {
    let mut config = Config::default();
    config.tables = vec![table];
    config.cycle.interval_ms = 3_600_000;
    config.cycle.trigger_changes = u64::MAX;
    config.cycle.orphan_grace_ms = 200;
    config.catalog.uri = Some(dir.join("_catalog").display().to_string());
    config.maintenance.interval_ms = interval_ms;
    config.maintenance.deleted_file_retention = HumanDuration(deleted_file_retention);
    config.maintenance.log_retention = HumanDuration(log_retention);
    Cluster::start_with(config, 2).await
}

/// Upserts every key in `keys` with a value of `round`, applies the cycle, updates the model.
async fn update_cycle(c: &Cluster, keys: std::ops::Range<i64>, round: i64, model: &mut Model) {
    let changes: Vec<Change> = keys
        .map(|k| (k, Some((format!("r{round}-{k}"), round * 1000 + k))))
        .collect();
    c.ingest_client()
        .await
        .ingest(request("t", false, &changes))
        .await
        .unwrap();
    let rec = c.coordinator.trigger("t").await.unwrap();
    assert_eq!(rec.state, "committed", "{rec:?}");
    apply(model, &changes);
}

/// Data files on disk (everything outside `_delta_log/` and `_freshet/`) with their sizes.
fn data_files(table_dir: &Path) -> BTreeMap<String, u64> {
    list_files(table_dir)
        .into_iter()
        .filter(|p| !p.starts_with("_delta_log") && !p.starts_with("_freshet"))
        .map(|p| {
            let size = std::fs::metadata(table_dir.join(&p)).unwrap().len();
            (p, size)
        })
        .collect()
}

/// Every Add and Remove (with its deletion timestamp) of the commits still in the log.
fn log_history(table_dir: &Path) -> (BTreeSet<String>, HashMap<String, i64>) {
    let mut added = BTreeSet::new();
    let mut removed = HashMap::new();
    for f in list_files(&table_dir.join("_delta_log")) {
        let Some(v) = f.strip_suffix(".json").and_then(|v| v.parse::<i64>().ok()) else {
            continue;
        };
        for a in commit_actions(table_dir, v) {
            if let Some(p) = a["add"]["path"].as_str() {
                added.insert(p.to_string());
            }
            if let Some(p) = a["remove"]["path"].as_str() {
                removed.insert(
                    p.to_string(),
                    a["remove"]["deletionTimestamp"].as_i64().unwrap(),
                );
            }
        }
    }
    (added, removed)
}

/// The files of the latest version (the log read afresh).
async fn live_files(c: &Cluster) -> BTreeMap<String, u64> {
    let def = c.coordinator.table("t").unwrap().def.clone();
    let table = freshet_common::delta::open(&def, &Default::default())
        .await
        .unwrap();
    freshet_common::delta::files(&def, &table)
        .unwrap()
        .into_iter()
        .map(|f| (f.path, f.size))
        .collect()
}

/// Reads the table at `version` (time travel).
async fn read_version(uri: &str, version: i64) -> Model {
    let url = deltalake::ensure_table_uri(uri).unwrap();
    let table = deltalake::DeltaTableBuilder::from_url(url)
        .unwrap()
        .with_version(version as u64)
        .load()
        .await
        .unwrap();
    let ctx = SessionContext::new();
    table.update_datafusion_session(&ctx.state()).unwrap();
    ctx.register_table("t", table.table_provider().await.unwrap())
        .unwrap();
    let batches = ctx
        .sql("select id, v, n from t order by id")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for b in batches {
        let ids = b.column(0).as_primitive::<Int64Type>();
        let vs = arrow::compute::cast(b.column(1), &DataType::Utf8).unwrap();
        let vs = vs.as_string::<i32>();
        let ns = b.column(2).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            out.insert(ids.value(i), (vs.value(i).to_string(), ns.value(i)));
        }
    }
    out
}

/// What a vacuum run may and may not have deleted, from the log's own timestamps: every
/// live file and every file removed within the retention (as of the end of the run) is
/// on disk; every file removed before the retention (as of its start) is gone; no other
/// data file is on disk.
fn check_retention(
    table_dir: &Path,
    live: &BTreeMap<String, u64>,
    run: &MaintenanceRun,
    retention: Duration,
) {
    let on_disk = data_files(table_dir);
    let (_, removed) = log_history(table_dir);
    let r = retention.as_millis() as i64;
    let end = run.started_at_ms + run.duration_ms as i64;
    for f in live.keys() {
        assert!(on_disk.contains_key(f), "live file {f} is gone");
    }
    for (f, ts) in &removed {
        if live.contains_key(f) {
            continue;
        }
        if *ts >= end - r {
            assert!(
                on_disk.contains_key(f),
                "{f}, removed {} ms before the run, within the {r} ms retention, was deleted",
                end - ts
            );
        }
        if *ts < run.started_at_ms - r {
            assert!(!on_disk.contains_key(f), "{f}, expired, was not vacuumed");
        }
    }
    for f in on_disk.keys() {
        assert!(
            live.contains_key(f) || removed.contains_key(f),
            "{f} is on disk but no retained version references it"
        );
    }
}

// Checkpoints every 10 commits (the default) are written by the commit path once the first
// maintenance run wrote `delta.checkpointInterval` into the table; a fresh reader (Python
// deltalake and deltalake-rs) loads the table from the checkpoint and agrees with the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_every_n_commits_and_fresh_readers_agree() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = table_config(dir.path(), "t", false, 2048);
    let day = Duration::from_secs(86_400);
    let c = cluster(dir.path(), cfg.clone(), 3_600_000, 7 * day, 30 * day).await;
    let table_dir = Path::new(&cfg.uri);

    // A table Freshet creates carries the settings from its first version: the first run
    // has nothing to write (no extra commit).
    let first = c.coordinator.run_maintenance("t").await.unwrap();
    assert!(first.error.is_empty(), "{first:?}");
    assert!(first.properties_set.is_empty(), "{first:?}");
    {
        let t = c.coordinator.table("t").unwrap();
        let d = t.delta.lock().await;
        let conf = d.snapshot().unwrap().metadata().configuration().clone();
        assert_eq!(
            conf.get("delta.checkpointInterval").map(String::as_str),
            Some("10")
        );
        assert_eq!(
            conf.get("delta.deletedFileRetentionDuration")
                .map(String::as_str),
            Some("interval 7 days")
        );
        assert_eq!(
            conf.get("delta.logRetentionDuration").map(String::as_str),
            Some("interval 30 days")
        );
    }
    let mut model = Model::new();
    for round in 0..25 {
        update_cycle(&c, (round * 7)..(round * 7 + 40), round, &mut model).await;
    }
    let version = c
        .coordinator
        .table("t")
        .unwrap()
        .delta
        .lock()
        .await
        .version()
        .unwrap();
    assert_eq!(version, 25, "create, 25 cycles");
    // (version + 1) % 10 == 0: 9 and 19, by the commit path.
    for v in [9, 19] {
        assert!(
            table_dir
                .join(format!("_delta_log/{v:020}.checkpoint.parquet"))
                .exists(),
            "no checkpoint at version {v}: {:?}",
            list_files(&table_dir.join("_delta_log"))
        );
    }
    let last: serde_json::Value = serde_json::from_slice(
        &std::fs::read(table_dir.join("_delta_log/_last_checkpoint")).unwrap(),
    )
    .unwrap();
    assert_eq!(last["version"], 19, "{last}");
    // Maintenance sees it and writes none of its own (no duplicate checkpoints).
    let run = c.coordinator.run_maintenance("t").await.unwrap();
    assert!(run.error.is_empty(), "{run:?}");
    assert_eq!(
        (run.checkpoint_version, run.checkpoint_written),
        (19, false),
        "{run:?}"
    );

    assert_eq!(read_table(&cfg.uri).await, model, "deltalake-rs reader");
    let script = r#"
import json, sys
import pyarrow as pa
from deltalake import DeltaTable, QueryBuilder
t = DeltaTable(sys.argv[1])
# The SQL engine: the pyarrow-dataset path refuses tables with deletion vectors.
rows = pa.table(QueryBuilder().register("t", t).execute("select id, v, n from t").read_all()).to_pylist()
print(json.dumps({"version": t.version(), "rows": sorted([[r["id"], r["v"], r["n"]] for r in rows])}))
sys.stdout.flush()
import os; os._exit(0)
"#;
    let out = Command::new(python())
        .args(["-c", script, &cfg.uri])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python deltalake: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], 25);
    let read: Model = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[0].as_i64().unwrap(),
                (r[1].as_str().unwrap().to_string(), r[2].as_i64().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        read, model,
        "the Python deltalake reader agrees with the model"
    );

    // The admin API and the CLI show the runs (JSON keys snake_case).
    let m = c
        .admin_client()
        .await
        .get_maintenance(GetMaintenanceRequest { table: "t".into() })
        .await
        .unwrap()
        .into_inner()
        .tables;
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].runs.len(), 2);
    assert_eq!(m[0].runs[0].checkpoint_version, 19, "newest first");
    assert_eq!(m[0].checkpoint_interval, 10);
    assert_eq!(m[0].deleted_file_retention_ms, 7 * 86_400_000);
    let endpoint = c.endpoint.clone();
    let (json, text) = tokio::task::spawn_blocking(move || {
        let run = |extra: &[&str]| {
            let o = Command::new(freshet_bin())
                .args(["--endpoint", &endpoint, "admin", "maintenance", "t"])
                .args(extra)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8(o.stdout).unwrap()
        };
        (run(&["-o", "json"]), run(&[]))
    })
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v[0]["runs"][0]["checkpoint_version"], 19, "{json}");
    assert_eq!(v[0]["checkpoint_interval"], 10, "{json}");
    assert!(text.contains("checkpoint every 10 commits"), "{text}");
    c.stop();
}

// A table under repeated update cycles: vacuum deletes exactly the files removed longer ago
// than the retention, keeps every file a retained version references (time travel to such a
// version reads), never touches the staging log or `_freshet/` objects, and expired log
// entries go once a checkpoint covers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_deletes_only_what_no_retained_version_references() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = table_config(dir.path(), "t", false, 2048);
    // The log is kept at least as long as the files (so every removal is still in the log
    // while its file may be on disk).
    let retention = Duration::from_secs(6);
    let log_retention = Duration::from_secs(7);
    let c = cluster(dir.path(), cfg.clone(), 3_600_000, retention, log_retention).await;
    let table_dir = Path::new(&cfg.uri);
    let r0 = c.coordinator.run_maintenance("t").await.unwrap();
    assert!(r0.error.is_empty(), "{r0:?}");

    // Every cycle rewrites every file: each version's files are all replaced by the next.
    let mut model = Model::new();
    let mut models = BTreeMap::new();
    for round in 0..12 {
        update_cycle(&c, 0..150, round, &mut model).await;
        let v = c
            .coordinator
            .table("t")
            .unwrap()
            .delta
            .lock()
            .await
            .version()
            .unwrap();
        models.insert(v as i64, model.clone());
    }
    let latest = *models.keys().last().unwrap();
    assert!(data_files(table_dir).len() > live_files(&c).await.len() * 6);

    // Keep a staged, unapplied segment around: pause, then ingest.
    c.coordinator.set_paused("t", true).await.unwrap();
    c.ingest_client()
        .await
        .ingest(request("t", false, &[(1, Some(("staged".into(), 1)))]))
        .await
        .unwrap();
    let freshet_before: Vec<String> = list_files(&table_dir.join("_freshet"));
    assert!(
        freshet_before.iter().any(|p| p.starts_with("staging/"))
            && freshet_before.iter().any(|p| p.starts_with("cycles/")),
        "{freshet_before:?}"
    );

    // Right away: everything the cycles removed is within the retention.
    let run = c.coordinator.run_maintenance("t").await.unwrap();
    assert!(run.error.is_empty(), "{run:?}");
    let live = live_files(&c).await;
    check_retention(table_dir, &live, &run, retention);
    let (_, removed) = log_history(table_dir);
    let newest_removal = removed.values().copied().max().unwrap();
    if newest_removal >= run.started_at_ms + run.duration_ms as i64 - retention.as_millis() as i64 {
        // The version before the last still reads, from files the last cycle removed.
        assert_eq!(
            read_version(&cfg.uri, latest - 1).await,
            models[&(latest - 1)]
        );
    }

    // Past the retention: vacuum deletes every replaced file; what is left is the live data,
    // and the staging log and `_freshet/` objects (older than the retention too) survive.
    tokio::time::sleep(log_retention + Duration::from_millis(500)).await;
    let run = c.coordinator.run_maintenance("t").await.unwrap();
    assert!(run.error.is_empty(), "{run:?}");
    assert!(run.files_vacuumed > 0 && run.bytes_freed > 0, "{run:?}");
    check_retention(table_dir, &live, &run, retention);
    assert_eq!(data_files(table_dir), live, "only the live files remain");
    let freshet_after = list_files(&table_dir.join("_freshet"));
    for p in &freshet_before {
        assert!(freshet_after.contains(p), "_freshet/{p} was deleted");
    }
    assert_eq!(read_table(&cfg.uri).await, model);

    // Expired log entries went, only below a checkpoint; the table still loads.
    let log = list_files(&table_dir.join("_delta_log"));
    let checkpoint: serde_json::Value = serde_json::from_slice(
        &std::fs::read(table_dir.join("_delta_log/_last_checkpoint")).unwrap(),
    )
    .unwrap();
    let cp = checkpoint["version"].as_i64().unwrap();
    let first_json = log
        .iter()
        .filter_map(|f| f.strip_suffix(".json")?.parse::<i64>().ok())
        .min()
        .unwrap();
    assert!(first_json > 0, "no expired log entry was removed: {log:?}");
    for v in cp..=latest {
        assert!(
            log.contains(&format!("{v:020}.json")),
            "version {v}, not below the checkpoint {cp}, went: {log:?}"
        );
    }

    // The table goes on: resumed, it applies the staged segment (the resume wakes a cycle).
    c.coordinator.set_paused("t", false).await.unwrap();
    c.coordinator.trigger("t").await.unwrap();
    apply(&mut model, &[(1, Some(("staged".into(), 1)))]);
    wait_until(
        "the staged change applied",
        Duration::from_secs(20),
        || async { (read_table(&cfg.uri).await == model).then_some(()) },
    )
    .await;
    c.stop();
}

// The scheduled task: with a short interval and retention, cycles keep rewriting and
// storage stays bounded (bytes on disk at most twice the live data); the runs show in
// GetMaintenance and the metrics, and cycles are never held up by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_vacuum_keeps_storage_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = table_config(dir.path(), "t", false, 4096);
    let retention = Duration::from_millis(1500);
    let c = cluster(
        dir.path(),
        cfg.clone(),
        400,
        retention,
        Duration::from_secs(2),
    )
    .await;
    let table_dir = Path::new(&cfg.uri);
    let mut model = Model::new();
    let mut peak = 0u64;
    for round in 0..30 {
        update_cycle(&c, 0..300, round, &mut model).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(data_files(table_dir).values().sum());
    }
    let live: u64 = live_files(&c).await.values().sum();
    // Every cycle replaced every file: without vacuum, storage would be 30 times the data.
    assert!(peak > 2 * live, "peak {peak} bytes for {live} live");
    let bounded = wait_until(
        "storage within twice the live data",
        Duration::from_secs(20),
        || async {
            let on_disk: u64 = data_files(table_dir).values().sum();
            (on_disk <= 2 * live).then_some(on_disk)
        },
    )
    .await;
    assert!(
        bounded <= 2 * live,
        "{bounded} bytes on disk for {live} live"
    );
    assert_eq!(read_table(&cfg.uri).await, model);

    let m = c
        .admin_client()
        .await
        .get_maintenance(GetMaintenanceRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tables;
    assert_eq!(m.len(), 1);
    assert!(!m[0].runs.is_empty());
    assert!(
        m[0].runs.iter().all(|r| r.error.is_empty()),
        "{:?}",
        m[0].runs
    );
    assert!(
        m[0].files_vacuumed_total > 0 && m[0].bytes_freed_total > 0,
        "{m:?}"
    );
    let label = TableLabel { table: "t".into() };
    let metrics = &c.coordinator.context().metrics;
    assert_eq!(
        metrics.vacuumed_files.get_or_create(&label).get(),
        m[0].files_vacuumed_total
    );
    assert_eq!(
        metrics.vacuumed_bytes.get_or_create(&label).get(),
        m[0].bytes_freed_total
    );
    c.stop();
}
