//! Validation of the values clients send. These functions face untrusted
//! input directly, so they are total (never panic) and are fuzzed.

use std::path::{Component, Path, PathBuf};

/// Longest path accepted, as Linux's `PATH_MAX`.
const MAX_PATH_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParsePathError {
    #[error("path is empty")]
    Empty,
    #[error("path {0:?} is not absolute")]
    Relative(String),
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path is longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    #[error("path {0:?} climbs above /")]
    Escapes(String),
}

/// Parses a client-supplied path into an absolute, lexically normalized path:
/// `.` and repeated slashes disappear, `..` removes the previous component,
/// and a `..` that would climb above `/` is an error rather than silently
/// clamped, so a client never acts on a path other than the one it meant.
pub fn parse_absolute_path(raw: &str) -> Result<PathBuf, ParsePathError> {
    if raw.is_empty() {
        return Err(ParsePathError::Empty);
    }
    if raw.len() > MAX_PATH_LEN {
        return Err(ParsePathError::TooLong);
    }
    if raw.contains('\0') {
        return Err(ParsePathError::Nul);
    }
    if !raw.starts_with('/') {
        return Err(ParsePathError::Relative(raw.to_owned()));
    }
    let mut normalized = PathBuf::from("/");
    for component in Path::new(raw).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if !normalized.pop() {
                    return Err(ParsePathError::Escapes(raw.to_owned()));
                }
            }
            Component::Normal(part) => normalized.push(part),
            // Prefixes exist only on Windows.
            Component::Prefix(_) => return Err(ParsePathError::Relative(raw.to_owned())),
        }
    }
    Ok(normalized)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseTagError {
    #[error("tag must be 1 to 128 characters long")]
    Length,
    #[error("tag may contain only ASCII letters, digits, '.', '_' and '-'")]
    Charset,
    #[error("tag must not be all digits, so that it cannot be mistaken for a pid")]
    Numeric,
}

/// Checks a process tag. Tags share the `{id}` path segment with pids, so a
/// tag is never all digits.
pub fn validate_tag(tag: &str) -> Result<(), ParseTagError> {
    if tag.is_empty() || tag.len() > 128 {
        return Err(ParseTagError::Length);
    }
    if !tag.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(ParseTagError::Charset);
    }
    if tag.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseTagError::Numeric);
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSignalError {
    #[error("unknown signal {0:?}")]
    UnknownName(String),
    #[error("signal number {0} is out of range 1..=64")]
    OutOfRange(i32),
}

const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// Resolves a signal name (`SIGTERM`, `term`, `TERM`) or number to its
/// Linux signal number.
pub fn parse_signal(signal: &crate::Signal) -> Result<i32, ParseSignalError> {
    match signal {
        crate::Signal::Number(n) if (1..=64).contains(n) => Ok(*n),
        crate::Signal::Number(n) => Err(ParseSignalError::OutOfRange(*n)),
        crate::Signal::Name(name) => {
            if let Ok(n) = name.parse::<i32>() {
                return parse_signal(&crate::Signal::Number(n));
            }
            let upper = name.to_ascii_uppercase();
            let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
            SIGNALS
                .iter()
                .find(|(candidate, _)| *candidate == bare)
                .map(|(_, number)| *number)
                .ok_or_else(|| ParseSignalError::UnknownName(name.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Signal;

    #[test]
    fn paths_are_normalized_lexically() {
        let ok = |raw: &str, want: &str| assert_eq!(parse_absolute_path(raw), Ok(want.into()));
        ok("/", "/");
        ok("/tmp//a/./b/", "/tmp/a/b");
        ok("/tmp/a/../b", "/tmp/b");
        ok("/..a/b..", "/..a/b..");
    }

    #[test]
    fn bad_paths_are_refused() {
        assert_eq!(parse_absolute_path(""), Err(ParsePathError::Empty));
        assert!(matches!(parse_absolute_path("tmp/a"), Err(ParsePathError::Relative(_))));
        assert_eq!(parse_absolute_path("/a\0b"), Err(ParsePathError::Nul));
        assert!(matches!(parse_absolute_path("/.."), Err(ParsePathError::Escapes(_))));
        assert!(matches!(parse_absolute_path("/a/../../etc"), Err(ParsePathError::Escapes(_))));
        assert_eq!(parse_absolute_path(&"/a".repeat(3000)), Err(ParsePathError::TooLong));
    }

    #[test]
    fn tags() {
        assert!(validate_tag("build-1.log_x").is_ok());
        assert_eq!(validate_tag("123"), Err(ParseTagError::Numeric));
        assert_eq!(validate_tag(""), Err(ParseTagError::Length));
        assert_eq!(validate_tag("a/b"), Err(ParseTagError::Charset));
    }

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal(&Signal::Name("SIGTERM".into())), Ok(15));
        assert_eq!(parse_signal(&Signal::Name("int".into())), Ok(2));
        assert_eq!(parse_signal(&Signal::Name("9".into())), Ok(9));
        assert_eq!(parse_signal(&Signal::Number(10)), Ok(10));
        assert!(parse_signal(&Signal::Number(0)).is_err());
        assert!(parse_signal(&Signal::Name("SIGNOPE".into())).is_err());
    }
}
