//! Merge semantics end to end through the real gRPC services: a property test against an
//! in-memory model, pruning, task retries, and foreign tables with overlapping files.

use std::collections::{BTreeMap, HashMap};

use freshet_common::delta::{files, open};
use freshet_common::table::MergeMode;
use freshet_integration_tests::*;
use proptest::prelude::*;

/// Checks that files within a partition never overlap and that count(*) (answered from the
/// log's numRecords) matches the model.
async fn check_invariants(c: &Cluster, name: &str, model: &BTreeMap<i64, (String, i64)>) {
    let t = c.coordinator.table(name).unwrap();
    let table = open(&t.def, &Default::default()).await.unwrap();
    let fs = files(&t.def, &table).unwrap();
    let mut by_part: HashMap<Vec<String>, Vec<_>> = HashMap::new();
    for f in fs {
        let mut pv: Vec<String> = f.partition_values.values().cloned().collect();
        pv.sort();
        by_part
            .entry(pv)
            .or_default()
            .push(f.range.clone().expect("freshet files carry exact ranges"));
    }
    // Copy-on-write keeps the files of a partition in disjoint key ranges; with deletion
    // vectors a group's files overlap, and the invariant is one live row per key, which
    // `read_table` (no key twice) and the count below check.
    let dv_files = t.def.merge_mode == freshet_common::table::MergeMode::DeletionVectors;
    for ranges in by_part.values_mut().filter(|_| !dv_files) {
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(w[0].1 < w[1].0, "files overlap: {:?} and {:?}", w[0], w[1]);
        }
    }
    let count = query(&t.def.uri, "select count(*) as c from t").await;
    let n = arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(count[0].column(0))
        .value(0);
    assert_eq!(n as usize, model.len(), "count(*) from numRecords");
}

fn change_strategy() -> impl Strategy<Value = Change> {
    (
        0i64..120,
        proptest::option::weighted(0.75, ("[a-z]{0,12}", any::<i64>())),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 9, .. ProptestConfig::default() })]

    // Random upserts and deletes over a small key space, several batches per cycle and many
    // cycles, small files that split: the table always equals the model.
    #[test]
    fn random_changes_over_many_cycles_equal_the_model(
        partitioned in any::<bool>(),
        mode in prop_oneof![Just(MergeMode::Auto), Just(MergeMode::CopyOnWrite), Just(MergeMode::DeletionVectors)],
        cycles in proptest::collection::vec(proptest::collection::vec(proptest::collection::vec(change_strategy(), 1..60), 1..3), 2..7),
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = table_config(dir.path(), "t", partitioned, 1536);
            cfg.merge_mode = Some(mode);
            let c = Cluster::start(dir.path(), vec![cfg.clone()], 2).await;
            let mut ingest = c.ingest_client().await;
            let mut model = BTreeMap::new();
            for batches in &cycles {
                for b in batches {
                    ingest.ingest(request("t", partitioned, b)).await.unwrap();
                    apply(&mut model, b);
                }
                let rec = c.coordinator.trigger("t").await.unwrap();
                assert_eq!(rec.state, "committed", "{}", rec.error);
                assert_eq!(read_table(&cfg.uri).await, model);
                check_invariants(&c, "t", &model).await;
            }
            c.stop();
        });
    }
}

/// Loads keys 0..n (as upserts) and runs one cycle.
async fn load(c: &Cluster, table: &str, partitioned: bool, n: i64) -> BTreeMap<i64, (String, i64)> {
    let changes: Vec<Change> = (0..n)
        .map(|i| (i, Some((format!("value-{i}"), i * 10))))
        .collect();
    c.ingest_client()
        .await
        .ingest(request(table, partitioned, &changes))
        .await
        .unwrap();
    assert_eq!(
        c.coordinator.trigger(table).await.unwrap().state,
        "committed"
    );
    let mut m = BTreeMap::new();
    apply(&mut m, &changes);
    m
}

