//! The `hutch` command: the platform's own processes (`up`, `server`,
//! `dataplane`, in [`platform`]) and the command-line client of its REST API
//! (`run`, `sandbox ...`, `image ...`, `node ...`, `namespace ...`).
//!
//! Every failure ends in one line on stderr and a non-zero exit status:
//! 2 for a command line that does not parse, 1 for anything else, and for
//! `run` and `sandbox exec|shell` the exit status of the remote command
//! (128 + the signal number when a signal ended it).

mod args;
mod attach;
mod client;
mod config;
mod cp;
mod daemon;
mod image;
mod namespace;
mod node;
mod platform;
mod run;
mod sandbox;
mod tty;

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;

use crate::args::{Cli, Command, ConnectionArgs};

/// A command line that parsed but makes no sense (exit status 2, like a
/// parse error).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_failure(&error),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // A client command is a handful of streams: two workers start faster
    // than one per core. The platform's processes get the whole machine.
    if !matches!(cli.command, Command::Up(_) | Command::Server(_) | Command::Dataplane(_)) {
        builder.worker_threads(2);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hutch: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.connection, cli.command));
    let code = match result {
        Ok(code) => code,
        Err(error) => {
            let _ = std::io::stdout().flush();
            eprintln!("hutch: {}", one_line(&format!("{error:#}")));
            if error.downcast_ref::<UsageError>().is_some() { 2 } else { 1 }
        }
    };
    // A reader of our stdin may still be blocked in the runtime's blocking
    // pool (stdin of `run` and `shell`); it must not keep the process alive.
    runtime.shutdown_background();
    let _ = std::io::stdout().flush();
    ExitCode::from(code)
}

async fn dispatch(connection: ConnectionArgs, command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Up(args) => platform::up(args).await.map(|()| 0),
        Command::Server(args) => platform::server(args).await.map(|()| 0),
        Command::Dataplane(args) => platform::dataplane(args).await.map(|()| 0),
        Command::Run(args) => run::run(&connection, args).await,
        Command::Sandbox(args) => sandbox::sandbox(&connection, args).await,
        Command::Image(args) => image::image(&connection, args).await.map(|()| 0),
        Command::Node(args) => node::node(&connection, args).await.map(|()| 0),
        Command::Namespace(args) => namespace::namespace(&connection, args).await.map(|()| 0),
    }
}

/// Reports a command line that clap rejected: help and version go to stdout
/// with status 0, errors become one line on stderr with status 2.
fn usage_failure(error: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = error.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("hutch: a subcommand is required (see --help)");
            ExitCode::from(2)
        }
        _ => {
            // The first paragraph is the error itself (with the missing
            // arguments on lines of their own); tips and usage follow.
            let rendered = error.render().to_string();
            let paragraph = rendered
                .lines()
                .skip_while(|l| l.trim().is_empty())
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ");
            let message = paragraph.strip_prefix("error: ").unwrap_or(&paragraph);
            let message = if message.is_empty() { "invalid arguments" } else { message };
            eprintln!("hutch: {message} (see --help)");
            ExitCode::from(2)
        }
    }
}

/// Error chains can carry newlines (a server's message, an io error's
/// text); the contract is one line per failure.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
