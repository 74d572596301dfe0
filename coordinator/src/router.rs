//! Sends tasks to workers: balanced by bytes, retried on another worker when the failure
//! is the worker's (or the way to it), not the task's: see [`retry_elsewhere`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use freshet_common::tls::ClientTls;
use freshet_proto::worker::v1::worker_service_client::WorkerServiceClient;
use freshet_proto::worker::v1::{RewriteRequest, RewriteResponse};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

/// The result of one task after all its attempts.
#[derive(Debug, Clone)]
pub struct TaskOutcome {
    /// The response of the successful attempt, if any.
    pub response: Option<RewriteResponse>,
    /// The worker of the last attempt.
    pub worker: String,
    /// Attempts made.
    pub attempts: u32,
    /// The error of each failed attempt.
    pub errors: Vec<String>,
    /// Wall time across attempts.
    pub duration: Duration,
}

/// A worker the router may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The URL to dial.
    pub address: String,
    /// Tasks it runs at once (weights the balancing).
    pub capacity: u32,
}

/// Tasks sent to a worker and how many failed, since this router started.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerStats {
    /// Attempts sent.
    pub sent: u64,
    /// Attempts that failed.
    pub failed: u64,
    /// Attempts running now.
    pub in_flight: u64,
}

/// The set of workers and their connections.
pub struct Router {
    members: RwLock<Vec<Member>>,
    clients: Mutex<HashMap<String, WorkerServiceClient<Channel>>>,
    stats: Mutex<HashMap<String, WorkerStats>>,
    max_message_bytes: usize,
    /// Mutual TLS to the workers (None: plaintext).
    tls: Option<Arc<ClientTls>>,
}

impl Router {
    /// A router over static endpoints (capacity 1 each).
    pub fn new(endpoints: Vec<String>, max_message_bytes: usize) -> Self {
        Router {
            members: RwLock::new(Vec::new()),
            clients: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            max_message_bytes,
            tls: None,
        }
        .with_endpoints(endpoints)
    }

    /// Dials workers over TLS, presenting the coordinator's certificate (mutual TLS).
    pub fn with_tls(mut self, tls: Option<Arc<ClientTls>>) -> Self {
        self.tls = tls;
        self
    }

    fn with_endpoints(self, endpoints: Vec<String>) -> Self {
        self.set_workers(endpoints);
        self
    }

    /// Replaces the worker set (capacity 1 each); used from the next cycle on.
    pub fn set_workers(&self, endpoints: Vec<String>) {
        self.set_members(
            endpoints
                .into_iter()
                .map(|address| Member {
                    address,
                    capacity: 1,
                })
                .collect(),
        );
    }

    /// Replaces the worker set; used from the next cycle (and the next retry) on.
    pub fn set_members(&self, members: Vec<Member>) {
        let mut m = members;
        m.sort_by(|a, b| a.address.cmp(&b.address));
        m.dedup_by(|a, b| a.address == b.address);
        self.clients
            .lock()
            .expect("lock")
            .retain(|addr, _| m.iter().any(|x| &x.address == addr));
        *self.members.write().expect("lock") = m;
    }

    /// The current worker endpoints.
    pub fn workers(&self) -> Vec<String> {
        self.members().into_iter().map(|m| m.address).collect()
    }

    /// The current workers.
    pub fn members(&self) -> Vec<Member> {
        self.members.read().expect("lock").clone()
    }

    /// Per-worker task counts.
    pub fn stats(&self, address: &str) -> WorkerStats {
        self.stats
            .lock()
            .expect("lock")
            .get(address)
            .copied()
            .unwrap_or_default()
    }

    fn count(&self, address: &str, f: impl FnOnce(&mut WorkerStats)) {
        f(self
            .stats
            .lock()
            .expect("lock")
            .entry(address.to_string())
            .or_default());
    }

