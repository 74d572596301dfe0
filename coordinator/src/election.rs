//! Leader election through etcd's election API. A candidate holds a lease (kept alive in
//! the background from before it campaigns), campaigns with its address as the value, and
//! leads until the lease is lost. The epoch of a term is the revision at which its leader
//! key was created: strictly increasing from one leader to the next.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, LeaderKey, ResignOptions};
use freshet_common::config::ClusterConfig;
use freshet_common::error::{Error, Result};
use freshet_common::etcd::election_name;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::fence::Fence;

/// What a leader announces in the election.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderValue {
    /// The coordinator's id.
    pub id: String,
    /// Its advertised gRPC URL.
    pub address: String,
}

/// The current leader as etcd sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    /// What the leader announced.
    pub value: LeaderValue,
    /// Its epoch.
    pub epoch: u64,
}

/// A won election: valid until `lost` turns true.
pub struct Term {
    /// The epoch.
    pub epoch: u64,
    /// The fence checked before acknowledging and committing.
    pub fence: Arc<Fence>,
    /// Turns true when the lease is lost.
    pub lost: watch::Receiver<bool>,
    client: Client,
    lease: i64,
    leader_key: LeaderKey,
}

impl Term {
    /// Gives leadership up: resign and revoke the lease (followers take over at once).
    pub async fn resign(self) {
        self.fence.lose();
        let mut c = self.client.clone();
        let resign = c.resign(Some(ResignOptions::new().with_leader(self.leader_key)));
        let _ = tokio::time::timeout(Duration::from_secs(2), resign).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(self.lease)).await;
    }
}

/// Campaigns until elected (or an etcd error); keeps the lease alive meanwhile.
pub async fn campaign(client: &Client, cluster: &ClusterConfig, me: &LeaderValue) -> Result<Term> {
    let ttl = Duration::from_secs(cluster.lease_ttl_s);
    let mut c = client.clone();
    let granted_at = Instant::now();
    let lease = c
        .lease_grant(cluster.lease_ttl_s as i64, None)
        .await
        .map_err(|e| Error::Unavailable(format!("etcd lease grant: {e}")))?
        .id();
    let name = election_name(cluster);
    let (lost_tx, lost) = watch::channel(false);
    let fence = Arc::new(Fence::etcd(
        client.clone(),
        lease,
        name.clone(),
        Vec::new(),
        granted_at,
        ttl,
    ));
    let keeper = tokio::spawn(keep_alive(
        client.clone(),
        lease,
        ttl,
        fence.clone(),
        lost_tx,
    ));
    // The lease outlives a long campaign because the keeper renews it meanwhile.
    let value = serde_json::to_vec(me).map_err(|e| Error::Internal(e.to_string()))?;
    let campaign = async {
        loop {
            match c.campaign(name.clone(), value.clone(), lease).await {
                Ok(mut resp) => {
                    return resp.take_leader().ok_or_else(|| {
                        Error::Internal("campaign answered without a leader key".into())
                    });
                }
                Err(e) => {
                    if fence.is_lost() {
                        return Err(Error::Unavailable(format!("campaign: lease lost: {e}")));
                    }
                    tracing::warn!(error = %e, "campaign interrupted; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    };
    let mut lost_rx = lost.clone();
    let leader_key = tokio::select! {
        r = campaign => r,
        _ = lost_rx.wait_for(|l| *l) => Err(Error::Unavailable("lease lost while campaigning".into())),
    };
    let leader_key = match leader_key {
        Ok(k) => k,
        Err(e) => {
            keeper.abort();
            let _ = c.lease_revoke(lease).await;
            return Err(e);
        }
    };
    fence.set_leader_key(leader_key.key().to_vec());
    Ok(Term {
        epoch: leader_key.rev() as u64,
        fence,
        lost,
        client: client.clone(),
        lease,
        leader_key,
    })
}

/// Keeps a lease alive every third of its TTL; reports it lost when etcd says it expired
/// or when no keep-alive has been answered before it could have expired.
async fn keep_alive(
    client: Client,
    lease: i64,
    ttl: Duration,
    fence: Arc<Fence>,
    lost: watch::Sender<bool>,
) {
    let period = (ttl / 3).max(Duration::from_millis(300));
    let mut c = client;
    let mut stream_pair = None;
    loop {
        if fence.is_lost() {
            let _ = lost.send(true);
            return;
        }
        let sent = Instant::now();
        let answer = async {
            if stream_pair.is_none() {
                stream_pair = Some(c.lease_keep_alive(lease).await.map_err(|e| e.to_string())?);
            }
            let (keeper, stream) = stream_pair.as_mut().expect("set");
            keeper.keep_alive().await.map_err(|e| e.to_string())?;
            match stream.message().await.map_err(|e| e.to_string())? {
                Some(r) => Ok(r.ttl()),
                None => Err("keep-alive stream closed".to_string()),
            }
        };
        match tokio::time::timeout(period, answer).await {
            Ok(Ok(t)) if t > 0 => fence.renewed(sent, Duration::from_secs(t as u64)),
            Ok(Ok(_)) => {
                tracing::warn!(lease, "leader lease expired");
                fence.lose();
                let _ = lost.send(true);
                return;
            }
            Ok(Err(e)) => {
                stream_pair = None;
                tracing::warn!(lease, error = %e, "lease keep-alive failed");
            }
            Err(_) => {
                stream_pair = None;
                tracing::warn!(lease, "lease keep-alive not answered in time");
            }
        }
        if fence.check_local().is_err() {
            tracing::warn!(lease, "lease may have expired; giving up leadership");
            fence.lose();
            let _ = lost.send(true);
            return;
        }
        let elapsed = sent.elapsed();
        if elapsed < period {
            tokio::time::sleep(period - elapsed).await;
        }
    }
}

/// The current leader, if any.
pub async fn leader(client: &Client, cluster: &ClusterConfig) -> Result<Option<LeaderInfo>> {
    let mut c = client.clone();
    match c.leader(election_name(cluster)).await {
        Ok(resp) => Ok(resp.kv().and_then(|kv| {
            let value: LeaderValue = serde_json::from_slice(kv.value()).ok()?;
            Some(LeaderInfo {
                value,
                epoch: kv.create_revision() as u64,
            })
        })),
        // etcd answers "election: no leader" as an error.
        Err(e) if e.to_string().contains("no leader") => Ok(None),
        Err(e) => Err(Error::Unavailable(format!("etcd leader lookup: {e}"))),
    }
}
