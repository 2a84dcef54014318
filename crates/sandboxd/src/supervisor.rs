//! The supervisor: the one task that owns the process table and reaps every
//! child.
//!
//! Spawning and reaping happen in the same task, so a child that exits
//! before its spawn returns can never be reaped before it is in the table.
//! Everything else talks to it through [`Supervisor`], a cheap handle that
//! sends a command and awaits the reply on a oneshot.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hutch_api::{ExitInfo, StartProcessRequest, StdinMode, Stream};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::process::{Process, StdinError, StdinOp};
use crate::sys::{self, ChildExit, SpawnSpec};
use crate::users::{ResolveUserError, UserDb};

/// Limits on what the supervisor keeps.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Output buffer per process.
    pub output_limit: usize,
    /// Exited processes kept for later queries, oldest forgotten first.
    pub max_exited: usize,
    /// Total buffered output kept for exited processes.
    pub max_exited_output: u64,
    /// How long after exit to keep reading output that a process's
    /// background children still write to the inherited pipes.
    pub drain_grace: Duration,
    pub users: UserDb,
    /// Who processes run as when a request names no user.
    pub default_user: Option<String>,
    /// The tag of a process whose exit ends everything: when it exits, every
    /// other process is killed at once and nothing new starts (processes and
    /// their output stay readable). This is how a sandbox whose main command
    /// finished stops running code while its results can still be read.
    pub end_with: Option<String>,
    /// Added to the OOM score of every process started, so that when memory
    /// runs out the kernel kills one of them and never sandboxd itself, whose
    /// death would end everything. Raising a score needs no privilege.
    pub child_oom_score_adj: Option<i32>,
}

impl Default for SupervisorConfig {
    fn default() -> SupervisorConfig {
        SupervisorConfig {
            output_limit: 8 << 20,
            max_exited: 256,
            max_exited_output: 64 << 20,
            drain_grace: Duration::from_millis(100),
            users: UserDb::default(),
            default_user: None,
            end_with: None,
            child_oom_score_adj: None,
        }
    }
}

/// A pid or a tag, as it appears in `/processes/{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessRef {
    Pid(u32),
    Tag(String),
}

