//! The one atomic Delta commit of a cycle: Remove(old) + Add(new) + txn(appId, last
//! applied sequence) + commitInfo with the cycle id and metrics.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, Add, DeletionVectorDescriptor, Remove, Transaction};
use deltalake::protocol::{DeltaOperation, OutputMode};
use deltalake::{DeltaTable, DeltaTableError};
use freshet_common::delta::{FileEntry, TAG_MAX_KEY, TAG_MIN_KEY, producer_app_id};
use freshet_common::error::{Error, Result};
use freshet_common::table::TableDef;
use freshet_proto::worker::v1::OutputFile;

use crate::fence::Fence;

/// Builds the Remove and Add actions: `removed` leave the table, `added` join it, and each
/// of `redeleted` (a file of the snapshot, its new deletion vector) is removed and added
/// again with the new deletion vector, its stats, tags and modification time kept.
pub fn actions(
    removed: &[FileEntry],
    added: &[OutputFile],
    redeleted: &[(FileEntry, DeletionVectorDescriptor)],
) -> Vec<Action> {
    let now = chrono::Utc::now().timestamp_millis();
    let partition_values = |f: &FileEntry| -> HashMap<String, Option<String>> {
        f.partition_values
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect()
    };
    // The Remove of a snapshot file names it as the log has it (with its deletion vector).
    let remove = |f: &FileEntry| {
        Action::Remove(Remove {
            path: f.path.clone(),
            data_change: true,
            deletion_timestamp: Some(now),
            extended_file_metadata: Some(true),
            partition_values: Some(partition_values(f)),
            size: Some(f.size as i64),
            tags: None,
            deletion_vector: f.deletion_vector.clone(),
            base_row_id: None,
            default_row_commit_version: None,
        })
    };
    let mut out = Vec::with_capacity(removed.len() + 2 * redeleted.len() + added.len());
    out.extend(removed.iter().map(remove));
    for (f, dv) in redeleted {
        out.push(remove(f));
        out.push(Action::Add(Add {
            path: f.path.clone(),
            partition_values: partition_values(f),
            size: f.size as i64,
            modification_time: f.modification_time,
            data_change: true,
            stats: f.stats.clone(),
            tags: (!f.tags.is_empty()).then(|| f.tags.clone()),
            deletion_vector: Some(dv.clone()),
            base_row_id: None,
            default_row_commit_version: None,
            clustering_provider: None,
        }));
    }
    for f in added {
        out.push(Action::Add(Add {
            path: f.path.clone(),
            partition_values: f
                .partition_values
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect(),
            size: f.size as i64,
            modification_time: f.modification_time,
            data_change: true,
            stats: Some(f.stats_json.clone()),
            tags: Some(HashMap::from([
                (TAG_MIN_KEY.to_string(), Some(f.min_key_json.clone())),
                (TAG_MAX_KEY.to_string(), Some(f.max_key_json.clone())),
            ])),
            deletion_vector: None,
            base_row_id: None,
            default_row_commit_version: None,
            clustering_provider: None,
        }));
    }
    out
}

/// The actions marked as rearranging data, not changing it (`dataChange = false`), as
/// compaction writes them: streaming readers skip such a version.
pub fn rearranging(mut actions: Vec<Action>) -> Vec<Action> {
    for a in &mut actions {
        match a {
            Action::Add(add) => add.data_change = false,
            Action::Remove(r) => r.data_change = false,
            _ => {}
        }
    }
    actions
}

/// The `txn` app id of a table's compaction commits.
pub fn compaction_app_id(def: &TableDef) -> String {
    format!("{}:compaction", def.app_id())
}

/// Commits a compaction run: its actions with a `txn` of its own (app id
/// [`compaction_app_id`], version: the run's start in ms), by which a commit whose reply was
/// lost is settled from the log, as a cycle's is by its staging sequence.
pub async fn commit_compaction(
    def: &TableDef,
    table: &mut DeltaTable,
    actions: Vec<Action>,
    run_id: &str,
    metrics: serde_json::Value,
    fence: &Fence,
) -> Result<i64> {
    let app_id = compaction_app_id(def);
    let stamp = chrono::Utc::now().timestamp_millis();
    let operation = DeltaOperation::Optimize {
        predicate: None,
        target_size: def.target_file_size as i64,
    };
    commit_settled(
        def,
        table,
        actions,
        vec![Transaction::new(app_id.clone(), stamp)],
        (app_id, stamp),
        operation,
        run_id,
        metrics,
        fence,
    )
    .await
}

