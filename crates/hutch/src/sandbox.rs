//! `hutch sandbox ...`.

use hutch_api::{PtySize, StartProcessRequest, StdinMode, Stream};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

use crate::args::{
    ConnectionArgs, CreateArgs, ListArgs, LogsArgs, SandboxArgs, SandboxCommand, ShellArgs,
};
use crate::attach::{self, Interrupts, OnInterrupt, Options};
use crate::client::{ApiError, Client};
use crate::config::Connection;

pub async fn sandbox(connection: &ConnectionArgs, args: SandboxArgs) -> anyhow::Result<u8> {
    let client = Client::new(Connection::resolve(connection)?)?;
    match args.command {
        SandboxCommand::Create(args) => create(&client, args).await,
        SandboxCommand::Ls(args) => list(&client, args).await,
        SandboxCommand::Get { id } => {
            let sandbox = client.get_sandbox(&id).await?;
            println!("{}", serde_json::to_string_pretty(&sandbox)?);
            Ok(0)
        }
        SandboxCommand::Exec(args) => {
            let mut interrupts = Interrupts::install()?;
            let request = crate::run::process_request(
                &args.command,
                &args.env,
                args.workdir,
                args.user,
                args.timeout,
            );
            crate::run::run_command(&client.daemon(&args.id), &request, &mut interrupts).await
        }
        SandboxCommand::Shell(args) => shell(&client, args).await,
        SandboxCommand::Cp(args) => {
            crate::cp::copy(&client, &args.source, &args.destination).await.map(|()| 0)
        }
        SandboxCommand::Logs(args) => logs(&client, args).await,
        SandboxCommand::Stop(args) => {
            client.stop_sandbox(&args.id, args.grace).await?;
            println!("{}", args.id);
            Ok(0)
        }
        SandboxCommand::Rm { ids } => {
            let mut failed = false;
            for id in ids {
                match client.delete_sandbox(&id).await {
                    Ok(_) => println!("{id}"),
                    Err(error) => {
                        failed = true;
                        eprintln!("hutch: {id}: {}", crate::one_line(&format!("{error:#}")));
                    }
                }
            }
            Ok(u8::from(failed))
        }
    }
}

async fn create(client: &Client, args: CreateArgs) -> anyhow::Result<u8> {
    let mut body = crate::run::sandbox_body(&args.spec);
    if let Some(disk) = args.disk {
        body["resources"]["disk_mb"] = json!(disk);
    }
    if !args.spec.env.is_empty() {
        body["env"] =
            json!(args.spec.env.iter().cloned().collect::<std::collections::BTreeMap<_, _>>());
    }
    if let Some(workdir) = &args.spec.workdir {
        body["working_dir"] = json!(workdir);
    }
    if let Some(user) = &args.spec.user {
        body["user"] = json!(user);
    }
    if let Some(idle) = args.idle_timeout {
        body["idle_timeout_secs"] = json!(idle);
    }
    if !args.ports.is_empty() {
        body["ports"] = json!(args.ports);
    }
    if !args.tags.is_empty() {
        body["tags"] =
            json!(args.tags.iter().cloned().collect::<std::collections::BTreeMap<_, _>>());
    }
    if !args.command.is_empty() {
        body["command"] = json!(args.command);
    }
    let sandbox = client.create_sandbox(&body).await?;
    match sandbox["id"].as_str() {
        Some(id) => println!("{id}"),
        None => anyhow::bail!("the server created a sandbox without an id: {sandbox}"),
    }
    Ok(0)
}

async fn list(client: &Client, args: ListArgs) -> anyhow::Result<u8> {
    let mut query = Vec::new();
    if args.all {
        query.push(("include_stopped", "true".to_owned()));
    }
    if let Some(state) = args.state {
        query.push(("state", state));
    }
    if let Some((key, value)) = args.tag {
        query.push(("tag", format!("{key}={value}")));
    }
    let sandboxes = client.list_sandboxes(&query).await?;
    if args.quiet {
        for sandbox in &sandboxes {
            println!("{}", text(&sandbox["id"]));
        }
        return Ok(0);
    }
    let rows = sandboxes
        .iter()
        .map(|s| {
            vec![
                text(&s["id"]),
                text(&s["state"]),
                text(&s["reason"]),
                text(&s["exit_code"]),
                text(&s["image"]),
                text(&s["created_at"]),
            ]
        })
        .collect::<Vec<_>>();
    print!("{}", table(&["ID", "STATE", "REASON", "EXIT", "IMAGE", "CREATED"], &rows));
    Ok(0)
}

