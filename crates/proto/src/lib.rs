//! The gRPC contract between the server and its dataplanes
//! (`proto/hutch/node/v1/node.proto`), compiled at build time.

#![allow(missing_debug_implementations)]

/// `hutch.node.v1`: registration and the level-triggered Sync stream.
pub mod node {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("hutch.node.v1");
}