/// Commits the actions with the txn at `last_seq` (and one txn per idempotent producer at
/// its last batch). Returns the new version, or the
/// current one when the log shows the sequence applied already (a duplicated commit).
/// A commit that did not land fails with [`Error::CommitConflict`] when another writer
/// committed first, and with [`Error::Delta`] otherwise (see [`failure`]).
///
/// A commit that reports an error may still have landed (a lost reply): its outcome is
/// settled from the log, and while the log cannot be read this waits (the table's cycles
/// with it) rather than guess, until the log answers or `fence` says the term is over.
pub async fn commit(
    def: &TableDef,
    table: &mut DeltaTable,
    actions: Vec<Action>,
    last_seq: u64,
    producers: &BTreeMap<String, u64>,
    cycle_id: &str,
    metrics: serde_json::Value,
    fence: &Fence,
) -> Result<i64> {
    let mut txns = vec![Transaction::new(def.app_id(), last_seq as i64)];
    txns.extend(
        producers
            .iter()
            .map(|(p, v)| Transaction::new(producer_app_id(def, p), *v as i64)),
    );
    let operation = DeltaOperation::StreamingUpdate {
        output_mode: OutputMode::Update,
        query_id: def.app_id(),
        epoch_id: last_seq as i64,
    };
    commit_settled(
        def,
        table,
        actions,
        txns,
        (def.app_id(), last_seq as i64),
        operation,
        cycle_id,
        metrics,
        fence,
    )
    .await
}

