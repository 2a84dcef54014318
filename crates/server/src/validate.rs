//! Validation of create requests: the request with defaults applied, or the
//! first field that is wrong.

use std::collections::BTreeSet;

use crate::model::{CreateSandbox, Network, Resources, SandboxSpec};

pub const DEFAULT_TIMEOUT_SECS: u64 = 3600;
pub const MAX_TIMEOUT_SECS: u64 = 86_400;
const MAX_TAGS: usize = 64;
const MAX_PORTS: usize = 64;
const MAX_ENV: usize = 1024;
/// Bounds on what one spec may carry. Every spec travels to its node and is
/// stored twice; unbounded, one tenant's specs could fill the node's messages
/// for every other tenant. 128 KiB is also `MAX_ARG_STRLEN`, the most one
/// argument or variable may be for `execve`.
pub const MAX_ENV_BYTES: usize = 128 * 1024;
pub const MAX_COMMAND_BYTES: usize = 128 * 1024;
const MAX_COMMAND_ARGS: usize = 4096;
const MAX_PATH_BYTES: usize = 4096;

/// A field of a request that is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> InvalidField {
    InvalidField { field: field.into(), message: message.into() }
}

/// A create request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidCreate {
    pub spec: SandboxSpec,
    pub timeout_secs: u64,
    pub idle_timeout_secs: Option<u64>,
    pub tags: std::collections::BTreeMap<String, String>,
}

pub fn validate_create(request: CreateSandbox) -> Result<ValidCreate, InvalidField> {
    let image = request.image.unwrap_or_else(|| "host".to_owned());
    if image.is_empty()
        || image.len() > 512
        || image.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            "image",
            "must be \"host\" or an OCI reference (1 to 512 characters, no spaces)",
        ));
    }
    let command = request.command.unwrap_or_default();
    if let Some(first) = command.first()
        && first.is_empty()
    {
        return Err(invalid("command[0]", "must not be empty"));
    }
    if let Some(index) = command.iter().position(|arg| arg.contains('\0')) {
        return Err(invalid(format!("command[{index}]"), "must not contain NUL"));
    }
    let command_bytes: usize = command.iter().map(|arg| arg.len() + 1).sum();
    if command.len() > MAX_COMMAND_ARGS || command_bytes > MAX_COMMAND_BYTES {
        return Err(invalid(
            "command",
            format!(
                "at most {MAX_COMMAND_ARGS} arguments of {} KiB in all",
                MAX_COMMAND_BYTES / 1024
            ),
        ));
    }
    let env = request.env.unwrap_or_default();
    if env.len() > MAX_ENV {
        return Err(invalid("env", format!("at most {MAX_ENV} variables")));
    }
    let env_bytes: usize = env.iter().map(|(key, value)| key.len() + value.len() + 2).sum();
    if env_bytes > MAX_ENV_BYTES {
        return Err(invalid(
            "env",
            format!(
                "at most {} KiB of names and values in all ({env_bytes} bytes given)",
                MAX_ENV_BYTES / 1024
            ),
        ));
    }
    for (key, value) in &env {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(invalid(
                format!("env.{key}"),
                "names must be non-empty without '=' or NUL",
            ));
        }
        if value.contains('\0') {
            return Err(invalid(format!("env.{key}"), "must not contain NUL"));
        }
    }
    if let Some(dir) = &request.working_dir
        && (!dir.starts_with('/') || dir.contains('\0') || dir.len() > MAX_PATH_BYTES)
    {
        return Err(invalid("working_dir", "must be an absolute path of at most 4096 bytes"));
    }
    if let Some(user) = &request.user
        && (user.is_empty() || user.len() > 64 || user.contains(['\0', ':', '/']))
    {
        return Err(invalid("user", "must be a user name or uid"));
    }
    let defaults = Resources::default();
    let asked = request.resources.unwrap_or_default();
    let resources = Resources {
        cpus: asked.cpus.unwrap_or(defaults.cpus),
        memory_mb: asked.memory_mb.unwrap_or(defaults.memory_mb),
        disk_mb: asked.disk_mb.unwrap_or(defaults.disk_mb),
        pids: asked.pids.unwrap_or(defaults.pids),
    };
    if !resources.cpus.is_finite() || resources.cpus < 0.01 || resources.cpus > 1024.0 {
        return Err(invalid("resources.cpus", "must be between 0.01 and 1024"));
    }
    if !(16..=16 * 1024 * 1024).contains(&resources.memory_mb) {
        return Err(invalid("resources.memory_mb", "must be between 16 and 16777216"));
    }
    if !(1..=64 * 1024 * 1024).contains(&resources.disk_mb) {
        return Err(invalid("resources.disk_mb", "must be between 1 and 67108864"));
    }
    if !(1..=1_000_000).contains(&resources.pids) {
        return Err(invalid("resources.pids", "must be between 1 and 1000000"));
    }
    let network = Network { egress: request.network.and_then(|n| n.egress).unwrap_or_default() };
    let ports = request.ports.unwrap_or_default();
    if ports.len() > MAX_PORTS {
        return Err(invalid("ports", format!("at most {MAX_PORTS} ports")));
    }
    let mut seen = BTreeSet::new();
    for (index, &port) in ports.iter().enumerate() {
        if port == 0 {
            return Err(invalid(format!("ports[{index}]"), "must be between 1 and 65535"));
        }
        if !seen.insert(port) {
            return Err(invalid(format!("ports[{index}]"), format!("port {port} is listed twice")));
        }
    }
    let timeout_secs = request.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
    validate_timeout("timeout_secs", timeout_secs)?;
    if let Some(idle) = request.idle_timeout_secs {
        validate_timeout("idle_timeout_secs", idle)?;
    }
    let tags = request.tags.unwrap_or_default();
    if tags.len() > MAX_TAGS {
        return Err(invalid("tags", format!("at most {MAX_TAGS} tags")));
    }
    for (key, value) in &tags {
        validate_tag_key(key).map_err(|message| invalid(format!("tags.{key}"), message))?;
        if value.len() > 256 || value.contains('\0') {
            return Err(invalid(format!("tags.{key}"), "values are at most 256 bytes, no NUL"));
        }
    }
    Ok(ValidCreate {
        spec: SandboxSpec {
            image,
            command,
            env,
            working_dir: request.working_dir,
            user: request.user,
            resources,
            network,
            ports,
        },
        timeout_secs,
        idle_timeout_secs: request.idle_timeout_secs,
        tags,
    })
}

