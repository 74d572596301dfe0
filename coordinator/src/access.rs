//! Who may call what on the coordinator's gRPC listener: a layer in front of every service
//! authenticates the caller (`authorization: Bearer ...`, see `freshet_common::auth`),
//! checks the method's class, and hands the [`Principal`] to the handlers (ingest checks
//! the table, admin mutations write the audit log). Methods are classified here, in one
//! table; a method nobody classified needs `admin`.

use std::sync::Arc;
use std::task::{Context, Poll};

use freshet_common::auth::{Action, AuthError, Authenticator, Principal};
use tonic::Status;
use tonic::codegen::http;
use tonic::transport::server::TcpConnectInfo;

/// The log target of audit lines (`RUST_LOG=freshet::audit=info` keeps only them).
pub const AUDIT_TARGET: &str = "freshet::audit";

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Nothing (health checks; reflection when `auth.reflection`).
    Open,
    /// Any authenticated caller (the leader's address, which every client needs to find).
    Authenticated,
    /// A role that ingests into some table; the handler checks the table.
    Ingest,
    /// `read` or `admin`.
    Read,
    /// `admin`.
    Admin,
}

const READ: &[&str] = &[
    "ListTables",
    "GetTable",
    "ListCycles",
    "GetCycle",
    "ListWorkers",
    "WatchCycles",
    "ListSources",
    "ExplainCycle",
    "GetMaintenance",
];
const ADMIN: &[&str] = &[
    "CreateTable",
    "TriggerCycle",
    "PauseTable",
    "ResumeTable",
    "AddSource",
    "DropTable",
    "RemoveSource",
    "ResyncTable",
    "AlterTable",
];

/// The class of the method at gRPC `path` (`/package.Service/Method`).
pub fn classify(path: &str, reflection_open: bool) -> Class {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("", ""));
    match service {
        "grpc.health.v1.Health" => Class::Open,
        "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection" => {
            if reflection_open {
                Class::Open
            } else {
                Class::Authenticated
            }
        }
        "freshet.ingest.v1.IngestService" if method == "Ingest" => Class::Ingest,
        "freshet.admin.v1.AdminService" if method == "GetLeader" => Class::Authenticated,
        "freshet.admin.v1.AdminService" if READ.contains(&method) => Class::Read,
        "freshet.admin.v1.AdminService" if ADMIN.contains(&method) => Class::Admin,
        // Flight SQL (coordinator/src/flight.rs) only reads: writes are refused there.
        "arrow.flight.protocol.FlightService" => Class::Read,
        // Unknown: only admins, until someone classifies it.
        _ => Class::Admin,
    }
}

/// The caller of a request as the layer left it; a request that did not pass the layer
/// (no principal) is refused rather than trusted.
pub fn principal<T>(request: &tonic::Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("the request was not authenticated"))
}

/// The caller's address, for the audit log.
pub fn peer<T>(request: &tonic::Request<T>) -> String {
    request
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "-".into())
}

/// Writes one audit line for an admin mutation: who, from where, what, on what, and how it
/// ended.
pub fn audit<T, E: std::fmt::Display>(
    who: &Principal,
    peer: &str,
    method: &str,
    target: &str,
    outcome: &Result<T, E>,
) {
    match outcome {
        Ok(_) => tracing::info!(
            target: AUDIT_TARGET,
            principal = %who.name, via = who.via, %peer, method, target, outcome = "ok",
            "audit: admin call"
        ),
        Err(e) => tracing::info!(
            target: AUDIT_TARGET,
            principal = %who.name, via = who.via, %peer, method, target, outcome = "error",
            error = %e, "audit: admin call"
        ),
    }
}

/// The layer that authenticates and coarsely authorizes every call (see the module doc).
#[derive(Clone, Debug)]
pub struct AccessLayer {
    auth: Option<Arc<Authenticator>>,
}

impl AccessLayer {
    /// With `auth` None every caller is [`Principal::anonymous`] (auth off).
    pub fn new(auth: Option<Arc<Authenticator>>) -> Self {
        AccessLayer { auth }
    }

    /// Who the caller is and whether the method's class allows them; errors are the status
    /// to answer.
    fn decide(&self, path: &str, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let Some(auth) = &self.auth else {
            return Ok(Principal::anonymous());
        };
        let class = classify(path, auth.reflection_open());
        if class == Class::Open {
            return Ok(Principal {
                name: "anonymous".into(),
                via: "none",
                roles: Vec::new(),
            });
        }
        let p = auth.authenticate(authorization)?;
        match class {
            Class::Open | Class::Authenticated => Ok(p),
            Class::Ingest if p.may_ingest_somewhere() => Ok(p),
            Class::Ingest => Err(AuthError::PermissionDenied(format!(
                "'{}' may not ingest (role ingest, ingest:<table> or admin)",
                p.name
            ))),
            Class::Read => p.check(Action::Read).map(|_| p),
            Class::Admin => p.check(Action::Admin).map(|_| p),
        }
    }
}

impl<S> tower_layer::Layer<S> for AccessLayer {
    type Service = AccessService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessService {
            inner,
            layer: self.clone(),
        }
    }
}

/// [`AccessLayer`] applied to a service.
#[derive(Clone, Debug)]
pub struct AccessService<S> {
    inner: S,
    layer: AccessLayer,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tonic::codegen::Service<http::Request<B>> for AccessService<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match self.layer.decide(req.uri().path(), header) {
            Ok(p) => {
                req.extensions_mut().insert(p);
                Box::pin(self.inner.call(req))
            }
            Err(e) => {
                let peer = req
                    .extensions()
                    .get::<TcpConnectInfo>()
                    .and_then(|i| i.remote_addr())
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "-".into());
                tracing::info!(
                    target: AUDIT_TARGET,
                    %peer, method = req.uri().path(), outcome = "refused", error = %e,
                    "audit: call refused"
                );
                let status = match e {
                    AuthError::PermissionDenied(m) => Status::permission_denied(m),
                    AuthError::Unauthenticated(m) => Status::unauthenticated(m),
                    AuthError::Config(m) => Status::internal(m),
                };
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Every method of the coordinator's services is classified on purpose: a new RPC that
    /// nobody classified would need admin, which this test makes someone decide.
    #[test]
    fn every_coordinator_method_is_classified() {
        let set =
            prost_types::FileDescriptorSet::decode(freshet_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut seen = 0;
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                if !matches!(service.name(), "AdminService" | "IngestService") {
                    continue;
                }
                for m in &service.method {
                    let path = format!("/{package}.{}/{}", service.name(), m.name());
                    let class = classify(&path, true);
                    let explicit = READ.contains(&m.name())
                        || ADMIN.contains(&m.name())
                        || matches!(m.name(), "Ingest" | "GetLeader");
                    assert!(explicit, "{path} is not classified in access.rs");
                    assert_ne!(class, Class::Open, "{path}");
                    seen += 1;
                }
            }
        }
        assert!(seen >= 14, "only {seen} methods found");
        assert_eq!(classify("/grpc.health.v1.Health/Check", false), Class::Open);
        assert_eq!(
            classify("/arrow.flight.protocol.FlightService/DoGet", false),
            Class::Read
        );
        assert_eq!(
            classify(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                false
            ),
            Class::Authenticated
        );
        assert_eq!(
            classify("/freshet.worker.v1.WorkerService/Rewrite", true),
            Class::Admin
        );
        assert_eq!(classify("/nonsense", true), Class::Admin);
    }
}