/// Commits `actions` with `txns`; when the commit reports an error, the log decides: it
/// landed when the txn `settle.0` is at `settle.1` or beyond.
#[allow(clippy::too_many_arguments)]
async fn commit_settled(
    def: &TableDef,
    table: &mut DeltaTable,
    actions: Vec<Action>,
    txns: Vec<Transaction>,
    settle: (String, i64),
    operation: DeltaOperation,
    cycle_id: &str,
    metrics: serde_json::Value,
    fence: &Fence,
) -> Result<i64> {
    let snapshot = table
        .snapshot()
        .map_err(|e| Error::delta(&def.name, e))?
        .clone();
    let props = CommitProperties::default()
        .with_application_transactions(txns)
        .with_metadata([
            (
                "freshet.cycleId".to_string(),
                serde_json::Value::from(cycle_id),
            ),
            ("freshet.metrics".to_string(), metrics),
        ])
        // Any concurrent commit fails this one; the next cycle re-plans on fresh state.
        .with_max_retries(0);
    let result = CommitBuilder::from(props)
        .with_actions(actions)
        .build(Some(&snapshot), table.log_store(), operation)
        .await;
    match result {
        Ok(done) => {
            let version = done.version() as i64;
            // The commit is in the log; a failed refresh only means the next cycle refreshes.
            if let Err(e) = table.update_state().await {
                tracing::warn!(table = %def.name, version, error = %e, "committed; refreshing the table state failed");
            }
            Ok(version)
        }
        Err(err) => {
            // The outcome may be ambiguous (a lost reply): the log decides.
            let mut wait = Duration::from_millis(200);
            loop {
                let read = async {
                    table
                        .update_state()
                        .await
                        .map_err(|e| Error::delta(&def.name, e))?;
                    let snapshot = table.snapshot().map_err(|e| Error::delta(&def.name, e))?;
                    snapshot
                        .transaction_version(table.log_store().as_ref(), settle.0.clone())
                        .await
                        .map_err(|e| Error::delta(&def.name, e))
                }
                .await;
                match read {
                    Ok(Some(applied)) if applied >= settle.1 => {
                        tracing::warn!(table = %def.name, error = %err, "commit reported an error but the log has it; treating as committed");
                        return Ok(table.version().map(|v| v as i64).unwrap_or(-1));
                    }
                    Ok(_) => {
                        let planned = snapshot.version() as i64 + 1;
                        let latest = table.version().map(|v| v as i64).unwrap_or(-1);
                        return Err(failure(&def.name, planned, latest, err));
                    }
                    Err(e) => {
                        // Unknown outcome: nothing may be cleaned up nor re-planned yet.
                        fence.check_local()?;
                        tracing::warn!(table = %def.name, commit_error = %err, error = %e, "commit outcome unknown: the Delta log cannot be read; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }
}

/// Whether a commit error means that another writer committed the version first. With
/// `max_retries(0)` deltalake reports a newer version found before the write, or a
/// put-if-absent that lost the race, as `MaxCommitAttempts`; the other two are the same
/// race reported on other paths.
pub fn is_conflict(err: &DeltaTableError) -> bool {
    matches!(
        err,
        DeltaTableError::VersionAlreadyExists(_)
            | DeltaTableError::Transaction {
                source: TransactionError::MaxCommitAttempts(_)
                    | TransactionError::VersionAlreadyExists(_)
                    | TransactionError::CommitConflict(_),
            }
    )
}

/// The error of a commit that did not land (the log says so): a conflict
/// ([`Error::CommitConflict`]: another writer committed version `planned` first, the next
/// cycle re-plans), or anything else ([`Error::Delta`]: the log store failed, or deltalake
/// refused the commit), never reported as a conflict.
pub fn failure(table: &str, planned: i64, latest: i64, err: DeltaTableError) -> Error {
    if is_conflict(&err) {
        return Error::CommitConflict {
            table: table.to_string(),
            message: format!(
                "version {planned} was committed first by another writer (the log is at version {latest}): {err}"
            ),
        };
    }
    let source = match err {
        // deltalake names every object-store error a failed *read*; a commit's was a write
        // (or the version probe before it).
        DeltaTableError::ObjectStore { source } => DeltaTableError::Transaction {
            source: TransactionError::ObjectStore { source },
        },
        other => other,
    };
    Error::delta(table, source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field, Schema};
    use freshet_common::faults::{self, FaultKind, FaultPlan, FaultRule, FaultSpec, Op};
    use freshet_common::storage::{StorageOptions, log_store, table_url};
    use std::sync::Arc;

    fn def(dir: &std::path::Path) -> TableDef {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
        ]));
        TableDef::new(
            "t",
            dir.to_str().unwrap(),
            schema,
            vec!["id".into()],
            vec![],
            1 << 20,
        )
        .unwrap()
    }

    async fn open(def: &TableDef, options: &StorageOptions) -> DeltaTable {
        let url = table_url(&def.name, &def.uri).unwrap();
        freshet_common::delta::open_or_create_in(def, log_store(&def.name, &url, options).unwrap())
            .await
            .unwrap()
            .0
    }

    fn output(name: &str) -> OutputFile {
        OutputFile {
            path: name.into(),
            size: 1,
            num_records: 1,
            stats_json: r#"{"numRecords":1}"#.into(),
            min_key_json: r#"["1"]"#.into(),
            max_key_json: r#"["1"]"#.into(),
            ..Default::default()
        }
    }

    async fn commit_one(def: &TableDef, table: &mut DeltaTable, seq: u64) -> Result<i64> {
        let file = output(&format!("fr-c{seq}-0-1-a.parquet"));
        commit(
            def,
            table,
            actions(&[], &[file], &[]),
            seq,
            &BTreeMap::new(),
            &format!("c{seq}"),
            serde_json::json!({}),
            &Fence::none(),
        )
        .await
    }

    #[tokio::test]
    async fn a_commit_that_loses_the_race_is_a_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let d = def(dir.path());
        let mut ours = open(&d, &Default::default()).await;
        let mut theirs = open(&d, &Default::default()).await;
        assert_eq!(commit_one(&d, &mut theirs, 1).await.unwrap(), 1);
        // Planned on version 0; version 1 is someone else's now.
        let e = commit_one(&d, &mut ours, 2).await.unwrap_err();
        assert!(matches!(e, Error::CommitConflict { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("concurrent commit")
                && msg.contains("version 1 was committed first by another writer"),
            "{msg}"
        );
        // The next attempt, on the refreshed state, commits.
        assert_eq!(commit_one(&d, &mut ours, 2).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_commit_the_store_refuses_is_not_a_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let d = def(dir.path());
        // Every put-if-absent on the log fails (without effect); reads work.
        let plan = FaultPlan::new(FaultSpec {
            seed: 1,
            rules: vec![FaultRule {
                ops: vec![Op::PutIfAbsent],
                path_contains: "_delta_log".into(),
                error_rate: 1.0,
                ..Default::default()
            }],
        });
        plan.set_enabled(false);
        let name = uuid::Uuid::new_v4().to_string();
        faults::register(&name, plan.clone());
        let options = StorageOptions::from([(faults::FAULTS_OPTION.to_string(), name)]);
        let mut table = open(&d, &options).await;
        plan.set_enabled(true);
        let e = commit_one(&d, &mut table, 1).await.unwrap_err();
        assert!(plan.total(FaultKind::Error) >= 1);
        assert!(matches!(e, Error::Delta { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(!msg.contains("concurrent"), "{msg}");
        assert!(
            msg.contains("Transaction failed: Log storage error"),
            "{msg}"
        );
        assert!(!is_conflict(&deltalake::DeltaTableError::Generic(
            "x".into()
        )));
        plan.set_enabled(false);
        assert_eq!(commit_one(&d, &mut table, 1).await.unwrap(), 1);
    }
}
