//! Merge-on-read: cycles that leave touched files in place, mark the changed rows in
//! deletion vectors and write the new versions to small files. The table equals the model
//! after every cycle (DataFusion refuses a key live twice), folding rewrites a group that
//! grew too many files, every reader in the test command reads the DV table as the model
//! says, time travel to a version before the DVs still works, and the same changes cost
//! far fewer bytes than copy-on-write (a ratio in one run).

use std::collections::BTreeMap;

use freshet_common::table::{MergeMode, TableConfig};
use freshet_integration_tests::*;
use rand::{Rng, SeedableRng};

use super::readers::{DUCKDB, POLARS, PYDELTA, read_with};

fn config(dir: &std::path::Path, name: &str, partitioned: bool, mode: MergeMode) -> TableConfig {
    let mut c = table_config(dir, name, partitioned, 48 * 1024);
    c.merge_mode = Some(mode);
    c
}

fn random_changes(rng: &mut rand::rngs::StdRng, round: usize, n: usize, keys: i64) -> Vec<Change> {
    (0..n)
        .map(|i| {
            let k = rng.gen_range(0..keys);
            if rng.gen_bool(0.2) {
                (k, None)
            } else {
                (k, Some((format!("r{round}-{i}"), rng.gen_range(0..10_000))))
            }
        })
        .collect()
}