    fn client(&self, endpoint: &str) -> Result<WorkerServiceClient<Channel>, String> {
        let mut clients = self.clients.lock().expect("lock");
        if let Some(c) = clients.get(endpoint) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("bad worker endpoint '{endpoint}': {e}"))?
            .connect_timeout(Duration::from_secs(5));
        let channel = match &self.tls {
            Some(tls) => tls.channel(ep),
            None => ep.connect_lazy(),
        };
        let c = WorkerServiceClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        clients.insert(endpoint.to_string(), c.clone());
        Ok(c)
    }

    /// Runs every task; a failed attempt is retried on another worker, up to `max_attempts`,
    /// unless its error says the task itself is at fault ([`retry_elsewhere`]).
    /// `weights` (bytes per task) balance the first assignment: largest first, to the worker
    /// whose load per unit of capacity stays lowest. Retries use the membership as it is at
    /// the time of the retry (a worker that joined mid-cycle can take over a task).
    pub async fn run(
        &self,
        requests: Vec<RewriteRequest>,
        weights: &[u64],
        max_attempts: u32,
        timeout: Duration,
    ) -> Vec<TaskOutcome> {
        let members = self.members();
        if members.is_empty() {
            return requests
                .iter()
                .map(|_| TaskOutcome {
                    response: None,
                    worker: String::new(),
                    attempts: 0,
                    errors: vec!["no workers available".into()],
                    duration: Duration::ZERO,
                })
                .collect();
        }
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by_key(|i| std::cmp::Reverse(weights[*i]));
        let first_worker = assign(&members, weights, &order);
        let futures = requests.into_iter().enumerate().map(|(i, req)| {
            let first = members[first_worker[i]].address.clone();
            let span = tracing::info_span!("task", cycle_id = %req.cycle_id, task = req.task_id);
            async move {
                let began = Instant::now();
                let mut errors = Vec::new();
                let mut worker = String::new();
                let mut failed: Vec<String> = Vec::new();
                for attempt in 1..=max_attempts.max(1) {
                    worker = if attempt == 1 { first.clone() } else { self.next_worker(&failed).unwrap_or_else(|| worker.clone()) };
                    let mut req = req.clone();
                    req.attempt = attempt;
                    self.count(&worker, |s| { s.sent += 1; s.in_flight += 1; });
                    // Err: the message, and whether another worker may succeed.
                    let result = match self.client(&worker) {
                        // A bad endpoint is that worker's problem, not the task's.
                        Err(e) => Err((e, true)),
                        Ok(mut client) => match tokio::time::timeout(timeout, client.rewrite(req)).await {
                            Err(_) => Err((format!("timed out after {timeout:?}"), true)),
                            Ok(Err(status)) => Err((format!("{}: {}", status.code(), status.message()), retry_elsewhere(status.code()))),
                            Ok(Ok(resp)) => Ok(resp.into_inner()),
                        },
                    };
                    self.count(&worker, |s| { s.in_flight -= 1; if result.is_err() { s.failed += 1; } });
                    match result {
                        Ok(resp) => {
                            return TaskOutcome { response: Some(resp), worker, attempts: attempt, errors, duration: began.elapsed() };
                        }
                        Err((e, retry)) => {
                            tracing::warn!(worker = %worker, attempt, error = %e, retry, "task attempt failed");
                            errors.push(format!("attempt {attempt} on {worker}: {e}"));
                            failed.push(worker.clone());
                            if !retry {
                                // Every worker would answer the same: the task is at fault.
                                return TaskOutcome { response: None, worker, attempts: attempt, errors, duration: began.elapsed() };
                            }
                        }
                    }
                }
                TaskOutcome { response: None, worker, attempts: max_attempts.max(1), errors, duration: began.elapsed() }
            }
            .instrument(span)
        });
        futures::future::join_all(futures).await
    }
}

impl Router {
    /// The worker each task of `weights` would go to first (a dry run of `run`'s
    /// assignment; nothing is sent).
    pub fn preview(&self, weights: &[u64]) -> Vec<String> {
        let members = self.members();
        if members.is_empty() {
            return vec![String::new(); weights.len()];
        }
        let mut order: Vec<usize> = (0..weights.len()).collect();
        order.sort_by_key(|i| std::cmp::Reverse(weights[*i]));
        assign(&members, weights, &order)
            .into_iter()
            .map(|i| members[i].address.clone())
            .collect()
    }

    /// The worker for a retry: the least-used current worker that has not failed this task,
    /// else any current worker.
    fn next_worker(&self, failed: &[String]) -> Option<String> {
        let members = self.members();
        let stats = self.stats.lock().expect("lock");
        let load = |m: &Member| {
            let s = stats.get(&m.address).copied().unwrap_or_default();
            (s.in_flight * 1000) / m.capacity.max(1) as u64
        };
        members
            .iter()
            .filter(|m| !failed.contains(&m.address))
            .min_by_key(|m| load(m))
            .or_else(|| {
                // Every worker failed this task once: go round again, oldest failure first.
                failed
                    .first()
                    .and_then(|f| members.iter().find(|m| &m.address == f))
            })
            .map(|m| m.address.clone())
    }
}

