//! The Freshet coordinator: validates and stages ingested changes, runs each table's merge
//! cycle (plan, dispatch to workers, one Delta commit), and serves the ingest and admin APIs.
//!
//! A term (`term`) is one leader's coordinator; its jobs live in their own modules
//! (`lifecycle`, `ingest`, `sources`, `source_ops`, `history`), and the cycle (`cycle`,
//! `planner`, `router`, `commit`) and the stager (`stage`) see only the term's
//! [`TermContext`].

pub mod access;
pub mod catalog;
pub mod commit;
pub mod compaction;
pub mod context;
pub mod cost;
pub mod cycle;
pub mod election;
pub mod explain;
pub mod fence;
pub mod fenced_store;
pub mod flight;
pub mod fresh_read;
pub mod grpc;
pub mod history;
pub mod ingest;
pub mod lifecycle;
pub mod maintenance;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod orphans;
pub mod planner;
pub mod process;
pub mod recovery;
pub mod router;
pub mod sink;
pub mod source_metrics;
pub mod source_ops;
pub mod sources;
pub mod stage;
pub mod tables;
pub mod term;
pub mod testing;
pub mod validate;

pub use context::TermContext;
pub use sources::{Source, SourceFactory, SourceOrigin};
pub use term::{Coordinator, StartOptions};
pub use testing::CrashPoint;
