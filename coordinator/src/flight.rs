//! Arrow Flight SQL on the coordinator's gRPC listener: read-only SQL (DataFusion) over the
//! served tables, each registered by its Freshet name (catalog `freshet`, schema `public`)
//! as a Delta table provider at its current committed version. Results stream batch by
//! batch (`execute_stream`, never collected); prepared statements (with optional positional
//! parameters `$1`, `$2`, ...), GetSqlInfo, GetCatalogs, GetDbSchemas, GetTables and
//! GetTableTypes are served so generic clients (JDBC, ADBC) work. Writes of any kind (SQL
//! DML/DDL, Flight SQL updates, bulk ingest, transactions) are refused. Every method is a
//! `read` call for the access layer (`access::classify`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionBeginTransactionRequest, ActionBeginTransactionResult,
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandPreparedStatementUpdate, CommandStatementIngest, CommandStatementQuery,
    CommandStatementSubstraitPlan, CommandStatementUpdate, DoPutPreparedStatementResult,
    ProstMessageExt, SqlInfo, SqlSupportedTransaction, TicketStatementQuery,
};
use arrow_flight::{
    FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage,
    SchemaAsIpc, Ticket,
};
use deltalake::datafusion::common::{ParamValues, ScalarValue};
use deltalake::datafusion::dataframe::DataFrame;
use deltalake::datafusion::execution::context::{SQLOptions, SessionContext};
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::fresh_read::Freshness;
use crate::node::Node;

/// The `arrow-flight` crate this module serves with, for clients in the workspace (the CLI).
pub use arrow_flight;

/// The catalog the tables are listed under (and the session's default).
pub const CATALOG: &str = crate::fresh_read::QUERY_CATALOG;
/// The schema the tables are listed under (and the session's default).
pub const SCHEMA: &str = crate::fresh_read::QUERY_SCHEMA;
/// Open prepared statements kept at most (clients that never close them cannot grow the
/// coordinator's memory without bound).
const MAX_PREPARED: usize = 10_000;

type DoGetStream = Pin<Box<dyn Stream<Item = Result<arrow_flight::FlightData, Status>> + Send>>;

/// A prepared statement: its SQL and the parameters bound last (one row).
struct Prepared {
    sql: String,
    params: Option<Vec<ScalarValue>>,
}

/// The Flight SQL service over a node's served tables.
pub struct FreshetFlightSql {
    node: Arc<Node>,
    prepared: Mutex<HashMap<String, Prepared>>,
    info: SqlInfoData,
}

/// The tonic service, with the listener's message size limits.
pub fn server(node: Arc<Node>, max: usize) -> FlightServiceServer<FreshetFlightSql> {
    FlightServiceServer::new(FreshetFlightSql::new(node))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max)
}

fn sql_info() -> SqlInfoData {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "Freshet");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    b.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(
        SqlInfo::FlightSqlServerTransaction,
        SqlSupportedTransaction::None as i32,
    );
    b.append(SqlInfo::FlightSqlServerCancel, false);
    b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    b.build().expect("static SqlInfo")
}

/// The refusal of every write.
fn read_only(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not supported: Freshet's Flight SQL endpoint is read-only \
         (INSERT/UPDATE/DELETE/MERGE, DDL and bulk ingest are refused); write through the \
         ingest API"
    ))
}

fn df_status(e: deltalake::datafusion::error::DataFusionError) -> Status {
    use deltalake::datafusion::error::DataFusionError;
    match e.find_root() {
        // Over query.max_memory_bytes: the query is too big, not malformed.
        DataFusionError::ResourcesExhausted(m) => Status::resource_exhausted(format!(
            "query failed: over the coordinator's query memory (query.max_memory_bytes): {m}"
        )),
        _ => Status::invalid_argument(format!("query failed: {e}")),
    }
}

fn schema_bytes(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let IpcMessage(b) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: arrow::error::ArrowError| Status::internal(format!("schema: {e}")))?;
    Ok(b)
}

/// Encodes batches (one or a stream) as a DoGet response.
fn respond<S>(schema: SchemaRef, batches: S) -> Response<DoGetStream>
where
    S: Stream<Item = Result<RecordBatch, FlightError>> + Send + 'static,
{
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(batches)
        .map_err(Status::from);
    Response::new(Box::pin(stream))
}

