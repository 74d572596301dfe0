//! Sends tasks to workers: balanced by bytes, retried on another worker on failure.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use freshet_proto::worker::v1::worker_service_client::WorkerServiceClient;
use freshet_proto::worker::v1::{RewriteRequest, RewriteResponse};
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

/// The set of workers and their connections.
pub struct Router {
    endpoints: RwLock<Vec<String>>,
    clients: Mutex<HashMap<String, WorkerServiceClient<Channel>>>,
    max_message_bytes: usize,
}

impl Router {
    /// A router over static endpoints.
    pub fn new(endpoints: Vec<String>, max_message_bytes: usize) -> Self {
        Router {
            endpoints: RwLock::new(endpoints),
            clients: Mutex::new(HashMap::new()),
            max_message_bytes,
        }
    }

    /// Replaces the worker set; used from the next cycle on.
    pub fn set_workers(&self, endpoints: Vec<String>) {
        *self.endpoints.write().expect("lock") = endpoints;
    }

    /// The current worker endpoints.
    pub fn workers(&self) -> Vec<String> {
        self.endpoints.read().expect("lock").clone()
    }

    fn client(&self, endpoint: &str) -> Result<WorkerServiceClient<Channel>, String> {
        let mut clients = self.clients.lock().expect("lock");
        if let Some(c) = clients.get(endpoint) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("bad worker endpoint '{endpoint}': {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        let c = WorkerServiceClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        clients.insert(endpoint.to_string(), c.clone());
        Ok(c)
    }

    /// Runs every task; a failed attempt is retried on the next worker, up to `max_attempts`.
    /// `weights` (bytes per task) balance the first assignment: largest first, to the least
    /// loaded worker.
    pub async fn run(
        &self,
        requests: Vec<RewriteRequest>,
        weights: &[u64],
        max_attempts: u32,
        timeout: Duration,
    ) -> Vec<TaskOutcome> {
        let workers = self.workers();
        if workers.is_empty() {
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
        let mut load = vec![0u64; workers.len()];
        let mut first_worker = vec![0usize; requests.len()];
        for i in order {
            let w = (0..workers.len())
                .min_by_key(|w| load[*w])
                .expect("workers");
            load[w] += weights[i].max(1);
            first_worker[i] = w;
        }
        let futures = requests.into_iter().enumerate().map(|(i, req)| {
            let workers = &workers;
            let start = first_worker[i];
            let span = tracing::info_span!("task", cycle_id = %req.cycle_id, task = req.task_id);
            async move {
                let began = Instant::now();
                let mut errors = Vec::new();
                let mut worker = String::new();
                for attempt in 1..=max_attempts.max(1) {
                    worker = workers[(start + attempt as usize - 1) % workers.len()].clone();
                    let mut req = req.clone();
                    req.attempt = attempt;
                    let result = match self.client(&worker) {
                        Err(e) => Err(e),
                        Ok(mut client) => match tokio::time::timeout(timeout, client.rewrite(req)).await {
                            Err(_) => Err(format!("timed out after {timeout:?}")),
                            Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
                            Ok(Ok(resp)) => Ok(resp.into_inner()),
                        },
                    };
                    match result {
                        Ok(resp) => {
                            return TaskOutcome { response: Some(resp), worker, attempts: attempt, errors, duration: began.elapsed() };
                        }
                        Err(e) => {
                            tracing::warn!(worker = %worker, attempt, error = %e, "task attempt failed");
                            errors.push(format!("attempt {attempt} on {worker}: {e}"));
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
