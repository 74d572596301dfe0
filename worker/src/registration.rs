//! Membership, the worker's side: a record under `<prefix>workers/<id>` attached to a lease
//! that is kept alive while the worker runs. The record is rewritten on every keep-alive
//! round, so its `heartbeat_ms` and `tasks_in_flight` stay current. If the lease is lost
//! (etcd restarted, a long pause), the worker registers again under a new lease.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use freshet_common::config::ClusterConfig;
use freshet_common::error::{Error, Result};
use freshet_common::etcd::{WorkerRecord, workers_prefix};
use tokio::sync::Mutex;

use crate::Worker;

/// A live registration.
pub struct Registration {
    client: Client,
    key: String,
    ttl: i64,
    lease: Mutex<i64>,
    registered: AtomicBool,
    stopped: AtomicBool,
    base: WorkerRecord,
}

impl Registration {
    /// Registers `worker` at `address` and keeps the registration alive in the background.
    pub async fn start(
        client: Client,
        cluster: &ClusterConfig,
        worker: Arc<Worker>,
        address: String,
    ) -> Result<Arc<Registration>> {
        let base = WorkerRecord {
            id: worker.id().to_string(),
            address,
            capacity: worker.capacity(),
            tasks_in_flight: 0,
            heartbeat_ms: 0,
            started_ms: chrono::Utc::now().timestamp_millis(),
        };
        let reg = Arc::new(Registration {
            client,
            key: format!("{}{}", workers_prefix(cluster), worker.id()),
            ttl: cluster.lease_ttl_s as i64,
            lease: Mutex::new(0),
            registered: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            base,
        });
        reg.register(&worker).await?;
        tokio::spawn(keep_alive(reg.clone(), worker));
        Ok(reg)
    }

    /// Whether the worker is registered now (for readiness).
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::SeqCst)
    }

    async fn register(&self, worker: &Worker) -> Result<()> {
        let mut c = self.client.clone();
        let lease = c
            .lease_grant(self.ttl, None)
            .await
            .map_err(|e| Error::Unavailable(format!("etcd lease grant: {e}")))?
            .id();
        *self.lease.lock().await = lease;
        self.put(worker, lease).await?;
        self.registered.store(true, Ordering::SeqCst);
        tracing::info!(key = %self.key, lease, address = %self.base.address, "worker registered");
        Ok(())
    }

    async fn put(&self, worker: &Worker, lease: i64) -> Result<()> {
        let record = WorkerRecord {
            tasks_in_flight: worker.in_flight(),
            heartbeat_ms: chrono::Utc::now().timestamp_millis(),
            ..self.base.clone()
        };
        let body = serde_json::to_vec(&record).map_err(|e| Error::Internal(e.to_string()))?;
        self.client
            .clone()
            .put(
                self.key.clone(),
                body,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(|e| Error::Unavailable(format!("etcd put {}: {e}", self.key)))?;
        Ok(())
    }

    /// Deregisters at once by revoking the lease (the record goes with it).
    pub async fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.registered.store(false, Ordering::SeqCst);
        let lease = *self.lease.lock().await;
        match self.client.clone().lease_revoke(lease).await {
            Ok(_) => tracing::info!(key = %self.key, "worker deregistered"),
            Err(e) => tracing::warn!(error = %e, "could not revoke lease; it will expire"),
        }
    }
}

async fn keep_alive(reg: Arc<Registration>, worker: Arc<Worker>) {
    let period = Duration::from_millis((reg.ttl as u64 * 1000 / 3).max(300));
    loop {
        tokio::time::sleep(period).await;
        if reg.stopped.load(Ordering::SeqCst) {
            return;
        }
        let lease = *reg.lease.lock().await;
        let alive = async {
            let mut c = reg.client.clone();
            let (mut keeper, mut stream) =
                c.lease_keep_alive(lease).await.map_err(|e| e.to_string())?;
            keeper.keep_alive().await.map_err(|e| e.to_string())?;
            match stream.message().await.map_err(|e| e.to_string())? {
                Some(r) if r.ttl() > 0 => Ok(true),
                _ => Ok::<_, String>(false),
            }
        }
        .await;
        if reg.stopped.load(Ordering::SeqCst) {
            return;
        }
        match alive {
            Ok(true) => {
                if let Err(e) = reg.put(&worker, lease).await {
                    tracing::warn!(error = %e, "heartbeat not written");
                }
            }
            Ok(false) => {
                reg.registered.store(false, Ordering::SeqCst);
                tracing::warn!(key = %reg.key, "lease expired; registering again");
                if let Err(e) = reg.register(&worker).await {
                    tracing::warn!(error = %e, "registration failed; will retry");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "etcd keep-alive failed; will retry");
            }
        }
    }
}
