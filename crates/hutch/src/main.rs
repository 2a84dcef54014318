//! The `hutch` command.
//!
//! Today it only knows `up`, which says what exists and what is coming: the
//! server, the dataplane and the proxy that `hutch up` will run in one
//! process are the next milestone. Until then it exits non-zero so no
//! script mistakes it for a running platform.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "hutch", version, about = "Isolated sandboxes for untrusted code")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole platform on this machine (server, dataplane, proxy).
    Up,
}

fn main() -> std::process::ExitCode {
    match Cli::parse().command {
        Command::Up => {
            eprintln!(
                "hutch up: the platform (REST server on :8900, dataplane and proxy on :8095) is not built yet\n\
                 (its contract: docs/platform-api.md).\n\
                 What exists today:\n  \
                 - sandboxd, the daemon every sandbox runs as PID 1:\n      \
                 cargo run --release -p hutch-sandboxd -- --listen tcp:127.0.0.1:9501\n    \
                 (API: docs/sandboxd-api.md)\n  \
                 - the native isolation, network and image libraries (crates/isolate, net, image)."
            );
            std::process::ExitCode::from(2)
        }
    }
}
