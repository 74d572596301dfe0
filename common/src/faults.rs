//! A fault-injecting [`ObjectStore`] wrapper for tests and chaos runs: per operation and
//! per path, an error probability, added latency, and "do it but lose the reply" (the
//! operation takes effect, then the caller gets an error, as when a response is lost on
//! the network). Seeded and deterministic for a given sequence of operations.
//!
//! Production never builds one: a store is wrapped only when its storage options name a
//! registered plan ([`FAULTS_OPTION`]), and the binaries register one only from the
//! `[testing] store_faults` configuration together with the `--allow-fault-injection` flag.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyMode, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The storage option naming a registered fault plan (never passed on to the real store).
pub const FAULTS_OPTION: &str = "freshet.faults";

/// An object-store operation a rule can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// An overwriting put.
    Put,
    /// A put-if-absent (`PutMode::Create`) or conditional update.
    PutIfAbsent,
    /// A whole-object get.
    Get,
    /// A ranged get (or `get_ranges`).
    GetRange,
    /// A head request.
    Head,
    /// A listing (recursive or with delimiter).
    List,
    /// A delete.
    Delete,
    /// An overwriting copy.
    Copy,
    /// A copy-if-not-exists.
    CopyIfNotExists,
    /// A multipart upload (faults apply when it starts).
    Multipart,
}

/// What a rule does to the operations it matches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultRule {
    /// Operations it applies to (empty: every operation).
    pub ops: Vec<Op>,
    /// Applies to paths containing this string (empty: every path).
    pub path_contains: String,
    /// Probability that the operation fails without taking effect.
    pub error_rate: f64,
    /// Probability that a write takes effect but its caller gets an error (a lost reply).
    pub lost_reply_rate: f64,
    /// Latency added before the operation, in milliseconds.
    pub latency_ms: u64,
    /// Matching operations let through before the rule starts injecting.
    pub after: u64,
    /// Faults injected at most (none: unlimited).
    pub max_faults: Option<u64>,
    /// Applies only once the rule at this index (in the spec) has injected a fault, so one
    /// fault can follow another (say, the log becomes unreadable right after a lost reply).
    pub armed_by: Option<usize>,
}

/// A seeded set of rules (the first matching rule with a fault to inject wins).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultSpec {
    /// Seed of the random choices.
    pub seed: u64,
    /// The rules.
    pub rules: Vec<FaultRule>,
}

impl FaultSpec {
    /// Checks the probabilities; the error names the rule and the field.
    pub fn validate(&self) -> Result<(), String> {
        for (i, r) in self.rules.iter().enumerate() {
            for (name, p) in [
                ("error_rate", r.error_rate),
                ("lost_reply_rate", r.lost_reply_rate),
            ] {
                if !(0.0..=1.0).contains(&p) {
                    return Err(format!(
                        "store_faults rule {i}: {name} = {p} is not in 0..=1"
                    ));
                }
            }
            if r.armed_by.is_some_and(|j| j >= self.rules.len() || j == i) {
                return Err(format!(
                    "store_faults rule {i}: armed_by = {} names no other rule",
                    r.armed_by.unwrap_or_default()
                ));
            }
        }
        Ok(())
    }
}

/// The kind of fault injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// Failed without effect.
    Error,
    /// Took effect, reply lost.
    LostReply,
    /// Delayed.
    Latency,
}

#[derive(Default)]
struct RuleState {
    seen: u64,
    injected: u64,
}

/// A live fault plan: the spec, its random state and counters. Shared by every store that
/// names it, so one plan covers a process (or one in-process test).
pub struct FaultPlan {
    spec: FaultSpec,
    state: Mutex<(SmallRng, Vec<RuleState>)>,
    counts: Mutex<BTreeMap<(Op, FaultKind), u64>>,
    enabled: AtomicBool,
}

impl fmt::Debug for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultPlan")
            .field("spec", &self.spec)
            .finish()
    }
}

enum Decision {
    Pass,
    Fail,
    LoseReply,
}

impl FaultPlan {
    /// A plan from its spec.
    pub fn new(spec: FaultSpec) -> Arc<Self> {
        let rules = spec.rules.iter().map(|_| RuleState::default()).collect();
        Arc::new(FaultPlan {
            state: Mutex::new((SmallRng::seed_from_u64(spec.seed), rules)),
            spec,
            counts: Mutex::new(BTreeMap::new()),
            enabled: AtomicBool::new(true),
        })
    }

    /// Turns injection on or off (a chaos run ends with the faults off to converge).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    /// Faults injected so far, by operation and kind.
    pub fn counts(&self) -> BTreeMap<(Op, FaultKind), u64> {
        self.counts.lock().expect("lock").clone()
    }

    /// Faults injected so far of one kind.
    pub fn total(&self, kind: FaultKind) -> u64 {
        self.counts()
            .iter()
            .filter(|((_, k), _)| *k == kind)
            .map(|(_, n)| n)
            .sum()
    }