pub fn validate_timeout(field: &str, secs: u64) -> Result<(), InvalidField> {
    if secs == 0 || secs > MAX_TIMEOUT_SECS {
        return Err(invalid(field, format!("must be between 1 and {MAX_TIMEOUT_SECS}")));
    }
    Ok(())
}

fn validate_tag_key(key: &str) -> Result<(), &'static str> {
    let ok = !key.is_empty()
        && key.len() <= 63
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'));
    if ok { Ok(()) } else { Err("keys are 1 to 63 characters of [A-Za-z0-9_.-/]") }
}

/// Namespace names: 1 to 63 characters of `[a-z0-9-]`, starting with a letter
/// or digit (they appear in URLs and proxy host names).
pub fn validate_namespace_name(name: &str) -> Result<(), InvalidField> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid("name", "must be 1 to 63 characters of [a-z0-9-], not starting with '-'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ResourcesRequest;

    #[test]
    fn empty_request_gets_the_documented_defaults() {
        let valid = validate_create(CreateSandbox::default()).unwrap();
        assert_eq!(valid.spec.image, "host");
        assert_eq!(valid.spec.resources, Resources::default());
        assert_eq!(valid.timeout_secs, 3600);
        assert_eq!(valid.idle_timeout_secs, None);
    }

    #[test]
    fn errors_name_the_field() {
        let request = CreateSandbox {
            resources: Some(ResourcesRequest { cpus: Some(0.0), ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(validate_create(request).unwrap_err().field, "resources.cpus");
        let request = CreateSandbox { ports: Some(vec![80, 80]), ..Default::default() };
        assert_eq!(validate_create(request).unwrap_err().field, "ports[1]");
        let request = CreateSandbox { timeout_secs: Some(86_401), ..Default::default() };
        assert_eq!(validate_create(request).unwrap_err().field, "timeout_secs");
    }

    #[test]
    fn specs_are_bounded_in_size() {
        let env =
            |bytes: usize| Some([("BIG".to_owned(), "x".repeat(bytes))].into_iter().collect());
        let fits = CreateSandbox { env: env(64 * 1024), ..Default::default() };
        assert!(validate_create(fits).is_ok());
        let huge = CreateSandbox { env: env(1 << 20), ..Default::default() };
        assert_eq!(validate_create(huge).unwrap_err().field, "env");
        let long = CreateSandbox {
            command: Some(vec!["sh".into(), "x".repeat(MAX_COMMAND_BYTES)]),
            ..Default::default()
        };
        assert_eq!(validate_create(long).unwrap_err().field, "command");
        let many = CreateSandbox { command: Some(vec!["a".into(); 5000]), ..Default::default() };
        assert_eq!(validate_create(many).unwrap_err().field, "command");
    }

    #[test]
    fn namespace_names() {
        assert!(validate_namespace_name("team-a").is_ok());
        assert!(validate_namespace_name("Team").is_err());
        assert!(validate_namespace_name("").is_err());
        assert!(validate_namespace_name("-a").is_err());
    }
}
