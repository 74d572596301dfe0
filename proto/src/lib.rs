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

        impl CycleState {
            /// The state as the `state` text field, the CLI and metrics show it.
            pub fn label(self) -> &'static str {
                match self {
                    CycleState::Unspecified => "unspecified",
                    CycleState::Noop => "noop",
                    CycleState::Committed => "committed",
                    CycleState::Failed => "failed",
                }
            }
        }

        impl CycleRecord {
            /// Sets how the cycle ended (the enum and its text form together).
            pub fn set_state(&mut self, state: CycleState) {
                self.outcome = state as i32;
                self.state = state.label().to_string();
            }

            /// How the cycle ended (records of older coordinators carry only the text).
            pub fn state(&self) -> CycleState {
                match CycleState::try_from(self.outcome) {
                    Ok(s) if s != CycleState::Unspecified => s,
                    _ => match self.state.as_str() {
                        "noop" => CycleState::Noop,
                        "committed" => CycleState::Committed,
                        "failed" => CycleState::Failed,
                        _ => CycleState::Unspecified,
                    },
                }
            }
        }
    }
}

/// Encoded file descriptor set of every Freshet service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("freshet_descriptor");
