//! Streams a running process over sandboxd's attach WebSocket: its output to
//! our stdout and stderr (byte for byte), our stdin to it, terminal resizes
//! and interrupts, until it exits.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use hutch_api::{ErrorCode, ExitInfo, Stream, WsClientMessage, WsServerEvent};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::daemon::Daemon;

/// Connections lost before the exit event are re-established this many times
/// (output is buffered by sandboxd, so resuming at our offset loses nothing).
const RECONNECTS: u32 = 5;

/// How a streamed process ended for us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Exited(ExitInfo),
    /// We stopped waiting because the user interrupted us.
    Interrupted,
    /// Our stdout or stderr was closed (`hutch run -- yes | head`): we stop
    /// quietly, as a local command would die of SIGPIPE.
    OutputClosed,
}

impl Outcome {
    /// The exit status a shell would give: the code, 128 + the signal, 130
    /// for an interrupt.
    pub fn exit_status(self) -> u8 {
        match self {
            Outcome::Exited(exit) => exit_status(exit),
            Outcome::Interrupted => 130,
            Outcome::OutputClosed => 128 + 13,
        }
    }
}

pub fn exit_status(exit: ExitInfo) -> u8 {
    match (exit.exit_code, exit.signal) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from((128 + signal).clamp(0, 255)).unwrap_or(255),
        (None, None) => 1,
    }
}

/// What an interrupt (SIGINT, SIGTERM, SIGHUP to `hutch`) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInterrupt {
    /// The first SIGINT is passed on to the process as SIGINT; a second one,
    /// or SIGTERM/SIGHUP, stops waiting.
    Forward,
    /// Any interrupt stops waiting.
    Stop,
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Send our stdin to the process (which must have a stdin pipe) and close
    /// its stdin at our end-of-file.
    pub forward_stdin: bool,
    /// The process has a terminal: follow our window size.
    pub tty: bool,
    pub on_interrupt: OnInterrupt,
}

/// The signals that interrupt a client command. Installed early, so that a
/// Ctrl-C at any moment is seen (and a sandbox that `run` created is removed)
/// rather than killing the process on the spot.
#[derive(Debug)]
pub struct Interrupts {
    int: Signal,
    term: Signal,
    hup: Signal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// SIGINT (Ctrl-C).
    Int,
    /// SIGTERM or SIGHUP.
    Term,
}

