//! The command line, as clap parses it, and the parsers of its values.

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::platform::{DataplaneArgs, ServerArgs, UpArgs};

#[derive(Debug, Parser)]
#[command(name = "hutch", version, about = "Isolated sandboxes for untrusted code")]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole platform on this machine (server, dataplane, proxy).
    Up(UpArgs),
    /// Run the control plane (REST and gRPC) alone.
    Server(ServerArgs),
    /// Run one node agent and its proxy.
    Dataplane(DataplaneArgs),
    /// Run a command in a new sandbox, stream its output and remove the sandbox.
    Run(RunArgs),
    /// Create, inspect, use and remove sandboxes.
    Sandbox(SandboxArgs),
    /// Pull, import, list and remove images.
    Image(ImageArgs),
    /// Show the dataplanes the server knows (admin).
    Node(NodeArgs),
    /// List, create and delete namespaces (admin).
    Namespace(NamespaceArgs),
}

/// Where the platform is and who we are, for the client commands (`run`,
/// `sandbox`, `image`); accepted anywhere on the command line. Falls back to
/// the local `hutch up`.
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// URL of the Hutch server [default: http://127.0.0.1:8900].
    #[arg(long, env = "HUTCH_URL", global = true)]
    pub url: Option<String>,
    /// API key [default: the admin key of the local `hutch up`].
    #[arg(long, env = "HUTCH_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Namespace of the sandboxes.
    #[arg(long, env = "HUTCH_NAMESPACE", global = true, default_value = "default")]
    pub namespace: String,
    /// Talk to this sandboxd directly instead of through the server's daemon
    /// route (sandbox commands that only use the daemon; for debugging).
    #[arg(long, env = "HUTCH_DAEMON_URL", global = true, hide = true)]
    pub daemon_url: Option<String>,
}

/// What a new sandbox gets; shared by `run` and `sandbox create`.
#[derive(Debug, Clone, Args)]
pub struct SandboxSpecArgs {
    /// Image: `host` (the host's root filesystem) or an OCI reference.
    #[arg(long, default_value = "host")]
    pub image: String,
    /// CPUs (fractions allowed).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory limit: a number of MiB or a size such as 512m, 2g.
    #[arg(long, value_parser = parse_memory_mb)]
    pub memory: Option<u64>,
    /// Time limit: seconds or a duration such as 90s, 10m, 1h (`run` kills
    /// the command then; a sandbox is stopped with reason `timeout`).
    #[arg(long, value_parser = parse_duration_secs)]
    pub timeout: Option<u64>,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// Outbound network access.
    #[arg(long, value_enum)]
    pub network: Option<Network>,
    /// Working directory of the command.
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// User to run as (`name`, `uid` or `uid:gid`).
    #[arg(long, short = 'u')]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Network {
    None,
    Internet,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::None => "none",
            Network::Internet => "internet",
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub spec: SandboxSpecArgs,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SandboxArgs {
    #[command(subcommand)]
    pub command: SandboxCommand,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox and print its id.
    Create(CreateArgs),
    /// List sandboxes.
    #[command(visible_alias = "list")]
    Ls(ListArgs),
    /// Show one sandbox as JSON.
    Get { id: String },
    /// Run a command in a sandbox, streaming its output; exits with its status.
    Exec(ExecArgs),
    /// An interactive terminal in a sandbox.
    Shell(ShellArgs),
    /// Copy files or directories: `cp ./local ID:/path` or `cp ID:/path ./local`.
    Cp(CpArgs),
    /// Output of the sandbox's main command.
    Logs(LogsArgs),
    /// Stop a sandbox (it ends `terminated`, reason `stopped`).
    Stop(StopArgs),
    /// Delete sandboxes (stopping them first if needed).
    #[command(visible_alias = "delete")]
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub spec: SandboxSpecArgs,
    /// Disk limit: a number of MiB or a size such as 1g.
    #[arg(long, value_parser = parse_memory_mb)]
    pub disk: Option<u64>,
    /// Stop after this long without API or proxy traffic (seconds or 10m, 1h).
    #[arg(long, value_parser = parse_duration_secs)]
    pub idle_timeout: Option<u64>,
    /// Port to expose through the proxy (repeatable).
    #[arg(long = "port", short = 'p')]
    pub ports: Vec<u16>,
    /// Tag K=V (repeatable).
    #[arg(long = "tag", value_name = "K=V", value_parser = parse_key_value)]
    pub tags: Vec<(String, String)>,
    /// The sandbox's main command (optional: without it the sandbox runs
    /// until stopped; with it, the sandbox completes when it exits).
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Include stopped (terminal) sandboxes.
    #[arg(long, short = 'a')]
    pub all: bool,
    /// Only sandboxes in this state.
    #[arg(long)]
    pub state: Option<String>,
    /// Only sandboxes with this tag K=V.
    #[arg(long, value_name = "K=V", value_parser = parse_key_value)]
    pub tag: Option<(String, String)>,
    /// Print only the ids.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    pub id: String,
    /// Environment variable (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// Working directory.
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// User to run as.
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Kill the command after this long (seconds or 10m, 1h).
    #[arg(long, value_parser = parse_duration_secs)]
    pub timeout: Option<u64>,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    pub id: String,
    /// User to run as.
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Working directory.
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// Command to run instead of the sandbox's bash (or sh).
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// `LOCAL_PATH` or `ID:/ABSOLUTE/PATH`.
    pub source: String,
    /// `LOCAL_PATH` or `ID:/ABSOLUTE/PATH`.
    pub destination: String,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    pub id: String,
    /// Keep streaming until the command exits.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// The process to read, by tag or pid.
    #[arg(long, default_value = "main")]
    pub process: String,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    pub id: String,
    /// Seconds between SIGTERM and SIGKILL.
    #[arg(long, value_parser = parse_duration_secs)]
    pub grace: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    pub command: ImageCommand,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Pull an image from its registry onto every node.
    Pull {
        reference: String,
        /// Registry user name.
        #[arg(long, env = "HUTCH_REGISTRY_USERNAME")]
        username: Option<String>,
        /// Registry password.
        #[arg(long, env = "HUTCH_REGISTRY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
    /// List images.
    #[command(visible_alias = "list")]
    Ls,
    /// Import an image tarball (`docker save` or OCI layout).
    Import { file: std::path::PathBuf },
    /// Remove an image.
    Rm { reference: String },
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    pub command: NodeCommand,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List nodes: state, cpus and memory allocated/capacity, sandboxes.
    #[command(visible_alias = "list")]
    Ls,
    /// Show one node as JSON.
    Get { id: String },
}

#[derive(Debug, Args)]
pub struct NamespaceArgs {
    #[command(subcommand)]
    pub command: NamespaceCommand,
}

#[derive(Debug, Subcommand)]
pub enum NamespaceCommand {
    /// List namespaces.
    #[command(visible_alias = "list")]
    Ls,
    /// Create a namespace and print its name.
    Create { name: String },
    /// Delete a namespace: its keys stop working and its sandboxes are
    /// stopped (reason `namespace_deleted`) and forgotten.
    #[command(visible_alias = "delete")]
    Rm { name: String },
}

/// `K=V`; the value may contain `=`, the key may not be empty.
pub fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected K=V, got {text:?}")),
    }
}

