//! The coordinator's gRPC services: ingest and admin, plus health and reflection.

use std::sync::Arc;

use freshet_common::error::{Error, Result};
use freshet_common::schema::SchemaSpec;
use freshet_common::table::{DEFAULT_TARGET_FILE_SIZE, TableDef};
use freshet_proto::admin::v1::admin_service_server::{AdminService, AdminServiceServer};
use freshet_proto::admin::v1::*;
use freshet_proto::ingest::v1::ingest_service_server::{IngestService, IngestServiceServer};
use freshet_proto::ingest::v1::{IngestRequest, IngestResponse};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::Coordinator;
use crate::access::{self, AccessLayer};
use crate::node::Node;
use freshet_common::auth::{Action, Authenticator};

/// The gRPC face of a coordinator [`Node`]: calls go to the current term's coordinator, or
/// are answered UNAVAILABLE with the leader's address (metadata `freshet-leader`).
#[derive(Clone)]
pub struct CoordinatorGrpc(pub Arc<Node>);

impl CoordinatorGrpc {
    fn c(&self) -> Result<Arc<Coordinator>, Status> {
        Ok(self.0.coordinator()?)
    }
}

#[tonic::async_trait]
impl IngestService for CoordinatorGrpc {
    async fn ingest(
        &self,
        request: Request<IngestRequest>,
    ) -> Result<Response<IngestResponse>, Status> {
        let who = access::principal(&request)?;
        who.check(Action::Ingest(&request.get_ref().table))
            .map_err(Error::from)?;
        Ok(Response::new(self.c()?.ingest(request.into_inner()).await?))
    }
}

#[tonic::async_trait]
impl AdminService for CoordinatorGrpc {
    async fn list_tables(
        &self,
        _r: Request<ListTablesRequest>,
    ) -> Result<Response<ListTablesResponse>, Status> {
        let c = self.c()?;
        let mut tables = Vec::new();
        for t in c.tables() {
            tables.push(c.table_info(&t).await?);
        }
        Ok(Response::new(ListTablesResponse { tables }))
    }

    async fn get_table(
        &self,
        r: Request<GetTableRequest>,
    ) -> Result<Response<GetTableResponse>, Status> {
        let c = self.c()?;
        let t = c.table(&r.into_inner().name)?;
        Ok(Response::new(GetTableResponse {
            table: Some(c.table_info(&t).await?),
        }))
    }

    async fn create_table(
        &self,
        r: Request<CreateTableRequest>,
    ) -> Result<Response<CreateTableResponse>, Status> {
        let (who, peer) = (access::principal(&r)?, access::peer(&r));
        let target = format!("{} at {}", r.get_ref().name, r.get_ref().uri);
        let out = self.create_table_inner(r.into_inner()).await;
        access::audit(&who, &peer, "CreateTable", &target, &out);
        out
    }

    async fn list_cycles(
        &self,
        r: Request<ListCyclesRequest>,
    ) -> Result<Response<ListCyclesResponse>, Status> {
        let c = self.c()?;
        let r = r.into_inner();
        let limit = if r.limit == 0 { 20 } else { r.limit as usize };
        let table = (!r.table.is_empty()).then_some(r.table.as_str());
        if let Some(t) = table {
            c.table(t)?;
        }
        Ok(Response::new(ListCyclesResponse {
            cycles: c.cycles(table, limit),
        }))
    }

    async fn get_cycle(
        &self,
        r: Request<GetCycleRequest>,
    ) -> Result<Response<GetCycleResponse>, Status> {
        Ok(Response::new(GetCycleResponse {
            cycle: Some(self.c()?.cycle(&r.into_inner().id)?),
        }))
    }

    async fn trigger_cycle(
        &self,
        r: Request<TriggerCycleRequest>,
    ) -> Result<Response<TriggerCycleResponse>, Status> {
        let (who, peer) = (access::principal(&r)?, access::peer(&r));
        let table = r.into_inner().table;
        let out = async { Ok::<_, Status>(self.c()?.trigger(&table).await?) }.await;
        access::audit(&who, &peer, "TriggerCycle", &table, &out);
        Ok(Response::new(TriggerCycleResponse { cycle: Some(out?) }))
    }

    async fn list_workers(
        &self,
        _r: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        Ok(Response::new(ListWorkersResponse {
            workers: self.0.workers()?,
        }))
    }

    async fn get_leader(
        &self,
        _r: Request<GetLeaderRequest>,
    ) -> Result<Response<GetLeaderResponse>, Status> {
        Ok(Response::new(self.0.leader()))
    }

    async fn pause_table(
        &self,
        r: Request<PauseTableRequest>,
    ) -> Result<Response<PauseTableResponse>, Status> {
        let (who, peer) = (access::principal(&r)?, access::peer(&r));
        let name = r.into_inner().table;
        let out = async { Ok::<_, Status>(self.c()?.set_paused(&name, true).await?) }.await;
        access::audit(&who, &peer, "PauseTable", &name, &out);
        Ok(Response::new(PauseTableResponse { table: Some(out?) }))
    }