async fn pruning(partitioned: bool) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = table_config(dir.path(), "t", partitioned, 2048);
    let c = Cluster::start(dir.path(), vec![cfg.clone()], 2).await;
    let mut model = load(&c, "t", partitioned, 600).await;
    let t = c.coordinator.table("t").unwrap();
    let fs = files(&t.def, &open(&t.def, &Default::default()).await.unwrap()).unwrap();
    assert!(fs.len() >= 4, "want several files, got {}", fs.len());

    // Pick two files; update one key inside each (and delete one absent key, which touches nothing).
    let key_in = |f: &freshet_common::delta::FileEntry| match &f.range.as_ref().unwrap().0[0] {
        freshet_common::key::KeyPart::Int(i) => *i as i64,
        _ => unreachable!(),
    };
    let picked = [&fs[0], &fs[fs.len() - 1]];
    let changes: Vec<Change> = vec![
        (key_in(picked[0]), Some(("changed".into(), -1))),
        (key_in(picked[1]), Some(("changed too".into(), -2))),
        (100_000, None),
    ];
    let mut ingest = c.ingest_client().await;
    ingest
        .ingest(request("t", partitioned, &changes))
        .await
        .unwrap();
    apply(&mut model, &changes);
    let rec = c.coordinator.trigger("t").await.unwrap();
    assert_eq!(rec.state, "committed");
    let mut want: Vec<String> = picked.iter().map(|f| f.path.clone()).collect();
    want.sort();
    assert_eq!(
        removed_paths(&dir.path().join("t"), rec.delta_version),
        want,
        "exactly the touched files are rewritten"
    );
    assert_eq!(rec.files_rewritten, 2);
    assert_eq!(rec.files_pruned, rec.files_considered - 2);
    assert_eq!(read_table(&cfg.uri).await, model);
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_rewrites_exactly_the_touched_files_unpartitioned() {
    pruning(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_rewrites_exactly_the_touched_files_partitioned() {
    pruning(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_is_retried_on_another_worker() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = table_config(dir.path(), "t", false, 1 << 20);
    let c = Cluster::start(dir.path(), vec![cfg.clone()], 2).await;
    c.workers[0]
        .faults
        .fail_next
        .store(1, std::sync::atomic::Ordering::SeqCst);
    c.workers[1]
        .faults
        .fail_next
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let model = load(&c, "t", false, 50).await;
    let rec = c.coordinator.cycles(Some("t"), 1).remove(0);
    assert_eq!(rec.tasks[0].attempts, 3, "{:?}", rec.tasks[0]);
    assert_eq!(rec.tasks[0].errors.len(), 2);
    assert!(
        rec.tasks[0].errors[0].contains("on http://")
            && rec.tasks[0].errors[1].contains("on http://")
    );
    assert_ne!(
        rec.tasks[0].errors[0].split(" on ").nth(1),
        rec.tasks[0].errors[1].split(" on ").nth(1),
        "retried elsewhere"
    );
    assert_eq!(read_table(&cfg.uri).await, model);
    // The failed attempts wrote nothing; nothing but live files remain.
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_tables_with_overlapping_files_merge_correctly() {
    use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let cfg = table_config(dir.path(), "t", false, 1 << 20);
    // Another writer (delta-rs) makes two files with overlapping key ranges.
    let url = deltalake::ensure_table_uri(&cfg.uri).unwrap();
    let mut model = BTreeMap::new();
    let mut table = deltalake::DeltaTable::try_from_url(url).await.unwrap();
    for ids in [vec![1i64, 5, 9, 13], vec![3, 7, 11, 15]] {
        let b = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(ids.clone())) as ArrayRef),
            (
                "v",
                Arc::new(StringArray::from(
                    ids.iter()
                        .map(|i| format!("foreign-{i}"))
                        .collect::<Vec<_>>(),
                )) as ArrayRef,
            ),
            ("n", Arc::new(Int64Array::from(ids.clone())) as ArrayRef),
        ])
        .unwrap();
        let b = RecordBatch::try_new(
            freshet_common::table::TableConfig::to_def(&cfg)
                .unwrap()
                .schema
                .clone(),
            b.columns().to_vec(),
        )
        .unwrap();
        table = table.write(vec![b]).await.unwrap();
        for i in ids {
            model.insert(i, (format!("foreign-{i}"), i));
        }
    }
    let c = Cluster::start(dir.path(), vec![cfg.clone()], 2).await;
    assert_eq!(read_table(&cfg.uri).await, model, "adopted as is");
    let changes: Vec<Change> = vec![
        (7, Some(("mine".into(), 70))),
        (9, None),
        (8, Some(("new".into(), 80))),
    ];
    c.ingest_client()
        .await
        .ingest(request("t", false, &changes))
        .await
        .unwrap();
    apply(&mut model, &changes);
    let rec = c.coordinator.trigger("t").await.unwrap();
    assert_eq!(rec.state, "committed", "{}", rec.error);
    assert_eq!(
        rec.files_rewritten, 2,
        "overlapping files are rewritten together"
    );
    assert_eq!(read_table(&cfg.uri).await, model);
    check_invariants(&c, "t", &model).await;
    c.stop();
}
