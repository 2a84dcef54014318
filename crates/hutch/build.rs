//! Builds the static sandboxd that `hutch up` and `hutch dataplane` put into
//! every sandbox, and embeds it in the `hutch` binary.
//!
//! sandboxd must be statically linked to run inside any image, which needs
//! its own target and RUSTFLAGS, so it cannot be an ordinary dependency:
//! this script runs a nested `cargo build` into a target directory of its
//! own. `HUTCH_SANDBOXD` (a path to an already built static sandboxd, as the
//! test script provides) skips the nested build.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=HUTCH_SANDBOXD");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let binary = match env::var_os("HUTCH_SANDBOXD").filter(|path| !path.is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path);
            println!("cargo:rerun-if-changed={}", path.display());
            path
        }
        None => build_sandboxd(&out_dir),
    };
    println!("cargo:rustc-env=HUTCH_EMBEDDED_SANDBOXD={}", binary.display());
}

fn build_sandboxd(out_dir: &std::path::Path) -> PathBuf {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.join("../..");
    for watched in ["crates/sandboxd/src", "crates/sandboxd/Cargo.toml", "crates/api/src"] {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }
    let target = env::var("TARGET").expect("cargo sets TARGET");
    let target_dir = out_dir.join("sandboxd-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args(["build", "--locked", "--profile", "sandboxd", "-p", "hutch-sandboxd", "--target"])
        .arg(&target)
        .arg("--target-dir")
        .arg(&target_dir)
        // The outer build's flags are for the host tools; sandboxd gets exactly these.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        .status()
        .expect("run cargo to build the static sandboxd");
    assert!(status.success(), "building the static sandboxd failed");
    target_dir.join(target).join("sandboxd").join("sandboxd")
}
