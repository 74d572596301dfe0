//! Ingest into a term: validated batches from the ingest API (with producer idempotency)
//! and already-typed changes from sources, staged durably before they are acknowledged.

use std::sync::Arc;
use std::time::Duration;

use freshet_common::delta::producer_sequence;
use freshet_common::error::{Error, Result};
use freshet_proto::ingest::v1::{IngestRequest, IngestResponse};
use tokio::sync::oneshot;

use crate::tables::TableRuntime;
use crate::tables::{ProducerState, StageRequest};
use crate::{Coordinator, validate};

impl Coordinator {
    /// Validates and stages a batch; returns once it is durable.
    pub async fn ingest(&self, req: IngestRequest) -> Result<IngestResponse> {
        self.inner().ctx.check_alive()?;
        let t = self.table(&req.table)?;
        let producer = producer_of(&req)?;
        if let Some((p, _)) = &producer {
            self.load_producer(&t, p).await?;
        }
        let pending_bytes = t.pending.lock().expect("lock").bytes();
        if pending_bytes > self.inner().ctx.config.ingest.max_pending_bytes {
            return Err(Error::Backpressure {
                table: t.def.name.clone(),
                message: format!(
                    "{pending_bytes} bytes pending, limit {} (ingest.max_pending_bytes)",
                    self.inner().ctx.config.ingest.max_pending_bytes
                ),
            });
        }
        let limits = self.inner().ctx.config.ingest.clone();
        let def = t.def.clone();
        let valid = tokio::task::spawn_blocking(move || validate::validate(&def, &req, &limits))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let rows = valid.batch.num_rows() as u64;
        let (reply, rx) = oneshot::channel();
        t.stager
            .send(StageRequest {
                batch: valid.batch,
                reply,
                sequence: None,
                origin_ms: None,
                producer,
                open: false,
            })
            .await
            .map_err(|_| Error::Unavailable("staging stopped".into()))?;
        let staged = rx
            .await
            .map_err(|_| Error::Unavailable("staging stopped".into()))??;
        Ok(IngestResponse {
            sequence: staged.sequence,
            rows,
            upserts: valid.upserts,
            deletes: valid.deletes,
            duplicate: staged.duplicate,
        })
    }

    /// Learns a producer's last applied batch from the Delta log the first time this term
    /// sees it (what is staged and not applied, recovery and the stager know).
    async fn load_producer(&self, t: &Arc<TableRuntime>, producer: &str) -> Result<()> {
        if t.producers.lock().expect("lock").contains_key(producer) {
            return Ok(());
        }
        let delta = t.delta.lock().await;
        if let Some(last) = producer_sequence(&t.def, &delta, producer).await? {
            t.producers
                .lock()
                .expect("lock")
                .entry(producer.to_string())
                .or_insert(ProducerState { last, sequence: 0 });
        }
        Ok(())
    }

    /// Stages changes that are already in the table's change schema (from a trusted source
    /// such as CDC) under the source's own `sequence`; a sequence below the table's next one
    /// was staged before and is acknowledged without staging again. Returns once durable.
    pub async fn stage_changes(
        &self,
        table: &str,
        batch: arrow::record_batch::RecordBatch,
        sequence: u64,
        origin_ms: Option<i64>,
    ) -> Result<u64> {
        self.stage_chunk(table, batch, sequence, origin_ms, false)
            .await
    }

    /// [`Coordinator::stage_changes`] for one chunk of a large source transaction: with
    /// `open`, more of the transaction follows under higher sequences, and no cycle applies
    /// any of it before its last chunk (staged with `open` false) is staged: the whole
    /// transaction becomes visible in one commit. Open chunks are not held in memory.
    pub async fn stage_chunk(
        &self,
        table: &str,
        batch: arrow::record_batch::RecordBatch,
        sequence: u64,
        origin_ms: Option<i64>,
        open: bool,
    ) -> Result<u64> {
        self.inner().ctx.check_alive()?;
        let t = self.table(table)?;
        let expected = freshet_common::changes::change_schema(&t.def);
        if batch.schema().fields() != expected.fields() {
            return Err(Error::invalid(
                table,
                format!(
                    "staged changes have schema {:?}, expected {:?}",
                    batch.schema(),
                    expected
                ),
            ));
        }
        self.wait_for_room(&t).await?;
        let (reply, rx) = oneshot::channel();
        t.stager
            .send(StageRequest {
                batch,
                reply,
                sequence: Some(sequence),
                origin_ms,
                producer: None,
                open,
            })
            .await
            .map_err(|_| Error::Unavailable("staging stopped".into()))?;
        Ok(rx
            .await
            .map_err(|_| Error::Unavailable("staging stopped".into()))??
            .sequence)
    }

    /// Back-pressure for a source: waits while the table holds more than its pending limit
    /// in memory (the source stops reading its stream meanwhile, and the database keeps the
    /// changes), so a paused table with a busy source cannot grow the coordinator.
    async fn wait_for_room(&self, t: &Arc<TableRuntime>) -> Result<()> {
        let limit = self.inner().ctx.config.ingest.max_pending_bytes;
        let mut stop = self.inner().ctx.stop.subscribe();
        let mut closed = t.closed.subscribe();
        let mut logged = false;
        loop {
            let held = t.pending.lock().expect("lock").bytes();
            if held <= limit {
                if logged {
                    tracing::info!(table = %t.def.name, "pending changes below the limit; the source reads on");
                }
                return Ok(());
            }
            if !logged {
                tracing::warn!(table = %t.def.name, held, limit, "pending changes over ingest.max_pending_bytes; the source waits");
                logged = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.wait_for(|s| *s) => return Err(Error::Unavailable("coordinator stopped".into())),
                _ = closed.wait_for(|s| *s) => return Err(Error::Unavailable(format!("table '{}' is being replaced", t.def.name))),
            }
            if self.inner().ctx.is_dead() {
                return Err(Error::Unavailable("coordinator stopped".into()));
            }
        }
    }
}

/// The producer id and sequence of an idempotent ingest request, checked.
fn producer_of(req: &IngestRequest) -> Result<Option<(String, u64)>> {
    let bad = |message: String| Error::invalid(&req.table, message);
    match (req.producer_id.as_str(), req.producer_sequence) {
        ("", 0) => Ok(None),
        ("", _) => Err(bad(
            "producer_sequence is set but producer_id is empty".into()
        )),
        (_, 0) => Err(bad(
            "producer_id is set: producer_sequence must be 1 or more".into(),
        )),
        (p, _) if p.len() > 128 || p.chars().any(|c| c.is_control()) => Err(bad(format!(
            "producer_id must be 1-128 printable characters (got {} bytes)",
            p.len()
        ))),
        (p, s) => Ok(Some((p.to_string(), s))),
    }
}