    async fn resume_table(
        &self,
        r: Request<ResumeTableRequest>,
    ) -> Result<Response<ResumeTableResponse>, Status> {
        let (who, peer) = (access::principal(&r)?, access::peer(&r));
        let name = r.into_inner().table;
        let out = async { Ok::<_, Status>(self.c()?.set_paused(&name, false).await?) }.await;
        access::audit(&who, &peer, "ResumeTable", &name, &out);
        Ok(Response::new(ResumeTableResponse { table: Some(out?) }))
    }

    async fn list_sources(
        &self,
        _r: Request<ListSourcesRequest>,
    ) -> Result<Response<ListSourcesResponse>, Status> {
        Ok(Response::new(ListSourcesResponse {
            sources: self.c()?.sources(),
        }))
    }

    async fn add_source(
        &self,
        r: Request<AddSourceRequest>,
    ) -> Result<Response<AddSourceResponse>, Status> {
        let (who, peer) = (access::principal(&r)?, access::peer(&r));
        let definition = r.into_inner().definition;
        let out = self.add_source_inner(&definition).await;
        let target = out
            .as_ref()
            .ok()
            .and_then(|s| s.source.as_ref())
            .map(|s| s.name.clone())
            .unwrap_or_else(|| "<definition>".into());
        access::audit(&who, &peer, "AddSource", &target, &out);
        Ok(Response::new(out?))
    }

    async fn drop_table(
        &self,
        r: Request<DropTableRequest>,
    ) -> Result<Response<DropTableResponse>, Status> {
        let (who, peer) = (access::principal(&r)?, access::peer(&r));
        let req = r.into_inner();
        let out = async {
            Ok::<_, Status>(
                self.c()?
                    .drop_table(&req.name, req.delete_data, req.force)
                    .await?,
            )
        }
        .await;
        let target = format!(
            "{} (delete_data={}, force={})",
            req.name, req.delete_data, req.force
        );
        access::audit(&who, &peer, "DropTable", &target, &out);
        let (pending_discarded, objects_deleted) = out?;
        Ok(Response::new(DropTableResponse {
            pending_discarded,
            objects_deleted,
        }))
    }

    async fn get_maintenance(
        &self,
        r: Request<GetMaintenanceRequest>,
    ) -> Result<Response<GetMaintenanceResponse>, Status> {
        let tables = self.c()?.maintenance(&r.into_inner().table)?;
        Ok(Response::new(GetMaintenanceResponse { tables }))
    }

    async fn remove_source(
        &self,
        r: Request<RemoveSourceRequest>,
    ) -> Result<Response<RemoveSourceResponse>, Status> {
        let (who, peer) = (access::principal(&r)?, access::peer(&r));
        let req = r.into_inner();
        let out = async {
            Ok::<_, Status>(
                self.c()?
                    .remove_source(&req.name, req.keep_publication)
                    .await?,
            )
        }
        .await;
        access::audit(&who, &peer, "RemoveSource", &req.name, &out);
        out?;
        Ok(Response::new(RemoveSourceResponse {}))
    }

    async fn resync_table(
        &self,
        r: Request<ResyncTableRequest>,
    ) -> Result<Response<ResyncTableResponse>, Status> {
        let (who, peer) = (access::principal(&r)?, access::peer(&r));
        let table = r.into_inner().table;
        let out = async { Ok::<_, Status>(self.c()?.resync_table(&table).await?) }.await;
        access::audit(&who, &peer, "ResyncTable", &table, &out);
        Ok(Response::new(ResyncTableResponse { source: out? }))
    }

    async fn alter_table(
        &self,
        r: Request<AlterTableRequest>,
    ) -> Result<Response<AlterTableResponse>, Status> {
        let (who, peer) = (access::principal(&r)?, access::peer(&r));
        let req = r.into_inner();
        let out = async {
            let spec =
                SchemaSpec::from_json(&req.add_columns_json).map_err(|e| Error::InvalidTable {
                    table: req.name.clone(),
                    message: e.to_string(),
                })?;
            Ok::<_, Status>(self.c()?.alter_table_add_columns(&req.name, spec).await?)
        }
        .await;
        let target = format!("{} add {}", req.name, req.add_columns_json);
        access::audit(&who, &peer, "AlterTable", &target, &out);
        Ok(Response::new(AlterTableResponse { table: Some(out?) }))
    }

    async fn explain_cycle(
        &self,
        r: Request<ExplainCycleRequest>,
    ) -> Result<Response<ExplainCycleResponse>, Status> {
        Ok(Response::new(
            self.c()?.explain(&r.into_inner().table).await?,
        ))
    }

    type WatchCyclesStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<CycleRecord, Status>> + Send>>;

