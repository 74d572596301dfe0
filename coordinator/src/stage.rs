//! Group commit into the staging log: batches waiting while a segment is being written go
//! into the next segment together (one PUT for many), and each is acknowledged only after
//! its segment is durable.

use std::sync::Arc;

use arrow::array::UInt64Array;
use arrow::record_batch::RecordBatch;
use freshet_common::changes::staging_schema;
use freshet_common::error::{Error, Result};
use freshet_common::staging::{OPEN_METADATA, PRODUCERS_METADATA, ProducerMark, write_segment};
use object_store::ObjectStoreExt;
use std::collections::HashMap;
use tokio::sync::{mpsc, watch};

use crate::context::TermContext;
use crate::tables::{PendingSegment, ProducerState, StageRequest, Staged, TableRuntime};

/// Most bytes (estimated in memory) grouped into one segment.
const MAX_GROUP_BYTES: usize = 64 * 1024 * 1024;

/// Runs the stager of one table until `stop` turns true or the queue closes.
pub async fn run_stager(
    table: Arc<TableRuntime>,
    mut rx: mpsc::Receiver<StageRequest>,
    mut next_seq: u64,
    inner: Arc<TermContext>,
) {
    // Sequences below this are durably staged (a source's re-send of one is skipped); fresh
    // sequences come from `next_seq`, which may run ahead of it past failed writes.
    let mut durable_next = next_seq;
    let mut unresolved: Option<Unresolved> = None;
    let trigger_rows = inner.config.cycle.trigger_changes;
    let mut stop: watch::Receiver<bool> = inner.stop.subscribe();
    let mut closed = table.closed.subscribe();
    let schema = staging_schema(&table.def);
    loop {
        if let Some(u) = unresolved.take() {
            if !settle(&table, &inner, u, &mut durable_next).await {
                return;
            }
        }
        let first = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => return },
            _ = stop.wait_for(|s| *s) => return,
            _ = closed.wait_for(|s| *s) => return,
        };
        // A coordinator whose lease may have run out answers nothing from its state (a
        // producer's sequence may have moved on under a newer leader): UNAVAILABLE, retried.
        if inner.fence.check_local().is_err() {
            let refuse =
                || Error::LeadershipLost("the leader lease may have expired; retry".into());
            let _ = first.reply.send(Err(refuse()));
            while let Ok(r) = rx.try_recv() {
                let _ = r.reply.send(Err(refuse()));
            }
            continue;
        }
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
        // Producer sequences this group would stage (rolled back if its write fails), and
        // requests that repeat one of them (they share its fate).
        let mut claimed: HashMap<String, (u64, usize)> = HashMap::new();
        let mut repeats: Vec<(StageRequest, usize)> = Vec::new();
        for r in queued {
            if let Some((producer, pseq)) = &r.producer {
                if let Some(&(last, index)) = claimed.get(producer) {
                    if *pseq == last {
                        repeats.push((r, index));
                        continue;
                    }
                }
                let known = claimed
                    .get(producer)
                    .map(|c| ProducerState {
                        last: c.0,
                        sequence: 0,
                    })
                    .or_else(|| table.producers.lock().expect("lock").get(producer).copied());
                match check_producer(&table.def.name, producer, *pseq, known) {
                    Ok(None) => {}
                    Ok(Some(dup)) => {
                        let _ = r.reply.send(Ok(dup));
                        continue;
                    }
                    Err(e) => {
                        let _ = r.reply.send(Err(e));
                        continue;
                    }
                }
                claimed.insert(producer.clone(), (*pseq, group.len()));
            }
            match r.sequence {
                Some(s) if s < durable_next => {
                    tracing::debug!(table = %table.def.name, sequence = s, "already staged; skipped");
                    let _ = r.reply.send(Ok(Staged {
                        sequence: s,
                        duplicate: true,
                    }));
                }
                Some(s) if seqs.last().is_some_and(|&l| s <= l) => {
                    // Segments hold increasing sequences; a source sends them in order.
                    let _ = r.reply.send(Err(Error::Internal(format!(
                        "table '{}': sequence {s} out of order in a staging group",
                        table.def.name
                    ))));
                }
                Some(s) => {
                    seqs.push(s);
                    next_seq = next_seq.max(s + 1);
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
        let marks: Vec<ProducerMark> = group
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let (producer, pseq) = r.producer.clone()?;
                Some(ProducerMark {
                    sequence: seqs[i],
                    producer,
                    producer_sequence: pseq,
                })
            })
            .collect();
        let origin_ms = group.iter().filter_map(|r| r.origin_ms).min();
        // A source sends a chunked transaction's chunks one after another: the segment is
        // open when its last batch is a chunk that more of its transaction follows.
        let open = group.last().is_some_and(|r| r.open);
        // Fresh sequences are never reused, even when the write fails (the write may have
        // taken effect); a source's own sequence is staged again when it re-sends it.
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
        let staged = match staged {
            Ok(s) => s,
            Err(e) => {
                for r in group.into_iter().chain(repeats.into_iter().map(|(r, _)| r)) {
                    let _ = r.reply.send(Err(Error::Internal(e.to_string())));
                }
                continue;
            }
        };
        let mut attempted = false;
        let result = async {
            // A coordinator whose term may have ended must not stage (it could race the new
            // leader's sequence numbers) nor acknowledge.
            inner.fence.check_local()?;
            let encoded =
                freshet_common::ipc::encode(&segment_schema(&schema, &marks, open)?, &staged)?;
            attempted = true;
            let path = write_segment(&table.store, first_seq, last_seq, encoded).await?;
            inner.fence.check_local()?;
            Ok::<_, Error>(path)
        }
        .await;
        match result {
            Ok(_) => {
                durable_next = durable_next.max(last_seq + 1);
                let seg = durable(&table, first_seq, last_seq, staged, marks, origin_ms, open);
                let (rows, size) = (seg.rows, seg.bytes);
                let pending_rows = {
                    let mut p = table.pending.lock().expect("lock");
                    p.segments.push(seg);
                    inner.metrics.pending(&table.def.name, p.rows(), p.bytes());
                    p.rows()
                };
                tracing::debug!(table = %table.def.name, first_seq, last_seq, rows, bytes = size, "staged");
                for (i, r) in group.into_iter().enumerate() {
                    let _ = r.reply.send(Ok(Staged {
                        sequence: seqs[i],
                        duplicate: false,
                    }));
                }
                for (r, i) in repeats {
                    let _ = r.reply.send(Ok(Staged {
                        sequence: seqs[i],
                        duplicate: true,
                    }));
                }
                if pending_rows >= trigger_rows {
                    table.wake.notify_one();
                }
            }
            Err(e) => {
                tracing::warn!(table = %table.def.name, error = %e, "staging write failed");
                if attempted {
                    // The write may have taken effect (a lost reply): settled before anything
                    // else is staged.
                    unresolved = Some(Unresolved {
                        first: first_seq,
                        last: last_seq,
                        batches: staged,
                        marks,
                        origin_ms,
                        open,
                    });
                }
                let msg = e.to_string();
                for r in group.into_iter().chain(repeats.into_iter().map(|(r, _)| r)) {
                    let _ = r.reply.send(Err(Error::Unavailable(format!(
                        "staging write failed, batch not acknowledged: {msg}"
                    ))));
                }
            }
        }
    }
}

