//! The nftables seam: rulesets are applied and listed by Debian's `nft` binary,
//! driven with JSON through the `nftables` crate.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nftables::helper::{self, NftablesError};
use nftables::schema::Nftables;

/// Why an `nft` invocation failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft binary {program:?} not found; install it with `apt-get install nftables`")]
    Missing { program: PathBuf },
    #[error("cannot run {program:?}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("nft failed while {hint}: {stderr}")]
    Failed { hint: String, stderr: String },
    #[error("nft failed")]
    Other(#[source] NftablesError),
    #[error("cannot serialize an nft ruleset")]
    Serialize(#[source] serde_json::Error),
    #[error("nft printed a listing that is not json")]
    Listing(#[source] serde_json::Error),
    #[error("the task running nft was lost")]
    Task(#[source] tokio::task::JoinError),
}

impl NftError {
    fn from_helper(program: &Path, error: NftablesError) -> Self {
        match error {
            NftablesError::NftExecution { inner, .. }
                if inner.kind() == io::ErrorKind::NotFound =>
            {
                NftError::Missing { program: program.to_owned() }
            }
            NftablesError::NftFailed { hint, stderr, .. } => {
                NftError::Failed { hint, stderr: stderr.trim().to_owned() }
            }
            other => NftError::Other(other),
        }
    }
}

/// Runs the configured `nft` binary. Calls block on a child process, so they
/// run on tokio's blocking pool.
///
/// No `nft` is started ahead of time to save its start-up: it would have to
/// wait for its input on a pipe, which every process the dataplane forks
/// meanwhile holds open (see [`run_apply`]).
#[derive(Debug, Clone)]
pub(crate) struct Nft {
    program: PathBuf,
}

/// An anonymous in-memory file holding `content`, positioned at its start.
fn memfd(content: &[u8]) -> io::Result<File> {
    let fd = nix::sys::memfd::memfd_create(c"hutch-nft", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut file = File::from(fd);
    file.write_all(content)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

/// Runs `nft -j -f -` on `payload`.
///
/// Its stdin and stderr are in-memory files, not pipes: a pipe's reader sees
/// its end only once every copy of the write end is closed, and any process
/// the dataplane forks meanwhile (a sandbox child keeps what it inherited
/// until it execs, and it waits for its attach to finish first) would hold a
/// copy, so two concurrent attaches could wait for each other forever.
fn run_apply(program: &Path, payload: &str) -> Result<(), NftError> {
    let spawn_error = |source| NftError::Spawn { program: program.to_owned(), source };
    let input = memfd(payload.as_bytes()).map_err(spawn_error)?;
    let mut errors = memfd(b"").map_err(spawn_error)?;
    let status = Command::new(program)
        .args(["-j", "-f", "-"])
        .stdin(input)
        .stdout(Stdio::null())
        .stderr(errors.try_clone().map_err(spawn_error)?)
        .status()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => NftError::Missing { program: program.to_owned() },
            _ => NftError::Spawn { program: program.to_owned(), source },
        })?;
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    // The offset is shared with the child's copy, which wrote to the end.
    errors.seek(SeekFrom::Start(0)).map_err(spawn_error)?;
    errors.read_to_string(&mut stderr).map_err(spawn_error)?;
    Err(NftError::Failed {
        hint: format!("applying ruleset ({status})"),
        stderr: stderr.trim().to_owned(),
    })
}

impl Nft {
    pub(crate) fn new(program: PathBuf) -> Self {
        Nft { program }
    }

    /// Fails with [`NftError::Missing`] when the binary cannot be found.
    pub(crate) async fn check_installed(&self) -> Result<(), NftError> {
        let program = self.program.clone();
        tokio::task::spawn_blocking(move || {
            let status = Command::new(&program)
                .arg("--version")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            match status {
                Ok(_) => Ok(()),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    Err(NftError::Missing { program })
                }
                Err(source) => Err(NftError::Spawn { program, source }),
            }
        })
        .await
        .map_err(NftError::Task)?
    }

    /// Applies `ruleset` as one transaction: all of it or nothing.
    pub(crate) async fn apply(&self, ruleset: Nftables<'static>) -> Result<(), NftError> {
        if ruleset.objects.is_empty() {
            return Ok(());
        }
        let payload = serde_json::to_string(&ruleset).map_err(NftError::Serialize)?;
        let program = self.program.clone();
        tokio::task::spawn_blocking(move || run_apply(&program, &payload))
            .await
            .map_err(NftError::Task)?
    }

    /// The whole ruleset of this network namespace, as JSON.
    pub(crate) async fn list(&self) -> Result<serde_json::Value, NftError> {
        let program = self.program.clone();
        let raw = tokio::task::spawn_blocking(move || {
            helper::get_current_ruleset_raw(Some(&program), helper::DEFAULT_ARGS)
                .map_err(|error| NftError::from_helper(&program, error))
        })
        .await
        .map_err(NftError::Task)??;
        serde_json::from_str(&raw).map_err(NftError::Listing)
    }
}
