//! What the node knows about one sandbox, and its record on disk that lets a
//! restarted dataplane re-adopt it: a journal, `<data_dir>/sandboxes.log`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

    /// A spec that names only the sandbox: for sandboxes the node must report
    /// or remove without knowing what they were.
    pub fn placeholder(id: SandboxId) -> Self {
        Self {
            id,
            namespace: String::new(),
            image: String::new(),
            command: Vec::new(),
            env: BTreeMap::new(),
            working_dir: String::new(),
            user: String::new(),
            cpus: 0.0,
            memory_mb: 0,
            disk_mb: 0,
            pids: 0,
            internet: false,
            ports: Vec::new(),
        }
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

/// One line of the journal ([`Records`]).
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

/// The node's sandbox records, kept as a journal of JSON lines: each save
/// appends the whole record, each removal a tombstone, and replaying the
/// journal from the top gives the newest record of every live sandbox.
///
/// Why a journal and not a file per sandbox, written to a temp file and
/// renamed: every such save allocated an inode and freed another. On ext4 an
/// inode allocation scans past recently freed inodes, and in a burst of
/// creates the records alone took 7 % of the node's CPU; an append takes one
/// `write`. A crash can tear only the last line, which replay skips: the
/// record before it stands, as the old record stood when a temp file was torn.
/// Like the files before, the journal is not fsynced: the records outlive the
/// dataplane process, and a machine that loses power loses its sandboxes too.
#[derive(Debug)]
pub(crate) struct Records {
    path: PathBuf,
    journal: Mutex<Journal>,
}

#[derive(Debug)]
struct Journal {
    file: File,
    /// The newest line of every live record, for compaction.
    live: BTreeMap<SandboxId, Vec<u8>>,
    /// Lines in the file, live or superseded.
    lines: usize,
    /// A write failed part-way: the file may end in a torn line, so the next
    /// save rewrites it whole instead of appending after the tear.
    torn: bool,
}

#[derive(Serialize)]
enum LineRef<'a> {
    #[serde(rename = "save")]
    Save(&'a Record),
    #[serde(rename = "remove")]
    Remove(&'a SandboxId),
}

#[derive(Deserialize)]
enum Line {
    #[serde(rename = "save")]
    Save(Box<Record>),
    #[serde(rename = "remove")]
    Remove(SandboxId),
}

/// Compaction rewrites the journal once superseded lines outnumber live ones
/// by this factor (and there are more than [`COMPACT_MIN`] lines).
const COMPACT_FACTOR: usize = 4;
const COMPACT_MIN: usize = 256;

impl Records {
    /// Opens `<data_dir>/sandboxes.log`, replays it and rewrites it compacted;
    /// returns the live records in id order. Records of the per-file layout of
    /// earlier versions (`<data_dir>/sandboxes/<id>.json`) are taken over.
    pub fn open(data_dir: &Path) -> Result<(Self, Vec<Record>), RecordError> {
        let path = data_dir.join("sandboxes.log");
        let mut live: BTreeMap<SandboxId, Record> = BTreeMap::new();
        let legacy = data_dir.join("sandboxes");
        let legacy_files = read_legacy(&legacy)?;
        for record in legacy_files.iter().flat_map(|(_, record)| record) {
            live.insert(record.spec.id.clone(), record.clone());
        }
        match File::open(&path) {
            Ok(file) => replay(io::BufReader::new(file), &path, &mut live),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(RecordError::Read { path, source }),
        }
        let lines = live
            .values()
            .map(|record| Ok((record.spec.id.clone(), line(LineRef::Save(record))?)))
            .collect::<Result<BTreeMap<_, _>, io::Error>>()
            .map_err(|source| RecordError::Write { path: path.clone(), source })?;
        let file = rewrite(&path, &lines)?;
        // Only now that the journal holds them may the old files go.
        for (file, _) in &legacy_files {
            let _ = std::fs::remove_file(file);
        }
        let _ = std::fs::remove_dir(&legacy);
        let journal = Journal { file, lines: lines.len(), live: lines, torn: false };
        Ok((Self { path, journal: Mutex::new(journal) }, live.into_values().collect()))
    }

    /// Records the sandbox's newest state.
    pub fn save(&self, record: &Record) -> Result<(), RecordError> {
        let bytes = line(LineRef::Save(record))
            .map_err(|source| RecordError::Write { path: self.path.clone(), source })?;
        self.append(bytes, |live, bytes| {
            live.insert(record.spec.id.clone(), bytes);
        })
    }

    /// Forgets the sandbox; forgetting an unknown one is not an error.
    pub fn remove(&self, id: &SandboxId) -> Result<(), RecordError> {
        let bytes = line(LineRef::Remove(id))
            .map_err(|source| RecordError::Remove { path: self.path.clone(), source })?;
        self.append(bytes, |live, _| {
            live.remove(id);
        })
    }

    fn append(
        &self,
        bytes: Vec<u8>,
        update: impl FnOnce(&mut BTreeMap<SandboxId, Vec<u8>>, Vec<u8>),
    ) -> Result<(), RecordError> {
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let written = if journal.torn {
            Err(io::Error::other("the journal ends in a torn line"))
        } else {
            journal.file.write_all(&bytes)
        };
        update(&mut journal.live, bytes);
        journal.lines += 1;
        let superseded = journal.lines.saturating_sub(journal.live.len());
        if written.is_ok()
            && (journal.lines <= COMPACT_MIN || superseded <= COMPACT_FACTOR * journal.live.len())
        {
            return Ok(());
        }
        // Compact, or repair after a failed write: the whole live set, anew.
        match rewrite(&self.path, &journal.live) {
            Ok(file) => {
                journal.file = file;
                journal.lines = journal.live.len();
                journal.torn = false;
                Ok(())
            }
            Err(error) => {
                journal.torn = true;
                Err(error)
            }
        }
    }
}

fn line(line: LineRef<'_>) -> io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(&line).map_err(io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Applies the journal's lines in order. A line that does not parse (the torn
/// tail of a crash, or damage) is logged and skipped.
fn replay(reader: impl io::BufRead, path: &Path, live: &mut BTreeMap<SandboxId, Record>) {
    for (number, text) in reader.split(b'\n').enumerate() {
        let text = match text {
            Ok(text) if text.is_empty() => continue,
            Ok(text) => text,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "stopped reading the sandbox journal");
                return;
            }
        };
        match serde_json::from_slice(&text) {
            Ok(Line::Save(record)) => {
                live.insert(record.spec.id.clone(), *record);
            }
            Ok(Line::Remove(id)) => {
                live.remove(&id);
            }
            Err(error) => tracing::warn!(
                path = %path.display(), line = number + 1, %error, "skipping a sandbox journal line"
            ),
        }
    }
}

/// Writes the live lines to a temp file and renames it over the journal, so
/// a crash leaves the old journal or the new one; returns the new file, open
/// for appending.
fn rewrite(path: &Path, live: &BTreeMap<SandboxId, Vec<u8>>) -> Result<File, RecordError> {
    let temp = path.with_extension("log.tmp");
    let write = || -> io::Result<File> {
        // The records hold tenants' environments (secrets, often): the owner only.
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt as _;
            OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp)?
        };
        let mut buffer = io::BufWriter::new(&mut file);
        for bytes in live.values() {
            buffer.write_all(bytes)?;
        }
        buffer.flush()?;
        drop(buffer);
        std::fs::rename(&temp, path)?;
        OpenOptions::new().append(true).open(path)
    };
    write().map_err(|source| RecordError::Write { path: path.to_owned(), source })
}

