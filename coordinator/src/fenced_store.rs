//! The coordinator's object store: every request bounded in time and retried here (not
//! inside object_store, whose own retries could keep a request going for minutes), with
//! the leader's fence checked before every write attempt, so a coordinator whose lease may
//! have expired starts no write; and a put-if-absent whose reply was lost is settled by
//! reading the object back, so a write that took effect is reported as done.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use crate::fence::Fence;

/// How the coordinator's requests are bounded.
#[derive(Debug, Clone, Copy)]
pub struct RequestPolicy {
    /// Attempts per request (1 = no retry).
    pub max_attempts: u32,
    /// Longest one attempt may take (further shortened to what is left of the lease).
    pub attempt_timeout: Duration,
    /// Wait before the first retry (doubled each time).
    pub backoff: Duration,
}

/// `store` with the coordinator's bounded retries and no lease to respect (the catalog,
/// start-up checks: a transient error there must not end a term or the process).
pub fn retrying(store: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
    Arc::new(FencedStore::new(
        store,
        Arc::new(Fence::none()),
        RequestPolicy {
            max_attempts: 4,
            attempt_timeout: Duration::from_secs(10),
            backoff: Duration::from_millis(100),
        },
    ))
}

/// The wrapper (see the module doc).
#[derive(Clone)]
pub struct FencedStore {
    inner: Arc<dyn ObjectStore>,
    fence: Arc<Fence>,
    policy: RequestPolicy,
}

impl fmt::Debug for FencedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FencedStore")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .finish()
    }
}

impl fmt::Display for FencedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FencedStore({})", self.inner)
    }
}

fn generic(msg: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "FencedStore",
        source: msg.into(),
    }
}

/// Errors worth another attempt: transport, server and timeout errors (object_store reports
/// them as `Generic`); answers such as not-found or already-exists are final.
fn transient(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::Generic { .. })
}

impl FencedStore {
    /// Wraps `inner`, fenced by `fence`.
    pub fn new(inner: Arc<dyn ObjectStore>, fence: Arc<Fence>, policy: RequestPolicy) -> Self {
        FencedStore {
            inner,
            fence,
            policy,
        }
    }

    /// The time one write attempt may take now, or an error when no write may start.
    fn write_budget(&self, what: &str) -> object_store::Result<Duration> {
        self.fence
            .check_local()
            .map_err(|e| generic(format!("{what} not started: {e}")))?;
        let budget = match self.fence.valid_for() {
            Some(left) => left.min(self.policy.attempt_timeout),
            None => self.policy.attempt_timeout,
        };
        if budget.is_zero() {
            return Err(generic(format!(
                "{what} not started: the leader lease is about to expire"
            )));
        }
        Ok(budget)
    }

