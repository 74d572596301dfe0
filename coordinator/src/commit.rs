//! The one atomic Delta commit of a cycle: Remove(old) + Add(new) + txn(appId, last
//! applied sequence) + commitInfo with the cycle id and metrics.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use deltalake::DeltaTable;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, Remove, Transaction};
use deltalake::protocol::{DeltaOperation, OutputMode};
use freshet_common::delta::{
    FileEntry, TAG_MAX_KEY, TAG_MIN_KEY, applied_sequence, producer_app_id,
};
use freshet_common::error::{Error, Result};
use freshet_common::table::TableDef;
use freshet_proto::worker::v1::OutputFile;

use crate::fence::Fence;

/// Builds the Remove and Add actions.
pub fn actions(removed: &[FileEntry], added: &[OutputFile]) -> Vec<Action> {
    let now = chrono::Utc::now().timestamp_millis();
    let mut out = Vec::with_capacity(removed.len() + added.len());
    for f in removed {
        out.push(Action::Remove(Remove {
            path: f.path.clone(),
            data_change: true,
            deletion_timestamp: Some(now),
            extended_file_metadata: Some(true),
            partition_values: Some(
                f.partition_values
                    .iter()
                    .map(|(k, v)| (k.clone(), Some(v.clone())))
                    .collect(),
            ),
            size: Some(f.size as i64),
            tags: None,
            deletion_vector: None,
            base_row_id: None,
            default_row_commit_version: None,
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

/// Commits the actions with the txn at `last_seq` (and one txn per idempotent producer at
/// its last batch). Returns the new version, or the
/// current one when the log shows the sequence applied already (a duplicated commit).
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
    let snapshot = table
        .snapshot()
        .map_err(|e| Error::delta(&def.name, e))?
        .clone();
    let mut txns = vec![Transaction::new(def.app_id(), last_seq as i64)];
    txns.extend(
        producers
            .iter()
            .map(|(p, v)| Transaction::new(producer_app_id(def, p), *v as i64)),
    );
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
    let operation = DeltaOperation::StreamingUpdate {
        output_mode: OutputMode::Update,
        query_id: def.app_id(),
        epoch_id: last_seq as i64,
    };
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
                    applied_sequence(def, table).await
                }
                .await;
                match read {
                    Ok(applied) if applied >= last_seq => {
                        tracing::warn!(table = %def.name, error = %err, "commit reported an error but the log has it; treating as committed");
                        return Ok(table.version().map(|v| v as i64).unwrap_or(-1));
                    }
                    Ok(_) => {
                        return Err(Error::CommitConflict {
                            table: def.name.clone(),
                            message: err.to_string(),
                        });
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
