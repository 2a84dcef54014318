//! The nftables seam: rulesets are applied and listed by Debian's `nft` binary,
//! driven with JSON through the `nftables` crate.

use std::io;
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
#[derive(Debug, Clone)]
pub(crate) struct Nft {
    program: PathBuf,
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
        let program = self.program.clone();
        tokio::task::spawn_blocking(move || {
            helper::apply_ruleset_with_args(&ruleset, Some(&program), helper::DEFAULT_ARGS)
                .map_err(|error| NftError::from_helper(&program, error))
        })
        .await
        .map_err(NftError::Task)?
    }

    /// Applies `ruleset` like [`Nft::apply`] and returns nft's echo of it, which
    /// carries the handles of the added rules.
    pub(crate) async fn apply_echo(
        &self,
        ruleset: Nftables<'static>,
    ) -> Result<serde_json::Value, NftError> {
        let program = self.program.clone();
        let payload = serde_json::to_string(&ruleset).map_err(NftError::Serialize)?;
        let raw = tokio::task::spawn_blocking(move || {
            helper::apply_ruleset_raw(&payload, Some(&program), ["--echo"])
                .map_err(|error| NftError::from_helper(&program, error))
        })
        .await
        .map_err(NftError::Task)??;
        serde_json::from_str(&raw).map_err(NftError::Listing)
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
