//! The worker's Prometheus metrics.

use freshet_common::error::{Error, Result};
use freshet_proto::worker::v1::RewriteResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of a task's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok`, `error` or `refused` (stale epoch, draining).
    pub outcome: String,
}

/// Counters and gauges of one worker.
#[derive(Clone)]
pub struct WorkerMetrics {
    /// Tasks by outcome.
    pub tasks: Family<OutcomeLabel, Counter>,
    /// Tasks running now.
    pub in_flight: Gauge,
    /// Bytes of input files read.
    pub bytes_read: Counter,
    /// Bytes of output files written.
    pub bytes_written: Counter,
    /// Task duration in seconds.
    pub task_seconds: Histogram,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            tasks: Family::default(),
            in_flight: Gauge::default(),
            bytes_read: Counter::default(),
            bytes_written: Counter::default(),
            task_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
        }
    }
}

impl WorkerMetrics {
    /// Registers every metric under the `freshet_worker` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("freshet_worker");
        r.register("tasks", "Rewrite tasks by outcome", self.tasks.clone());
        r.register(
            "tasks_in_flight",
            "Tasks running now",
            self.in_flight.clone(),
        );
        r.register(
            "read_bytes",
            "Bytes of input files read",
            self.bytes_read.clone(),
        );
        r.register(
            "written_bytes",
            "Bytes of output files written",
            self.bytes_written.clone(),
        );
        r.register(
            "task_duration_seconds",
            "Rewrite task duration",
            self.task_seconds.clone(),
        );
    }

    /// Counts one finished task.
    pub fn observe(&self, result: &Result<RewriteResponse>) {
        let outcome = match result {
            Ok(r) => {
                self.bytes_read.inc_by(r.bytes_read);
                self.bytes_written.inc_by(r.bytes_written);
                self.task_seconds.observe(r.duration_ms as f64 / 1000.0);
                "ok"
            }
            Err(Error::Unavailable(_)) => "refused",
            Err(_) => "error",
        };
        self.tasks
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }
}