/// Whether a task whose attempt failed with `code` may succeed on another worker.
///
/// Retried: failures of the worker or of the way to it, which another worker (or a later
/// attempt) may not have: UNAVAILABLE (down, draining, a stale epoch, connection refused),
/// DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (busy, or a smaller message limit there), ABORTED,
/// CANCELLED, UNKNOWN (what tonic makes of a connection reset mid-call, e.g. a killed
/// worker), INTERNAL (the worker's object store or disk failed, injected faults),
/// DATA_LOSS, UNIMPLEMENTED and UNAUTHENTICATED (that endpoint is not a worker of this
/// cluster, or does not take our credentials). Timeouts and bad endpoints are retried too.
///
/// Not retried: the task itself is refused, and every worker would refuse it the same way:
/// INVALID_ARGUMENT (a malformed request), FAILED_PRECONDITION, OUT_OF_RANGE, NOT_FOUND,
/// ALREADY_EXISTS, PERMISSION_DENIED (a table URI outside the allowed prefixes, or an epoch
/// etcd says is not the leader's). OK never fails.
pub fn retry_elsewhere(code: Code) -> bool {
    match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal
        | Code::DataLoss
        | Code::Unimplemented
        | Code::Unauthenticated => true,
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Ok => false,
    }
}

/// Longest-processing-time assignment weighted by capacity: tasks in `order` (heaviest
/// first) each go to the worker whose load per unit of capacity after taking it is lowest.
fn assign(members: &[Member], weights: &[u64], order: &[usize]) -> Vec<usize> {
    let mut load = vec![0u64; members.len()];
    let mut out = vec![0usize; weights.len()];
    for &i in order {
        let w = weights[i].max(1);
        let best = (0..members.len())
            .min_by(|a, b| {
                let la = (load[*a] + w) as f64 / members[*a].capacity.max(1) as f64;
                let lb = (load[*b] + w) as f64 / members[*b].capacity.max(1) as f64;
                la.total_cmp(&lb)
            })
            .expect("members");
        load[best] += w;
        out[i] = best;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(a: &str, c: u32) -> Member {
        Member {
            address: a.into(),
            capacity: c,
        }
    }

    #[test]
    fn assignment_balances_bytes_by_capacity() {
        // Six equal tasks over workers of capacity 1 and 2: the bigger one gets twice as many.
        let members = vec![m("a", 1), m("b", 2)];
        let weights = vec![10; 6];
        let order: Vec<usize> = (0..6).collect();
        let a = assign(&members, &weights, &order);
        assert_eq!(a.iter().filter(|w| **w == 0).count(), 2);
        assert_eq!(a.iter().filter(|w| **w == 1).count(), 4);
        // One heavy task and many light ones: the light ones avoid the heavy one's worker.
        let members = vec![m("a", 1), m("b", 1), m("c", 1)];
        let weights = vec![100, 10, 10, 10, 10, 10];
        let a = assign(&members, &weights, &(0..6).collect::<Vec<_>>());
        assert!(a[1..].iter().all(|w| *w != a[0]), "{a:?}");
    }

    #[test]
    fn only_failures_of_the_worker_are_retried_elsewhere() {
        let retried = [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Cancelled,
            Code::Unknown,
            Code::Internal,
            Code::DataLoss,
            Code::Unimplemented,
            Code::Unauthenticated,
        ];
        let permanent = [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::OutOfRange,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::Ok,
        ];
        // Every code is in exactly one list.
        assert_eq!(retried.len() + permanent.len(), 17);
        for c in retried {
            assert!(retry_elsewhere(c), "{c:?}");
        }
        for c in permanent {
            assert!(!retry_elsewhere(c), "{c:?}");
        }
        // The codes Freshet's own errors map to on a worker.
        use freshet_common::error::Error;
        let code = |e: Error| retry_elsewhere(e.code());
        assert!(!code(Error::invalid("t", "bad request")));
        assert!(!code(Error::PermissionDenied("forged epoch".into())));
        assert!(code(Error::Unavailable("draining".into())));
        assert!(code(Error::Injected("worker rewrite".into())));
        assert!(code(Error::Internal("disk".into())));
    }

    #[test]
    fn retries_prefer_workers_that_did_not_fail() {
        let r = Router::new(vec![], 1 << 20);
        r.set_members(vec![m("http://a", 1), m("http://b", 1), m("http://c", 1)]);
        let next = r.next_worker(&["http://a".into()]).unwrap();
        assert_ne!(next, "http://a");
        let all: Vec<String> = vec!["http://a".into(), "http://b".into(), "http://c".into()];
        assert_eq!(r.next_worker(&all).unwrap(), "http://a");
        r.set_members(vec![]);
        assert!(r.next_worker(&[]).is_none());
    }
}
