//! Test support shared by Hutch's test suites and benchmarks.
//!
//! Several crates test against the same real things: a statically linked
//! sandboxd, a busybox image, Debian's `docker-registry`. Each piece lives
//! here once so that the suites agree on what they run against, and a fix to
//! one (a readiness check, a clean-up) reaches all of them.
//!
//! This crate is a dev-dependency only and a leaf: it depends on no Hutch
//! crate, so that `hutch-image` and `hutch-isolate` can use it without a
//! dependency cycle. Helpers that need a Hutch type (a driver, a dataplane,
//! an image store) stay in the test support module of the crate they test.
//! Errors are `anyhow` and fixtures panic where a test could do nothing else:
//! this is test code.

pub mod bench;
pub mod http;
pub mod image;
pub mod layer;
pub mod netns;
pub mod poll;
pub mod registry;
pub mod sandboxd;

pub use http::sandboxd_request;
pub use image::{
    busybox_bundle, busybox_layer, busybox_rootfs, crun_run, image_config, oci_layout,
};
pub use layer::{LayerBuilder, gzip, sha256};
pub use netns::in_private_netns;
pub use poll::{eventually, wait_until};
pub use registry::Registry;
pub use sandboxd::{build_sandboxd, sandboxd_path, spawn_listening};

/// A TCP port on 127.0.0.1 that was free a moment ago, for a server that
/// cannot be handed a listener (such as `docker-registry`) and so must be
/// told a port. Binding port 0 and closing lets the kernel pick one; another
/// process could take it in between, which tests accept.
pub fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
