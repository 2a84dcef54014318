//! sandboxd: the daemon that runs as PID 1 in every Hutch sandbox.
//!
//! It starts processes (with pipes or a terminal), keeps their output in
//! bounded buffers readers can resume from, moves files in and out as
//! streams, and, being PID 1, reaps every orphan and shuts the sandbox's
//! processes down in order. It knows only its own local HTTP API: nothing
//! of sandboxes, namespaces or the control plane.

mod files;
pub mod http;
mod output;
mod process;
pub mod range;
mod supervisor;
mod sys;
mod users;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

pub use supervisor::{Supervisor, SupervisorConfig};

/// Where to listen: `tcp:HOST:PORT`, `HOST:PORT`, `unix:PATH`, or `fd:N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
    /// An inherited Unix stream socket, bound by whoever started us; sandboxd
    /// only calls `listen` on it. This is how the sandbox driver hands over a
    /// socket whose path lives where no process in the sandbox can reach it,
    /// and `listen` from sandboxd makes sandboxd the socket's peer
    /// (`SO_PEERCRED`) for every client.
    Fd(std::os::fd::RawFd),
}

#[derive(Debug, thiserror::Error)]
pub enum ParseListenAddrError {
    #[error("{0:?} is not tcp:HOST:PORT, HOST:PORT or unix:PATH")]
    Malformed(String),
    #[error("unix socket path {0:?} must be absolute")]
    RelativeSocket(String),
    #[error("{0:?} is not a descriptor number above 2")]
    InvalidFd(String),
}

impl std::str::FromStr for ListenAddr {
    type Err = ParseListenAddrError;

    fn from_str(raw: &str) -> Result<ListenAddr, ParseListenAddrError> {
        if let Some(path) = raw.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(ParseListenAddrError::RelativeSocket(path.to_owned()));
            }
            return Ok(ListenAddr::Unix(path.into()));
        }
        if let Some(fd) = raw.strip_prefix("fd:") {
            return match fd.parse::<std::os::fd::RawFd>() {
                Ok(fd) if fd > 2 => Ok(ListenAddr::Fd(fd)),
                _ => Err(ParseListenAddrError::InvalidFd(fd.to_owned())),
            };
        }
        let addr = raw.strip_prefix("tcp:").unwrap_or(raw);
        addr.parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| ParseListenAddrError::Malformed(raw.to_owned()))
    }
}

/// A bound listener of either kind.
#[derive(Debug)]
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    pub async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(addr) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(addr).await?)),
            ListenAddr::Unix(path) => {
                // A socket file left by an earlier run would make bind fail.
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                Ok(Listener::Unix(tokio::net::UnixListener::bind(path)?))
            }
            ListenAddr::Fd(fd) => Ok(Listener::Unix(listen_on_inherited(*fd)?)),
        }
    }

    /// The bound address, e.g. `tcp:127.0.0.1:41234`, for logs and tests.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => {
                l.local_addr().map_or_else(|e| e.to_string(), |a| format!("tcp:{a}"))
            }
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".into()),
        }
    }
}

/// Takes over an inherited, bound Unix stream socket and listens on it.
fn listen_on_inherited(fd: std::os::fd::RawFd) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let check = |ret: libc::c_int| {
        if ret < 0 { Err(std::io::Error::last_os_error()) } else { Ok(ret) }
    };
    // SAFETY: fcntl on a descriptor number only reads its flags; an fd that is
    // not open fails with EBADF before we take ownership of anything.
    check(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: the descriptor is open (checked above) and was handed to us for
    // this one purpose; nothing else in this process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into `kind`, whose size `len` gives.
    check(unsafe {
        libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    if kind != libc::SOCK_STREAM {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the inherited descriptor is not a stream socket",
        ));
    }
    // SAFETY: plain fcntl and listen calls on a socket we own.
    unsafe {
        check(libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC))?;
        let flags = check(libc::fcntl(raw, libc::F_GETFL))?;
        check(libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
        check(libc::listen(raw, 1024))?;
    }
    tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
}

/// How long in-flight requests may take to finish once shutdown starts.
const CONNECTION_DRAIN: Duration = Duration::from_secs(1);

/// Largest request head accepted; larger heads get 431.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Serves `router` on every listener until `shutdown` resolves, then stops
/// accepting and gives open connections [`CONNECTION_DRAIN`] to finish.
pub async fn serve(
    listeners: Vec<Listener>,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    use hyper_util::server::graceful::GracefulShutdown;

    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEADER_BYTES)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::channel(64);
    let mut acceptors = tokio::task::JoinSet::new();
    for listener in listeners {
        let accepted_tx = accepted_tx.clone();
        acceptors.spawn(async move {
            loop {
                let stream: Box<dyn Stream> = match &listener {
                    Listener::Tcp(l) => match l.accept().await {
                        Ok((stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            Box::new(stream)
                        }
                        Err(e) => {
                            accept_failed(e).await;
                            continue;
                        }
                    },
                    Listener::Unix(l) => match l.accept().await {
                        Ok((stream, _)) => Box::new(stream),
                        Err(e) => {
                            accept_failed(e).await;
                            continue;
                        }
                    },
                };
                if accepted_tx.send(stream).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(accepted_tx);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            Some(stream) = accepted.recv() => {
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!("connection ended with an error: {e}");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    acceptors.abort_all();
    let _ = tokio::time::timeout(CONNECTION_DRAIN, graceful.shutdown()).await;
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Accept errors are mostly transient (a connection reset before accept,
/// or out of descriptors); back off a little rather than spin.
async fn accept_failed(error: std::io::Error) {
    tracing::warn!("accept failed: {error}");
    tokio::time::sleep(Duration::from_millis(20)).await;
}
