//! Our own terminal: its size, and raw mode for `sandbox shell`.

use hutch_api::PtySize;
use nix::sys::termios::{self, SetArg, Termios};

/// The size of the terminal on stdin (or stdout), if either is one.
pub fn window_size() -> Option<PtySize> {
    [libc::STDIN_FILENO, libc::STDOUT_FILENO].into_iter().find_map(|fd| {
        let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which
        // points to a live, properly aligned local; a bad fd only fails.
        let result = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) };
        (result == 0 && size.ws_row > 0 && size.ws_col > 0)
            .then_some(PtySize { rows: size.ws_row, cols: size.ws_col })
    })
}

/// Puts the terminal on stdin in raw mode (keys go to the remote shell
/// unprocessed: Ctrl-C is a byte, not our SIGINT) and restores it on drop,
/// on every way out of `sandbox shell`.
#[derive(Debug)]
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enable() -> nix::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, SetArg::TCSADRAIN, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSADRAIN, &self.saved);
    }
}
