//! Group commit into the staging log: batches waiting while a segment is being written go
//! into the next segment together (one PUT for many), and each is acknowledged only after
//! its segment is durable.

use std::sync::Arc;

use arrow::array::UInt64Array;
use arrow::record_batch::RecordBatch;
use freshet_common::changes::staging_schema;
use freshet_common::error::{Error, Result};
use freshet_common::staging::write_segment;
use tokio::sync::{mpsc, oneshot, watch};

use crate::Inner;
use crate::tables::{PendingSegment, TableRuntime};

/// Most bytes (estimated in memory) grouped into one segment.
const MAX_GROUP_BYTES: usize = 64 * 1024 * 1024;

/// A validated batch waiting to be staged.
pub struct StageRequest {
    /// Changes in change-schema form.
    pub batch: RecordBatch,
    /// Gets the batch's sequence number once durable.
    pub reply: oneshot::Sender<Result<u64>>,
    /// A sequence chosen by the source (a CDC source's commit LSN); a batch whose sequence
    /// is below the next one was staged before and is acknowledged without staging again.
    pub sequence: Option<u64>,
    /// When the change happened at its origin (a source transaction's commit time, ms since
    /// the epoch): freshness is measured from here instead of from the acknowledgement.
    pub origin_ms: Option<i64>,
}

/// Runs the stager of one table until `stop` turns true or the queue closes.
pub async fn run_stager(
    table: Arc<TableRuntime>,
    mut rx: mpsc::Receiver<StageRequest>,
    mut next_seq: u64,
    inner: Arc<Inner>,
) {
    let trigger_rows = inner.config.cycle.trigger_changes;
    let mut stop: watch::Receiver<bool> = inner.stop.subscribe();
    let mut closed = table.closed.subscribe();
    let schema = staging_schema(&table.def);
    loop {
        let first = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => return },
            _ = stop.wait_for(|s| *s) => return,
            _ = closed.wait_for(|s| *s) => return,
        };
        let mut queued = vec![first];
        let mut bytes = queued[0].batch.get_array_memory_size();
        while bytes < MAX_GROUP_BYTES {
            match rx.try_recv() {
                Ok(r) => {
                    bytes += r.batch.get_array_memory_size();
                    queued.push(r);
                }
                Err(_) => break,
            }
        }
        // Assign sequences: the source's own (skipping what was staged before) or the next.
        let mut group = Vec::with_capacity(queued.len());
        let mut seqs = Vec::with_capacity(queued.len());
        for r in queued {
            match r.sequence {
                Some(s) if s < next_seq => {
                    tracing::debug!(table = %table.def.name, sequence = s, "already staged; skipped");
                    let _ = r.reply.send(Ok(s));
                }
                Some(s) => {
                    seqs.push(s);
                    next_seq = s + 1;
                    group.push(r);
                }
                None => {
                    seqs.push(next_seq);
                    next_seq += 1;
                    group.push(r);
                }
            }
        }
        if group.is_empty() {
            continue;
        }
        let origin_ms = group.iter().filter_map(|r| r.origin_ms).min();
        // Sequences are never reused, even when the write fails.
        let first_seq = seqs[0];
        let last_seq = *seqs.last().expect("non-empty");
        let staged: Result<Vec<RecordBatch>> = group
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut cols = r.batch.columns().to_vec();
                cols.push(Arc::new(UInt64Array::from(vec![
                    seqs[i];
                    r.batch.num_rows()
                ])));
                RecordBatch::try_new(schema.clone(), cols)
                    .map_err(|e| Error::data("staging batch", e))
            })
            .collect();
        let result = async {
            // A coordinator whose term may have ended must not stage (it could race the new
            // leader's sequence numbers) nor acknowledge.
            inner.fence.check_local()?;
            let staged = staged?;
            let encoded = freshet_common::ipc::encode(&schema, &staged)?;
            let size = encoded.len() as u64;
            let path = write_segment(&table.store, first_seq, last_seq, encoded).await?;
            inner.fence.check_local()?;
            Ok::<_, Error>((staged, path, size))
        }
        .await;
        match result {
            Ok((batches, path, size)) => {
                let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
                let pending_rows = {
                    let mut p = table.pending.lock().expect("lock");
                    inner
                        .metrics
                        .pending(&table.def.name, p.rows() + rows, p.bytes() + size);
                    p.segments.push(PendingSegment {
                        first: first_seq,
                        last: last_seq,
                        path,
                        batches,
                        rows,
                        bytes: size,
                        acked_at_ms: origin_ms
                            .unwrap_or_else(|| chrono::Utc::now().timestamp_millis()),
                    });
                    p.rows()
                };
                tracing::debug!(table = %table.def.name, first_seq, last_seq, rows, bytes = size, "staged");
                for (i, r) in group.into_iter().enumerate() {
                    let _ = r.reply.send(Ok(seqs[i]));
                }
                if pending_rows >= trigger_rows {
                    table.wake.notify_one();
                }
            }
            Err(e) => {
                tracing::warn!(table = %table.def.name, error = %e, "staging write failed");
                let msg = e.to_string();
                for r in group {
                    let _ = r.reply.send(Err(Error::Unavailable(format!(
                        "staging write failed, batch not acknowledged: {msg}"
                    ))));
                }
            }
        }
    }
}
