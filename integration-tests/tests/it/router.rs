//! The router against real in-process workers: a failure that every worker would answer
//! the same (the task is malformed) is tried once; a failure of the worker (it drains) is
//! retried on the others.

use std::sync::Arc;
use std::time::Duration;

use freshet_coordinator::router::Router;
use freshet_proto::worker::v1::RewriteRequest;
use freshet_worker::Worker;
use tokio::sync::watch;

/// `n` real workers on local ports, serving until the sender is dropped or set.
async fn workers(n: usize) -> (Vec<Arc<Worker>>, Vec<String>, watch::Sender<bool>) {
    let (stop, stop_rx) = watch::channel(false);
    let mut ws = Vec::new();
    let mut eps = Vec::new();
    for i in 0..n {
        let (l, addr) = freshet_worker::bind("127.0.0.1:0").await.unwrap();
        let w = Worker::new(format!("w{i}"), 2, Default::default());
        let mut rx = stop_rx.clone();
        tokio::spawn(freshet_worker::serve(w.clone(), l, 64 << 20, async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        ws.push(w);
        eps.push(format!("http://{addr}"));
    }
    (ws, eps, stop)
}

/// A task without a table: every worker refuses it as INVALID_ARGUMENT.
fn malformed() -> RewriteRequest {
    RewriteRequest {
        cycle_id: "c".into(),
        task_id: 0,
        attempt: 1,
        epoch: 1,
        ..Default::default()
    }
}

fn sent(router: &Router, eps: &[String]) -> Vec<u64> {
    eps.iter().map(|e| router.stats(e).sent).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_failing_with_invalid_argument_is_tried_once_not_on_every_worker() {
    let (_ws, eps, stop) = workers(3).await;
    let router = Router::new(eps.clone(), 64 << 20);
    let out = router
        .run(vec![malformed()], &[1], 3, Duration::from_secs(10))
        .await
        .remove(0);
    assert!(out.response.is_none());
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    assert!(
        out.errors[0].contains("invalid argument"),
        "{:?}",
        out.errors
    );
    assert_eq!(out.attempts, 1, "{:?}", out.errors);
    assert_eq!(
        sent(&router, &eps).iter().sum::<u64>(),
        1,
        "one attempt in all"
    );
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_failing_with_unavailable_is_retried_on_the_other_workers() {
    let (ws, eps, stop) = workers(3).await;
    // Draining workers answer UNAVAILABLE before looking at the task.
    for w in &ws {
        w.drain();
    }
    let router = Router::new(eps.clone(), 64 << 20);
    let out = router
        .run(vec![malformed()], &[1], 3, Duration::from_secs(10))
        .await
        .remove(0);
    assert!(out.response.is_none());
    assert_eq!(out.attempts, 3, "{:?}", out.errors);
    assert!(
        out.errors.iter().all(|e| e.contains("shutting down")),
        "{:?}",
        out.errors
    );
    assert_eq!(sent(&router, &eps), vec![1, 1, 1], "once on each worker");
    let _ = stop.send(true);
}