/// The records of the per-file layout, with their paths; unreadable ones are
/// logged and skipped (the server's desired state still decides what exists).
fn read_legacy(dir: &Path) -> Result<Vec<(PathBuf, Option<Record>)>, RecordError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(RecordError::Read { path: dir.to_owned(), source }),
    };
    let mut records = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") {
            records.push((path, None));
            continue;
        }
        if path.extension().is_none_or(|ext| ext != "json") {
            continue;
        }
        match read_record(&path) {
            Ok(record) => records.push((path, Some(record))),
            // Left in place for a human: it was never part of the table.
            Err(error) => tracing::warn!(path = %path.display(), %error, "skipping sandbox record"),
        }
    }
    Ok(records)
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

    fn record(id: &str) -> Record {
        Record {
            spec: Spec::from_proto(&proto_spec(id)).unwrap(),
            observed: Observed::creating("pulling_image"),
            has_main: true,
        }
    }

    #[test]
    fn records_survive_a_reopen_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let (records, loaded) = Records::open(dir.path()).unwrap();
        assert!(loaded.is_empty());
        let (a, mut b) = (record("a"), record("b"));
        records.save(&a).unwrap();
        records.save(&b).unwrap();
        b.observed.finish(Phase::Exited, "exited", Some(3), String::new());
        records.save(&b).unwrap();
        records.remove(&a.spec.id).unwrap();
        records.remove(&a.spec.id).unwrap();
        drop(records);
        let (_, loaded) = Records::open(dir.path()).unwrap();
        assert_eq!(loaded, vec![b.clone()]);
        // Reopening compacted the journal to its one live record.
        let text = std::fs::read_to_string(dir.path().join("sandboxes.log")).unwrap();
        assert_eq!(text.lines().count(), 1);
    }

    #[test]
    fn the_journal_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (records, _) = Records::open(dir.path()).unwrap();
        records.save(&record("secret")).unwrap();
        let mode =
            std::fs::metadata(dir.path().join("sandboxes.log")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_torn_last_line_leaves_the_record_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (records, _) = Records::open(dir.path()).unwrap();
        let mut a = record("a");
        records.save(&a).unwrap();
        drop(records);
        // A crash in the middle of the next save.
        a.observed.finish(Phase::Failed, "sandbox_died", None, String::new());
        let whole = line(LineRef::Save(&a)).unwrap();
        let mut file =
            OpenOptions::new().append(true).open(dir.path().join("sandboxes.log")).unwrap();
        file.write_all(&whole[..whole.len() / 2]).unwrap();
        let (records, loaded) = Records::open(dir.path()).unwrap();
        assert_eq!(loaded, vec![record("a")]);
        // The rewritten journal takes appends cleanly again.
        records.save(&a).unwrap();
        drop(records);
        assert_eq!(Records::open(dir.path()).unwrap().1, vec![a]);
    }

    #[test]
    fn the_journal_is_compacted_as_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let (records, _) = Records::open(dir.path()).unwrap();
        let mut a = record("a");
        for i in 0..2000 {
            a.observed.started_at_ms = i;
            records.save(&a).unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join("sandboxes.log")).unwrap();
        assert!(text.lines().count() <= COMPACT_MIN + 1, "{} lines", text.lines().count());
        drop(records);
        assert_eq!(Records::open(dir.path()).unwrap().1, vec![a]);
    }

    #[test]
    fn records_of_the_per_file_layout_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("sandboxes");
        std::fs::create_dir(&legacy).unwrap();
        let a = record("a");
        std::fs::write(legacy.join("a.json"), serde_json::to_vec(&a).unwrap()).unwrap();
        std::fs::write(legacy.join(".b.tmp"), "{").unwrap();
        std::fs::write(legacy.join("garbage.json"), "{").unwrap();
        let (_, loaded) = Records::open(dir.path()).unwrap();
        assert_eq!(loaded, vec![a.clone()]);
        assert!(!legacy.join("a.json").exists() && !legacy.join(".b.tmp").exists());
        // An unreadable record is left for a human, and ignored again.
        assert!(legacy.join("garbage.json").exists());
        assert_eq!(Records::open(dir.path()).unwrap().1, vec![a]);
    }
}
