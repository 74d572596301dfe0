//! Compiles the versioned .proto files and emits a descriptor set for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "freshet/ingest/v1/ingest.proto",
        "freshet/worker/v1/worker.proto",
        "freshet/admin/v1/admin.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("freshet_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
