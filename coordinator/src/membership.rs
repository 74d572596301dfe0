//! Membership, the coordinator's side: the live set of workers, read from etcd's
//! `<prefix>workers/` and kept current by a watch. A worker whose lease expires (or that
//! revokes it when shutting down) disappears with its key.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use freshet_common::config::ClusterConfig;
use freshet_common::etcd::{WorkerRecord, workers_prefix};
use tokio::sync::watch;

/// The workers currently registered.
#[derive(Default)]
pub struct Membership {
    workers: RwLock<BTreeMap<String, WorkerRecord>>,
    changed: Option<watch::Sender<u64>>,
}

impl Membership {
    /// An empty membership and a receiver that ticks on every change.
    pub fn new() -> (Arc<Membership>, watch::Receiver<u64>) {
        let (tx, rx) = watch::channel(0);
        (
            Arc::new(Membership {
                workers: RwLock::new(BTreeMap::new()),
                changed: Some(tx),
            }),
            rx,
        )
    }

    /// The registered workers, by id.
    pub fn workers(&self) -> Vec<WorkerRecord> {
        self.workers
            .read()
            .expect("lock")
            .values()
            .cloned()
            .collect()
    }

    fn replace(&self, all: BTreeMap<String, WorkerRecord>) {
        *self.workers.write().expect("lock") = all;
        self.tick();
    }

    fn apply(&self, id: String, record: Option<WorkerRecord>) {
        let mut w = self.workers.write().expect("lock");
        let before = w.get(&id).map(|r| (r.address.clone(), r.capacity));
        match record {
            Some(r) => {
                let after = Some((r.address.clone(), r.capacity));
                w.insert(id, r);
                drop(w);
                // Heartbeats rewrite the record; only address or capacity changes matter.
                if before != after {
                    self.tick();
                }
            }
            None => {
                w.remove(&id);
                drop(w);
                self.tick();
            }
        }
    }

    fn tick(&self) {
        if let Some(tx) = &self.changed {
            tx.send_modify(|n| *n += 1);
        }
    }
}

/// Keeps `membership` equal to etcd's worker keys until the process ends: list, then watch
/// from the listed revision; on any watch failure, list again.
pub async fn follow(client: Client, cluster: ClusterConfig, membership: Arc<Membership>) {
    let prefix = workers_prefix(&cluster);
    loop {
        if let Err(e) = follow_once(&client, &prefix, &membership).await {
            tracing::warn!(error = %e, "worker watch interrupted; listing again");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn follow_once(
    client: &Client,
    prefix: &str,
    membership: &Membership,
) -> Result<(), etcd_client::Error> {
    let mut c = client.clone();
    let resp = c.get(prefix, Some(GetOptions::new().with_prefix())).await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut all = BTreeMap::new();
    for kv in resp.kvs() {
        if let Some(r) = parse(kv.value()) {
            all.insert(id_of(prefix, kv.key()), r);
        }
    }
    tracing::info!(workers = all.len(), "worker membership listed");
    membership.replace(all);
    let mut stream = c
        .watch(
            prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    while let Some(resp) = stream.message().await? {
        if resp.canceled() {
            return Err(etcd_client::Error::WatchError(format!(
                "watch canceled: {}",
                resp.cancel_reason()
            )));
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let id = id_of(prefix, kv.key());
            match ev.event_type() {
                EventType::Put => {
                    if let Some(r) = parse(kv.value()) {
                        if membership.workers.read().expect("lock").get(&id).is_none() {
                            tracing::info!(worker = %id, address = %r.address, capacity = r.capacity, "worker joined");
                        }
                        membership.apply(id, Some(r));
                    }
                }
                EventType::Delete => {
                    tracing::info!(worker = %id, "worker left");
                    membership.apply(id, None);
                }
            }
        }
    }
    Err(etcd_client::Error::WatchError("watch stream ended".into()))
}

fn id_of(prefix: &str, key: &[u8]) -> String {
    String::from_utf8_lossy(key)
        .strip_prefix(prefix)
        .unwrap_or_default()
        .to_string()
}

fn parse(value: &[u8]) -> Option<WorkerRecord> {
    match serde_json::from_slice(value) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring unreadable worker record");
            None
        }
    }
}
