//! `sandbox shell` on a real terminal: `hutch` runs on the slave side of a
//! pseudo-terminal this test owns, as a user's shell would have it. The
//! terminal goes raw while the shell runs, window size changes reach the
//! remote terminal, the exit status comes back, and the terminal's settings
//! are restored afterwards.

mod support;

use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hutch_testkit::eventually;
use nix::pty::{Winsize, openpty};
use nix::sys::termios::{LocalFlags, tcgetattr};
use support::Sandboxd;

fn set_size(master: &OwnedFd, rows: u16, cols: u16) {
    let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one `winsize` from a live local; the fd is ours.
    let result = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    assert_eq!(result, 0, "TIOCSWINSZ");
}

#[tokio::test]
async fn shell_is_raw_follows_resizes_and_restores_the_terminal() {
    let sandboxd = Sandboxd::start();
    let pty = openpty(&Winsize { ws_row: 30, ws_col: 100, ws_xpixel: 0, ws_ypixel: 0 }, None)
        .expect("openpty");
    let before = tcgetattr(&pty.slave).unwrap();
    assert!(before.local_flags.contains(LocalFlags::ECHO | LocalFlags::ICANON));

    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_hutch"));
    command
        .args(["sandbox", "shell", "sb", "--", "sh"])
        .env("HUTCH_DAEMON_URL", &sandboxd.base)
        .env("TERM", "xterm")
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::from(pty.slave.try_clone().unwrap()));
    // SAFETY: only async-signal-safe calls between fork and exec: the child
    // gets a session of its own with the pty as controlling terminal, so the
    // kernel sends it SIGWINCH when the size changes.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        command.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().expect("spawn hutch");

    // Everything the terminal shows, read in the background.
    let screen = Arc::new(Mutex::new(Vec::new()));
    let mut reader = std::fs::File::from(pty.master.try_clone().unwrap());
    let sink = screen.clone();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buffer) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buffer[..n]);
        }
    });
    let shows = |text: &'static str| {
        let screen = screen.clone();
        async move {
            eventually(Duration::from_secs(20), async || {
                String::from_utf8_lossy(&screen.lock().unwrap()).contains(text)
            })
            .await
        }
    };
    let mut writer = std::fs::File::from(pty.master.try_clone().unwrap());

    // Raw while the shell runs: our side neither echoes nor edits lines.
    let raw = eventually(Duration::from_secs(20), async || {
        !tcgetattr(&pty.slave)
            .unwrap()
            .local_flags
            .intersects(LocalFlags::ECHO | LocalFlags::ICANON)
    })
    .await;
    assert!(raw, "the terminal never went raw");

    writer.write_all(b"echo \"size $(stty size)\"\n").unwrap();
    assert!(shows("size 30 100").await, "{}", String::from_utf8_lossy(&screen.lock().unwrap()));

    set_size(&pty.master, 40, 120);
    let resized = eventually(Duration::from_secs(20), async || {
        let _ = writer.write_all(b"echo \"size $(stty size)\"\n");
        tokio::time::sleep(Duration::from_millis(100)).await;
        String::from_utf8_lossy(&screen.lock().unwrap()).contains("size 40 120")
    })
    .await;
    assert!(resized, "{}", String::from_utf8_lossy(&screen.lock().unwrap()));

    writer.write_all(b"exit 4\n").unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(4));

    let after = tcgetattr(&pty.slave).unwrap();
    assert!(after.local_flags.contains(LocalFlags::ECHO | LocalFlags::ICANON), "not restored");
    assert_eq!(after.input_flags, before.input_flags);
    assert_eq!(after.output_flags, before.output_flags);
}