/// Live rows per file can never go below zero: each DV fits its file.
async fn check_deletion_vectors(uri: &str, def_name: &str, cfg: &TableConfig) -> u64 {
    let def = cfg.to_def().unwrap();
    assert_eq!(def.name, def_name);
    let table = freshet_common::delta::open(&def, &Default::default())
        .await
        .unwrap();
    let files = freshet_common::delta::files(&def, &table).unwrap();
    let mut deleted = 0;
    for f in &files {
        assert!(
            f.deleted_rows() <= f.num_records.unwrap_or(0),
            "{uri}: {} deletes more rows than it has",
            f.path
        );
        deleted += f.deleted_rows();
    }
    deleted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_vector_cycles_equal_the_model_and_cost_less_than_copy_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let dv = config(dir.path(), "dv", true, MergeMode::DeletionVectors);
    let cow = config(dir.path(), "cow", true, MergeMode::CopyOnWrite);
    let c = Cluster::start(dir.path(), vec![dv.clone(), cow.clone()], 2).await;
    let mut ingest = c.ingest_client().await;
    let mut model = BTreeMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    // A base of 12,000 rows: several files per partition.
    let base: Vec<Change> = (0..12_000)
        .map(|i| (i, Some((format!("base-{i}"), i))))
        .collect();
    for t in ["dv", "cow"] {
        ingest.ingest(request(t, true, &base)).await.unwrap();
        assert_eq!(c.coordinator.trigger(t).await.unwrap().state, "committed");
    }
    apply(&mut model, &base);
    let base_files = freshet_common::delta::files(
        &dv.to_def().unwrap(),
        &freshet_common::delta::open(&dv.to_def().unwrap(), &Default::default())
            .await
            .unwrap(),
    )
    .unwrap()
    .len();
    let version_before = {
        let info = c.coordinator.table("dv").unwrap();
        let t = info.delta.lock().await;
        t.version().unwrap()
    };
    let model_before = model.clone();

    let (mut dv_bytes, mut cow_bytes) = (0u64, 0u64);
    let (mut dv_tasks, mut folds, mut redeleted) = (0, 0, 0);
    for round in 0..12 {
        let changes = random_changes(&mut rng, round, 150, 13_000);
        for t in ["dv", "cow"] {
            ingest.ingest(request(t, true, &changes)).await.unwrap();
        }
        apply(&mut model, &changes);
        let r = c.coordinator.trigger("dv").await.unwrap();
        assert_eq!(r.state, "committed", "{}", r.error);
        for task in &r.tasks {
            match task.mode.as_str() {
                "deletion_vectors" => {
                    dv_tasks += 1;
                    redeleted += task.files_with_new_deletions.len();
                    assert!(
                        task.files_with_new_deletions
                            .iter()
                            .all(|f| task.input_files.contains(f)),
                        "a deletion vector on a file the task was not given"
                    );
                }
                "copy_on_write" => {
                    if task.mode_reason.starts_with("fold") {
                        folds += 1;
                    } else {
                        assert!(
                            task.input_files.is_empty()
                                || task
                                    .mode_reason
                                    .starts_with("every file of the group is small"),
                            "forced deletion vectors, yet copy-on-write: {}",
                            task.mode_reason
                        );
                    }
                }
                other => panic!("task mode '{other}'"),
            }
        }
        dv_bytes += r.bytes_written;
        let rc = c.coordinator.trigger("cow").await.unwrap();
        assert_eq!(rc.state, "committed", "{}", rc.error);
        assert!(rc.tasks.iter().all(|t| t.mode == "copy_on_write"));
        cow_bytes += rc.bytes_written;
        // read_table fails on a key that is live twice.
        assert_eq!(read_table(&dv.uri).await, model, "round {round}");
        assert_eq!(read_table(&cow.uri).await, model, "round {round}");
        let count = query(&dv.uri, "select count(*) from t").await;
        let n =
            arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(count[0].column(0))
                .value(0);
        assert_eq!(n as usize, model.len(), "count(*) with deletion vectors");
    }
    assert!(
        dv_tasks > 0 && redeleted > 0,
        "no deletion vector was written"
    );
    // Small files are rewritten with the next changes (the cost model per file), so the
    // groups do not gather a file per cycle.
    let files = freshet_common::delta::files(
        &dv.to_def().unwrap(),
        &freshet_common::delta::open(&dv.to_def().unwrap(), &Default::default())
            .await
            .unwrap(),
    )
    .unwrap()
    .len();
    println!("files: {base_files} after the load, {files} after 12 rounds; {folds} folds");
    assert!(
        files <= 2 * base_files,
        "{files} files, {base_files} after the load"
    );
    let deleted = check_deletion_vectors(&dv.uri, "dv", &dv).await;
    assert!(deleted > 0, "the table ends with deleted rows in DVs");
    // The admin view counts live rows.
    let info = c
        .coordinator
        .table_info(&c.coordinator.table("dv").unwrap())
        .await
        .unwrap();
    assert_eq!(info.total_rows as usize, model.len());
    assert!(info.deletion_vectors && info.deleted_rows == deleted);
    // Bytes written for the same changes, side by side.
    println!(
        "bytes written over 12 rounds: deletion vectors {dv_bytes}, copy-on-write {cow_bytes}"
    );
    assert!(
        dv_bytes * 4 < cow_bytes,
        "deletion vectors wrote {dv_bytes} bytes, copy-on-write {cow_bytes}"
    );

    // Other readers see the model; time travel to before any DV still reads.
    assert_eq!(read_with(PYDELTA, &dv.uri, "python deltalake"), model);
    assert_eq!(read_with(DUCKDB, &dv.uri, "duckdb"), model);
    assert_eq!(read_with(POLARS, &dv.uri, "polars"), model);
    let url = deltalake::ensure_table_uri(&dv.uri).unwrap();
    let mut old = deltalake::DeltaTableBuilder::from_url(url)
        .unwrap()
        .load()
        .await
        .unwrap();
    old.load_version(version_before).await.unwrap();
    let ctx = deltalake::datafusion::prelude::SessionContext::new();
    ctx.register_table("t", old.table_provider().await.unwrap())
        .unwrap();
    let n = ctx
        .sql("select count(*) from t")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(
        arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(n[0].column(0)).value(0)
            as usize,
        model_before.len()
    );
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_created_under_auto_has_deletion_vectors_and_copy_on_write_keeps_the_old_protocol()
{
    let dir = tempfile::tempdir().unwrap();
    let auto = config(dir.path(), "auto", false, MergeMode::Auto);
    let cow = config(dir.path(), "cow", false, MergeMode::CopyOnWrite);
    let c = Cluster::start(dir.path(), vec![auto.clone(), cow.clone()], 1).await;
    let protocol = |name: &str| {
        let a = commit_actions(&dir.path().join(name), 0);
        a.iter()
            .find_map(|a| a.get("protocol").cloned())
            .expect("protocol action")
    };
    let p = protocol("auto");
    assert_eq!(p["minReaderVersion"], 3, "{p}");
    assert_eq!(p["minWriterVersion"], 7, "{p}");
    assert!(p["readerFeatures"].to_string().contains("deletionVectors"));
    let p = protocol("cow");
    assert!(!p.to_string().contains("deletionVectors"), "{p}");
    let info = c
        .coordinator
        .table_info(&c.coordinator.table("cow").unwrap())
        .await
        .unwrap();
    assert!(!info.deletion_vectors && info.merge_mode == "copy_on_write");
    // Readers without deletion-vector support: Python deltalake's pyarrow-dataset path reads
    // the copy-on-write table and refuses the other, naming the feature.
    let pyarrow = |name: &str| {
        std::process::Command::new(python())
            .args([
                "-c",
                "import sys, os\nfrom deltalake import DeltaTable\nprint(DeltaTable(sys.argv[1]).to_pyarrow_table().num_rows)\nsys.stdout.flush(); os._exit(0)",
                &dir.path().join(name).display().to_string(),
            ])
            .output()
            .unwrap()
    };
    assert!(pyarrow("cow").status.success());
    let refused = pyarrow("auto");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("deletionVectors"));
    // Auto on a small table: the cost model rewrites (cheap) and says why.
    let mut ingest = c.ingest_client().await;
    let rows: Vec<Change> = (0..100).map(|i| (i, Some((format!("v{i}"), i)))).collect();
    ingest.ingest(request("auto", false, &rows)).await.unwrap();
    c.coordinator.trigger("auto").await.unwrap();
    ingest
        .ingest(request("auto", false, &[(5, None)]))
        .await
        .unwrap();
    let r = c.coordinator.trigger("auto").await.unwrap();
    assert_eq!(r.tasks[0].mode, "copy_on_write");
    assert!(
        r.tasks[0].mode_reason.contains("small group"),
        "{}",
        r.tasks[0].mode_reason
    );
    c.stop();
}