impl ProcessRef {
    pub fn parse(raw: &str) -> ProcessRef {
        match raw.parse::<u32>() {
            Ok(pid) => ProcessRef::Pid(pid),
            Err(_) => ProcessRef::Tag(raw.to_owned()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartProcessError {
    #[error("tag {0:?} is used by a running process")]
    TagInUse(String),
    #[error("invalid tag: {0}")]
    InvalidTag(#[from] hutch_api::ParseTagError),
    #[error("invalid working directory: {0}")]
    InvalidWorkingDir(#[source] hutch_api::ParsePathError),
    #[error("working directory {0:?} does not exist or is not a directory")]
    MissingWorkingDir(PathBuf),
    #[error("command is empty")]
    EmptyCommand,
    #[error("terminal size must be at least 1x1")]
    InvalidPtySize,
    #[error(transparent)]
    User(#[from] ResolveUserError),
    #[error(transparent)]
    Spawn(#[from] sys::SpawnError),
    #[error("cannot watch the output of process {pid}: {source}")]
    Pipes {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("sandboxd is shutting down")]
    ShuttingDown,
    #[error("the main process exited: this sandbox has ended and starts no more processes")]
    MainExited,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoveProcessError {
    #[error("no process {0:?}")]
    NotFound(String),
    #[error("process {0} is still running")]
    Running(u32),
}

enum Command {
    Start {
        request: StartProcessRequest,
        /// Feed these bytes to stdin and close it (for `/exec`).
        input: Option<Bytes>,
        reply: oneshot::Sender<Result<Arc<Process>, StartProcessError>>,
    },
    Get {
        id: ProcessRef,
        reply: oneshot::Sender<Option<Arc<Process>>>,
    },
    List {
        reply: oneshot::Sender<Vec<Arc<Process>>>,
    },
    Remove {
        id: ProcessRef,
        reply: oneshot::Sender<Result<(), RemoveProcessError>>,
    },
    Finished {
        pid: u32,
    },
    Shutdown {
        grace: Duration,
        reply: oneshot::Sender<()>,
    },
}

/// A handle on the supervisor task.
#[derive(Debug, Clone)]
pub struct Supervisor {
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Start { .. } => "Start",
            Command::Get { .. } => "Get",
            Command::List { .. } => "List",
            Command::Remove { .. } => "Remove",
            Command::Finished { .. } => "Finished",
            Command::Shutdown { .. } => "Shutdown",
        })
    }
}

impl Supervisor {
    /// Starts the supervisor task. Must be called inside a Tokio runtime,
    /// before any child is spawned, so no SIGCHLD is missed.
    pub fn start(config: SupervisorConfig) -> std::io::Result<Supervisor> {
        let sigchld = signal(SignalKind::child())?;
        if let Err(e) = sys::become_subreaper() {
            tracing::warn!("cannot become child subreaper: {e}");
        }
        let (commands, receiver) = mpsc::channel(256);
        let owner = Owner {
            config,
            receiver,
            commands: commands.downgrade(),
            sigchld,
            by_pid: HashMap::new(),
            by_tag: HashMap::new(),
            exited: VecDeque::new(),
            shutdown: None,
            stopping: false,
            ended: false,
        };
        tokio::spawn(owner.run());
        Ok(Supervisor { commands })
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (reply, response) = oneshot::channel();
        self.commands.send(make(reply)).await.ok()?;
        response.await.ok()
    }

    pub async fn start_process(
        &self,
        request: StartProcessRequest,
        input: Option<Bytes>,
    ) -> Result<Arc<Process>, StartProcessError> {
        self.ask(|reply| Command::Start { request, input, reply })
            .await
            .unwrap_or(Err(StartProcessError::ShuttingDown))
    }

    pub async fn get(&self, id: ProcessRef) -> Option<Arc<Process>> {
        self.ask(|reply| Command::Get { id, reply }).await.flatten()
    }

    pub async fn list(&self) -> Vec<Arc<Process>> {
        self.ask(|reply| Command::List { reply }).await.unwrap_or_default()
    }

    pub async fn remove(&self, id: ProcessRef) -> Result<(), RemoveProcessError> {
        let fallback = RemoveProcessError::NotFound(format!("{id:?}"));
        self.ask(|reply| Command::Remove { id, reply }).await.unwrap_or(Err(fallback))
    }

    /// Signals every process to stop, waits up to `grace` for all to exit,
    /// then kills what is left. Returns when no child remains.
    pub async fn shutdown(&self, grace: Duration) {
        self.ask(|reply| Command::Shutdown { grace, reply }).await;
    }
}

struct Entry {
    process: Arc<Process>,
    /// Taken when the child is reaped; the process's watcher waits on it.
    reaped: Option<oneshot::Sender<ChildExit>>,
}

struct Owner {
    config: SupervisorConfig,
    receiver: mpsc::Receiver<Command>,
    /// For watchers to report back; weak so the supervisor stops once every
    /// `Supervisor` handle is gone.
    commands: mpsc::WeakSender<Command>,
    sigchld: tokio::signal::unix::Signal,
    by_pid: HashMap<u32, Entry>,
    by_tag: HashMap<String, u32>,
    /// Exited pids, oldest first, for retention.
    exited: VecDeque<u32>,
    shutdown: Option<Shutdown>,
    /// Set once shutdown began; nothing new starts after it.
    stopping: bool,
    /// Set once the [`SupervisorConfig::end_with`] process exited; nothing new
    /// starts after it.
    ended: bool,
}

struct Shutdown {
    deadline: Instant,
    killed: bool,
    replies: Vec<oneshot::Sender<()>>,
}

impl Owner {
    async fn run(mut self) {
        loop {
            let deadline = self.shutdown.as_ref().map(|s| s.deadline);
            tokio::select! {
                command = self.receiver.recv() => match command {
                    Some(command) => self.handle(command),
                    None => break,
                },
                _ = self.sigchld.recv() => self.reap_all(),
                _ = sleep_until(deadline) => self.kill_remaining(),
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Start { request, input, reply } => {
                let result = self.start(request, input);
                let _ = reply.send(result);
            }
            Command::Get { id, reply } => {
                let _ = reply.send(self.lookup(&id).map(|e| e.process.clone()));
            }
            Command::List { reply } => {
                let mut all: Vec<_> = self.by_pid.values().map(|e| e.process.clone()).collect();
                all.sort_by_key(|p| (p.started_at_ms, p.pid));
                let _ = reply.send(all);
            }
            Command::Remove { id, reply } => {
                let _ = reply.send(self.remove(&id));
            }
            Command::Finished { pid } => {
                self.exited.push_back(pid);
                self.enforce_retention();
            }
            Command::Shutdown { grace, reply } => self.begin_shutdown(grace, reply),
        }
    }

    fn lookup(&self, id: &ProcessRef) -> Option<&Entry> {
        let pid = match id {
            ProcessRef::Pid(pid) => *pid,
            ProcessRef::Tag(tag) => *self.by_tag.get(tag)?,
        };
        self.by_pid.get(&pid)
    }

    fn start(
        &mut self,
        request: StartProcessRequest,
        input: Option<Bytes>,
    ) -> Result<Arc<Process>, StartProcessError> {
        if self.ended {
            return Err(StartProcessError::MainExited);
        }
        if self.stopping {
            return Err(StartProcessError::ShuttingDown);
        }
        let spec = self.validate(&request, input.is_some())?;
        if let Some(tag) = &request.tag {
            hutch_api::validate_tag(tag)?;
            let running = self.by_tag.get(tag).and_then(|pid| self.by_pid.get(pid));
            if running.is_some_and(|e| e.process.is_running()) {
                return Err(StartProcessError::TagInUse(tag.clone()));
            }
        }
        let spawned = sys::spawn(&spec)?;
        let pid = spawned.pid;
        // A pid can come back after its previous owner exited; the old
        // record is forgotten so the new process is the one found.
        if let Some(old) = self.by_pid.remove(&pid) {
            self.forget_tag(&old.process);
            self.exited.retain(|p| *p != pid);
        }
        let result = self.watch(request, spawned, input);
        match result {
            Ok((process, reaped)) => {
                if let Some(tag) = &process.tag {
                    self.by_tag.insert(tag.clone(), pid);
                }
                self.by_pid.insert(pid, Entry { process: process.clone(), reaped: Some(reaped) });
                Ok(process)
            }
            Err(source) => {
                // The child runs but cannot be watched; do not leave it behind.
                let _ = sys::signal(pid, libc::SIGKILL, true);
                Err(StartProcessError::Pipes { pid, source })
            }
        }
    }

    fn validate(
        &self,
        request: &StartProcessRequest,
        feed_input: bool,
    ) -> Result<SpawnSpec, StartProcessError> {
        if request.command.is_empty() {
            return Err(StartProcessError::EmptyCommand);
        }
        if request.pty.is_some_and(|size| size.rows == 0 || size.cols == 0) {
            return Err(StartProcessError::InvalidPtySize);
        }
        let working_dir = match &request.working_dir {
            Some(dir) => {
                let dir = hutch_api::parse_absolute_path(dir)
                    .map_err(StartProcessError::InvalidWorkingDir)?;
                if !dir.is_dir() {
                    return Err(StartProcessError::MissingWorkingDir(dir));
                }
                Some(dir)
            }
            None => None,
        };
        // Resolved at each start, since /etc/passwd may change inside.
        let user = request
            .user
            .as_deref()
            .or(self.config.default_user.as_deref())
            .map(|u| self.config.users.resolve(u))
            .transpose()?;
        Ok(SpawnSpec {
            command: request.command.clone(),
            args: request.args.clone(),
            env: request.env.clone(),
            working_dir,
            user,
            stdin_pipe: request.stdin == StdinMode::Pipe || feed_input,
            pty: request.pty,
            oom_score_adj: self.config.child_oom_score_adj,
        })
    }

    /// Wires up the pumps and the watcher of a freshly spawned process.
    fn watch(
        &self,
        request: StartProcessRequest,
        spawned: sys::Spawned,
        input: Option<Bytes>,
    ) -> std::io::Result<(Arc<Process>, oneshot::Sender<ChildExit>)> {
        let pid = spawned.pid;
        let mut pumps = Vec::new();
        let (stdin_tx, stdin_rx) = mpsc::channel(16);
        let mut pty_for_resize = None;
        let mut stdin_sink = None;
        let mut pty_reader = None;
        if let Some(master) = spawned.pty_master {
            pty_for_resize = Some(sys::dup(&master)?);
            stdin_sink = Some(StdinSink::Pty(register(
                set_nonblocking(sys::dup(&master)?)?,
                Interest::WRITABLE,
            )?));
            pty_reader = Some(register(set_nonblocking(master)?, Interest::READABLE)?);
        } else if let Some(fd) = spawned.stdin {
            stdin_sink = Some(StdinSink::Pipe(tokio::net::unix::pipe::Sender::from_owned_fd(fd)?));
        }
        let interactive = request.stdin == StdinMode::Pipe || request.pty.is_some();
        let process = Arc::new(Process::new(
            pid,
            request.tag,
            request.command,
            request.args,
            self.config.output_limit,
            pty_for_resize,
            (interactive && stdin_sink.is_some()).then(|| stdin_tx.clone()),
        ));
        if let Some(reader) = pty_reader {
            pumps.push(tokio::spawn(pump_pty(reader, process.clone())));
        }
        for (fd, stream) in [(spawned.stdout, Stream::Stdout), (spawned.stderr, Stream::Stderr)] {
            if let Some(fd) = fd {
                let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?;
                pumps.push(tokio::spawn(pump_pipe(pipe, stream, process.clone())));
            }
        }
        if let Some(sink) = stdin_sink {
            tokio::spawn(pump_stdin(sink, stdin_rx, pid));
            if let Some(input) = input {
                let feed = stdin_tx.clone();
                tokio::spawn(async move {
                    let (done, _) = oneshot::channel();
                    let _ = feed.send(StdinOp::Data(input, done)).await;
                    let _ = feed.send(StdinOp::Close).await;
                });
            }
        }
        drop(stdin_tx);
        let (reaped_tx, reaped_rx) = oneshot::channel();
        let timeout = request.timeout_ms.map(Duration::from_millis);
        tokio::spawn(watch_exit(
            process.clone(),
            reaped_rx,
            pumps,
            timeout,
            self.config.drain_grace,
            self.commands.clone(),
        ));
        Ok((process, reaped_tx))
    }

    fn reap_all(&mut self) {
        loop {
            match sys::reap() {
                Ok(Some((pid, exit))) => {
                    if let Some(reaped) = self.by_pid.get_mut(&pid).and_then(|e| e.reaped.take()) {
                        let _ = reaped.send(exit);
                    }
                    if !self.ended
                        && let Some(tag) = &self.config.end_with
                        && self.by_tag.get(tag) == Some(&pid)
                    {
                        // At once, in the task that spawns: nothing can start
                        // between the main process's exit and this kill, and a
                        // process that forks meanwhile cannot outrun it (the
                        // kernel walks the namespace with new forks held off).
                        self.ended = true;
                        // Its own group first: it was just reaped, so it is no longer
                        // among the running processes signal_everything walks, but
                        // what it left in its group is.
                        let _ = sys::signal(pid, libc::SIGKILL, true);
                        self.signal_everything(Signal::SIGKILL);
                    }
                    // Anything else was an orphan that PID 1 (or a
                    // subreaper) inherited: reaping it is all it needs.
                }
                Ok(None) => break,
                Err(Errno::ECHILD) => {
                    self.finish_shutdown();
                    break;
                }
                Err(e) => {
                    tracing::error!("waitpid failed: {e}");
                    break;
                }
            }
        }
    }

    fn remove(&mut self, id: &ProcessRef) -> Result<(), RemoveProcessError> {
        let entry = self.lookup(id).ok_or_else(|| RemoveProcessError::NotFound(display(id)))?;
        if entry.process.is_running() {
            return Err(RemoveProcessError::Running(entry.process.pid));
        }
        let pid = entry.process.pid;
        if let Some(entry) = self.by_pid.remove(&pid) {
            self.forget_tag(&entry.process);
        }
        self.exited.retain(|p| *p != pid);
        Ok(())
    }

    fn forget_tag(&mut self, process: &Process) {
        if let Some(tag) = &process.tag
            && self.by_tag.get(tag) == Some(&process.pid)
        {
            self.by_tag.remove(tag);
        }
    }

    /// Forgets the oldest exited processes beyond the count and output caps.
    fn enforce_retention(&mut self) {
        let mut retained: u64 = self
            .exited
            .iter()
            .filter_map(|pid| self.by_pid.get(pid))
            .map(|e| e.process.retained_output())
            .sum();
        while self.exited.len() > self.config.max_exited
            || (retained > self.config.max_exited_output && self.exited.len() > 1)
        {
            let Some(pid) = self.exited.pop_front() else { break };
            if let Some(entry) = self.by_pid.remove(&pid) {
                retained = retained.saturating_sub(entry.process.retained_output());
                self.forget_tag(&entry.process);
            }
        }
    }

    fn begin_shutdown(&mut self, grace: Duration, reply: oneshot::Sender<()>) {
        if let Some(shutdown) = &mut self.shutdown {
            shutdown.replies.push(reply);
            return;
        }
        if self.stopping {
            // An earlier shutdown already finished: nothing is left.
            let _ = reply.send(());
            return;
        }
        self.stopping = true;
        self.shutdown = Some(Shutdown {
            deadline: Instant::now() + grace,
            killed: false,
            replies: vec![reply],
        });
        self.signal_everything(Signal::SIGTERM);
        self.reap_all();
    }

    fn kill_remaining(&mut self) {
        let Some(shutdown) = &mut self.shutdown else { return };
        if shutdown.killed {
            // Everything got SIGKILL already; a child that still did not
            // exit is stuck in the kernel, and waiting longer will not help.
            self.finish_shutdown();
            return;
        }
        shutdown.killed = true;
        shutdown.deadline = Instant::now() + Duration::from_secs(2);
        self.signal_everything(Signal::SIGKILL);
        self.reap_all();
    }

    fn signal_everything(&self, signal: Signal) {
        sys::signal_all_in_namespace(signal);
        for entry in self.by_pid.values().filter(|e| e.reaped.is_some()) {
            let _ = sys::signal(entry.process.pid, signal as i32, true);
        }
    }

    fn finish_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            for reply in shutdown.replies {
                let _ = reply.send(());
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn display(id: &ProcessRef) -> String {
    match id {
        ProcessRef::Pid(pid) => pid.to_string(),
        ProcessRef::Tag(tag) => tag.clone(),
    }
}

/// Waits for a process to be reaped (killing it at its timeout), lets the
/// pumps drain what is left in the pipes, then records the exit.
async fn watch_exit(
    process: Arc<Process>,
    reaped: oneshot::Receiver<ChildExit>,
    pumps: Vec<tokio::task::JoinHandle<()>>,
    timeout: Option<Duration>,
    drain_grace: Duration,
    supervisor: mpsc::WeakSender<Command>,
) {
    let mut reaped = reaped;
    let mut timed_out = false;
    let exit = match timeout {
        Some(timeout) => match tokio::time::timeout(timeout, &mut reaped).await {
            Ok(exit) => exit,
            Err(_) => {
                timed_out = true;
                let _ = sys::signal(process.pid, libc::SIGKILL, true);
                reaped.await
            }
        },
        None => reaped.await,
    };
    // Pipes reach EOF once every writer is gone. Background children that
    // inherited them may keep writing: their output is taken for a short
    // grace period, then the exit is recorded. The pumps keep draining (and
    // discarding) until EOF rather than close the pipes, which would kill
    // those children with SIGPIPE on their next write.
    let deadline = Instant::now() + drain_grace;
    for mut pump in pumps {
        let _ = tokio::time::timeout_at(deadline, &mut pump).await;
    }
    let exit = match exit {
        Ok(ChildExit::Code(code)) => ExitInfo { exit_code: Some(code), signal: None, timed_out },
        Ok(ChildExit::Signal(signal)) => {
            ExitInfo { exit_code: None, signal: Some(signal), timed_out }
        }
        // The supervisor forgot the process (shutdown); its status is lost.
        Err(_) => ExitInfo { exit_code: None, signal: Some(libc::SIGKILL), timed_out },
    };
    process.finish(exit);
    if let Some(supervisor) = supervisor.upgrade() {
        let _ = supervisor.send(Command::Finished { pid: process.pid }).await;
    }
}

const PUMP_BUFFER: usize = 64 * 1024;

async fn pump_pipe(
    mut pipe: tokio::net::unix::pipe::Receiver,
    stream: Stream,
    process: Arc<Process>,
) {
    let mut buf = vec![0u8; PUMP_BUFFER];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => process.append(stream, &buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(pid = process.pid, "reading {stream:?} failed: {e}");
                break;
            }
        }
    }
}

async fn pump_pty(master: AsyncFd<OwnedFd>, process: Arc<Process>) {
    let mut buf = vec![0u8; PUMP_BUFFER];
    loop {
        let Ok(mut guard) = master.readable().await else { break };
        match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buf).map_err(Into::into)) {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => process.append(Stream::Stdout, &buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // EIO means every holder of the terminal's slave side is gone:
            // the terminal's end of file.
            Ok(Err(_)) => break,
            Err(_would_block) => continue,
        }
    }
}

enum StdinSink {
    Pipe(tokio::net::unix::pipe::Sender),
    Pty(AsyncFd<OwnedFd>),
}

impl StdinSink {
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            StdinSink::Pipe(pipe) => pipe.write_all(data).await,
            StdinSink::Pty(master) => {
                let mut rest = data;
                while !rest.is_empty() {
                    let mut guard = master.writable().await?;
                    match guard
                        .try_io(|fd| nix::unistd::write(fd.get_ref(), rest).map_err(Into::into))
                    {
                        Ok(Ok(n)) => rest = &rest[n..],
                        Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Ok(Err(e)) => return Err(e),
                        Err(_would_block) => {}
                    }
                }
                Ok(())
            }
        }
    }
}

/// Owns a process's stdin. Writes are acknowledged once in the pipe, which
/// gives writers backpressure; `Close` closes a pipe, or sends end-of-file
/// (the terminal's EOF character) to a terminal.
async fn pump_stdin(mut sink: StdinSink, mut ops: mpsc::Receiver<StdinOp>, pid: u32) {
    while let Some(op) = ops.recv().await {
        match op {
            StdinOp::Data(data, done) => {
                let result = sink
                    .write_all(&data)
                    .await
                    .map_err(|e| StdinError::Write { pid, reason: e.kind() });
                let failed = result.is_err();
                let _ = done.send(result);
                if failed {
                    break;
                }
            }
            StdinOp::Close => {
                if let StdinSink::Pty(_) = sink {
                    let _ = sink.write_all(&[0x04]).await;
                }
                break;
            }
        }
    }
    // Dropping the sink closes the pipe; later writers see the channel gone.
    drop(sink);
    while let Some(op) = ops.recv().await {
        if let StdinOp::Data(_, done) = op {
            let _ = done.send(Err(StdinError::Closed { pid }));
        }
    }
}

/// Registers a descriptor with the reactor.
fn register(fd: OwnedFd, interest: Interest) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `OwnedFd` owns a valid open descriptor and returns that same
    // descriptor from `as_raw_fd` until it is dropped together with the
    // `AsyncFd`, which deregisters it first.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(std::io::Error::from)
}

fn set_nonblocking(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
    fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(fd)
}