    /// Runs attempts of `op` until one succeeds, an error is final, or attempts run out.
    async fn retry<T, F, Fut>(&self, what: &str, write: bool, mut op: F) -> object_store::Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        let mut backoff = self.policy.backoff;
        let mut attempt = 1;
        loop {
            let budget = if write {
                self.write_budget(what)?
            } else {
                self.policy.attempt_timeout
            };
            let result = match tokio::time::timeout(budget, op(attempt)).await {
                Ok(r) => r,
                Err(_) => Err(generic(format!(
                    "{what}: no answer within {} ms",
                    budget.as_millis()
                ))),
            };
            match result {
                Err(e) if transient(&e) && attempt < self.policy.max_attempts.max(1) => {
                    tracing::debug!(what, attempt, error = %e, "object store request failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// After an attempt of a put-if-absent failed ambiguously and a later one found the
    /// object: it is ours when it holds exactly our bytes.
    async fn settle_create(
        &self,
        location: &Path,
        payload: &PutPayload,
    ) -> object_store::Result<PutResult> {
        let ours: Vec<u8> = payload.iter().flat_map(|b| b.iter().copied()).collect();
        let stored = self
            .retry(&format!("read back {location}"), false, |_| async {
                self.inner.get(location).await?.bytes().await
            })
            .await?;
        if stored.as_ref() == ours.as_slice() {
            tracing::info!(path = %location, "put-if-absent: an earlier attempt took effect (lost reply)");
            Ok(PutResult {
                e_tag: None,
                version: None,
            })
        } else {
            Err(object_store::Error::AlreadyExists {
                path: location.to_string(),
                source: "another writer created it".into(),
            })
        }
    }
}

#[async_trait]
impl ObjectStore for FencedStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let create = matches!(opts.mode, PutMode::Create);
        let mut ambiguous = false;
        let what = format!("put {location}");
        let result = self
            .retry(&what, true, |attempt| {
                let (payload, opts) = (payload.clone(), opts.clone());
                if attempt > 1 {
                    ambiguous = true;
                }
                async move { self.inner.put_opts(location, payload, opts).await }
            })
            .await;
        match result {
            Err(object_store::Error::AlreadyExists { .. }) if create && ambiguous => {
                self.settle_create(location, &payload).await
            }
            other => other,
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.write_budget(&format!("multipart upload {location}"))?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.retry(&format!("get {location}"), false, |_| {
            self.inner.get_opts(location, options.clone())
        })
        .await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.retry(&format!("get {location}"), false, |_| {
            self.inner.get_ranges(location, ranges)
        })
        .await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let this = Arc::new(self.clone());
        locations
            .then(move |p| {
                let this = this.clone();
                async move {
                    let p = p?;
                    this.retry(&format!("delete {p}"), true, |_| {
                        let one = futures::stream::iter([Ok(p.clone())]).boxed();
                        let mut s = this.inner.delete_stream(one);
                        let p = p.clone();
                        async move { s.next().await.unwrap_or(Ok(p)) }
                    })
                    .await
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        // Collected with retries, so a listing never ends half-way on a transient error.
        let this = self.clone();
        let prefix = prefix.cloned();
        futures::stream::once(async move {
            let what = format!("list {}", prefix.as_ref().map(|p| p.as_ref()).unwrap_or(""));
            let all: object_store::Result<Vec<ObjectMeta>> = this
                .retry(&what, false, |_| {
                    this.inner.list(prefix.as_ref()).try_collect::<Vec<_>>()
                })
                .await;
            match all {
                Ok(v) => futures::stream::iter(v.into_iter().map(Ok)).boxed(),
                Err(e) => futures::stream::iter([Err(e)]).boxed(),
            }
        })
        .flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let what = format!("list {}", prefix.map(|p| p.as_ref()).unwrap_or(""));
        self.retry(&what, false, |_| self.inner.list_with_delimiter(prefix))
            .await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.retry(&format!("copy {from} to {to}"), true, |_| {
            self.inner.copy_opts(from, to, options.clone())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshet_common::faults::{FaultPlan, FaultRule, FaultSpec, FaultStore, Op};
    use object_store::memory::InMemory;

    fn policy() -> RequestPolicy {
        RequestPolicy {
            max_attempts: 4,
            attempt_timeout: Duration::from_secs(2),
            backoff: Duration::from_millis(1),
        }
    }

    fn faulty(rules: Vec<FaultRule>) -> (FencedStore, Arc<dyn ObjectStore>) {
        let raw: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let plan = FaultPlan::new(FaultSpec { seed: 7, rules });
        let store = FencedStore::new(
            Arc::new(FaultStore::new(raw.clone(), plan)),
            Arc::new(Fence::none()),
            policy(),
        );
        (store, raw)
    }

    #[tokio::test]
    async fn a_lost_reply_of_a_put_if_absent_is_settled_as_done() {
        let (s, raw) = faulty(vec![FaultRule {
            ops: vec![Op::PutIfAbsent],
            lost_reply_rate: 1.0,
            max_faults: Some(1),
            ..Default::default()
        }]);
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        s.put_opts(&Path::from("seg"), PutPayload::from("abc"), create.clone())
            .await
            .expect("the write took effect: done");
        assert_eq!(
            raw.get(&Path::from("seg"))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
            "abc"
        );
        // Someone else's object is still a conflict.
        let e = s
            .put_opts(&Path::from("seg"), PutPayload::from("xyz"), create)
            .await
            .unwrap_err();
        assert!(
            matches!(e, object_store::Error::AlreadyExists { .. }),
            "{e}"
        );
    }

    #[tokio::test]
    async fn transient_errors_are_retried_and_then_reported() {
        let (s, _) = faulty(vec![FaultRule {
            ops: vec![Op::Put, Op::Get],
            error_rate: 1.0,
            max_faults: Some(3),
            ..Default::default()
        }]);
        s.put(&Path::from("a"), PutPayload::from("1"))
            .await
            .expect("4th attempt");
        let (s, _) = faulty(vec![FaultRule {
            ops: vec![Op::Put],
            error_rate: 1.0,
            ..Default::default()
        }]);
        let e = s
            .put(&Path::from("a"), PutPayload::from("1"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("injected"), "{e}");
    }

    #[tokio::test]
    async fn a_slow_request_is_cut_at_the_attempt_timeout() {
        let raw: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let plan = FaultPlan::new(FaultSpec {
            seed: 0,
            rules: vec![FaultRule {
                ops: vec![Op::Put],
                latency_ms: 60_000,
                ..Default::default()
            }],
        });
        let s = FencedStore::new(
            Arc::new(FaultStore::new(raw, plan)),
            Arc::new(Fence::none()),
            RequestPolicy {
                max_attempts: 2,
                attempt_timeout: Duration::from_millis(50),
                backoff: Duration::from_millis(1),
            },
        );
        let started = std::time::Instant::now();
        let e = s
            .put(&Path::from("a"), PutPayload::from("1"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no answer within 50 ms"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[tokio::test]
    async fn no_write_outlives_the_lease() {
        // A store that hangs (a minute per request) under a lease with ~1.2 s left: the
        // write is cut when the lease (less its margin) runs out, and no retry starts.
        let raw: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let plan = FaultPlan::new(FaultSpec {
            seed: 0,
            rules: vec![FaultRule {
                ops: vec![Op::PutIfAbsent],
                latency_ms: 60_000,
                ..Default::default()
            }],
        });
        let s = FencedStore::new(
            Arc::new(FaultStore::new(raw.clone(), plan)),
            Arc::new(Fence::lease_only(Duration::from_millis(1200))),
            RequestPolicy {
                max_attempts: 10,
                attempt_timeout: Duration::from_secs(30),
                backoff: Duration::from_millis(10),
            },
        );
        let started = std::time::Instant::now();
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let e = s
            .put_opts(&Path::from("seg"), PutPayload::from("x"), create)
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(e.to_string().contains("lease"), "{e}");
        assert!(
            took < Duration::from_millis(1200),
            "the write outlived the lease: {took:?}"
        );
        // Nothing was written, not even later.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(raw.head(&Path::from("seg")).await.is_err());
    }
}
