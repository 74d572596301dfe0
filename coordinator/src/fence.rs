//! Leadership fencing: what a leader checks before it acknowledges a staged batch or
//! commits to Delta. Object stores offer no fencing tokens, so the leader proves to itself
//! that its etcd lease is still valid: locally (the lease cannot have expired yet, counting
//! from when the last keep-alive was sent) before every acknowledgement, and additionally
//! against etcd (lease alive, our key still leads the election) right before each commit.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::Client;
use freshet_common::error::{Error, Result};

/// Kept between a check and the write it guards (the time the write may take to start).
const MARGIN: Duration = Duration::from_millis(500);

/// A leader's proof of leadership, or nothing to prove (single coordinator, no etcd).
pub struct Fence {
    etcd: Option<EtcdFence>,
}

struct EtcdFence {
    /// None only in unit tests (a lease with no etcd to ask).
    client: Option<Client>,
    lease: i64,
    election: String,
    leader_key: Mutex<Vec<u8>>,
    valid_until: Mutex<Instant>,
    lost: AtomicBool,
}

impl Fence {
    /// No fencing: the only coordinator.
    pub fn none() -> Self {
        Fence { etcd: None }
    }

    /// Fencing by an etcd lease held since `granted_at` for `ttl`.
    pub fn etcd(
        client: Client,
        lease: i64,
        election: String,
        leader_key: Vec<u8>,
        granted_at: Instant,
        ttl: Duration,
    ) -> Self {
        Fence {
            etcd: Some(EtcdFence {
                client: Some(client),
                lease,
                election,
                leader_key: Mutex::new(leader_key),
                valid_until: Mutex::new(granted_at + ttl),
                lost: AtomicBool::new(false),
            }),
        }
    }

    /// A lease valid for `ttl` from now, with no etcd behind it (unit tests of what the
    /// fence bounds).
    #[cfg(test)]
    pub(crate) fn lease_only(ttl: Duration) -> Self {
        Fence {
            etcd: Some(EtcdFence {
                client: None,
                lease: 0,
                election: String::new(),
                leader_key: Mutex::new(Vec::new()),
                valid_until: Mutex::new(Instant::now() + ttl),
                lost: AtomicBool::new(false),
            }),
        }
    }

    /// A keep-alive sent at `sent_at` was answered with `ttl`: the lease lives at least
    /// until `sent_at + ttl`.
    pub fn renewed(&self, sent_at: Instant, ttl: Duration) {
        if let Some(f) = &self.etcd {
            let mut v = f.valid_until.lock().expect("lock");
            *v = (*v).max(sent_at + ttl);
        }
    }

    /// Records the election key this fence's lease won.
    pub fn set_leader_key(&self, key: Vec<u8>) {
        if let Some(f) = &self.etcd {
            *f.leader_key.lock().expect("lock") = key;
        }
    }

    /// Marks leadership as lost for good.
    pub fn lose(&self) {
        if let Some(f) = &self.etcd {
            f.lost.store(true, Ordering::SeqCst);
        }
    }

    /// Whether leadership is known lost.
    pub fn is_lost(&self) -> bool {
        self.etcd
            .as_ref()
            .is_some_and(|f| f.lost.load(Ordering::SeqCst))
    }

    /// Cheap check: the lease cannot have expired yet.
    pub fn check_local(&self) -> Result<()> {
        let Some(f) = &self.etcd else { return Ok(()) };
        if f.lost.load(Ordering::SeqCst) {
            return Err(Error::LeadershipLost(
                "this coordinator's term ended".into(),
            ));
        }
        if Instant::now() + MARGIN >= *f.valid_until.lock().expect("lock") {
            return Err(Error::LeadershipLost(
                "the leader lease may have expired (no keep-alive answered in time)".into(),
            ));
        }
        Ok(())
    }

    /// How long the lease is certainly still valid, less the safety margin (`None`: no
    /// lease to respect). A write that may take longer must not start.
    pub fn valid_for(&self) -> Option<Duration> {
        let f = self.etcd.as_ref()?;
        let until = *f.valid_until.lock().expect("lock");
        Some(
            until
                .saturating_duration_since(Instant::now())
                .saturating_sub(MARGIN),
        )
    }

    /// Full check before a commit: local, then etcd confirms the lease and that our key
    /// still leads the election.
    pub async fn check(&self) -> Result<()> {
        self.check_local()?;
        let Some(f) = &self.etcd else { return Ok(()) };
        let Some(mut c) = f.client.clone() else {
            return Ok(());
        };
        let remote = async {
            let ttl = c
                .lease_time_to_live(f.lease, None)
                .await
                .map_err(|e| format!("lease check: {e}"))?
                .ttl();
            if ttl <= 0 {
                return Ok(false);
            }
            let leader = c
                .leader(f.election.clone())
                .await
                .map_err(|e| format!("leader check: {e}"))?;
            let ours = f.leader_key.lock().expect("lock").clone();
            Ok::<_, String>(
                leader
                    .kv()
                    .is_some_and(|kv| !ours.is_empty() && kv.key() == ours.as_slice()),
            )
        };
        match tokio::time::timeout(Duration::from_secs(2), remote).await {
            Ok(Ok(true)) => self.check_local(),
            Ok(Ok(false)) => {
                self.lose();
                Err(Error::LeadershipLost(
                    "etcd says this coordinator no longer leads".into(),
                ))
            }
            Ok(Err(e)) => Err(Error::Unavailable(format!(
                "cannot confirm leadership before commit: {e}"
            ))),
            Err(_) => Err(Error::Unavailable(
                "cannot confirm leadership before commit: etcd did not answer within 2s".into(),
            )),
        }
    }
}
