//! Leader epochs a worker accepts. A worker refuses epochs older than the newest it has
//! adopted (a stale leader gets nothing done). Because that rule would let one forged
//! request with a huge epoch make the worker refuse every real task, a worker in cluster
//! mode adopts a higher epoch only after etcd confirms it: the election's current leader
//! key must have that creation revision (the epoch, see coordinator/src/election.rs). A
//! request whose epoch cannot be confirmed is refused (PERMISSION_DENIED) and changes
//! nothing. Verified epochs are cached: only a rise costs an etcd round trip.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use etcd_client::Client;
use freshet_common::config::ClusterConfig;
use freshet_common::error::{Error, Result};
use freshet_common::etcd::election_name;

use crate::Worker;

/// The newest adopted epoch and, in cluster mode, how to verify a higher one.
#[derive(Default)]
pub struct Epochs {
    newest: AtomicU64,
    verifier: OnceLock<Verifier>,
    /// One verification at a time: a flood of forged epochs makes one etcd call at a time.
    verifying: tokio::sync::Mutex<()>,
}

struct Verifier {
    client: Client,
    election: String,
}

impl Epochs {
    /// The newest epoch adopted.
    pub fn newest(&self) -> u64 {
        self.newest.load(Ordering::SeqCst)
    }

    /// Admits a task of `epoch`: refused when older than the newest adopted; a higher one
    /// is adopted only once verified (cluster mode).
    pub async fn admit(&self, epoch: u64) -> Result<()> {
        let stale =
            |newest: u64| Error::Unavailable(format!("stale epoch {epoch} (newest seen {newest})"));
        let newest = self.newest();
        if epoch < newest {
            return Err(stale(newest));
        }
        if epoch == newest {
            return Ok(());
        }
        if let Some(v) = self.verifier.get() {
            let _one = self.verifying.lock().await;
            // Another request may have verified it meanwhile.
            if epoch > self.newest() {
                v.verify(epoch).await?;
            }
        }
        let newest = self.newest.fetch_max(epoch, Ordering::SeqCst);
        if epoch < newest {
            return Err(stale(newest));
        }
        Ok(())
    }
}

impl Verifier {
    async fn verify(&self, epoch: u64) -> Result<()> {
        let mut c = self.client.clone();
        let leader = match c.leader(self.election.clone()).await {
            Ok(mut r) => r.take_kv().map(|kv| kv.create_revision() as u64),
            Err(e) if e.to_string().contains("no leader") => None,
            // etcd unreachable: refuse for now (the coordinator retries), adopt nothing.
            Err(e) => {
                return Err(Error::Unavailable(format!(
                    "cannot verify epoch {epoch} in etcd: {e}"
                )));
            }
        };
        match leader {
            Some(current) if current == epoch => Ok(()),
            Some(current) => Err(Error::PermissionDenied(format!(
                "epoch {epoch} is not the current leader's (etcd says {current}); refused"
            ))),
            None => Err(Error::PermissionDenied(format!(
                "epoch {epoch} cannot be verified: no leader is elected; refused"
            ))),
        }
    }
}

impl Worker {
    /// Cluster mode: higher epochs are adopted only once etcd confirms them as the current
    /// leader's (call once, before serving).
    pub fn verify_epochs_with(&self, client: Client, cluster: &ClusterConfig) {
        let _ = self.epochs.verifier.set(Verifier {
            client,
            election: election_name(cluster),
        });
    }
}