/// A segment write that failed after it was sent: it may exist.
struct Unresolved {
    first: u64,
    last: u64,
    batches: Vec<RecordBatch>,
    marks: Vec<ProducerMark>,
    origin_ms: Option<i64>,
    open: bool,
}

/// Finds out whether a failed segment write took effect, and if so makes it pending like
/// any staged segment (its batches were durable though their producers were told
/// otherwise; a producer's retry is then a duplicate). Waits while the store cannot say;
/// returns false when the stager must stop.
async fn settle(
    table: &Arc<TableRuntime>,
    inner: &Arc<TermContext>,
    u: Unresolved,
    durable_next: &mut u64,
) -> bool {
    let path = freshet_common::staging::segment_path(u.first, u.last);
    let mut wait = std::time::Duration::from_millis(100);
    loop {
        if *inner.stop.borrow() || *table.closed.borrow() || inner.fence.is_lost() {
            return false;
        }
        match table.store.head(&path).await {
            Ok(_) => break,
            Err(object_store::Error::NotFound { .. }) => return true,
            Err(e) => {
                tracing::warn!(table = %table.def.name, segment = %path, error = %e, "cannot tell whether a failed staging write took effect; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
    tracing::warn!(table = %table.def.name, segment = %path, "a staging write reported as failed took effect; applying it");
    *durable_next = (*durable_next).max(u.last + 1);
    let seg = durable(
        table,
        u.first,
        u.last,
        u.batches,
        u.marks,
        u.origin_ms,
        u.open,
    );
    table.pending.lock().expect("lock").segments.push(seg);
    true
}

/// A segment now known durable: its producers' batches count as staged, and it becomes a
/// pending segment (open chunks wait in the store, not in memory, until the cycle that
/// applies their whole transaction reads them; pending limits count decoded bytes).
fn durable(
    table: &TableRuntime,
    first: u64,
    last: u64,
    batches: Vec<RecordBatch>,
    marks: Vec<ProducerMark>,
    origin_ms: Option<i64>,
    open: bool,
) -> PendingSegment {
    {
        let mut producers = table.producers.lock().expect("lock");
        for m in &marks {
            producers.insert(
                m.producer.clone(),
                ProducerState {
                    last: m.producer_sequence,
                    sequence: m.sequence,
                },
            );
        }
    }
    PendingSegment {
        first,
        last,
        path: freshet_common::staging::segment_path(first, last),
        rows: batches.iter().map(|b| b.num_rows() as u64).sum(),
        bytes: batches
            .iter()
            .map(|b| b.get_array_memory_size() as u64)
            .sum(),
        batches: (!open).then_some(batches),
        skip: Vec::new(),
        producers: marks,
        open,
        acked_at_ms: origin_ms.unwrap_or_else(|| chrono::Utc::now().timestamp_millis()),
    }
}

/// Decides a producer's batch: `Ok(None)` to stage it, `Ok(Some(..))` for a duplicate, an
/// error for a sequence that skips ahead (a batch in between is missing).
pub fn check_producer(
    table: &str,
    producer: &str,
    pseq: u64,
    known: Option<ProducerState>,
) -> Result<Option<Staged>> {
    let Some(known) = known else { return Ok(None) };
    if pseq <= known.last {
        let sequence = if pseq == known.last {
            known.sequence
        } else {
            0
        };
        return Ok(Some(Staged {
            sequence,
            duplicate: true,
        }));
    }
    if pseq != known.last + 1 {
        return Err(Error::OutOfOrder(format!(
            "table '{table}': producer '{producer}' sent sequence {pseq}, expected {} (the batch after its last staged one, {})",
            known.last + 1,
            known.last
        )));
    }
    Ok(None)
}

/// The segment's schema: the staging schema plus the producer marks of its batches, so
/// they are durable with the data they describe.
fn segment_schema(
    schema: &arrow::datatypes::SchemaRef,
    marks: &[ProducerMark],
    open: bool,
) -> Result<arrow::datatypes::Schema> {
    let mut s = schema.as_ref().clone();
    if open {
        s.metadata
            .insert(OPEN_METADATA.to_string(), "true".to_string());
    }
    if !marks.is_empty() {
        let json = serde_json::to_string(marks).map_err(|e| Error::Internal(e.to_string()))?;
        s.metadata.insert(PRODUCERS_METADATA.to_string(), json);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producer_sequences_are_deduplicated_and_must_not_skip() {
        assert_eq!(
            check_producer("t", "p", 7, None).unwrap(),
            None,
            "first contact: any start"
        );
        let known = Some(ProducerState {
            last: 7,
            sequence: 42,
        });
        assert_eq!(check_producer("t", "p", 8, known).unwrap(), None);
        assert_eq!(
            check_producer("t", "p", 7, known).unwrap(),
            Some(Staged {
                sequence: 42,
                duplicate: true
            })
        );
        assert_eq!(
            check_producer("t", "p", 3, known).unwrap(),
            Some(Staged {
                sequence: 0,
                duplicate: true
            })
        );
        let e = check_producer("t", "p", 9, known).unwrap_err().to_string();
        assert!(e.contains("expected 8"), "{e}");
    }
}
