//! Compiles the gRPC contract with protox, a pure-Rust protobuf compiler, so
//! a build needs no `protoc` from the system.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/hutch/node/v1/node.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
