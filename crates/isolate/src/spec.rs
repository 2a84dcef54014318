//! What a sandbox should be: the typed input of [`crate::Driver::create`].

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A validated sandbox id: `[a-z0-9-]`, 1 to 63 characters, not starting with `-`.
///
/// Every host artefact of a sandbox (directories, cgroups, the socket) is named after
/// it, so the charset is kept to what is safe in a path, a cgroup name and a hostname.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SandboxId(String);

/// Why a string is not a [`SandboxId`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidSandboxId {
    #[error("sandbox id is empty")]
    Empty,
    #[error("sandbox id is {len} characters long, at most 63 are allowed")]
    TooLong { len: usize },
    #[error("sandbox id contains {character:?}; only a-z, 0-9 and '-' are allowed")]
    BadCharacter { character: char },
    #[error("sandbox id starts with '-'")]
    LeadingDash,
}

impl SandboxId {
    /// Maximum length, the limit of a DNS label (ids double as hostnames).
    pub const MAX_LEN: usize = 63;

    pub fn new(id: impl Into<String>) -> Result<Self, InvalidSandboxId> {
        let id = id.into();
        if id.is_empty() {
            return Err(InvalidSandboxId::Empty);
        }
        if id.len() > Self::MAX_LEN {
            return Err(InvalidSandboxId::TooLong { len: id.len() });
        }
        if let Some(character) =
            id.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(InvalidSandboxId::BadCharacter { character });
        }
        if id.starts_with('-') {
            return Err(InvalidSandboxId::LeadingDash);
        }
        Ok(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lets maps keyed by id be searched with a plain `&str`. The derived `Ord`
/// and `Hash` are those of the inner string, as `Borrow` requires.
impl std::borrow::Borrow<str> for SandboxId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SandboxId {
    type Error = InvalidSandboxId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<SandboxId> for String {
    fn from(value: SandboxId) -> Self {
        value.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything needed to create one sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxSpec {
    pub id: SandboxId,
    /// Hostname inside the sandbox's UTS namespace; defaults to the id when `None`.
    pub hostname: Option<String>,
    pub rootfs: Rootfs,
    /// Environment of sandboxd, which hands it on to the processes it starts.
    ///
    /// Merge rule: entries are applied in order over the driver's defaults (`PATH`,
    /// `HOME`, `HOSTNAME`), and a later entry replaces an earlier one of the same name.
    /// [`SandboxSpec::from_image`] puts the image's `Env` first, so whatever the caller
    /// pushes afterwards (or sets with [`SandboxSpec::set_env`]) wins over the image.
    pub env: Vec<(String, String)>,
    /// Working directory of sandboxd inside the sandbox, inherited by the processes it
    /// starts; `/` when `None`. Must be absolute and free of `..`. Created (owned by
    /// root, mode 0755, in the writable layer) when the image lacks it, as Docker does.
    pub working_dir: Option<String>,
    /// Default user of processes started by sandboxd, passed to it as `HUTCH_USER`
    /// (sandboxd itself runs as root inside, to be able to switch users).
    pub user: Option<String>,
    /// The sandbox's main command (an image's `Entrypoint` + `Cmd`), started by
    /// sandboxd as the process tagged `main` before the sandbox counts as created; a
    /// command that cannot start fails [`crate::Driver::create`]. `None` leaves the
    /// sandbox idle, with only sandboxd running: a sandbox platform that runs its own
    /// processes through sandboxd usually clears what [`SandboxSpec::from_image`] set.
    pub command: Option<Vec<String>>,
    pub limits: Limits,
    pub egress: Egress,
    /// Run the sandbox in its own user namespace, which owns all its other
    /// namespaces: root inside is host uid [`crate::IdRange::base`]
    /// ([`crate::Driver::with_user_ids`]), the image's files are root's inside
    /// (idmapped mounts), the host's bind-mounted files are `nobody`'s. The overlay
    /// then reads its metadata from `user.overlay.*` (`userxattr`), which hutch-image
    /// sets beside `trusted.overlay.*` for opaque directories.
    pub user_namespace: bool,
}

impl SandboxSpec {
    /// A spec with the host image, default limits and no network.
    pub fn new(id: SandboxId) -> Self {
        Self {
            id,
            hostname: None,
            rootfs: Rootfs::Host,
            env: Vec::new(),
            working_dir: None,
            user: None,
            command: None,
            limits: Limits::default(),
            egress: Egress::None,
            user_namespace: false,
        }
    }

    /// A spec that runs `image` as Docker would: its layers as the root, its `Env`
    /// (see [`SandboxSpec::env`] for how the caller's entries override it), its
    /// `WorkingDir`, its `User` as the default user, and `Entrypoint` followed by `Cmd`
    /// as [`SandboxSpec::command`] (`None` when both are empty). Limits and egress are
    /// the defaults of [`SandboxSpec::new`].
    pub fn from_image(id: SandboxId, image: &hutch_image::Image) -> Self {
        let config = &image.config;
        let env = config
            .env
            .iter()
            .map(|entry| match entry.split_once('=') {
                Some((key, value)) => (key.to_owned(), value.to_owned()),
                // Docker treats a bare name in an image's Env as an empty value.
                None => (entry.clone(), String::new()),
            })
            .collect();
        let command: Vec<String> = config.entrypoint.iter().chain(&config.cmd).cloned().collect();
        Self {
            rootfs: Rootfs::Layers { lower: image.layers.clone() },
            env,
            working_dir: config.working_dir.clone().filter(|dir| !dir.is_empty()),
            user: config.user.clone().filter(|user| !user.is_empty()),
            command: (!command.is_empty()).then_some(command),
            ..Self::new(id)
        }
    }

    /// Sets `key` to `value`, replacing any earlier entry of that name (so the value
    /// wins over the image's `Env`).
    pub fn set_env(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
    }
}

/// The environment sandboxd starts with: `defaults`, then `overrides` applied in
/// order, a later entry replacing an earlier one of the same name in place of it.
pub(crate) fn merge_env(
    defaults: Vec<(String, String)>,
    overrides: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env = defaults;
    for (key, value) in overrides {
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
    env
}

/// The root filesystem of a sandbox. Every variant is mounted read-only beneath a
/// per-sandbox writable layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rootfs {
    /// The built-in `host` image: the host's /usr (and /bin, /lib*, /sbin) read-only
    /// and a filtered copy of /etc; nothing from /home, /root or /var.
    Host,
    /// Unpacked OCI layer directories, bottom to top.
    Layers { lower: Vec<PathBuf> },
}

/// Resource limits, enforced through cgroups and the size of the writable layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU quota in thousandths of a CPU (1000 = one full CPU).
    pub cpu_millis: u32,
    /// Memory the sandbox's processes may use, in bytes.
    pub memory_bytes: u64,
    /// Maximum number of tasks (processes and threads).
    pub pids: u32,
    /// Size of the writable layer. It is a tmpfs, whose pages are charged to the
    /// memory cgroup of whoever writes them; so the cgroup's limit is
    /// [`Limits::memory_limit`], memory plus disk, and filling the disk ends in
    /// `ENOSPC` from the tmpfs, never in the OOM killer.
    pub disk_bytes: u64,
}

impl Limits {
    /// What the sandbox's memory cgroup is limited to: its memory and its disk,
    /// which lives in memory.
    pub fn memory_limit(&self) -> u64 {
        self.memory_bytes.saturating_add(self.disk_bytes)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self { cpu_millis: 1000, memory_bytes: 512 << 20, pids: 512, disk_bytes: 1 << 30 }
    }
}

/// What the sandbox may reach on the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Egress {
    /// Loopback only.
    None,
    /// NAT to the internet through a host bridge, set up by `hutch-net`; needs a
    /// driver built with [`crate::Driver::with_network`].
    Internet,
}

/// The directories to create, parents first, so that `dir` exists: `/a/b` gives
/// `["/a", "/a/b"]`. `None` when `dir` is not absolute or has a `..` component:
/// Docker refuses a relative working directory, and `..` has no business in one.
pub(crate) fn working_dir_ancestors(dir: &str) -> Option<Vec<String>> {
    if !dir.starts_with('/') {
        return None;
    }
    let mut path = String::new();
    let mut ancestors = Vec::new();
    for component in dir.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if component == ".." {
            return None;
        }
        path.push('/');
        path.push_str(component);
        ancestors.push(path.clone());
    }
    Some(ancestors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(config: hutch_image::ImageConfig) -> hutch_image::Image {
        hutch_image::Image {
            reference: "example.com/app:1".into(),
            digest: "sha256:00".into(),
            layer_digests: vec!["sha256:01".into(), "sha256:02".into()],
            layers: vec!["/store/layers/01".into(), "/store/layers/02".into()],
            config,
            size: 0,
        }
    }

    fn pairs(env: &[(&str, &str)]) -> Vec<(String, String)> {
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn from_image_applies_the_image_config() {
        let id = SandboxId::new("app").unwrap();
        let spec = SandboxSpec::from_image(
            id.clone(),
            &image(hutch_image::ImageConfig {
                env: vec!["PATH=/bin".into(), "EQ=a=b".into(), "BARE".into()],
                cmd: vec!["-c".into(), "echo hi".into()],
                entrypoint: vec!["/bin/sh".into()],
                working_dir: Some("/work".into()),
                user: Some("1000:1000".into()),
            }),
        );
        assert_eq!(
            spec.rootfs,
            Rootfs::Layers { lower: vec!["/store/layers/01".into(), "/store/layers/02".into()] }
        );
        assert_eq!(spec.env, pairs(&[("PATH", "/bin"), ("EQ", "a=b"), ("BARE", "")]));
        assert_eq!(spec.working_dir.as_deref(), Some("/work"));
        assert_eq!(spec.user.as_deref(), Some("1000:1000"));
        assert_eq!(spec.command, Some(vec!["/bin/sh".to_string(), "-c".into(), "echo hi".into()]));
        assert_eq!(spec.limits, Limits::default());
        assert_eq!(spec.egress, Egress::None);
        assert_eq!(spec.id, id);
    }

    #[test]
    fn from_image_without_cmd_or_entrypoint_has_no_command() {
        let spec = SandboxSpec::from_image(
            SandboxId::new("idle").unwrap(),
            &image(hutch_image::ImageConfig {
                working_dir: Some(String::new()),
                user: Some(String::new()),
                ..Default::default()
            }),
        );
        assert_eq!(spec.command, None);
        assert_eq!(spec.working_dir, None);
        assert_eq!(spec.user, None);
        assert!(spec.env.is_empty());
    }

    #[test]
    fn later_env_entries_override_the_image_and_the_defaults() {
        let mut spec = SandboxSpec::from_image(
            SandboxId::new("env").unwrap(),
            &image(hutch_image::ImageConfig {
                env: vec!["PATH=/bin".into(), "FOO=image".into(), "KEEP=1".into()],
                ..Default::default()
            }),
        );
        spec.env.push(("FOO".into(), "pushed".into()));
        spec.set_env("KEEP", "set");
        let defaults = pairs(&[("PATH", "/usr/bin"), ("HOME", "/root")]);
        assert_eq!(
            merge_env(defaults, &spec.env),
            pairs(&[("HOME", "/root"), ("PATH", "/bin"), ("FOO", "pushed"), ("KEEP", "set")])
        );
    }

    #[test]
    fn working_dir_must_be_absolute_without_dot_dot() {
        assert_eq!(working_dir_ancestors("/"), Some(vec![]));
        assert_eq!(
            working_dir_ancestors("/a//b/./c/"),
            Some(vec!["/a".to_string(), "/a/b".into(), "/a/b/c".into()])
        );
        assert_eq!(working_dir_ancestors("work"), None);
        assert_eq!(working_dir_ancestors("/a/../../etc"), None);
    }
}
