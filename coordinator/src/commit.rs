//! The one atomic Delta commit of a cycle: Remove(old) + Add(new) + txn(appId, last
//! applied sequence) + commitInfo with the cycle id and metrics.

use std::collections::HashMap;

use deltalake::DeltaTable;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, Remove, Transaction};
use deltalake::protocol::{DeltaOperation, OutputMode};
use freshet_common::delta::{FileEntry, TAG_MAX_KEY, TAG_MIN_KEY, applied_sequence};
use freshet_common::error::{Error, Result};
use freshet_common::table::TableDef;
use freshet_proto::worker::v1::OutputFile;

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

/// Commits the actions with the txn at `last_seq`. Returns the new version, or the
/// current one when the log shows the sequence applied already (a duplicated commit).
pub async fn commit(
    def: &TableDef,
    table: &mut DeltaTable,
    actions: Vec<Action>,
    last_seq: u64,
    cycle_id: &str,
    metrics: serde_json::Value,
) -> Result<i64> {
    let snapshot = table
        .snapshot()
        .map_err(|e| Error::delta(&def.name, e))?
        .clone();
    let props = CommitProperties::default()
        .with_application_transaction(Transaction::new(def.app_id(), last_seq as i64))
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
            table
                .update_state()
                .await
                .map_err(|e| Error::delta(&def.name, e))?;
            Ok(version)
        }
        Err(err) => {
            // The outcome may be ambiguous (a lost reply): the log decides.
            table
                .update_state()
                .await
                .map_err(|e| Error::delta(&def.name, e))?;
            if applied_sequence(def, table).await? >= last_seq {
                tracing::warn!(table = %def.name, error = %err, "commit reported an error but the log has it; treating as committed");
                return Ok(table.version().map(|v| v as i64).unwrap_or(-1));
            }
            Err(Error::CommitConflict {
                table: def.name.clone(),
                message: err.to_string(),
            })
        }
    }
}
