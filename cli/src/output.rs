//! Printing: tables for people, JSON (`-o json`) for programs.

use clap::ValueEnum;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use freshet_proto::admin::v1::{CycleRecord, TableInfo};
use serde_json::{Value, json};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    /// A table.
    #[default]
    Table,
    /// JSON.
    Json,
    /// CSV (query only).
    Csv,
}

/// A text table with the given header.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(header.to_vec());
    t
}

/// Human-readable bytes.
pub fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// A cycle as JSON.
pub fn cycle_json(c: &CycleRecord) -> Value {
    json!({
        "id": c.id, "table": c.table, "state": c.state, "error": c.error,
        "started_at_ms": c.started_at_ms, "duration_ms": c.duration_ms,
        "phases": c.phases.iter().map(|p| json!({"name": p.name, "duration_us": p.duration_us})).collect::<Vec<_>>(),
        "first_sequence": c.first_sequence, "last_sequence": c.last_sequence,
        "changes": c.changes, "keys": c.keys,
        "files_total": c.files_total, "files_considered": c.files_considered, "files_pruned": c.files_pruned,
        "files_rewritten": c.files_rewritten, "files_added": c.files_added,
        "rows_inserted": c.rows_inserted, "rows_updated": c.rows_updated, "rows_deleted": c.rows_deleted,
        "bytes_read": c.bytes_read, "bytes_written": c.bytes_written,
        "write_amplification": c.write_amplification, "delta_version": c.delta_version,
        "freshness_lag_ms": c.freshness_lag_ms,
        "epoch": c.epoch,
        "coordinator": c.coordinator,
        "tasks": c.tasks.iter().map(|t| json!({
            "task_id": t.task_id, "worker": t.worker, "input_files": t.input_files, "output_files": t.output_files,
            "changes": t.changes, "rows_read": t.rows_read, "rows_written": t.rows_written,
            "bytes_read": t.bytes_read, "bytes_written": t.bytes_written, "duration_ms": t.duration_ms,
            "attempts": t.attempts, "errors": t.errors,
            "mode": t.mode, "mode_reason": t.mode_reason, "files_with_new_deletions": t.files_with_new_deletions,
            "rewritten_files": t.rewritten_files,
        })).collect::<Vec<_>>(),
    })
}

/// A table as JSON.
pub fn table_json(t: &TableInfo) -> Value {
    json!({
        "name": t.name, "uri": t.uri, "schema": serde_json::from_str::<Value>(&t.schema_json).unwrap_or(Value::Null),
        "primary_key": t.primary_key, "partition_columns": t.partition_columns,
        "target_file_size": t.target_file_size, "version": t.version, "num_files": t.num_files,
        "total_bytes": t.total_bytes, "total_rows": t.total_rows, "pending_changes": t.pending_changes,
        "pending_bytes": t.pending_bytes, "applied_sequence": t.applied_sequence, "paused": t.paused,
        "freshness_p50_ms": t.freshness_p50_ms, "freshness_p99_ms": t.freshness_p99_ms,
        "freshness_window": t.freshness_window,
        "merge_mode": t.merge_mode, "deletion_vectors": t.deletion_vectors, "deleted_rows": t.deleted_rows,
        "last_cycle": t.last_cycle.as_ref().map(cycle_json),
    })
}

/// One line per cycle, as `freshet dev` prints them.
pub fn cycle_line(c: &CycleRecord) -> String {
    if c.state() == freshet_proto::admin::v1::CycleState::Failed {
        return format!(
            "cycle {} {} FAILED after {} ms: {}",
            &c.id[c.id.len() - 8..],
            c.table,
            c.duration_ms,
            c.error
        );
    }
    format!(
        "v{:<5} {:<8} files {:>3}/{:<4} rewritten  +{:<6} ~{:<6} -{:<6} rows  {:>10} written  cycle {:>5} ms  lag {:>5} ms",
        c.delta_version,
        c.table,
        c.files_rewritten,
        c.files_total,
        c.rows_inserted,
        c.rows_updated,
        c.rows_deleted,
        bytes(c.bytes_written),
        c.duration_ms,
        c.freshness_lag_ms
    )
}
