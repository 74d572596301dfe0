//! The coordinator's Prometheus metrics. One set per process, shared by every leadership
//! term, registered under `freshet_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// A table label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    /// Table name.
    pub table: String,
}

/// A table and cycle-state label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CycleLabel {
    /// Table name.
    pub table: String,
    /// `committed` or `failed`.
    pub state: String,
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

/// Every coordinator metric.
pub struct CoordinatorMetrics {
    /// Cycle wall time by table and outcome.
    pub cycle_seconds: Family<CycleLabel, Histogram, fn() -> Histogram>,
    /// Time from acknowledgement of the oldest applied change to its commit.
    pub freshness_seconds: Family<TableLabel, Histogram, fn() -> Histogram>,
    /// Freshness lag of the last committed cycle.
    pub freshness_lag: Family<TableLabel, Gauge<f64, AtomicU64>>,
    /// Changes staged and not yet applied.
    pub pending_changes: Family<TableLabel, Gauge>,
    /// Bytes staged and not yet applied.
    pub pending_bytes: Family<TableLabel, Gauge>,
    /// Files removed by commits (rewritten).
    pub files_rewritten: Family<TableLabel, Counter>,
    /// Bytes written by committed rewrites.
    pub bytes_written: Family<TableLabel, Counter>,
    /// Task attempts beyond the first.
    pub task_retries: Family<TableLabel, Counter>,
    /// Workers known.
    pub workers: Gauge,
    /// Leader changes seen by this coordinator.
    pub leader_changes: Counter,
    /// 1 while this coordinator leads.
    pub is_leader: Gauge,
    /// Data files deleted by vacuum.
    pub vacuumed_files: Family<TableLabel, Counter>,
    /// Bytes freed by vacuum.
    pub vacuumed_bytes: Family<TableLabel, Counter>,
    /// Expired Delta log entries deleted by maintenance.
    pub log_entries_removed: Family<TableLabel, Counter>,
    /// Checkpoints written by maintenance (the commit path writes the others).
    pub checkpoints_written: Family<TableLabel, Counter>,
    /// Maintenance runs that failed (the next run tries again).
    pub maintenance_failures: Family<TableLabel, Counter>,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        CoordinatorMetrics {
            cycle_seconds: Family::new_with_constructor(seconds_histogram),
            freshness_seconds: Family::new_with_constructor(seconds_histogram),
            freshness_lag: Family::default(),
            pending_changes: Family::default(),
            pending_bytes: Family::default(),
            files_rewritten: Family::default(),
            bytes_written: Family::default(),
            task_retries: Family::default(),
            workers: Gauge::default(),
            leader_changes: Counter::default(),
            is_leader: Gauge::default(),
            vacuumed_files: Family::default(),
            vacuumed_bytes: Family::default(),
            log_entries_removed: Family::default(),
            checkpoints_written: Family::default(),
            maintenance_failures: Family::default(),
        }
    }
}

impl CoordinatorMetrics {
    /// Registers every metric under the `freshet` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("freshet");
        r.register(
            "cycle_duration_seconds",
            "Merge cycle wall time",
            self.cycle_seconds.clone(),
        );
        r.register(
            "freshness_seconds",
            "Acknowledgement to visible commit, per cycle (oldest change)",
            self.freshness_seconds.clone(),
        );
        r.register(
            "freshness_lag_seconds",
            "Freshness lag of the last committed cycle",
            self.freshness_lag.clone(),
        );
        r.register(
            "pending_changes",
            "Changes staged and not yet applied",
            self.pending_changes.clone(),
        );
        r.register(
            "pending_bytes",
            "Bytes staged and not yet applied",
            self.pending_bytes.clone(),
        );
        r.register(
            "files_rewritten",
            "Files replaced by committed cycles",
            self.files_rewritten.clone(),
        );
        r.register(
            "rewritten_bytes",
            "Bytes written by committed cycles",
            self.bytes_written.clone(),
        );
        r.register(
            "task_retries",
            "Task attempts beyond the first",
            self.task_retries.clone(),
        );
        r.register(
            "workers",
            "Workers known to this coordinator",
            self.workers.clone(),
        );
        r.register(
            "leader_changes",
            "Leader changes seen by this coordinator",
            self.leader_changes.clone(),
        );
        r.register(
            "is_leader",
            "1 while this coordinator leads",
            self.is_leader.clone(),
        );
        r.register(
            "vacuumed_files",
            "Data files deleted by vacuum (removed from the table beyond the retention)",
            self.vacuumed_files.clone(),
        );
        r.register(
            "vacuumed_bytes",
            "Bytes freed by vacuum",
            self.vacuumed_bytes.clone(),
        );
        r.register(
            "log_entries_removed",
            "Expired Delta log entries deleted by maintenance",
            self.log_entries_removed.clone(),
        );
        r.register(
            "checkpoints_written",
            "Delta checkpoints written by maintenance",
            self.checkpoints_written.clone(),
        );
        r.register(
            "maintenance_failures",
            "Maintenance runs that failed",
            self.maintenance_failures.clone(),
        );
    }

    /// Updates the pending gauges of a table.
    pub fn pending(&self, table: &str, changes: u64, bytes: u64) {
        let l = TableLabel {
            table: table.into(),
        };
        self.pending_changes.get_or_create(&l).set(changes as i64);
        self.pending_bytes.get_or_create(&l).set(bytes as i64);
    }
}
