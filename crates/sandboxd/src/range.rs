//! HTTP `Range` request headers (RFC 9110 §14), single ranges only.

/// What to serve for a request with a `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOutcome {
    /// Serve the whole file: no range, a malformed one, or several (which
    /// a server may ignore).
    Full,
    /// Serve bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// The range lies wholly outside the file: 416.
    Unsatisfiable,
}

pub fn parse_range(header: Option<&str>, size: u64) -> RangeOutcome {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeOutcome::Full;
    };
    if spec.contains(',') {
        return RangeOutcome::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return RangeOutcome::Full };
    let (first, last) = (first.trim(), last.trim());
    let parse =
        |s: &str| s.bytes().all(|b| b.is_ascii_digit()).then(|| s.parse::<u64>().ok()).flatten();
    match (first.is_empty(), last.is_empty()) {
        // `bytes=-N`: the last N bytes.
        (true, false) => match parse(last) {
            Some(n) if n == 0 || size == 0 => RangeOutcome::Unsatisfiable,
            Some(n) => RangeOutcome::Partial { start: size.saturating_sub(n), end: size - 1 },
            None => RangeOutcome::Full,
        },
        // `bytes=N-`: from N to the end.
        (false, true) => match parse(first) {
            Some(start) if start >= size => RangeOutcome::Unsatisfiable,
            Some(start) => RangeOutcome::Partial { start, end: size - 1 },
            None => RangeOutcome::Full,
        },
        (false, false) => match (parse(first), parse(last)) {
            (Some(start), Some(end)) if start > end => RangeOutcome::Full,
            (Some(start), Some(_)) if start >= size => RangeOutcome::Unsatisfiable,
            (Some(start), Some(end)) => RangeOutcome::Partial { start, end: end.min(size - 1) },
            _ => RangeOutcome::Full,
        },
        (true, true) => RangeOutcome::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::RangeOutcome::*;
    use super::parse_range;

    #[test]
    fn single_ranges() {
        assert_eq!(parse_range(Some("bytes=0-9"), 100), Partial { start: 0, end: 9 });
        assert_eq!(parse_range(Some("bytes=90-"), 100), Partial { start: 90, end: 99 });
        assert_eq!(parse_range(Some("bytes=-10"), 100), Partial { start: 90, end: 99 });
        assert_eq!(parse_range(Some("bytes=-1000"), 100), Partial { start: 0, end: 99 });
        assert_eq!(parse_range(Some("bytes=95-1000"), 100), Partial { start: 95, end: 99 });
    }

    #[test]
    fn unsatisfiable_and_ignored_ranges() {
        assert_eq!(parse_range(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 100), Unsatisfiable);
        assert_eq!(parse_range(None, 100), Full);
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Full);
        assert_eq!(parse_range(Some("items=0-1"), 100), Full);
        assert_eq!(parse_range(Some("bytes=5-1"), 100), Full);
        assert_eq!(parse_range(Some("bytes=+1-2"), 100), Full);
        assert_eq!(parse_range(Some("bytes=-"), 100), Full);
    }
}
