//! The stateless Freshet worker: serves `freshet.worker.v1.WorkerService`, rewriting files
//! with their changes directly against object storage.

pub mod deletion;
pub mod epoch;
pub mod format;
pub mod metrics;
pub mod output;
pub mod process;
pub mod registration;
pub mod rewrite;
pub mod rowgroup;
pub mod stores;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use freshet_common::error::{Error, Result};
use freshet_common::storage::StorageOptions;
use freshet_proto::worker::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use freshet_proto::worker::v1::{InfoRequest, InfoResponse, RewriteRequest, RewriteResponse};
use object_store::ObjectStore;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Fault injection for tests: makes the next rewrites fail, around the real work.
#[derive(Debug, Default)]
pub struct Faults {
    /// Fail this many upcoming rewrites (before doing any work).
    pub fail_next: AtomicU32,
    /// Sleep this long before each rewrite (makes "kill a worker mid-task" testable).
    pub delay_ms: AtomicU64,
}

/// A worker: its identity, capacity and caches. Holds no task state.
pub struct Worker {
    id: String,
    capacity: u32,
    options: StorageOptions,
    permits: Semaphore,
    in_flight: AtomicU64,
    epochs: epoch::Epochs,
    draining: AtomicBool,
    /// The largest message the worker's server accepts, which also bounds what a task's
    /// changes may decode to; [`serve`] sets it.
    max_message_bytes: AtomicUsize,
    stores: stores::Stores,
    /// Test fault injection.
    pub faults: Faults,
    /// The worker's Prometheus metrics.
    pub metrics: metrics::WorkerMetrics,
}

impl Worker {
    /// A worker with `capacity` concurrent tasks.
    pub fn new(id: impl Into<String>, capacity: u32, options: StorageOptions) -> Arc<Self> {
        Arc::new(Worker {
            id: id.into(),
            capacity: capacity.max(1),
            options,
            permits: Semaphore::new(capacity.max(1) as usize),
            in_flight: AtomicU64::new(0),
            epochs: epoch::Epochs::default(),
            draining: AtomicBool::new(false),
            max_message_bytes: AtomicUsize::new(
                freshet_common::config::ServerConfig::default().max_message_bytes,
            ),
            stores: stores::Stores::default(),
            faults: Faults::default(),
            metrics: metrics::WorkerMetrics::default(),
        })
    }

    /// Tasks the worker runs at once.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Tasks running now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Stops taking new tasks (they are refused as UNAVAILABLE, so the coordinator retries
    /// them elsewhere); running tasks finish.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// The worker's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn store(&self, table: &str, uri: &str) -> Result<Arc<dyn ObjectStore>> {
        self.stores.get(table, uri, &self.options)
    }

    /// Runs one task.
    pub async fn rewrite(&self, req: RewriteRequest) -> Result<RewriteResponse> {
        // Stale leaders must not get work done, and forged epochs must not be adopted.
        self.epochs.admit(req.epoch).await?;
        if self.draining.load(Ordering::SeqCst) {
            return Err(Error::Unavailable(format!(
                "worker {} is shutting down",
                self.id
            )));
        }
        if self
            .faults
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Error::Injected(format!("worker {} rewrite", self.id)));
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::Unavailable("worker stopping".into()))?;
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.metrics.in_flight.set(self.in_flight() as i64);
        let delay = self.faults.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let table = req
            .table
            .as_ref()
            .map(|t| (t.name.clone(), t.uri.clone()))
            .unwrap_or_default();
        let result = async {
            let store = self.store(&table.0, &table.1)?;
            let max = self.max_message_bytes.load(Ordering::SeqCst);
            rewrite::rewrite_within(&store, &req, &self.id, max).await
        }
        .await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.metrics.in_flight.set(self.in_flight() as i64);
        self.metrics.observe(&result);
        result
    }
}

/// The gRPC face of a [`Worker`].
#[derive(Clone)]
pub struct WorkerGrpc(pub Arc<Worker>);

#[tonic::async_trait]
impl WorkerService for WorkerGrpc {
    async fn rewrite(
        &self,
        request: Request<RewriteRequest>,
    ) -> Result<Response<RewriteResponse>, Status> {
        let req = request.into_inner();
        let table = req
            .table
            .as_ref()
            .map(|t| t.name.clone())
            .unwrap_or_default();
        let span = tracing::info_span!("task", cycle_id = %req.cycle_id, table = %table, task = req.task_id, attempt = req.attempt, worker = %self.0.id);
        async {
            let inputs = req.inputs.len();
            match self.0.rewrite(req).await {
                Ok(resp) => {
                    tracing::debug!(
                        inputs,
                        outputs = resp.files.len(),
                        ms = resp.duration_ms,
                        "task done"
                    );
                    Ok(Response::new(resp))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "task failed");
                    Err(e.into())
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            worker_id: self.0.id.clone(),
            capacity: self.0.capacity,
            tasks_in_flight: self.0.in_flight.load(Ordering::SeqCst),
        }))
    }
}

