//! The small HTTP server beside each gRPC server: Prometheus `/metrics`, `/livez` (the
//! process answers; depends on nothing else) and `/readyz` (the services it needs answer).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

use crate::error::{Error, Result};
use crate::tls::{ServerIo, ServerTls};

/// Accepted TLS connections (handshakes done by `tls::incoming`) as an axum listener.
struct TlsListener {
    addr: SocketAddr,
    incoming: Pin<Box<dyn futures::Stream<Item = std::io::Result<ServerIo>> + Send>>,
}

impl axum::serve::Listener for TlsListener {
    type Io = ServerIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ServerIo, SocketAddr) {
        use futures::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(io)) => {
                    let peer = io.peer_addr().unwrap_or(self.addr);
                    return (io, peer);
                }
                Some(Err(e)) => tracing::warn!(error = %e, "http accept failed"),
                // The accept loop ended (it does not, while the server runs).
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// A readiness check: `Ok` when every service the process needs answers.
pub type ReadyCheck = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = std::result::Result<(), String>> + Send>> + Send + Sync,
>;

#[derive(Clone)]
struct HttpState {
    registry: Arc<Registry>,
    ready: ReadyCheck,
}

/// Binds `addr` and serves `/metrics`, `/livez` and `/readyz` until the process ends,
/// over TLS when `tls` is given. Returns the bound address.
pub async fn serve(
    addr: &str,
    registry: Arc<Registry>,
    ready: ReadyCheck,
    tls: Option<Arc<ServerTls>>,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {addr} (http_listen): {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(HttpState { registry, ready });
    tokio::spawn(async move {
        let served = match tls {
            None => axum::serve(listener, app).await,
            Some(tls) => {
                let incoming = TlsListener {
                    addr: bound,
                    incoming: Box::pin(crate::tls::incoming(listener, Some(tls))),
                };
                axum::serve(incoming, app).await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "http server stopped");
        }
    });
    Ok(bound)
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            e.to_string(),
        ),
    }
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    match (s.ready)().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
    }
}