impl Interrupts {
    pub fn install() -> anyhow::Result<Interrupts> {
        Ok(Interrupts {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub async fn recv(&mut self) -> Interrupt {
        tokio::select! {
            _ = self.int.recv() => Interrupt::Int,
            _ = self.term.recv() => Interrupt::Term,
            _ = self.hup.recv() => Interrupt::Term,
        }
    }
}

/// Streams process `id` from output offset 0 until it exits.
pub async fn stream(
    daemon: &Daemon,
    id: &str,
    options: Options,
    interrupts: &mut Interrupts,
) -> anyhow::Result<Outcome> {
    let mut stdin = options.forward_stdin.then(spawn_stdin_reader);
    let mut winch = if options.tty { Some(signal(SignalKind::window_change())?) } else { None };
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut offset = 0u64;
    let mut sigint_forwarded = false;
    let mut reconnects = 0;
    loop {
        let mut socket = match daemon.attach(id, offset).await {
            Ok(socket) => socket,
            // A lost connection that cannot be made again at once (the
            // server restarting, say) gets a few more tries; an answer that
            // the process or sandbox is gone does not.
            Err(error)
                if reconnects > 0
                    && reconnects < RECONNECTS
                    && error.downcast_ref::<crate::client::ApiError>().is_none() =>
            {
                reconnects += 1;
                tokio::time::sleep(Duration::from_millis(100 * u64::from(reconnects))).await;
                continue;
            }
            Err(error) => return Err(error),
        };
        if options.tty
            && let Some(size) = crate::tty::window_size()
        {
            send_control(
                &mut socket,
                &WsClientMessage::Resize { rows: size.rows, cols: size.cols },
            )
            .await;
        }
        // The loop ends only when the connection does; the exit event returns.
        loop {
            tokio::select! {
                message = socket.next() => match message {
                    Some(Ok(Message::Binary(frame))) => {
                        let Some((&tag, data)) = frame.split_first() else { continue };
                        offset += data.len() as u64;
                        let written = if Stream::from_ws_tag(tag) == Some(Stream::Stderr) {
                            write_flush(&mut stderr, data).await
                        } else {
                            write_flush(&mut stdout, data).await
                        };
                        match written {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                                return Ok(Outcome::OutputClosed);
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Some(Ok(Message::Text(text))) => {
                        match serde_json::from_str::<WsServerEvent>(text.as_str()) {
                            Ok(WsServerEvent::Exit(exit)) => {
                                let _ = socket.close(None).await;
                                return Ok(Outcome::Exited(exit));
                            }
                            Ok(WsServerEvent::Dropped { offset: at, bytes }) => {
                                offset = at + bytes;
                                eprintln!("hutch: {bytes} bytes of output were dropped before they could be read");
                            }
                            // Writing to a process that closed its stdin is
                            // not our failure to report.
                            Ok(WsServerEvent::Error { code: ErrorCode::StdinClosed, .. }) => {}
                            Ok(WsServerEvent::Error { message, .. }) => {
                                eprintln!("hutch: sandboxd: {message}");
                            }
                            Err(_) => {}
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
                chunk = recv_stdin(&mut stdin) => {
                    let message = match chunk {
                        Some(bytes) => Message::Binary(bytes),
                        None => {
                            stdin = None;
                            control(&WsClientMessage::CloseStdin)
                        }
                    };
                    if socket.send(message).await.is_err() {
                        break;
                    }
                }
                () = recv_winch(&mut winch) => {
                    if let Some(size) = crate::tty::window_size() {
                        send_control(&mut socket, &WsClientMessage::Resize { rows: size.rows, cols: size.cols }).await;
                    }
                }
                interrupt = interrupts.recv() => {
                    if options.on_interrupt == OnInterrupt::Forward && interrupt == Interrupt::Int && !sigint_forwarded {
                        sigint_forwarded = true;
                        let signal = hutch_api::Signal::Name("SIGINT".into());
                        send_control(&mut socket, &WsClientMessage::Signal { signal }).await;
                    } else {
                        return Ok(Outcome::Interrupted);
                    }
                }
            }
        }
        reconnects += 1;
        if reconnects > RECONNECTS {
            anyhow::bail!("lost the connection to the process {RECONNECTS} times; giving up");
        }
        // Output resumes at `offset`, but a stdin chunk in flight may be lost.
        tokio::time::sleep(Duration::from_millis(100 * u64::from(reconnects))).await;
    }
}

async fn write_flush(
    out: &mut (impl tokio::io::AsyncWrite + Unpin),
    data: &[u8],
) -> std::io::Result<()> {
    out.write_all(data).await?;
    out.flush().await
}

fn control(message: &WsClientMessage) -> Message {
    Message::Text(serde_json::to_string(message).unwrap_or_default().into())
}

/// Sends a control message; a failure shows up as the connection ending.
async fn send_control(socket: &mut crate::daemon::WebSocket, message: &WsClientMessage) {
    let _ = socket.send(control(message)).await;
}

async fn recv_stdin(stdin: &mut Option<mpsc::Receiver<Bytes>>) -> Option<Bytes> {
    match stdin {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_winch(winch: &mut Option<Signal>) {
    match winch {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Reads our stdin in the background; the channel closes at end-of-file (or
/// a read error, which ends input just the same).
fn spawn_stdin_reader() -> mpsc::Receiver<Bytes> {
    let (sender, receiver) = mpsc::channel(8);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sender.send(Bytes::copy_from_slice(&buffer[..n])).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    receiver
}

/// Whether our stdin should be forwarded: not a terminal (a terminal means
/// nobody is piping anything in, as with `docker run` without `-i`), and not
/// `/dev/null` or another character device, which would only send an
/// immediate end-of-file.
pub fn stdin_has_input() -> bool {
    use std::io::IsTerminal as _;
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return false;
    }
    let Ok(metadata) = nix::sys::stat::fstat(&stdin) else { return false };
    metadata.st_mode & libc::S_IFMT != libc::S_IFCHR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_follow_the_shell() {
        let exit = |exit_code, signal| ExitInfo { exit_code, signal, timed_out: false };
        assert_eq!(exit_status(exit(Some(0), None)), 0);
        assert_eq!(exit_status(exit(Some(3), None)), 3);
        assert_eq!(exit_status(exit(None, Some(9))), 137);
        assert_eq!(exit_status(exit(None, Some(2))), 130);
    }
}