/// A JSON value as a table cell: strings bare, null as `-`.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Left-aligned columns two spaces apart; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
    }
    out
}

/// An interactive terminal: the remote process runs under a PTY of our
/// size; our terminal is raw while it runs and restored however it ends.
async fn shell(client: &Client, args: ShellArgs) -> anyhow::Result<u8> {
    use std::io::IsTerminal as _;
    let (command, arguments) = match args.command.split_first() {
        Some((command, arguments)) => (command.clone(), arguments.to_vec()),
        // bash where the image has it, else sh; both as login shells so the
        // image's profile sets PATH and the prompt.
        None => (
            "/bin/sh".to_owned(),
            vec![
                "-c".to_owned(),
                "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi"
                    .to_owned(),
            ],
        ),
    };
    let term = std::env::var("TERM").ok().filter(|t| !t.is_empty() && t != "dumb");
    let request = StartProcessRequest {
        command,
        args: arguments,
        env: [("TERM".to_owned(), term.unwrap_or_else(|| "xterm-256color".to_owned()))].into(),
        working_dir: args.workdir,
        user: args.user,
        stdin: StdinMode::Pipe,
        pty: Some(crate::tty::window_size().unwrap_or(PtySize { rows: 24, cols: 80 })),
        tag: None,
        timeout_ms: None,
    };
    let daemon = client.daemon(&args.id);
    let mut interrupts = Interrupts::install()?;
    let process = daemon.start_process(&request).await?;
    let interactive = std::io::stdin().is_terminal();
    let raw = if interactive { Some(crate::tty::RawMode::enable()?) } else { None };
    let options =
        Options { forward_stdin: true, tty: interactive, on_interrupt: OnInterrupt::Stop };
    let outcome = attach::stream(&daemon, &process.pid.to_string(), options, &mut interrupts).await;
    drop(raw);
    if let Ok(attach::Outcome::Interrupted | attach::Outcome::OutputClosed) = outcome {
        // We leave; the shell must not linger without its terminal.
        let _ = daemon.signal(&process.pid.to_string(), "SIGHUP", true).await;
    }
    Ok(outcome?.exit_status())
}

async fn logs(client: &Client, args: LogsArgs) -> anyhow::Result<u8> {
    let daemon = client.daemon(&args.id);
    let explain = |error: anyhow::Error| {
        if args.process == "main"
            && error.downcast_ref::<ApiError>().is_some_and(|e| e.code == "process_not_found")
        {
            anyhow::anyhow!("sandbox {} has no main command (it was created without one)", args.id)
        } else {
            error
        }
    };
    if args.follow {
        let mut interrupts = Interrupts::install()?;
        let options = Options { forward_stdin: false, tty: false, on_interrupt: OnInterrupt::Stop };
        let outcome = attach::stream(&daemon, &args.process, options, &mut interrupts)
            .await
            .map_err(explain)?;
        return Ok(match outcome {
            attach::Outcome::Exited(_) => 0,
            _ => outcome.exit_status(),
        });
    }
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut offset = 0;
    loop {
        let page = daemon.output(&args.process, offset).await.map_err(explain)?;
        if page.dropped > 0 {
            eprintln!("hutch: the first {} bytes of output were dropped", page.dropped);
        }
        for chunk in &page.chunks {
            let data = hutch_api::decode_base64(&chunk.data)?;
            match chunk.stream {
                Stream::Stdout => stdout.write_all(&data).await?,
                Stream::Stderr => stderr.write_all(&data).await?,
            }
        }
        stdout.flush().await?;
        stderr.flush().await?;
        if page.chunks.is_empty() || page.next_offset <= offset {
            return Ok(0);
        }
        offset = page.next_offset;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_on_the_widest_cell() {
        let rows = vec![
            vec!["abc".to_owned(), "running".to_owned(), "-".to_owned()],
            vec!["d".to_owned(), "failed".to_owned(), "oom".to_owned()],
        ];
        assert_eq!(
            table(&["ID", "STATE", "REASON"], &rows),
            "ID   STATE    REASON\nabc  running  -\nd    failed   oom\n"
        );
    }
}