fn respond_one<E: std::fmt::Display>(
    batch: Result<RecordBatch, E>,
) -> Result<Response<DoGetStream>, Status> {
    let batch = batch.map_err(|e| Status::internal(e.to_string()))?;
    Ok(respond(
        batch.schema(),
        futures::stream::once(async move { Ok(batch) }),
    ))
}

/// A FlightInfo whose one endpoint's ticket is `ticket` (on this same server).
fn info(
    schema: &Schema,
    ticket: impl ProstMessageExt,
    descriptor: FlightDescriptor,
) -> Result<Response<FlightInfo>, Status> {
    let ticket = Ticket::new(ticket.as_any().encode_to_vec());
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Status::internal(format!("schema: {e}")))?
        .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
        .with_descriptor(descriptor);
    Ok(Response::new(info))
}

/// SQL `LIKE` patterns of the metadata calls (`%` any run, `_` one character).
fn like(pattern: Option<&str>, s: &str) -> bool {
    fn m(p: &[char], s: &[char]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some('%') => (0..=s.len()).any(|i| m(&p[1..], &s[i..])),
            Some('_') => !s.is_empty() && m(&p[1..], &s[1..]),
            Some(c) => s.first() == Some(c) && m(&p[1..], &s[1..]),
        }
    }
    match pattern {
        None => true,
        Some(p) => m(
            &p.chars().collect::<Vec<_>>(),
            &s.chars().collect::<Vec<_>>(),
        ),
    }
}

impl FreshetFlightSql {
    /// The service over `node` (its coordinator's tables; a follower answers UNAVAILABLE
    /// with the leader's address, like the admin API).
    pub fn new(node: Arc<Node>) -> Self {
        FreshetFlightSql {
            node,
            prepared: Mutex::new(HashMap::new()),
            info: sql_info(),
        }
    }

    /// A session with every served table registered as `freshness` says: the committed
    /// version (default), or with the acknowledged, not yet committed changes laid over it
    /// (`x-freshet-freshness: latest`, read-your-writes; see `fresh_read`).
    async fn session(&self, freshness: Freshness) -> Result<SessionContext, Status> {
        Ok(self.node.coordinator()?.query_session(freshness).await?)
    }

    /// Plans `sql` read-only (DML, DDL and statements such as SET are refused).
    async fn plan(&self, sql: &str, freshness: Freshness) -> Result<DataFrame, Status> {
        let ctx = self.session(freshness).await?;
        // Time travel: "table@v12" / "table@2026-12-01T10:00:00Z" in the query.
        self.node
            .coordinator()?
            .register_time_travel(&ctx, sql)
            .await?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        ctx.sql_with_options(sql, options).await.map_err(|e| {
            let msg = e.to_string();
            if msg.contains("not supported") && (msg.contains("DML") || msg.contains("DDL"))
                || msg.contains("Statement not supported")
            {
                read_only(&format!("this statement ({})", msg.trim()))
            } else {
                df_status(e)
            }
        })
    }

    /// Plans and streams `sql` (with parameters, when bound).
    async fn execute(
        &self,
        sql: &str,
        params: Option<Vec<ScalarValue>>,
        freshness: Freshness,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut df = self.plan(sql, freshness).await?;
        if let Some(p) = params {
            df = df
                .with_param_values(ParamValues::from(p))
                .map_err(df_status)?;
        }
        let stream = df.execute_stream().await.map_err(df_status)?;
        let schema = stream.schema();
        let batches = stream.map_err(|e| FlightError::Tonic(Box::new(df_status(e))));
        // A panic inside the query engine ends this query with an error, not a reset stream
        // (CatchUnwind ends the stream after it).
        let batches = std::panic::AssertUnwindSafe(batches)
            .catch_unwind()
            .map(|item| match item {
                Ok(item) => item,
                Err(_) => Err(FlightError::Tonic(Box::new(Status::internal(
                    "query failed: the query engine panicked (see the coordinator's log)",
                )))),
            });
        Ok(respond(schema, batches))
    }

    fn prepared_sql(&self, handle: &[u8]) -> Result<(String, Option<Vec<ScalarValue>>), Status> {
        let key = std::str::from_utf8(handle)
            .map_err(|_| Status::invalid_argument("malformed prepared statement handle"))?;
        let p = self.prepared.lock().expect("lock");
        let s = p
            .get(key)
            .ok_or_else(|| Status::not_found(format!("no prepared statement '{key}'")))?;
        Ok((s.sql.clone(), s.params.clone()))
    }
}

