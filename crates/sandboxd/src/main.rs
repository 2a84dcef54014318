//! The `sandboxd` binary: parses flags, binds listeners, reports readiness,
//! and runs until SIGTERM or SIGINT, then shuts every process down in order.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hutch_api::StartProcessRequest;
use hutch_sandboxd::http::{AppState, router};
use hutch_sandboxd::{ListenAddr, Listener, Supervisor, SupervisorConfig, serve};

#[derive(Debug, Parser)]
#[command(
    name = "sandboxd",
    version,
    about = "The daemon that runs as PID 1 in every Hutch sandbox"
)]
struct Args {
    /// Where to listen: tcp:HOST:PORT, HOST:PORT or unix:PATH. Repeatable.
    #[arg(long = "listen", default_value = "tcp:0.0.0.0:9501")]
    listen: Vec<ListenAddr>,
    /// An inherited descriptor to write one byte to once every listener is
    /// bound, then close: the sandbox driver waits on it instead of polling.
    #[arg(long)]
    ready_fd: Option<i32>,
    /// Output buffered per process, in bytes; older output is dropped.
    #[arg(long, default_value_t = 8 << 20)]
    output_limit: usize,
    /// Exited processes kept for later queries.
    #[arg(long, default_value_t = 256)]
    max_exited: usize,
    /// Seconds processes get to exit after SIGTERM before they are killed.
    #[arg(long, default_value_t = 5.0)]
    grace_secs: f64,
    /// Worker threads; 0 runs everything on one thread (the lightest).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "warn")]
    log_level: tracing::Level,
    /// Processes started without a `user` run as this one (name, uid or
    /// uid:gid). The driver sets it from the image's `User`.
    #[arg(long, env = "HUTCH_USER")]
    default_user: Option<String>,
    /// The tag of the main command.
    #[arg(long, default_value = "main")]
    main_tag: String,
    /// When the main command exits, kill every other process and start no
    /// more: the sandbox has ended, its output and files stay readable.
    #[arg(long)]
    end_with_main: bool,
    /// Added to the OOM score of every process started (-1000 to 1000), so
    /// that when the sandbox runs out of memory the kernel never picks
    /// sandboxd, whose death would end every process.
    #[arg(long, allow_hyphen_values = true, value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    child_oom_score_adj: Option<i32>,
    /// A command to start before sandboxd reports ready (the image's
    /// entrypoint and cmd), tagged with `--main-tag`.
    #[arg(last = true)]
    main: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    // Before anything could start a process: descriptors we were handed (the
    // ready pipe, a listening socket) must never reach the processes we start,
    // which only get 0, 1 and 2 of their own.
    close_inherited_on_exec();
    let args = Args::parse();
    // HUTCH_USER is for sandboxd alone; the processes it starts must not
    // inherit it.
    // SAFETY: no other thread exists yet (the runtime is built below), so
    // nothing can read the environment concurrently.
    unsafe { std::env::remove_var("HUTCH_USER") };
    tracing_subscriber::fmt().with_max_level(args.log_level).with_writer(std::io::stderr).init();
    let runtime = if args.threads == 0 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    // The supervisor installs the SIGCHLD handler; it must exist before
    // anything could fork.
    let config = SupervisorConfig {
        output_limit: args.output_limit,
        max_exited: args.max_exited,
        default_user: args.default_user.clone(),
        end_with: (args.end_with_main && !args.main.is_empty()).then(|| args.main_tag.clone()),
        child_oom_score_adj: args.child_oom_score_adj,
        ..SupervisorConfig::default()
    };
    if let Some(user) = &config.default_user {
        config.users.resolve(user).with_context(|| format!("--default-user {user:?}"))?;
    }
    let supervisor = Supervisor::start(config).context("starting the supervisor")?;
    if let Some((command, args_)) = args.main.split_first() {
        let request = StartProcessRequest {
            command: command.clone(),
            args: args_.to_vec(),
            tag: Some(args.main_tag.clone()),
            ..StartProcessRequest::default()
        };
        // Before readiness, so a sandbox whose main command cannot start
        // fails its creation with this message instead of sitting idle.
        supervisor
            .start_process(request, None)
            .await
            .with_context(|| format!("starting the main command {command:?}"))?;
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;

    let mut listeners = Vec::new();
    for addr in &args.listen {
        let listener = Listener::bind(addr).await.with_context(|| format!("binding {addr:?}"))?;
        listeners.push(listener);
    }
    // Announcing the addresses is a courtesy to whoever started us (tests
    // bind port 0 and read it here); a closed stdout must not stop PID 1.
    let mut stdout = std::io::stdout().lock();
    for listener in &listeners {
        let _ = writeln!(stdout, "sandboxd listening on {}", listener.describe());
    }
    let _ = stdout.flush();
    drop(stdout);
    if let Some(fd) = args.ready_fd {
        signal_ready(fd);
    }

    let app = router(AppState { supervisor: supervisor.clone(), started });
    let grace = Duration::from_secs_f64(args.grace_secs.max(0.0));
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("shutting down: stopping every process");
        supervisor.shutdown(grace).await;
    };
    serve(listeners, app, shutdown).await;
    Ok(())
}

/// Marks every descriptor above stderr close-on-exec.
fn close_inherited_on_exec() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes descriptor
    // flags; no memory is involved.
    let ret =
        unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) };
    if ret == 0 {
        return;
    }
    // Kernels before 5.11 lack the flag: mark them one by one.
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<i32> =
        entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    for fd in fds.into_iter().filter(|fd| *fd > 2) {
        // SAFETY: fcntl on a descriptor number; one that is not open (such as
        // read_dir's own, now closed) fails with EBADF and is left alone.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

fn signal_ready(fd: i32) {
    // SAFETY: the descriptor was handed to us for this one purpose by
    // whoever started sandboxd; nothing else in this process uses it.
    let fd = unsafe { hutch_sandboxd_fd(fd) };
    let mut file = std::fs::File::from(fd);
    if let Err(e) = file.write_all(b"1") {
        tracing::warn!("cannot signal readiness on fd: {e}");
    }
}

/// # Safety
/// See [`std::os::fd::OwnedFd::from_raw_fd`].
unsafe fn hutch_sandboxd_fd(fd: i32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: forwarded from the caller.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}