    async fn watch_cycles(
        &self,
        r: Request<WatchCyclesRequest>,
    ) -> Result<Response<Self::WatchCyclesStream>, Status> {
        let c = self.c()?;
        let table = r.into_inner().table;
        if !table.is_empty() {
            c.table(&table)?;
        }
        let rx = c.subscribe();
        Ok(Response::new(record_stream(c, table, rx)))
    }
}

/// A stream of cycle records that ends (UNAVAILABLE) when the coordinator's term ends.
fn record_stream(
    c: Arc<Coordinator>,
    table: String,
    rx: tokio::sync::broadcast::Receiver<CycleRecord>,
) -> std::pin::Pin<Box<dyn futures::Stream<Item = Result<CycleRecord, Status>> + Send>> {
    use tokio::sync::broadcast::error::RecvError;
    let state = (c, table, rx, false);
    Box::pin(futures::stream::unfold(
        state,
        |(c, table, mut rx, done)| async move {
            if done {
                return None;
            }
            loop {
                tokio::select! {
                    r = rx.recv() => match r {
                        Ok(rec) if table.is_empty() || rec.table == table => return Some((Ok(rec), (c, table, rx, false))),
                        Ok(_) | Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => return None,
                    },
                    _ = c.stopped() => {
                        let s = Status::unavailable("this coordinator stopped leading; watch the new leader");
                        return Some((Err(s), (c, table, rx, true)));
                    }
                }
            }
        },
    ))
}

impl CoordinatorGrpc {
    async fn create_table_inner(
        &self,
        r: CreateTableRequest,
    ) -> Result<Response<CreateTableResponse>, Status> {
        let c = self.c()?;
        let bad = |m: String| Error::InvalidTable {
            table: r.name.clone(),
            message: m,
        };
        let schema = SchemaSpec::from_json(&r.schema_json)
            .and_then(|s| s.to_arrow())
            .map_err(|e| bad(e.to_string()))?;
        let def = TableDef::new(
            &r.name,
            &r.uri,
            schema,
            r.primary_key.clone(),
            r.partition_by.clone(),
            if r.target_file_size == 0 {
                DEFAULT_TARGET_FILE_SIZE
            } else {
                r.target_file_size
            },
        )?
        .with_merge_mode(freshet_common::table::MergeMode::parse(
            &r.merge_mode,
            &r.name,
        )?);
        let (table, adopted) = c.create_table(def).await?;
        Ok(Response::new(CreateTableResponse {
            table: Some(table),
            adopted,
        }))
    }

    async fn add_source_inner(&self, definition: &str) -> Result<AddSourceResponse, Status> {
        let c = self.c()?;
        let def = freshet_common::source::SourceConfig::parse(definition).map_err(|message| {
            Error::InvalidSource {
                name: "<definition>".into(),
                message,
            }
        })?;
        Ok(AddSourceResponse {
            source: Some(c.define_source(def).await?),
        })
    }
}

/// Serves a single always-leading coordinator on `listener` until `shutdown` resolves.
pub async fn serve(
    coordinator: Arc<Coordinator>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .map(|a| format!("http://{a}"))
        .unwrap_or_default();
    let max = coordinator.context().config.server.max_message_bytes;
    let tls = freshet_common::tls::ServerTls::coordinator(&coordinator.context().config.tls)?;
    let auth = Authenticator::new(&coordinator.context().config.auth).map_err(Error::from)?;
    let addr = match tls {
        Some(_) => addr.replacen("http://", "https://", 1),
        None => addr,
    };
    serve_node(
        Node::standalone(coordinator, addr),
        max,
        listener,
        tls,
        auth,
        shutdown,
    )
    .await
}

/// Serves ingest, admin, Flight SQL, health and reflection for `node` until `shutdown`
/// resolves, over TLS when `tls` is given, every call checked by `auth` (None: open).
pub async fn serve_node(
    node: Arc<Node>,
    max: usize,
    listener: TcpListener,
    tls: Option<Arc<freshet_common::tls::ServerTls>>,
    auth: Option<Arc<Authenticator>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (reporter, health) = freshet_common::server::health();
    reporter
        .set_serving::<IngestServiceServer<CoordinatorGrpc>>()
        .await;
    reporter
        .set_serving::<AdminServiceServer<CoordinatorGrpc>>()
        .await;
    let (refl_v1, refl_v1alpha) = freshet_common::server::reflection();
    let flight = crate::flight::server(node.clone(), max);
    let grpc = CoordinatorGrpc(node);
    tonic::transport::Server::builder()
        .layer(AccessLayer::new(auth))
        .add_service(health)
        .add_service(refl_v1)
        .add_service(refl_v1alpha)
        .add_service(
            IngestServiceServer::new(grpc.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            AdminServiceServer::new(grpc)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(flight)
        .serve_with_incoming_shutdown(freshet_common::tls::incoming(listener, tls), shutdown)
        .await
        .map_err(|e| Error::Internal(format!("coordinator server: {e}")))
}