/// The parameter schema of a plan: `$1`, `$2`, ... in order (Null when unknown).
fn parameter_schema(df: &DataFrame) -> Result<Schema, Status> {
    let types = df.logical_plan().get_parameter_types().map_err(df_status)?;
    let mut names: Vec<_> = types.into_iter().collect();
    names.sort_by_key(|(n, _)| {
        (
            n.trim_start_matches('$').parse::<u64>().unwrap_or(u64::MAX),
            n.clone(),
        )
    });
    Ok(Schema::new(
        names
            .into_iter()
            .map(|(n, t)| Field::new(n, t.unwrap_or(DataType::Null), true))
            .collect::<Vec<_>>(),
    ))
}

#[tonic::async_trait]
impl FlightSqlService for FreshetFlightSql {
    type FlightService = FreshetFlightSql;

    /// Authentication is the access layer's (a bearer token on every call): the handshake
    /// only answers, so clients that always shake hands work.
    async fn do_handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        let out = futures::stream::once(async {
            Ok(HandshakeResponse {
                protocol_version: 0,
                payload: Default::default(),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        if query.transaction_id.is_some() {
            return Err(read_only("a transaction"));
        }
        let df = self.plan(&query.query, freshness(&request)?).await?;
        let schema = df.schema().as_arrow().clone();
        // Stateless: the ticket carries the SQL, planned again by DoGet.
        let ticket = TicketStatementQuery {
            statement_handle: query.query.into_bytes().into(),
        };
        info(&schema, ticket, request.into_inner())
    }

    async fn get_flight_info_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(Status::unimplemented(
            "Substrait plans are not supported: send SQL",
        ))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let (sql, params) = self.prepared_sql(&cmd.prepared_statement_handle)?;
        let mut df = self.plan(&sql, freshness(&request)?).await?;
        if let Some(p) = params {
            df = df
                .with_param_values(ParamValues::from(p))
                .map_err(df_status)?;
        }
        let schema = df.schema().as_arrow().clone();
        info(&schema, cmd, request.into_inner())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        info(&schema, query, request.into_inner())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        info(&schema, query, request.into_inner())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        info(&schema, query, request.into_inner())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        info(&schema, query, request.into_inner())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&self.info).schema();
        info(&schema, query, request.into_inner())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let sql = String::from_utf8(ticket.statement_handle.to_vec())
            .map_err(|_| Status::invalid_argument("malformed statement ticket"))?;
        self.execute(&sql, None, freshness(&request)?).await
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let (sql, params) = self.prepared_sql(&query.prepared_statement_handle)?;
        self.execute(&sql, params, freshness(&request)?).await
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.node.coordinator()?;
        let mut b = query.into_builder();
        b.append(CATALOG);
        respond_one(b.build())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.node.coordinator()?;
        let mut b = query.into_builder();
        b.append(CATALOG, SCHEMA);
        respond_one(b.build())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let c = self.node.coordinator()?;
        let catalog_ok = query.catalog.as_deref().is_none_or(|x| x == CATALOG);
        let schema_ok = like(query.db_schema_filter_pattern.as_deref(), SCHEMA);
        let types_ok = query.table_types.is_empty()
            || query
                .table_types
                .iter()
                .any(|t| t.eq_ignore_ascii_case("TABLE"));
        let name_pattern = query.table_name_filter_pattern.clone();
        let mut tables: Vec<_> = c.tables();
        tables.sort_by(|a, b| a.def.name.cmp(&b.def.name));
        let mut b = query.into_builder();
        if catalog_ok && schema_ok && types_ok {
            for t in tables {
                if like(name_pattern.as_deref(), &t.def.name) {
                    b.append(CATALOG, SCHEMA, &t.def.name, "TABLE", &t.def.schema)
                        .map_err(|e| Status::internal(e.to_string()))?;
                }
            }
        }
        respond_one(b.build())
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut b = query.into_builder();
        b.append("TABLE");
        respond_one(b.build())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        respond_one(query.into_builder(&self.info).build())
    }

    async fn do_put_statement_update(
        &self,
        _ticket: CommandStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("an update statement"))
    }