/// A size in MiB: a bare number is MiB; suffixes k, m, g, t (with an optional
/// `b`, `ib`), powers of 1024. Must come to at least 1 MiB.
pub fn parse_memory_mb(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let digits_end = lower.find(|c: char| !c.is_ascii_digit()).unwrap_or(lower.len());
    let (number, unit) = lower.split_at(digits_end);
    let invalid = || format!("invalid size {text:?} (expected MiB or e.g. 512m, 2g)");
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let unit = unit.trim_end_matches("ib").trim_end_matches('b');
    let kib = match unit {
        "k" => number,
        "" | "m" => number.checked_mul(1024).ok_or_else(invalid)?,
        "g" => number.checked_mul(1024 * 1024).ok_or_else(invalid)?,
        "t" => number.checked_mul(1024 * 1024 * 1024).ok_or_else(invalid)?,
        _ => return Err(invalid()),
    };
    let mib = kib / 1024;
    if mib == 0 {
        return Err(format!("size {text:?} is less than 1 MiB"));
    }
    Ok(mib)
}

/// Seconds: a bare number, or a number with `s`, `m`, `h` or `d`.
pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let invalid = || format!("invalid duration {text:?} (expected seconds or e.g. 90s, 10m, 1h)");
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(invalid()),
    };
    number.checked_mul(factor).ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_mib_unless_suffixed() {
        assert_eq!(parse_memory_mb("512"), Ok(512));
        assert_eq!(parse_memory_mb("512m"), Ok(512));
        assert_eq!(parse_memory_mb("512MiB"), Ok(512));
        assert_eq!(parse_memory_mb("2g"), Ok(2048));
        assert_eq!(parse_memory_mb("2GB"), Ok(2048));
        assert_eq!(parse_memory_mb("2048k"), Ok(2));
        for bad in ["", "m", "-1", "1.5g", "12x", "0", "100k", "99999999999999999999"] {
            assert!(parse_memory_mb(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_are_seconds_unless_suffixed() {
        assert_eq!(parse_duration_secs("30"), Ok(30));
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert_eq!(parse_duration_secs("10m"), Ok(600));
        assert_eq!(parse_duration_secs("1h"), Ok(3600));
        assert_eq!(parse_duration_secs("1d"), Ok(86400));
        for bad in ["", "h", "1.5h", "-3", "5 minutes"] {
            assert!(parse_duration_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_values_split_at_the_first_equals_sign() {
        assert_eq!(parse_key_value("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_key_value("A="), Ok(("A".into(), String::new())));
        assert!(parse_key_value("=b").is_err());
        assert!(parse_key_value("A").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
