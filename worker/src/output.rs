//! What a task wrote: each finished file put under its output name
//! (`fr-<cycle>-<task>-<attempt>-<unique>.parquet`, [`freshet_common::naming`]) and
//! described for the commit, and the totals the response reports. Both rewrite paths
//! write through here.

use std::sync::Arc;
use std::time::Instant;

use freshet_common::error::{Error, Result};
use freshet_common::merge::MergeCounts;
use freshet_common::naming::OutputName;
use freshet_proto::worker::v1::{OutputFile, RewriteRequest, RewriteResponse};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// What a rewrite did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub files: Vec<OutputFile>,
    pub counts: MergeCounts,
    pub rows_written: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Row groups copied byte for byte / decoded and re-encoded (row-group path only).
    pub groups_copied: u64,
    pub groups_rewritten: u64,
    /// Deletion-vector mode: the inputs given new deletions, and the DV file written.
    pub deletions: Vec<freshet_proto::worker::v1::InputDeletions>,
    pub deletion_vector_file: String,
}

/// A finished file's description (its bytes aside).
pub struct Described {
    pub num_records: u64,
    pub stats_json: String,
    pub min_key_json: String,
    pub max_key_json: String,
}

impl Outcome {
    /// Puts a finished file in partition directory `dir` under a fresh output name of the
    /// task, and records it.
    pub async fn put_file(
        &mut self,
        store: &Arc<dyn ObjectStore>,
        req: &RewriteRequest,
        dir: &str,
        bytes: Vec<u8>,
        file: Described,
    ) -> Result<()> {
        let name = format!(
            "{dir}{}",
            OutputName::new(&req.cycle_id, req.task_id, req.attempt)
        );
        let size = bytes.len() as u64;
        let path = Path::from(name.as_str());
        store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|e| Error::store(&path, e))?;
        self.bytes_written += size;
        self.rows_written += file.num_records;
        self.files.push(OutputFile {
            path: name,
            size,
            partition_values: req.partition_values.clone(),
            num_records: file.num_records,
            stats_json: file.stats_json,
            min_key_json: file.min_key_json,
            max_key_json: file.max_key_json,
            modification_time: now_ms(),
        });
        Ok(())
    }

    /// The task's response.
    pub fn response(self, started: Instant, worker_id: &str) -> RewriteResponse {
        RewriteResponse {
            files: self.files,
            rows_read: self.counts.rows_read,
            rows_written: self.rows_written,
            rows_inserted: self.counts.inserted,
            rows_updated: self.counts.updated,
            rows_deleted: self.counts.deleted,
            bytes_read: self.bytes_read,
            bytes_written: self.bytes_written,
            duration_ms: started.elapsed().as_millis() as u64,
            worker_id: worker_id.to_string(),
            deletions: self.deletions,
            deletion_vector_file: self.deletion_vector_file,
        }
    }
}

/// Milliseconds since the epoch (a file's modification time).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