    async fn do_put_statement_ingest(
        &self,
        _ticket: CommandStatementIngest,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("Flight SQL bulk ingest"))
    }

    async fn do_put_prepared_statement_update(
        &self,
        _query: CommandPreparedStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("a prepared update statement"))
    }

    async fn do_put_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(Status::unimplemented(
            "Substrait plans are not supported: send SQL",
        ))
    }

    /// Binds parameters (the first row of the batch sent) to a prepared statement.
    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let key = std::str::from_utf8(&query.prepared_statement_handle)
            .map_err(|_| Status::invalid_argument("malformed prepared statement handle"))?
            .to_string();
        let mut batches = FlightRecordBatchStream::new_from_flight_data(
            request.into_inner().map_err(FlightError::from),
        );
        let mut params = None;
        while let Some(batch) = batches.next().await {
            let batch = batch.map_err(|e| Status::invalid_argument(format!("parameters: {e}")))?;
            if params.is_none() && batch.num_rows() > 0 {
                if batch.num_rows() > 1 {
                    return Err(Status::invalid_argument(
                        "parameters: one row per execution is supported",
                    ));
                }
                let row = batch
                    .columns()
                    .iter()
                    .map(|a: &ArrayRef| ScalarValue::try_from_array(a, 0))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(df_status)?;
                params = Some(row);
            }
        }
        let mut p = self.prepared.lock().expect("lock");
        let s = p
            .get_mut(&key)
            .ok_or_else(|| Status::not_found(format!("no prepared statement '{key}'")))?;
        s.params = params;
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(key.into_bytes().into()),
        })
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        if query.transaction_id.is_some() {
            return Err(read_only("a transaction"));
        }
        let df = self.plan(&query.query, freshness(&request)?).await?;
        let dataset_schema = schema_bytes(df.schema().as_arrow())?;
        let parameter_schema = schema_bytes(&parameter_schema(&df)?)?;
        let handle = uuid::Uuid::new_v4().to_string();
        {
            let mut p = self.prepared.lock().expect("lock");
            if p.len() >= MAX_PREPARED {
                return Err(Status::resource_exhausted(format!(
                    "{MAX_PREPARED} prepared statements are open: close some"
                )));
            }
            p.insert(
                handle.clone(),
                Prepared {
                    sql: query.query,
                    params: None,
                },
            );
        }
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into_bytes().into(),
            dataset_schema,
            parameter_schema,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        _request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        if let Ok(key) = std::str::from_utf8(&query.prepared_statement_handle) {
            self.prepared.lock().expect("lock").remove(key);
        }
        Ok(())
    }

    async fn do_action_begin_transaction(
        &self,
        _query: ActionBeginTransactionRequest,
        _request: Request<arrow_flight::Action>,
    ) -> Result<ActionBeginTransactionResult, Status> {
        Err(read_only("a transaction"))
    }

    async fn do_get_fallback(
        &self,
        _request: Request<Ticket>,
        message: Any,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        Err(Status::unimplemented(format!(
            "{} is not supported by Freshet's Flight SQL endpoint",
            message.type_url
        )))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

#[cfg(test)]
mod tests {
    use super::like;

    #[test]
    fn like_patterns() {
        assert!(like(None, "orders"));
        assert!(like(Some("%"), "orders"));
        assert!(like(Some("ord%"), "orders"));
        assert!(like(Some("_rders"), "orders"));
        assert!(!like(Some("users"), "orders"));
        assert!(!like(Some("ord"), "orders"));
    }
}

/// The metadata header that asks for read-your-writes.
pub const FRESHNESS_HEADER: &str = "x-freshet-freshness";

/// What a call asks to see: `x-freshet-freshness: latest` or `committed` (the default).
fn freshness<T>(request: &Request<T>) -> Result<Freshness, Status> {
    match request.metadata().get(FRESHNESS_HEADER) {
        None => Ok(Freshness::Committed),
        Some(v) => v
            .to_str()
            .map_err(|_| Status::invalid_argument(format!("{FRESHNESS_HEADER} is not text")))?
            .parse()
            .map_err(|e: freshet_common::error::Error| {
                Status::invalid_argument(format!("{FRESHNESS_HEADER}: {e}"))
            }),
    }
}