    fn count(&self, op: Op, kind: FaultKind) {
        *self
            .counts
            .lock()
            .expect("lock")
            .entry((op, kind))
            .or_default() += 1;
    }

    /// Decides the fate of one operation (and how long to delay it).
    fn decide(&self, op: Op, path: &str) -> (Decision, Duration) {
        if !self.enabled.load(Ordering::SeqCst) {
            return (Decision::Pass, Duration::ZERO);
        }
        let mut guard = self.state.lock().expect("lock");
        let (rng, states) = &mut *guard;
        let mut delay = Duration::ZERO;
        for (i, rule) in self.spec.rules.iter().enumerate() {
            let matches = (rule.ops.is_empty() || rule.ops.contains(&op))
                && (rule.path_contains.is_empty() || path.contains(&rule.path_contains))
                && rule
                    .armed_by
                    .is_none_or(|j| states.get(j).is_some_and(|s| s.injected > 0));
            if !matches {
                continue;
            }
            let st = &mut states[i];
            st.seen += 1;
            if st.seen <= rule.after || rule.max_faults.is_some_and(|m| st.injected >= m) {
                continue;
            }
            if rule.latency_ms > 0 {
                delay += Duration::from_millis(rule.latency_ms);
            }
            let writes = !matches!(op, Op::Get | Op::GetRange | Op::Head | Op::List);
            let x: f64 = rng.r#gen();
            if x < rule.error_rate {
                st.injected += 1;
                self.count(op, FaultKind::Error);
                return (Decision::Fail, delay);
            }
            if writes && x < rule.error_rate + rule.lost_reply_rate {
                st.injected += 1;
                self.count(op, FaultKind::LostReply);
                return (Decision::LoseReply, delay);
            }
        }
        if !delay.is_zero() {
            self.count(op, FaultKind::Latency);
        }
        (Decision::Pass, delay)
    }
}

fn registry() -> &'static Mutex<HashMap<String, Arc<FaultPlan>>> {
    static R: OnceLock<Mutex<HashMap<String, Arc<FaultPlan>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Registers a plan under `name`; stores whose options set [`FAULTS_OPTION`] to `name` use it.
pub fn register(name: &str, plan: Arc<FaultPlan>) {
    registry()
        .lock()
        .expect("lock")
        .insert(name.to_string(), plan);
}

/// The plan registered under `name`.
pub fn lookup(name: &str) -> Option<Arc<FaultPlan>> {
    registry().lock().expect("lock").get(name).cloned()
}

/// The object store with faults injected.
#[derive(Debug)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    plan: Arc<FaultPlan>,
}

impl FaultStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, plan: Arc<FaultPlan>) -> Self {
        FaultStore { inner, plan }
    }

    fn injected(op: Op, path: &str, lost: bool) -> object_store::Error {
        let what = if lost {
            "reply lost after the operation took effect"
        } else {
            "operation failed"
        };
        object_store::Error::Generic {
            store: "FaultStore",
            source: format!("injected fault: {op:?} {path}: {what}").into(),
        }
    }

    /// Runs `f` under the plan's decision for (`op`, `path`).
    async fn run<T, F>(&self, op: Op, path: &str, f: F) -> object_store::Result<T>
    where
        F: std::future::Future<Output = object_store::Result<T>>,
    {
        let (decision, delay) = self.plan.decide(op, path);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match decision {
            Decision::Pass => f.await,
            Decision::Fail => Err(Self::injected(op, path, false)),
            Decision::LoseReply => {
                let _ = f.await?;
                Err(Self::injected(op, path, true))
            }
        }
    }
}

