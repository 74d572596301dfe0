//! Server plumbing shared by coordinator and worker: logging, gRPC health and reflection.

use tonic_health::server::HealthReporter;

/// Initialises tracing: `RUST_LOG` filter (default `info`), text or JSON lines.
pub fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    // deltalake logs expected probes (opening a table that does not exist yet) as ERROR;
    // Freshet's own errors carry deltalake's cause, so its logs are off unless RUST_LOG asks.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(
            "warn,deltalake_core=off,buoyant_kernel=off,freshet_coordinator=info,freshet_worker=info,freshet_common=info,freshet::audit=info",
        )
    });
    // Colour codes only on a terminal: a log file or a pipe gets plain text.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && std::io::stdout().is_terminal())
        .with_target(false);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// gRPC reflection services (v1 and v1alpha, so grpcurl 1.8 can list).
pub fn reflection() -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(freshet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("valid descriptor set");
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(freshet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("valid descriptor set");
    (v1, v1alpha)
}

/// The gRPC health service and its reporter.
pub fn health() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    tonic_health::server::health_reporter()
}
