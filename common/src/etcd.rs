//! What coordinators and workers share about etcd: connecting (with a bounded wait and an
//! error that names the endpoints), the key layout, and the worker registration record.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use serde::{Deserialize, Serialize};

use crate::config::ClusterConfig;
use crate::error::{Error, Result};

/// A worker's registration, stored under `<prefix>workers/<id>` with the worker's lease.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// The worker's id.
    pub id: String,
    /// The URL coordinators dial.
    pub address: String,
    /// Tasks it runs at once.
    pub capacity: u32,
    /// Tasks running when the record was written.
    pub tasks_in_flight: u64,
    /// When the record was last written (ms since the epoch): the heartbeat.
    pub heartbeat_ms: i64,
    /// When the worker started (ms since the epoch).
    pub started_ms: i64,
}

/// The key prefix under which workers register.
pub fn workers_prefix(cluster: &ClusterConfig) -> String {
    format!("{}workers/", cluster.prefix())
}

/// The election name coordinators campaign on.
pub fn election_name(cluster: &ClusterConfig) -> String {
    format!("{}leader", cluster.prefix())
}

/// Connects to etcd and checks it answers, within `etcd_connect_timeout_ms`.
pub async fn connect(cluster: &ClusterConfig) -> Result<Client> {
    if cluster.etcd_endpoints.is_empty() {
        return Err(Error::Config("cluster.etcd_endpoints is empty".into()));
    }
    if cluster.lease_ttl_s < 2 {
        return Err(Error::Config(format!(
            "cluster.lease_ttl_s is {}; it must be at least 2",
            cluster.lease_ttl_s
        )));
    }
    let timeout = Duration::from_millis(cluster.etcd_connect_timeout_ms.max(100));
    let endpoints = cluster.etcd_endpoints.join(", ");
    let fail = |e: String| {
        Error::Config(format!(
            "cannot reach etcd at {endpoints} (cluster.etcd_endpoints) within {timeout:?}: {e}"
        ))
    };
    let options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout.max(Duration::from_secs(5)))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    let attempt = async {
        let mut client = Client::connect(cluster.etcd_endpoints.clone(), Some(options))
            .await
            .map_err(|e| e.to_string())?;
        client.status().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(client)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(fail(e)),
        Err(_) => Err(fail("timed out".into())),
    }
}

/// Whether etcd answers now (for readiness).
pub async fn ping(client: &Client) -> std::result::Result<(), String> {
    let mut c = client.clone();
    match tokio::time::timeout(Duration::from_secs(2), c.status()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("etcd: {e}")),
        Err(_) => Err("etcd: no answer within 2s".into()),
    }
}