impl fmt::Display for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let op = match opts.mode {
            PutMode::Overwrite => Op::Put,
            _ => Op::PutIfAbsent,
        };
        self.run(
            op,
            location.as_ref(),
            self.inner.put_opts(location, payload, opts),
        )
        .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.run(
            Op::Multipart,
            location.as_ref(),
            self.inner.put_multipart_opts(location, opts),
        )
        .await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let op = if options.head {
            Op::Head
        } else if options.range.is_some() {
            Op::GetRange
        } else {
            Op::Get
        };
        self.run(
            op,
            location.as_ref(),
            self.inner.get_opts(location, options),
        )
        .await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.run(
            Op::GetRange,
            location.as_ref(),
            self.inner.get_ranges(location, ranges),
        )
        .await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let inner = self.inner.clone();
        let plan = self.plan.clone();
        locations
            .then(move |p| {
                let inner = inner.clone();
                let plan = plan.clone();
                async move {
                    let p = p?;
                    let store = FaultStore { inner, plan };
                    let one = futures::stream::once(futures::future::ready(Ok(p.clone()))).boxed();
                    store
                        .run(Op::Delete, p.as_ref(), async {
                            let mut s = store.inner.delete_stream(one);
                            match s.next().await {
                                Some(r) => r,
                                None => Ok(p.clone()),
                            }
                        })
                        .await
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let path = prefix.map(|p| p.to_string()).unwrap_or_default();
        let (decision, delay) = self.plan.decide(Op::List, &path);
        let inner = self.inner.list(prefix);
        let fail = matches!(decision, Decision::Fail | Decision::LoseReply);
        futures::stream::once(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if fail {
                futures::stream::once(futures::future::ready(Err(Self::injected(
                    Op::List,
                    &path,
                    false,
                ))))
                .boxed()
            } else {
                inner
            }
        })
        .flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let path = prefix.map(|p| p.to_string()).unwrap_or_default();
        self.run(Op::List, &path, self.inner.list_with_delimiter(prefix))
            .await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let op = match options.mode {
            CopyMode::Overwrite => Op::Copy,
            CopyMode::Create => Op::CopyIfNotExists,
        };
        self.run(op, to.as_ref(), self.inner.copy_opts(from, to, options))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    fn store(spec: FaultSpec) -> (FaultStore, Arc<FaultPlan>) {
        let plan = FaultPlan::new(spec);
        (
            FaultStore::new(Arc::new(InMemory::new()), plan.clone()),
            plan,
        )
    }

    #[tokio::test]
    async fn a_lost_reply_takes_effect_and_an_error_does_not() {
        let (s, plan) = store(FaultSpec {
            seed: 1,
            rules: vec![
                FaultRule {
                    ops: vec![Op::PutIfAbsent],
                    path_contains: "lost/".into(),
                    lost_reply_rate: 1.0,
                    ..Default::default()
                },
                FaultRule {
                    ops: vec![Op::Put],
                    path_contains: "err/".into(),
                    error_rate: 1.0,
                    max_faults: Some(1),
                    ..Default::default()
                },
            ],
        });
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let e = s
            .put_opts(&Path::from("lost/a"), PutPayload::from("x"), create.clone())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("reply lost"), "{e}");
        assert_eq!(
            s.get(&Path::from("lost/a"))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
            "x"
        );
        // A retry of the put-if-absent finds the object (the ambiguity callers must settle).
        plan.set_enabled(false);
        let e = s
            .put_opts(&Path::from("lost/a"), PutPayload::from("x"), create)
            .await
            .unwrap_err();
        assert!(
            matches!(e, object_store::Error::AlreadyExists { .. }),
            "{e}"
        );
        plan.set_enabled(true);

        assert!(
            s.put(&Path::from("err/b"), PutPayload::from("y"))
                .await
                .is_err()
        );
        assert!(
            s.head(&Path::from("err/b")).await.is_err(),
            "a failed put has no effect"
        );
        // max_faults = 1: the next put goes through.
        s.put(&Path::from("err/b"), PutPayload::from("y"))
            .await
            .unwrap();
        assert_eq!(plan.total(FaultKind::Error), 1);
        assert_eq!(plan.total(FaultKind::LostReply), 1);
    }

    #[tokio::test]
    async fn the_same_seed_injects_the_same_faults() {
        let spec = FaultSpec {
            seed: 42,
            rules: vec![FaultRule {
                error_rate: 0.3,
                ..Default::default()
            }],
        };
        let mut outcomes = Vec::new();
        for _ in 0..2 {
            let (s, _) = store(spec.clone());
            let mut o = Vec::new();
            for i in 0..50 {
                o.push(
                    s.put(&Path::from(format!("k/{i}")), PutPayload::from("v"))
                        .await
                        .is_ok(),
                );
            }
            outcomes.push(o);
        }
        assert_eq!(outcomes[0], outcomes[1]);
        let fails = outcomes[0].iter().filter(|ok| !**ok).count();
        assert!((5..30).contains(&fails), "{fails} of 50 failed at rate 0.3");
    }

    #[tokio::test]
    async fn reads_lists_and_deletes_can_fail() {
        let (s, plan) = store(FaultSpec::default());
        s.put(&Path::from("d/x"), PutPayload::from("v"))
            .await
            .unwrap();
        let (f, _) = {
            let p = FaultPlan::new(FaultSpec {
                seed: 0,
                rules: vec![FaultRule {
                    ops: vec![Op::List, Op::Get, Op::Delete],
                    error_rate: 1.0,
                    ..Default::default()
                }],
            });
            (FaultStore::new(s.inner.clone(), p.clone()), p)
        };
        assert!(f.get(&Path::from("d/x")).await.is_err());
        let listed: Vec<_> = f.list(Some(&Path::from("d"))).collect().await;
        assert!(listed.iter().all(|r| r.is_err()) && !listed.is_empty());
        assert!(f.delete(&Path::from("d/x")).await.is_err());
        assert!(
            s.head(&Path::from("d/x")).await.is_ok(),
            "the failed delete had no effect"
        );
        assert_eq!(plan.total(FaultKind::Error), 0);
        assert!(
            FaultSpec {
                seed: 0,
                rules: vec![FaultRule {
                    error_rate: 1.5,
                    ..Default::default()
                }]
            }
            .validate()
            .unwrap_err()
            .contains("error_rate")
        );
    }
}
