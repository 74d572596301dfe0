//! `freshet admin ...`: tables and cycles through the admin API (never joins the cluster).

use anyhow::Context;
use clap::Subcommand;
use freshet_proto::admin::v1::admin_service_client::AdminServiceClient;
use freshet_proto::admin::v1::*;

use crate::output::{Format, bytes, cycle_json, table, table_json};

#[derive(Subcommand)]
pub enum AdminCommand {
    /// List tables.
    Tables {
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// List recent cycles, newest first.
    Cycles {
        /// Only this table's cycles.
        #[arg(long)]
        table: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Show one cycle with its phases and tasks.
    Cycle {
        /// The cycle id.
        id: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Run a cycle of a table now.
    Trigger {
        /// The table.
        table: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// List workers: address, capacity, tasks in flight, last heartbeat.
    Workers {
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Show what a table's next cycle would do with what is pending now (nothing is
    /// written): files touched and pruned, bytes, tasks and their workers.
    Explain {
        /// The table.
        table: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Show the current leader and its epoch.
    Leader {
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Follow cycles live as they end (Ctrl-C to stop).
    Watch {
        /// Only this table's cycles.
        #[arg(long)]
        table: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Pause a table's cycles (changes are still staged).
    Pause {
        /// The table.
        table: String,
    },
    /// Resume a paused table.
    Resume {
        /// The table.
        table: String,
    },
    /// Show table maintenance: settings and the last runs (checkpoints, expired log
    /// entries removed, files vacuumed, bytes freed, errors).
    Maintenance {
        /// Only this table (default: every table).
        table: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
}

impl AdminCommand {
    /// Commands any coordinator answers (no need to find the leader).
    pub fn any_coordinator(&self) -> bool {
        matches!(self, AdminCommand::Leader { .. })
    }
}

/// The leader's endpoint when `endpoint` is a follower that names one, else `endpoint`.
pub async fn leader_endpoint(endpoint: &str) -> String {
    let Ok(mut c) = client(endpoint).await else {
        return endpoint.to_string();
    };
    match c.get_leader(GetLeaderRequest {}).await {
        Ok(r) => {
            let r = r.into_inner();
            if !r.is_leader && !r.leader.is_empty() && r.leader != endpoint {
                eprintln!("{endpoint} is a follower; using the leader at {}", r.leader);
                r.leader
            } else {
                endpoint.to_string()
            }
        }
        Err(_) => endpoint.to_string(),
    }
}

/// Connects to the admin API.
pub async fn client(endpoint: &str) -> anyhow::Result<AdminServiceClient<crate::Conn>> {
    Ok(AdminServiceClient::new(crate::channel(endpoint).await?))
}

pub async fn run(endpoint: &str, cmd: AdminCommand) -> anyhow::Result<()> {
    let mut c = client(endpoint).await?;
    match cmd {
        AdminCommand::Tables { output } => {
            let tables = c
                .list_tables(ListTablesRequest {})
                .await?
                .into_inner()
                .tables;
            if output == Format::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &tables.iter().map(table_json).collect::<Vec<_>>()
                    )?
                );
            } else {
                let mut t = table(&[
                    "table",
                    "version",
                    "files",
                    "bytes",
                    "rows",
                    "pending",
                    "fresh p50/p99 ms",
                    "applied seq",
                    "key",
                    "partitions",
                    "uri",
                ]);
                for x in &tables {
                    t.add_row(vec![
                        x.name.clone(),
                        x.version.to_string(),
                        x.num_files.to_string(),
                        bytes(x.total_bytes),
                        x.total_rows.to_string(),
                        x.pending_changes.to_string(),
                        format!("{}/{}", x.freshness_p50_ms, x.freshness_p99_ms),
                        x.applied_sequence.to_string(),
                        x.primary_key.join(","),
                        x.partition_columns.join(","),
                        x.uri.clone(),
                    ]);
                }
                println!("{t}");
            }
        }
        AdminCommand::Cycles {
            table: tname,
            limit,
            output,
        } => {
            let cycles = c
                .list_cycles(ListCyclesRequest {
                    table: tname.unwrap_or_default(),
                    limit,
                })
                .await?
                .into_inner()
                .cycles;
            if output == Format::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &cycles.iter().map(cycle_json).collect::<Vec<_>>()
                    )?
                );
            } else {
                let mut t = table(&[
                    "cycle",
                    "table",
                    "state",
                    "version",
                    "changes",
                    "files rewritten",
                    "+/~/- rows",
                    "written",
                    "ms",
                    "lag ms",
                ]);
                for x in &cycles {
                    t.add_row(vec![
                        x.id.clone(),
                        x.table.clone(),
                        x.state.clone(),
                        x.delta_version.to_string(),
                        x.changes.to_string(),
                        format!("{}/{}", x.files_rewritten, x.files_total),
                        format!("{}/{}/{}", x.rows_inserted, x.rows_updated, x.rows_deleted),
                        bytes(x.bytes_written),
                        x.duration_ms.to_string(),
                        x.freshness_lag_ms.to_string(),
                    ]);
                }
                println!("{t}");
            }
        }
        AdminCommand::Cycle { id, output } => {
            let cycle = c
                .get_cycle(GetCycleRequest { id })
                .await?
                .into_inner()
                .cycle
                .context("no cycle in reply")?;
            print_cycle(&cycle, output)?;
        }
        AdminCommand::Trigger {
            table: tname,
            output,
        } => {
            let cycle = c
                .trigger_cycle(TriggerCycleRequest { table: tname })
                .await?
                .into_inner()
                .cycle
                .context("no cycle in reply")?;
            print_cycle(&cycle, output)?;
        }
        AdminCommand::Workers { output } => {
            let workers = c
                .list_workers(ListWorkersRequest {})
                .await?
                .into_inner()
                .workers;
            let now = chrono::Utc::now().timestamp_millis();
            if output == Format::Json {
                let v: Vec<_> = workers
                    .iter()
                    .map(|w| {
                        serde_json::json!({
                            "id": w.id, "address": w.address, "capacity": w.capacity,
                            "tasks_in_flight": w.tasks_in_flight, "last_heartbeat_ms": w.last_heartbeat_ms,
                            "tasks_sent": w.tasks_sent, "tasks_failed": w.tasks_failed,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let mut t = table(&[
                    "worker",
                    "address",
                    "capacity",
                    "in flight",
                    "heartbeat",
                    "tasks sent",
                    "failed",
                ]);
                for w in &workers {
                    t.add_row(vec![
                        w.id.clone(),
                        w.address.clone(),
                        w.capacity.to_string(),
                        w.tasks_in_flight.to_string(),
                        if w.last_heartbeat_ms > 0 {
                            format!("{:.1} s ago", (now - w.last_heartbeat_ms) as f64 / 1000.0)
                        } else {
                            "static".into()
                        },
                        w.tasks_sent.to_string(),
                        w.tasks_failed.to_string(),
                    ]);
                }
                println!("{t}");
            }
        }
        AdminCommand::Explain {
            table: name,
            output,
        } => {
            let e = c
                .explain_cycle(ExplainCycleRequest { table: name })
                .await?
                .into_inner();
            if output == Format::Json {
                println!("{}", serde_json::to_string_pretty(&explain_json(&e))?);
            } else {
                print_explain(&e);
            }
        }
        AdminCommand::Leader { output } => {
            let l = c.get_leader(GetLeaderRequest {}).await?.into_inner();
            if output == Format::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "leader": l.leader, "epoch": l.epoch, "node_id": l.node_id,
                        "node_address": l.node_address, "is_leader": l.is_leader,
                        "leader_changes": l.leader_changes,
                    }))?
                );
            } else if l.leader.is_empty() {
                println!(
                    "no leader elected (asked {} at {})",
                    l.node_id, l.node_address
                );
            } else {
                println!("leader: {} (epoch {})", l.leader, l.epoch);
                println!(
                    "asked:  {} at {} ({}); leader changes seen: {}",
                    l.node_id,
                    l.node_address,
                    if l.is_leader {
                        "the leader"
                    } else {
                        "a follower"
                    },
                    l.leader_changes
                );
            }
        }
        AdminCommand::Watch {
            table: tname,
            output,
        } => {
            let mut stream = c
                .watch_cycles(WatchCyclesRequest {
                    table: tname.unwrap_or_default(),
                })
                .await?
                .into_inner();
            eprintln!("watching cycles at {endpoint} (Ctrl-C to stop)");
            while let Some(x) = stream.message().await? {
                if output == Format::Json {
                    println!("{}", serde_json::to_string(&cycle_json(&x))?);
                } else {
                    let at = chrono::DateTime::from_timestamp_millis(x.started_at_ms)
                        .map(|d| d.format("%H:%M:%S%.3f").to_string())
                        .unwrap_or_default();
                    println!(
                        "{at} {} {} v{} {} changes, {}/{} files, wrote {}, {} ms, lag {} ms, epoch {}{}",
                        x.table,
                        x.state,
                        x.delta_version,
                        x.changes,
                        x.files_rewritten,
                        x.files_total,
                        bytes(x.bytes_written),
                        x.duration_ms,
                        x.freshness_lag_ms,
                        x.epoch,
                        if x.error.is_empty() {
                            String::new()
                        } else {
                            format!(" error: {}", x.error)
                        }
                    );
                }
            }
        }
        AdminCommand::Pause { table: tname } => {
            c.pause_table(PauseTableRequest {
                table: tname.clone(),
            })
            .await?;
            println!("table {tname} paused");
        }
        AdminCommand::Resume { table: tname } => {
            c.resume_table(ResumeTableRequest {
                table: tname.clone(),
            })
            .await?;
            println!("table {tname} resumed");
        }
        AdminCommand::Maintenance {
            table: tname,
            output,
        } => {
            let tables = c
                .get_maintenance(GetMaintenanceRequest {
                    table: tname.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .tables;
            print_maintenance(&tables, output)?;
        }
    }
    Ok(())
}

fn maintenance_run_json(r: &MaintenanceRun) -> serde_json::Value {
    serde_json::json!({
        "started_at_ms": r.started_at_ms, "duration_ms": r.duration_ms,
        "table_version": r.table_version, "checkpoint_version": r.checkpoint_version,
        "checkpoint_written": r.checkpoint_written, "log_entries_removed": r.log_entries_removed,
        "files_vacuumed": r.files_vacuumed, "bytes_freed": r.bytes_freed,
        "properties_set": r.properties_set, "error": r.error, "epoch": r.epoch,
    })
}

fn print_maintenance(tables: &[TableMaintenance], output: Format) -> anyhow::Result<()> {
    if output == Format::Json {
        let v: Vec<_> = tables
            .iter()
            .map(|m| {
                serde_json::json!({
                    "table": m.table, "interval_ms": m.interval_ms,
                    "checkpoint_interval": m.checkpoint_interval,
                    "log_retention_ms": m.log_retention_ms,
                    "deleted_file_retention_ms": m.deleted_file_retention_ms,
                    "files_vacuumed_total": m.files_vacuumed_total,
                    "bytes_freed_total": m.bytes_freed_total,
                    "runs": m.runs.iter().map(maintenance_run_json).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let hours = |ms: u64| format!("{:.1} h", ms as f64 / 3_600_000.0);
    for m in tables {
        println!(
            "table {}: every {} ms; checkpoint every {} commits, log retention {}, deleted-file retention {}; vacuumed {} files, {} since the term began",
            m.table,
            m.interval_ms,
            m.checkpoint_interval,
            hours(m.log_retention_ms),
            hours(m.deleted_file_retention_ms),
            m.files_vacuumed_total,
            bytes(m.bytes_freed_total)
        );
        let mut t = table(&[
            "at",
            "ms",
            "version",
            "checkpoint",
            "log removed",
            "vacuumed",
            "freed",
            "error",
        ]);
        for r in &m.runs {
            let at = chrono::DateTime::from_timestamp_millis(r.started_at_ms)
                .map(|d| d.format("%H:%M:%S%.3f").to_string())
                .unwrap_or_default();
            t.add_row(vec![
                at,
                r.duration_ms.to_string(),
                r.table_version.to_string(),
                match (r.checkpoint_version, r.checkpoint_written) {
                    (-1, _) => "none".into(),
                    (v, true) => format!("{v} (written)"),
                    (v, false) => v.to_string(),
                },
                r.log_entries_removed.to_string(),
                r.files_vacuumed.to_string(),
                bytes(r.bytes_freed),
                r.error.clone(),
            ]);
        }
        println!("{t}");
    }
    Ok(())
}

fn print_cycle(c: &CycleRecord, output: Format) -> anyhow::Result<()> {
    if output == Format::Json {
        println!("{}", serde_json::to_string_pretty(&cycle_json(c))?);
        return Ok(());
    }
    println!(
        "cycle {} of table {}: {} (Delta version {})",
        c.id, c.table, c.state, c.delta_version
    );
    if !c.error.is_empty() {
        println!("error: {}", c.error);
    }
    println!(
        "sequences {}..={}, {} changes on {} keys; files considered {}, pruned {}, rewritten {} of {}, added {}",
        c.first_sequence,
        c.last_sequence,
        c.changes,
        c.keys,
        c.files_considered,
        c.files_pruned,
        c.files_rewritten,
        c.files_total,
        c.files_added
    );
    println!(
        "rows +{} ~{} -{}; read {}, wrote {}, write amplification {:.2}; {} ms, freshness lag {} ms",
        c.rows_inserted,
        c.rows_updated,
        c.rows_deleted,
        bytes(c.bytes_read),
        bytes(c.bytes_written),
        c.write_amplification,
        c.duration_ms,
        c.freshness_lag_ms
    );
    let mut t = table(&["phase", "ms"]);
    for p in &c.phases {
        t.add_row(vec![
            p.name.clone(),
            format!("{:.1}", p.duration_us as f64 / 1000.0),
        ]);
    }
    println!("{t}");
    let mut t = table(&[
        "task",
        "worker",
        "inputs",
        "outputs",
        "changes",
        "rows read",
        "rows written",
        "written",
        "ms",
        "attempts",
    ]);
    for x in &c.tasks {
        t.add_row(vec![
            x.task_id.to_string(),
            x.worker.clone(),
            x.input_files.join("\n"),
            x.output_files.len().to_string(),
            x.changes.to_string(),
            x.rows_read.to_string(),
            x.rows_written.to_string(),
            bytes(x.bytes_written),
            x.duration_ms.to_string(),
            x.attempts.to_string(),
        ]);
    }
    println!("{t}");
    Ok(())
}

/// An explained cycle as JSON (snake_case keys, as the proto fields).
fn explain_json(e: &ExplainCycleResponse) -> serde_json::Value {
    serde_json::json!({
        "table": e.table, "note": e.note, "segments": e.segments,
        "segments_left": e.segments_left, "first_sequence": e.first_sequence,
        "last_sequence": e.last_sequence, "changes": e.changes, "keys": e.keys,
        "files_total": e.files_total,
        "files_untouched_partitions": e.files_untouched_partitions,
        "files_pruned_by_range": e.files_pruned_by_range,
        "files_to_rewrite": e.files_to_rewrite, "bytes_to_read": e.bytes_to_read,
        "bytes_to_write_estimate": e.bytes_to_write_estimate, "rounds": e.rounds,
        "tasks": e.tasks.iter().map(|t| serde_json::json!({
            "partition": t.partition, "inputs": t.inputs, "input_bytes": t.input_bytes,
            "changes": t.changes, "worker": t.worker, "mode": t.mode, "mode_reason": t.mode_reason,
        })).collect::<Vec<_>>(),
    })
}

fn print_explain(e: &ExplainCycleResponse) {
    if !e.note.is_empty() {
        println!("{}: {}", e.table, e.note);
        if e.segments == 0 {
            return;
        }
    }
    println!(
        "{}: next cycle takes {} segment(s) (sequences {}..={}), {} changes on {} keys{}",
        e.table,
        e.segments,
        e.first_sequence,
        e.last_sequence,
        e.changes,
        e.keys,
        if e.segments_left > 0 {
            format!("; {} segment(s) left for later cycles", e.segments_left)
        } else {
            String::new()
        }
    );
    println!(
        "files: {} in the table, {} pruned (partition not touched), {} pruned (no changed key in range), {} to rewrite",
        e.files_total, e.files_untouched_partitions, e.files_pruned_by_range, e.files_to_rewrite
    );
    println!(
        "bytes: {} to read, about {} to write{}",
        bytes(e.bytes_to_read),
        bytes(e.bytes_to_write_estimate),
        if e.rounds > 1 {
            format!(" (first of {} rounds)", e.rounds)
        } else {
            String::new()
        }
    );
    let mut t = table(&[
        "task",
        "partition",
        "inputs",
        "input bytes",
        "changes",
        "worker",
        "mode",
        "why",
    ]);
    for (i, x) in e.tasks.iter().enumerate() {
        t.add_row(vec![
            i.to_string(),
            if x.partition.is_empty() {
                "-".into()
            } else {
                x.partition.clone()
            },
            x.inputs.len().to_string(),
            bytes(x.input_bytes),
            x.changes.to_string(),
            x.worker.clone(),
            x.mode.clone(),
            x.mode_reason.clone(),
        ]);
    }
    println!("{t}");
}
