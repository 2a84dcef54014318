//! Where the client finds the platform: flags and `HUTCH_*` variables first,
//! then the local `hutch up` (its data dir holds the admin key).

use std::path::PathBuf;

use anyhow::Context as _;

use crate::args::ConnectionArgs;

/// The URL `hutch up` listens on by default.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8900";

/// The resolved connection settings of one client command.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Base URL of the server, without a trailing slash.
    pub url: String,
    pub api_key: Option<String>,
    pub namespace: String,
    /// Base URL of a sandboxd to talk to directly, if given.
    pub daemon_url: Option<String>,
}

impl Connection {
    /// Resolves the settings. A missing API key is not an error here: the
    /// direct daemon mode needs none, and the server says 401 clearly.
    pub fn resolve(args: &ConnectionArgs) -> anyhow::Result<Connection> {
        let url = args.url.clone().unwrap_or_else(|| DEFAULT_URL.to_owned());
        check_http_url(&url, "--url/HUTCH_URL")?;
        if let Some(daemon) = &args.daemon_url {
            check_http_url(daemon, "--daemon-url/HUTCH_DAEMON_URL")?;
        }
        if args.namespace.is_empty() {
            return Err(
                crate::UsageError("--namespace/HUTCH_NAMESPACE may not be empty".into()).into()
            );
        }
        let api_key = match &args.api_key {
            Some(key) if !key.trim().is_empty() => Some(key.trim().to_owned()),
            _ if args.daemon_url.is_some() => None,
            _ => local_admin_key()?,
        };
        Ok(Connection {
            url: url.trim_end_matches('/').to_owned(),
            api_key,
            namespace: args.namespace.clone(),
            daemon_url: args.daemon_url.as_ref().map(|u| u.trim_end_matches('/').to_owned()),
        })
    }
}

fn check_http_url(url: &str, what: &str) -> Result<(), crate::UsageError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(crate::UsageError(format!("{what} must start with http:// or https://, got {url:?}")))
    }
}

/// The data dir of a local `hutch up`: `HUTCH_DATA_DIR`, else
/// `/var/lib/hutch` for root and `~/.local/share/hutch` for anyone else.
pub fn local_data_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HUTCH_DATA_DIR").filter(|d| !d.is_empty()) {
        return Some(dir.into());
    }
    if nix::unistd::geteuid().is_root() {
        return Some("/var/lib/hutch".into());
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".local/share/hutch"))
}

/// The admin key a local `hutch up` wrote, if there is one.
fn local_admin_key() -> anyhow::Result<Option<String>> {
    let Some(dir) = local_data_dir() else { return Ok(None) };
    let path = dir.join("admin.key");
    match std::fs::read_to_string(&path) {
        Ok(key) => Ok(Some(key.trim().to_owned()).filter(|k| !k.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| {
            format!("cannot read the local admin key {} (set HUTCH_API_KEY)", path.display())
        }),
    }
}