/// Serves a worker on `listener` until `shutdown` resolves.
pub async fn serve(
    worker: Arc<Worker>,
    listener: TcpListener,
    max_message_bytes: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    serve_tls(worker, listener, max_message_bytes, None, shutdown).await
}

/// Serves a worker on `listener` until `shutdown` resolves, over TLS when `tls` is given
/// (built with [`freshet_common::tls::ServerTls::worker`]: client certificates required).
pub async fn serve_tls(
    worker: Arc<Worker>,
    listener: TcpListener,
    max_message_bytes: usize,
    tls: Option<Arc<freshet_common::tls::ServerTls>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    worker
        .max_message_bytes
        .store(max_message_bytes, Ordering::SeqCst);
    let (reporter, health) = freshet_common::server::health();
    reporter
        .set_serving::<WorkerServiceServer<WorkerGrpc>>()
        .await;
    let (refl_v1, refl_v1alpha) = freshet_common::server::reflection();
    let svc = WorkerServiceServer::new(WorkerGrpc(worker))
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(refl_v1)
        .add_service(refl_v1alpha)
        .add_service(svc)
        .serve_with_incoming_shutdown(freshet_common::tls::incoming(listener, tls), shutdown)
        .await
        .map_err(|e| Error::Internal(format!("worker server: {e}")))
}

/// Binds a listener, returning it with its address.
pub async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {addr}: {e}")))?;
    let a = l.local_addr().map_err(|e| Error::Internal(e.to_string()))?;
    Ok((l, a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(epoch: u64) -> RewriteRequest {
        RewriteRequest {
            epoch,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn stale_epochs_and_draining_are_refused_before_any_work() {
        let w = Worker::new("w", 1, Default::default());
        // Epoch 5 is accepted (the empty request then fails validation, not the epoch).
        let e = w.rewrite(request(5)).await.unwrap_err().to_string();
        assert!(!e.contains("stale"), "{e}");
        let e = w.rewrite(request(3)).await.unwrap_err();
        assert!(
            e.to_string().contains("stale epoch 3 (newest seen 5)"),
            "{e}"
        );
        assert_eq!(e.code(), tonic::Code::Unavailable);
        let e = w.rewrite(request(5)).await.unwrap_err().to_string();
        assert!(!e.contains("stale"), "{e}");
        w.drain();
        let e = w.rewrite(request(6)).await.unwrap_err();
        assert!(e.to_string().contains("shutting down"), "{e}");
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn changes_that_decode_past_the_message_limit_are_refused() {
        use arrow::array::{ArrayRef, Int8Array, Int64Array, RecordBatch, StringArray};
        use arrow::datatypes::{DataType, Field, Schema};
        use freshet_proto::worker::v1::TableSpec;
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
        ]));
        let def = freshet_common::table::TableDef::new(
            "t",
            "memory:///t",
            schema.clone(),
            vec!["id".into()],
            vec![],
            1 << 20,
        )
        .unwrap();
        let cs = freshet_common::changes::change_schema(&def);
        let changes = |rows: usize, with_v: bool| {
            let mut cols: Vec<(&str, ArrayRef)> = vec![
                ("id", Arc::new(Int64Array::from(vec![0i64; rows]))),
                ("__op", Arc::new(Int8Array::from(vec![1i8; rows]))),
            ];
            if with_v {
                cols.insert(1, ("v", Arc::new(StringArray::new_null(rows))));
            }
            let b = RecordBatch::try_from_iter(cols).unwrap();
            freshet_common::ipc::encode(&b.schema(), &[b]).unwrap()
        };
        let req = |changes_ipc: Vec<u8>| RewriteRequest {
            epoch: 1,
            table: Some(TableSpec {
                name: "t".into(),
                uri: "memory:///t".into(),
                schema_ipc: freshet_common::ipc::encode_schema(&schema).unwrap(),
                primary_key: vec!["id".into()],
                partition_columns: vec![],
            }),
            changes_ipc,
            ..Default::default()
        };
        assert_eq!(cs.field(cs.fields().len() - 1).name(), "__op");
        let w = Worker::new("w", 1, Default::default());
        w.max_message_bytes.store(1 << 20, Ordering::SeqCst);
        // 1M changes: 13 MB once decoded (keys, op, offsets), a few tens of KB on the wire.
        let bomb = changes(1_000_000, true);
        assert!(bomb.len() < 1 << 20);
        let e = w.rewrite(req(bomb)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.to_string().contains("bytes once decoded")
                && e.to_string()
                    .contains("limit 1048576 (server.max_message_bytes)"),
            "{e}"
        );
        // Columns the coordinator always sends must be there, so none is filled per row.
        let e = w.rewrite(req(changes(10, false))).await.unwrap_err();
        assert!(e.to_string().contains("task changes: no column 'v'"), "{e}");
    }
}
