//! A served table at run time: its definition, stores, Delta handle and pending changes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use arrow::record_batch::RecordBatch;
use deltalake::DeltaTable;
use freshet_common::error::Result;
use freshet_common::table::TableDef;
use freshet_proto::admin::v1::CycleRecord;
use object_store::ObjectStore;
use object_store::path::Path;
use tokio::sync::{Notify, mpsc, oneshot};

use freshet_common::staging::ProducerMark;

/// A staged segment not yet applied, kept in memory so cycles need not re-read it.
#[derive(Debug, Clone)]
pub struct PendingSegment {
    /// First sequence.
    pub first: u64,
    /// Last sequence.
    pub last: u64,
    /// Where it is stored.
    pub path: Path,
    /// Its rows ([`freshet_common::changes::staging_schema`]); `None` while they are only
    /// in the store (recovery beyond the memory budget), read by the cycle that takes it.
    pub batches: Option<Vec<RecordBatch>>,
    /// Staging sequences of batches to leave out when it is read (repeated producer
    /// batches found by recovery).
    pub skip: Vec<u64>,
    /// Rows.
    pub rows: u64,
    /// Bytes its batches take in memory (whether or not they are held now).
    pub bytes: u64,
    /// When it was acknowledged (ms since the epoch).
    pub acked_at_ms: i64,
    /// The idempotent-ingest batches in it.
    pub producers: Vec<ProducerMark>,
    /// It ends inside a source transaction staged in chunks (more of it follows): no
    /// cycle commits part of a transaction.
    pub open: bool,
}

/// What is staged and not yet applied.
#[derive(Debug, Default)]
pub struct Pending {
    /// Segments in sequence order.
    pub segments: Vec<PendingSegment>,
}

impl Pending {
    /// Pending rows.
    pub fn rows(&self) -> u64 {
        self.segments.iter().map(|s| s.rows).sum()
    }

    /// Pending bytes held in memory.
    pub fn bytes(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| s.batches.is_some())
            .map(|s| s.bytes)
            .sum()
    }
}

/// A table the coordinator serves.
pub struct TableRuntime {
    /// The definition.
    pub def: TableDef,
    /// The object store rooted at the table.
    pub store: Arc<dyn ObjectStore>,
    /// The Delta table; its lock is also the cycle lock (one cycle per table at a time).
    pub delta: tokio::sync::Mutex<DeltaTable>,
    /// Staged, unapplied changes.
    pub pending: Mutex<Pending>,
    /// Queue of the group-commit stager.
    pub stager: mpsc::Sender<StageRequest>,
    /// Wakes the table's cycle loop early.
    pub wake: Notify,
    /// Paused tables run no cycles.
    pub paused: AtomicBool,
    /// The most recent cycle.
    pub last_cycle: Mutex<Option<CycleRecord>>,
    /// Ids of persisted cycle records, newest first (to bound them).
    pub history_ids: Mutex<VecDeque<String>>,
    /// Idempotent-ingest producers seen in this term: their last staged or applied batch.
    pub producers: Mutex<HashMap<String, ProducerState>>,
    /// Turns true when this runtime is replaced (schema change): its loops end.
    pub closed: tokio::sync::watch::Sender<bool>,
}

impl TableRuntime {
    /// Builds the runtime (the stager is started by the caller with the receiver).
    pub fn new(
        def: TableDef,
        store: Arc<dyn ObjectStore>,
        delta: DeltaTable,
        stager: mpsc::Sender<StageRequest>,
    ) -> Arc<Self> {
        Arc::new(TableRuntime {
            def,
            store,
            delta: tokio::sync::Mutex::new(delta),
            pending: Mutex::new(Pending::default()),
            stager,
            wake: Notify::new(),
            paused: AtomicBool::new(false),
            last_cycle: Mutex::new(None),
            history_ids: Mutex::new(VecDeque::new()),
            producers: Mutex::new(HashMap::new()),
            closed: tokio::sync::watch::channel(false).0,
        })
    }
}

/// A validated batch waiting to be staged.
pub struct StageRequest {
    /// Changes in change-schema form.
    pub batch: RecordBatch,
    /// Gets the batch's sequence number once durable.
    pub reply: oneshot::Sender<Result<Staged>>,
    /// A sequence chosen by the source (a CDC source's commit LSN); a batch whose sequence
    /// is below the next one was staged before and is acknowledged without staging again.
    pub sequence: Option<u64>,
    /// When the change happened at its origin (a source transaction's commit time, ms since
    /// the epoch): freshness is measured from here instead of from the acknowledgement.
    pub origin_ms: Option<i64>,
    /// The producer's id and its sequence for this batch (idempotent ingest).
    pub producer: Option<(String, u64)>,
    /// A chunk of a source transaction that continues in later requests.
    pub open: bool,
}

/// The answer to a staged batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Staged {
    /// Its staging sequence (0 for a duplicate whose sequence is no longer known).
    pub sequence: u64,
    /// It was staged before (same source sequence or same producer sequence); nothing new
    /// was staged.
    pub duplicate: bool,
}

/// What the stager knows of a producer: its last staged (or applied) sequence and the
/// staging sequence that batch got (0 when only the Delta log's txn told).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerState {
    /// The producer's last sequence staged or applied.
    pub last: u64,
    /// The staging sequence of that batch (0: unknown).
    pub sequence: u64,
}
