//! Freshet's error type, and its one mapping to gRPC status codes.

use tonic::{Code, Status};

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of Freshet's libraries. Each names the table, file or row it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A batch of changes (or any request) is malformed; nothing was changed.
    #[error("invalid input for table '{table}': {message}")]
    InvalidInput { table: String, message: String },
    /// A batch is larger than the configured limits; nothing was staged.
    #[error("batch for table '{table}' too large: {message}")]
    TooLarge { table: String, message: String },
    /// Too much is staged and not yet applied; the client should retry later.
    #[error("table '{table}' is over its pending-changes limit ({message}); retry later")]
    Backpressure { table: String, message: String },
    /// A table definition is inconsistent.
    #[error("invalid table definition '{table}': {message}")]
    InvalidTable { table: String, message: String },
    /// No such table.
    #[error("no table named '{0}'")]
    TableNotFound(String),
    /// A table of that name exists already.
    #[error("table '{0}' exists already")]
    TableExists(String),
    /// No such cycle.
    #[error("no cycle with id '{0}'")]
    CycleNotFound(String),
    /// No such source.
    #[error("source '{0}' not found")]
    SourceNotFound(String),
    /// Configuration is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// A source definition is wrong or its database refuses it; nothing was changed.
    #[error("source '{name}': {message}")]
    InvalidSource { name: String, message: String },
    /// Reading or writing the Delta log failed.
    #[error("delta table '{table}': {source}")]
    Delta {
        table: String,
        #[source]
        source: deltalake::DeltaTableError,
    },
    /// Another writer committed first; the cycle must re-plan.
    #[error("delta table '{table}': concurrent commit, cycle will re-plan: {message}")]
    CommitConflict { table: String, message: String },
    /// Object storage failed.
    #[error("object store ({path}): {source}")]
    ObjectStore {
        path: String,
        #[source]
        source: object_store::Error,
    },
    /// Arrow or Parquet failed while processing data.
    #[error("{context}: {message}")]
    Data { context: String, message: String },
    /// A remote call failed.
    #[error("{context}: {status}")]
    Rpc {
        context: String,
        #[source]
        status: Status,
    },
    /// The coordinator is shutting down or not serving.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// This coordinator is not the leader; the leader's address is given when known.
    #[error("this coordinator is not the leader; {}", match .leader { Some(l) => format!("the leader is at {l}"), None => "no leader is elected yet".to_string() })]
    NotLeader { leader: Option<String> },
    /// A producer's batch sequence skips ahead of what was staged (a batch is missing).
    #[error("out of order: {0}")]
    OutOfOrder(String),
    /// Leadership was lost while working; nothing more is committed or acknowledged.
    #[error("leadership lost: {0}")]
    LeadershipLost(String),
    /// A deliberately injected crash point was hit (tests only).
    #[error("injected failure at {0}")]
    Injected(String),
    /// A table URI lies outside `storage.allowed_prefixes`; nothing was read or written.
    #[error("table '{table}': uri '{uri}' is not allowed: {message}")]
    UriNotAllowed {
        table: String,
        uri: String,
        message: String,
    },
    /// A request claims an authority (say, a leader epoch) that could not be verified; it
    /// changed nothing.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The caller sent no credentials, or credentials that prove nothing.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Builds a [`Error::Data`] from any displayable error.
    pub fn data(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Error::Data {
            context: context.into(),
            message: err.to_string(),
        }
    }

    /// Builds an [`Error::InvalidInput`].
    pub fn invalid(table: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidInput {
            table: table.into(),
            message: message.into(),
        }
    }

    /// Builds an [`Error::Delta`].
    pub fn delta(table: impl Into<String>, source: deltalake::DeltaTableError) -> Self {
        Error::Delta {
            table: table.into(),
            source,
        }
    }

    /// Builds an [`Error::ObjectStore`].
    pub fn store(path: impl std::fmt::Display, source: object_store::Error) -> Self {
        Error::ObjectStore {
            path: path.to_string(),
            source,
        }
    }

    /// The gRPC code for this error: the one place errors meet status codes.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidInput { .. }
            | Error::InvalidTable { .. }
            | Error::InvalidSource { .. }
            | Error::Config(_) => Code::InvalidArgument,
            Error::TooLarge { .. } | Error::Backpressure { .. } => Code::ResourceExhausted,
            Error::TableNotFound(_) | Error::CycleNotFound(_) | Error::SourceNotFound(_) => {
                Code::NotFound
            }
            Error::TableExists(_) => Code::AlreadyExists,
            Error::OutOfOrder(_) => Code::FailedPrecondition,
            Error::UriNotAllowed { .. } | Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::CommitConflict { .. } => Code::Aborted,
            Error::Unavailable(_) | Error::NotLeader { .. } | Error::LeadershipLost(_) => {
                Code::Unavailable
            }
            Error::Rpc { status, .. } => status.code(),
            Error::Delta { .. }
            | Error::ObjectStore { .. }
            | Error::Data { .. }
            | Error::Injected(_)
            | Error::Internal(_) => Code::Internal,
        }
    }
}

/// gRPC metadata key naming the leader's address on a follower's UNAVAILABLE answer.
pub const LEADER_METADATA: &str = "freshet-leader";

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let mut status = Status::new(err.code(), err.to_string());
        if let Error::NotLeader {
            leader: Some(leader),
        } = &err
        {
            if let Ok(v) = leader.parse() {
                status.metadata_mut().insert(LEADER_METADATA, v);
            }
        }
        status
    }
}
