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
    /// No connection to PostgreSQL: the network, TLS (the server's certificate, a server
    /// without TLS when the source requires it) or a refused authentication method.
    #[error("source '{name}': connecting to {host}: {message}")]
    Connect {
        name: String,
        host: String,
        message: String,
    },
    /// PostgreSQL answered with an error (shown with the server's message: tokio-postgres
    /// shows only "db error").
    #[error("postgres ({context}): {}", describe(source))]
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

/// A tokio-postgres error with its cause: the server's severity, code, message and detail.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut m = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(d) = db.detail() {
                m.push_str(&format!(" ({d})"));
            }
            m
        }
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
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
