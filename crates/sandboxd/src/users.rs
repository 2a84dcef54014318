//! Resolving `user` strings against the sandbox's own /etc/passwd and
//! /etc/group. sandboxd is statically linked and must not depend on NSS, so
//! it reads the files itself, as container runtimes do.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub name: Option<String>,
    pub home: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveUserError {
    #[error("user {0:?} not found in /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} not found in /etc/group")]
    UnknownGroup(String),
    #[error("user {0:?} is malformed; expected name, uid, name:group or uid:gid")]
    Malformed(String),
}

#[derive(Debug, Clone)]
pub struct UserDb {
    passwd: PathBuf,
    group: PathBuf,
}

impl Default for UserDb {
    fn default() -> UserDb {
        UserDb { passwd: "/etc/passwd".into(), group: "/etc/group".into() }
    }
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

impl UserDb {
    pub fn at(etc: &Path) -> UserDb {
        UserDb { passwd: etc.join("passwd"), group: etc.join("group") }
    }

    fn passwd(&self) -> Vec<PasswdEntry> {
        let text = std::fs::read_to_string(&self.passwd).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                (fields.len() >= 6).then_some(())?;
                Some(PasswdEntry {
                    name: fields[0].to_owned(),
                    uid: fields[2].parse().ok()?,
                    gid: fields[3].parse().ok()?,
                    home: fields[5].to_owned(),
                })
            })
            .collect()
    }

    fn group_id(&self, name: &str) -> Option<u32> {
        let text = std::fs::read_to_string(&self.group).unwrap_or_default();
        text.lines().find_map(|line| {
            let mut fields = line.split(':');
            let group = fields.next()?;
            let gid = fields.nth(1)?;
            (group == name).then(|| gid.parse().ok()).flatten()
        })
    }

    /// Resolves `name`, `uid`, `name:group`, `uid:gid` (mixed forms too). A
    /// numeric uid need not exist in /etc/passwd, as with Docker's `--user`.
    pub fn resolve(&self, spec: &str) -> Result<User, ResolveUserError> {
        let (user_part, group_part) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        if user_part.is_empty() || group_part.is_some_and(str::is_empty) {
            return Err(ResolveUserError::Malformed(spec.to_owned()));
        }
        let entries = self.passwd();
        let mut user = match user_part.parse::<u32>() {
            Ok(uid) => {
                let entry = entries.iter().find(|e| e.uid == uid);
                User {
                    uid,
                    gid: entry.map_or(uid, |e| e.gid),
                    name: entry.map(|e| e.name.clone()),
                    home: entry.map(|e| e.home.clone()),
                }
            }
            Err(_) => {
                let entry = entries
                    .iter()
                    .find(|e| e.name == user_part)
                    .ok_or_else(|| ResolveUserError::UnknownUser(user_part.to_owned()))?;
                User {
                    uid: entry.uid,
                    gid: entry.gid,
                    name: Some(entry.name.clone()),
                    home: Some(entry.home.clone()),
                }
            }
        };
        if let Some(group) = group_part {
            user.gid = match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => self
                    .group_id(group)
                    .ok_or_else(|| ResolveUserError::UnknownGroup(group.to_owned()))?,
            };
        }
        Ok(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, UserDb) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1001::/home/alice:/bin/sh\nbroken\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("group"), "root:x:0:\nstaff:x:50:alice\n").unwrap();
        let db = UserDb::at(dir.path());
        (dir, db)
    }

    #[test]
    fn names_numbers_and_groups_resolve() {
        let (_dir, db) = db();
        let alice = db.resolve("alice").unwrap();
        assert_eq!(
            (alice.uid, alice.gid, alice.home.as_deref()),
            (1000, 1001, Some("/home/alice"))
        );
        assert_eq!(db.resolve("alice:staff").unwrap().gid, 50);
        assert_eq!(db.resolve("4242").unwrap().gid, 4242);
        assert_eq!(db.resolve("1000:7").unwrap().gid, 7);
        assert_eq!(db.resolve("0").unwrap().name.as_deref(), Some("root"));
    }

    #[test]
    fn unknown_and_malformed_users_are_errors() {
        let (_dir, db) = db();
        assert!(matches!(db.resolve("bob"), Err(ResolveUserError::UnknownUser(_))));
        assert!(matches!(db.resolve("alice:nogroup"), Err(ResolveUserError::UnknownGroup(_))));
        assert!(matches!(db.resolve(":1"), Err(ResolveUserError::Malformed(_))));
        assert!(matches!(db.resolve("1:"), Err(ResolveUserError::Malformed(_))));
    }
}
