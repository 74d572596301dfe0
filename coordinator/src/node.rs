//! A coordinator process in a cluster: it campaigns for leadership and, while it leads,
//! runs a [`Coordinator`] term (recovery, cycles, ingest); while it follows, it answers
//! ingest and admin calls with UNAVAILABLE naming the leader. A single coordinator without
//! etcd is a node that always leads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::Client;
use freshet_common::config::Config;
use freshet_common::error::{Error, Result};
use freshet_proto::admin::v1::{GetLeaderResponse, WorkerInfo};
use tokio::sync::watch;

use crate::election::{self, LeaderValue};
use crate::membership::{self, Membership};
use crate::metrics::CoordinatorMetrics;
use crate::router::Member;
use crate::{Coordinator, StartOptions};

/// What this node knows of the current leader.
#[derive(Debug, Clone, Default)]
struct Known {
    address: String,
    epoch: u64,
}

/// A coordinator process.
pub struct Node {
    /// This node's id.
    pub id: String,
    /// This node's advertised gRPC URL.
    pub address: String,
    /// Metrics, shared by every term.
    pub metrics: Arc<CoordinatorMetrics>,
    config: Config,
    etcd: Option<Client>,
    current: RwLock<Option<Arc<Coordinator>>>,
    known: RwLock<Known>,
    leader_changes: AtomicU64,
    membership: Option<Arc<Membership>>,
    sources: Option<Arc<dyn crate::SourceFactory>>,
    stop: watch::Sender<bool>,
}

impl Node {
    /// A node that always leads: wraps an already started coordinator.
    pub fn standalone(coordinator: Arc<Coordinator>, address: String) -> Arc<Node> {
        let inner = coordinator.context().clone();
        Arc::new(Node {
            id: inner.node_id.clone(),
            address: address.clone(),
            metrics: inner.metrics.clone(),
            config: inner.config.clone(),
            etcd: None,
            current: RwLock::new(Some(coordinator)),
            known: RwLock::new(Known {
                address,
                epoch: inner.epoch,
            }),
            leader_changes: AtomicU64::new(0),
            membership: None,
            sources: None,
            stop: watch::channel(false).0,
        })
    }

    /// Starts a clustered node: follows worker membership and campaigns for leadership in
    /// the background. Returns at once (a follower until elected).
    pub fn clustered(
        config: Config,
        client: Client,
        id: String,
        address: String,
        sources: Option<Arc<dyn crate::SourceFactory>>,
    ) -> Arc<Node> {
        let metrics = Arc::new(CoordinatorMetrics::default());
        let (membership, changes) = Membership::new();
        let node = Arc::new(Node {
            id,
            address,
            metrics,
            config: config.clone(),
            etcd: Some(client.clone()),
            current: RwLock::new(None),
            known: RwLock::new(Known::default()),
            leader_changes: AtomicU64::new(0),
            membership: Some(membership.clone()),
            sources,
            stop: watch::channel(false).0,
        });
        tokio::spawn(membership::follow(
            client,
            config.cluster.clone(),
            membership,
        ));
        tokio::spawn(push_members(node.clone(), changes));
        tokio::spawn(observe_leader(node.clone()));
        tokio::spawn(lead_when_elected(node.clone()));
        node
    }

    /// The coordinator of the current term, or NOT_LEADER naming the leader.
    pub fn coordinator(&self) -> Result<Arc<Coordinator>> {
        if let Some(c) = self.current.read().expect("lock").clone() {
            return Ok(c);
        }
        let known = self.known.read().expect("lock").clone();
        if known.address == self.address {
            return Err(Error::Unavailable(
                "this coordinator was just elected and is recovering its tables; retry shortly"
                    .into(),
            ));
        }
        Err(Error::NotLeader {
            leader: (!known.address.is_empty()).then_some(known.address),
        })
    }

    /// Who leads, as this node knows it.
    pub fn leader(&self) -> GetLeaderResponse {
        let known = self.known.read().expect("lock").clone();
        let is_leader = self.current.read().expect("lock").is_some();
        GetLeaderResponse {
            leader: known.address,
            epoch: known.epoch,
            node_id: self.id.clone(),
            node_address: self.address.clone(),
            is_leader,
            leader_changes: self.leader_changes.load(Ordering::SeqCst),
        }
    }

    /// The workers: registered ones (with heartbeats) in cluster mode, else the static list.
    pub fn workers(&self) -> Result<Vec<WorkerInfo>> {
        let c = self.coordinator()?;
        let router = &c.context().router;
        Ok(match &self.membership {
            Some(m) => m
                .workers()
                .into_iter()
                .map(|w| {
                    let s = router.stats(&w.address);
                    WorkerInfo {
                        id: w.id,
                        address: w.address,
                        capacity: w.capacity,
                        tasks_in_flight: w.tasks_in_flight,
                        last_heartbeat_ms: w.heartbeat_ms,
                        tasks_sent: s.sent,
                        tasks_failed: s.failed,
                    }
                })
                .collect(),
            None => router
                .members()
                .into_iter()
                .map(|m| {
                    let s = router.stats(&m.address);
                    WorkerInfo {
                        id: m.address.clone(),
                        address: m.address,
                        capacity: m.capacity,
                        tasks_in_flight: s.in_flight,
                        last_heartbeat_ms: 0,
                        tasks_sent: s.sent,
                        tasks_failed: s.failed,
                    }
                })
                .collect(),
        })
    }

