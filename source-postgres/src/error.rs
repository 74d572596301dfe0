//! The source's errors, each naming the source, table or value it is about.

/// Result with [`SourceError`].
pub type Result<T, E = SourceError> = std::result::Result<T, E>;

/// What can go wrong reading PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source's configuration is wrong.
    #[error("source configuration: {0}")]
    Config(String),
    /// A table cannot be mirrored (no primary key, unsupported shape).
    #[error("table '{table}': {message}")]
    Table { table: String, message: String },
    /// PostgreSQL answered with an error.
    #[error("postgres ({context}): {source}")]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The replication connection failed or ended.
    #[error("replication connection ({context}): {source}")]
    Replication {
        context: String,
        #[source]
        source: pgwire_replication::PgWireError,
    },
    /// A replication message could not be decoded.
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// A value could not be converted.
    #[error("table '{table}', column '{column}': {message}")]
    Value {
        table: String,
        column: String,
        message: String,
    },
    /// Staging into Freshet failed.
    #[error("freshet: {0}")]
    Freshet(#[from] freshet_common::error::Error),
}

impl SourceError {
    /// Wraps a PostgreSQL error with what was being done.
    pub fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
        let context = context.into();
        move |source| SourceError::Postgres { context, source }
    }

    /// Wraps a replication connection error with what was being done.
    pub fn repl(
        context: impl Into<String>,
    ) -> impl FnOnce(pgwire_replication::PgWireError) -> SourceError {
        let context = context.into();
        move |source| SourceError::Replication { context, source }
    }
}
