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

/// The gRPC face of a [`Coordinator`].
#[derive(Clone)]
pub struct CoordinatorGrpc(pub Arc<Coordinator>);

#[tonic::async_trait]
impl IngestService for CoordinatorGrpc {
    async fn ingest(
        &self,
        request: Request<IngestRequest>,
    ) -> Result<Response<IngestResponse>, Status> {
        Ok(Response::new(self.0.ingest(request.into_inner()).await?))
    }
}

#[tonic::async_trait]
impl AdminService for CoordinatorGrpc {
    async fn list_tables(
        &self,
        _r: Request<ListTablesRequest>,
    ) -> Result<Response<ListTablesResponse>, Status> {
        let mut tables = Vec::new();
        for t in self.0.tables() {
            tables.push(self.0.table_info(&t).await?);
        }
        Ok(Response::new(ListTablesResponse { tables }))
    }

    async fn get_table(
        &self,
        r: Request<GetTableRequest>,
    ) -> Result<Response<GetTableResponse>, Status> {
        let t = self.0.table(&r.into_inner().name)?;
        Ok(Response::new(GetTableResponse {
            table: Some(self.0.table_info(&t).await?),
        }))
    }

    async fn create_table(
        &self,
        r: Request<CreateTableRequest>,
    ) -> Result<Response<CreateTableResponse>, Status> {
        let r = r.into_inner();
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
        )?;
        let (table, adopted) = self.0.create_table(def).await?;
        Ok(Response::new(CreateTableResponse {
            table: Some(table),
            adopted,
        }))
    }

    async fn list_cycles(
        &self,
        r: Request<ListCyclesRequest>,
    ) -> Result<Response<ListCyclesResponse>, Status> {
        let r = r.into_inner();
        let limit = if r.limit == 0 { 20 } else { r.limit as usize };
        let table = (!r.table.is_empty()).then_some(r.table.as_str());
        if let Some(t) = table {
            self.0.table(t)?;
        }
        Ok(Response::new(ListCyclesResponse {
            cycles: self.0.cycles(table, limit),
        }))
    }

    async fn get_cycle(
        &self,
        r: Request<GetCycleRequest>,
    ) -> Result<Response<GetCycleResponse>, Status> {
        Ok(Response::new(GetCycleResponse {
            cycle: Some(self.0.cycle(&r.into_inner().id)?),
        }))
    }

    async fn trigger_cycle(
        &self,
        r: Request<TriggerCycleRequest>,
    ) -> Result<Response<TriggerCycleResponse>, Status> {
        Ok(Response::new(TriggerCycleResponse {
            cycle: Some(self.0.trigger(&r.into_inner().table).await?),
        }))
    }
}

/// Serves ingest, admin, health and reflection on `listener` until `shutdown` resolves.
pub async fn serve(
    coordinator: Arc<Coordinator>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let max = coordinator.inner().config.server.max_message_bytes;
    let (reporter, health) = freshet_common::server::health();
    reporter
        .set_serving::<IngestServiceServer<CoordinatorGrpc>>()
        .await;
    reporter
        .set_serving::<AdminServiceServer<CoordinatorGrpc>>()
        .await;
    let (refl_v1, refl_v1alpha) = freshet_common::server::reflection();
    let grpc = CoordinatorGrpc(coordinator);
    tonic::transport::Server::builder()
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
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(|e| Error::Internal(format!("coordinator server: {e}")))
}