    /// Whether etcd and the object store answer (for readiness).
    pub async fn ready(&self) -> std::result::Result<(), String> {
        if let Some(c) = &self.etcd {
            freshet_common::etcd::ping(c).await?;
        }
        if let Some(uri) = &self.config.catalog.uri {
            check_store(uri, &self.config.storage.options)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Steps down (if leading) and stops campaigning.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        if let Some(c) = self.current.write().expect("lock").take() {
            c.shutdown();
        }
        // Give the election loop a moment to resign.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    fn set_members(&self) {
        let (Some(m), Some(c)) = (&self.membership, self.current.read().expect("lock").clone())
        else {
            return;
        };
        let members: Vec<Member> = m
            .workers()
            .into_iter()
            .map(|w| Member {
                address: w.address,
                capacity: w.capacity,
            })
            .collect();
        self.metrics.workers.set(members.len() as i64);
        c.context().router.set_members(members);
    }

    fn saw_leader(&self, address: String, epoch: u64) {
        let mut k = self.known.write().expect("lock");
        if k.epoch != epoch && epoch != 0 {
            if k.epoch != 0 {
                self.leader_changes.fetch_add(1, Ordering::SeqCst);
                self.metrics.leader_changes.inc();
            }
            tracing::info!(leader = %address, epoch, "leader is known");
        }
        *k = Known { address, epoch };
    }
}

/// Checks that an object-store URI parses and answers.
pub async fn check_store(
    uri: &str,
    options: &freshet_common::storage::StorageOptions,
) -> Result<()> {
    use futures::StreamExt;
    let url = freshet_common::storage::table_url("catalog", uri).map_err(|e| match e {
        Error::InvalidTable { message, .. } => Error::Config(format!("catalog.uri: {message}")),
        other => Error::Config(format!("catalog.uri: {other}")),
    })?;
    let store = crate::fenced_store::retrying(freshet_common::storage::table_store(
        "catalog", &url, options,
    )?);
    let prefix = object_store::path::Path::from("tables");
    let first = tokio::time::timeout(Duration::from_secs(5), async {
        store.list(Some(&prefix)).next().await
    })
    .await
    .map_err(|_| Error::Unavailable(format!("object store at '{uri}' did not answer within 5s")))?;
    match first {
        Some(Err(e)) => Err(Error::store(uri, e)),
        _ => Ok(()),
    }
}

async fn push_members(node: Arc<Node>, mut changes: watch::Receiver<u64>) {
    while changes.changed().await.is_ok() {
        node.set_members();
    }
}

async fn observe_leader(node: Arc<Node>) {
    let Some(client) = node.etcd.clone() else {
        return;
    };
    loop {
        match election::leader(&client, &node.config.cluster).await {
            Ok(Some(l)) => node.saw_leader(l.value.address, l.epoch),
            Ok(None) => node.saw_leader(String::new(), 0),
            Err(e) => tracing::debug!(error = %e, "leader lookup failed"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn lead_when_elected(node: Arc<Node>) {
    let Some(client) = node.etcd.clone() else {
        return;
    };
    let me = LeaderValue {
        id: node.id.clone(),
        address: node.address.clone(),
    };
    let mut stop = node.stop.subscribe();
    loop {
        if *stop.borrow() {
            return;
        }
        let term = tokio::select! {
            t = election::campaign(&client, &node.config.cluster, &me) => t,
            _ = stop.wait_for(|s| *s) => return,
        };
        let term = match term {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "campaign failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        tracing::info!(epoch = term.epoch, node = %node.id, "elected leader; recovering tables");
        node.saw_leader(node.address.clone(), term.epoch);
        let options = StartOptions {
            epoch: term.epoch,
            fence: term.fence.clone(),
            node_id: node.id.clone(),
            metrics: node.metrics.clone(),
            sources: node.sources.clone(),
        };
        let coordinator = match Coordinator::start_with(node.config.clone(), options).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "could not start as leader; resigning");
                term.resign().await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        *node.current.write().expect("lock") = Some(coordinator.clone());
        node.metrics.is_leader.set(1);
        node.set_members();
        if let Err(e) = coordinator.start_sources().await {
            tracing::error!(error = %e, "sources could not be started");
        }
        tracing::info!(epoch = term.epoch, "leading");
        let mut lost = term.lost.clone();
        let stopping = tokio::select! {
            _ = lost.wait_for(|l| *l) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        // Whatever ended the term, no more work is done under it.
        term.fence.lose();
        coordinator.shutdown();
        node.current.write().expect("lock").take();
        node.metrics.is_leader.set(0);
        if stopping {
            tracing::info!("resigning leadership");
            term.resign().await;
            return;
        }
        tracing::warn!(epoch = term.epoch, "leadership lost; following");
        term.resign().await;
    }
}
