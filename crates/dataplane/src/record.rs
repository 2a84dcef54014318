//! What the node knows about one sandbox, and its record on disk
//! (`<data_dir>/sandboxes/<id>.json`) that lets a restarted dataplane re-adopt it.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use hutch_isolate::{InvalidSandboxId, SandboxId};
use hutch_proto::node;
use serde::{Deserialize, Serialize};

/// A sandbox as the server asked for it, validated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Spec {
    pub id: SandboxId,
    pub namespace: String,
    pub image: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: String,
    pub user: String,
    pub cpus: f64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub pids: u32,
    pub internet: bool,
    pub ports: Vec<u16>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum InvalidSpec {
    #[error("invalid sandbox id")]
    Id(#[from] InvalidSandboxId),
    #[error("port {0} is not a TCP port")]
    Port(u32),
}

impl Spec {
    pub fn from_proto(spec: &node::SandboxSpec) -> Result<Self, InvalidSpec> {
        let resources = spec.resources.unwrap_or_default();
        let ports = spec
            .ports
            .iter()
            .map(|&port| {
                u16::try_from(port).ok().filter(|p| *p != 0).ok_or(InvalidSpec::Port(port))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            id: SandboxId::new(spec.id.clone())?,
            namespace: spec.namespace.clone(),
            image: spec.image.clone(),
            command: spec.command.clone(),
            env: spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            working_dir: spec.working_dir.clone(),
            user: spec.user.clone(),
            cpus: resources.cpus,
            memory_mb: resources.memory_mb,
            disk_mb: resources.disk_mb,
            pids: resources.pids,
            internet: spec.egress == node::Egress::Internet as i32,
            ports,
        })
    }

    pub fn is_host_image(&self) -> bool {
        self.image.is_empty() || self.image == "host"
    }
}

/// The observed phase, as reported to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Creating,
    Running,
    Exited,
    Stopped,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Creating => "creating",
            Phase::Running => "running",
            Phase::Exited => "exited",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        }
    }

    pub(crate) fn to_proto(self) -> node::ObservedPhase {
        match self {
            Phase::Creating => node::ObservedPhase::ObservedCreating,
            Phase::Running => node::ObservedPhase::ObservedRunning,
            Phase::Exited => node::ObservedPhase::ObservedExited,
            Phase::Stopped => node::ObservedPhase::ObservedStopped,
            Phase::Failed => node::ObservedPhase::ObservedFailed,
        }
    }
}

/// What the node observed of a sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Observed {
    pub phase: Phase,
    pub reason: String,
    pub message: String,
    pub exit_code: Option<i32>,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
}

impl Observed {
    pub fn creating(reason: &str) -> Self {
        Self {
            phase: Phase::Creating,
            reason: reason.to_owned(),
            message: String::new(),
            exit_code: None,
            started_at_ms: 0,
            finished_at_ms: 0,
        }
    }

    /// Moves to a terminal phase, stamping the finish time.
    pub fn finish(&mut self, phase: Phase, reason: &str, exit_code: Option<i32>, message: String) {
        self.phase = phase;
        self.reason = reason.to_owned();
        self.exit_code = exit_code;
        self.message = message;
        self.finished_at_ms = now_ms();
    }
}

/// `<data_dir>/sandboxes/<id>.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub spec: Spec,
    pub observed: Observed,
    /// Whether sandboxd runs a main command (tag `main`) whose exit ends the sandbox.
    #[serde(default)]
    pub has_main: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The directory of sandbox records.
#[derive(Clone, Debug)]
pub(crate) struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn open(dir: PathBuf) -> Result<Self, RecordError> {
        std::fs::create_dir_all(&dir)
            .map_err(|source| RecordError::Write { path: dir.clone(), source })?;
        Ok(Self { dir })
    }

    fn path(&self, id: &SandboxId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes a record atomically (temp file and rename), so a crash leaves
    /// either the old record or the new one.
    pub fn save(&self, record: &Record) -> Result<(), RecordError> {
        let path = self.path(&record.spec.id);
        let temp = self.dir.join(format!(".{}.tmp", record.spec.id));
        let bytes = serde_json::to_vec(record)
            .map_err(|e| RecordError::Write { path: path.clone(), source: io::Error::other(e) })?;
        std::fs::write(&temp, bytes)
            .and_then(|()| std::fs::rename(&temp, &path))
            .map_err(|source| RecordError::Write { path, source })
    }

    pub fn remove(&self, id: &SandboxId) -> Result<(), RecordError> {
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RecordError::Remove { path, source }),
        }
    }

    /// Every readable record; unreadable ones are logged and skipped (the
    /// server's desired state still decides what exists).
    pub fn load(&self) -> Result<Vec<Record>, RecordError> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|source| RecordError::Read { path: self.dir.clone(), source })?;
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            match read_record(&path) {
                Ok(record) => records.push(record),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "skipping sandbox record")
                }
            }
        }
        records.sort_by(|a, b| a.spec.id.cmp(&b.spec.id));
        Ok(records)
    }
}

fn read_record(path: &Path) -> io::Result<Record> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(io::Error::other)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto_spec(id: &str) -> node::SandboxSpec {
        node::SandboxSpec {
            id: id.into(),
            namespace: "default".into(),
            image: "host".into(),
            command: vec!["sh".into()],
            ports: vec![8000],
            egress: node::Egress::Internet as i32,
            resources: Some(node::Resources { cpus: 0.5, memory_mb: 64, disk_mb: 10, pids: 20 }),
            ..Default::default()
        }
    }

    #[test]
    fn a_proto_spec_is_validated() {
        let spec = Spec::from_proto(&proto_spec("abc")).unwrap();
        assert_eq!(spec.ports, vec![8000]);
        assert!(spec.internet && spec.is_host_image());
        assert_eq!((spec.cpus, spec.memory_mb, spec.pids), (0.5, 64, 20));
        assert!(matches!(Spec::from_proto(&proto_spec("../etc")), Err(InvalidSpec::Id(_))));
        let mut bad_port = proto_spec("abc");
        bad_port.ports = vec![70000];
        assert!(matches!(Spec::from_proto(&bad_port), Err(InvalidSpec::Port(70000))));
    }

    #[test]
    fn records_round_trip_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(dir.path().join("sandboxes")).unwrap();
        let record = Record {
            spec: Spec::from_proto(&proto_spec("abc")).unwrap(),
            observed: Observed::creating("pulling_image"),
            has_main: true,
        };
        records.save(&record).unwrap();
        std::fs::write(dir.path().join("sandboxes/garbage.json"), "{").unwrap();
        assert_eq!(records.load().unwrap(), vec![record.clone()]);
        records.remove(&record.spec.id).unwrap();
        records.remove(&record.spec.id).unwrap();
        assert!(records.load().unwrap().is_empty());
    }
}
