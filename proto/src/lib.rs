//! Freshet's gRPC protocol, compiled from the versioned `.proto` files beside this crate.

/// Ingest service: batches of changes in, sequence numbers out.
pub mod ingest {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("freshet.ingest.v1");
    }
}

/// Worker service: file rewrites.
pub mod worker {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("freshet.worker.v1");
    }
}

/// Admin service: tables and cycles.
pub mod admin {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("freshet.admin.v1");
    }
}

/// Encoded file descriptor set of every Freshet service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("freshet_descriptor");
