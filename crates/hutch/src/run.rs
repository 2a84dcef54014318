//! `hutch run`: an ephemeral sandbox for one command.
//!
//! The sandbox is created without a command and the command is started at
//! once through the daemon route (the server holds that request until the
//! sandbox runs), so the sandbox outlives the command just long enough for
//! its output and exit status to be read; then it is deleted, whatever
//! happened, Ctrl-C included.

use std::collections::BTreeMap;

use hutch_api::{StartProcessRequest, StdinMode};
use serde_json::{Map, Value, json};

use crate::args::{ConnectionArgs, RunArgs, SandboxSpecArgs};
use crate::attach::{self, Interrupts, OnInterrupt, Options, Outcome};
use crate::client::{ApiError, Client};
use crate::config::Connection;
use crate::daemon::Daemon;

/// Exit status for a command that could not be started, as shells use.
const SPAWN_FAILED: u8 = 127;

/// The longest `timeout_secs` the server accepts.
const MAX_TIMEOUT_SECS: u64 = 86400;

pub async fn run(connection: &ConnectionArgs, args: RunArgs) -> anyhow::Result<u8> {
    let connection = Connection::resolve(connection)?;
    if connection.daemon_url.is_some() {
        return Err(crate::UsageError(
            "hutch run creates a sandbox: it cannot use --daemon-url".into(),
        )
        .into());
    }
    let client = Client::new(connection)?;
    let mut interrupts = Interrupts::install()?;

    let mut body = sandbox_body(&args.spec);
    // The command is killed at `--timeout` (and says so); the sandbox lives a
    // little longer, so that the exit is reported rather than the sandbox
    // vanishing under the command.
    if let Some(timeout) = args.spec.timeout
        && timeout < MAX_TIMEOUT_SECS
    {
        body["timeout_secs"] = json!((timeout + 10).min(MAX_TIMEOUT_SECS));
    }
    let create = client.create_sandbox(&body);
    tokio::pin!(create);
    let mut interrupted = false;
    let sandbox = loop {
        tokio::select! {
            result = &mut create => break result?,
            _ = interrupts.recv() => interrupted = true,
        }
    };
    let Some(id) = sandbox["id"].as_str().map(str::to_owned) else {
        anyhow::bail!("the server created a sandbox without an id: {sandbox}");
    };

    let result = if interrupted {
        Ok(Outcome::Interrupted.exit_status())
    } else {
        let spec = &args.spec;
        let request = process_request(
            &args.command,
            &spec.env,
            spec.workdir.clone(),
            spec.user.clone(),
            spec.timeout,
        );
        run_command(&client.daemon(&id), &request, &mut interrupts).await
    };

    if let Err(error) = client.delete_sandbox(&id).await {
        eprintln!(
            "hutch: could not delete sandbox {id}: {}",
            crate::one_line(&format!("{error:#}"))
        );
    }
    result
}

/// Starts `request` and streams it to its end; the exit status to report.
/// Shared by `run` and `sandbox exec`.
pub async fn run_command(
    daemon: &Daemon,
    request: &StartProcessRequest,
    interrupts: &mut Interrupts,
) -> anyhow::Result<u8> {
    let start = daemon.start_process(request);
    let process = tokio::select! {
        result = start => match result {
            Ok(process) => process,
            Err(error) if error.downcast_ref::<ApiError>().is_some_and(|e| e.code == "spawn_failed") => {
                eprintln!("hutch: {}", crate::one_line(&format!("{error:#}")));
                return Ok(SPAWN_FAILED);
            }
            Err(error) => return Err(error),
        },
        _ = interrupts.recv() => return Ok(Outcome::Interrupted.exit_status()),
    };
    let id = process.pid.to_string();
    let options = Options {
        forward_stdin: request.stdin == StdinMode::Pipe,
        tty: false,
        on_interrupt: OnInterrupt::Forward,
    };
    let outcome = attach::stream(daemon, &id, options, interrupts).await?;
    match outcome {
        Outcome::Exited(exit) if exit.timed_out => {
            eprintln!("hutch: the command timed out and was killed");
        }
        Outcome::Exited(_) => {}
        // Nobody is left to read it: the command must not run on unseen.
        Outcome::Interrupted | Outcome::OutputClosed => {
            let _ = daemon.signal(&id, "SIGKILL", true).await;
        }
    }
    Ok(outcome.exit_status())
}

/// The process of `run` and `sandbox exec`: stdin is a pipe only when there
/// is input to forward.
pub fn process_request(
    command: &[String],
    env: &[(String, String)],
    working_dir: Option<String>,
    user: Option<String>,
    timeout_secs: Option<u64>,
) -> StartProcessRequest {
    let (program, arguments) =
        command.split_first().map_or((String::new(), &[][..]), |(p, a)| (p.clone(), a));
    StartProcessRequest {
        command: program,
        args: arguments.to_vec(),
        env: env.iter().cloned().collect::<BTreeMap<_, _>>(),
        working_dir,
        user,
        stdin: if attach::stdin_has_input() { StdinMode::Pipe } else { StdinMode::Closed },
        pty: None,
        tag: None,
        timeout_ms: timeout_secs.map(|secs| secs.saturating_mul(1000)),
    }
}

/// `CreateSandbox` for the sandbox options; fields not given are left to the
/// server's defaults.
pub fn sandbox_body(spec: &SandboxSpecArgs) -> Value {
    let mut body = Map::new();
    body.insert("image".into(), json!(spec.image));
    let mut resources = Map::new();
    if let Some(cpus) = spec.cpus {
        resources.insert("cpus".into(), json!(cpus));
    }
    if let Some(memory) = spec.memory {
        resources.insert("memory_mb".into(), json!(memory));
    }
    if !resources.is_empty() {
        body.insert("resources".into(), Value::Object(resources));
    }
    if let Some(network) = spec.network {
        body.insert("network".into(), json!({ "egress": network.as_str() }));
    }
    if let Some(timeout) = spec.timeout {
        body.insert("timeout_secs".into(), json!(timeout));
    }
    Value::Object(body)
}
