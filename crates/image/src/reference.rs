//! Image reference normalisation, the way Docker does it.

use oci_client::Reference;

/// A reference that is neither a valid image name nor a bare digest.
#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {reference:?}")]
pub struct InvalidReferenceError {
    pub reference: String,
    #[source]
    pub source: oci_client::ParseError,
}

/// Returns true for `sha256:<64 hex>`, the name of an image that was imported
/// without any tag.
pub(crate) fn is_bare_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Normalises a reference: `busybox` becomes `docker.io/library/busybox:latest`,
/// `127.0.0.1:5000/a/b` becomes `127.0.0.1:5000/a/b:latest`. A bare
/// `sha256:<hex>` (an untagged imported image) is returned unchanged.
pub fn normalize_reference(reference: &str) -> Result<String, InvalidReferenceError> {
    if is_bare_digest(reference) {
        return Ok(reference.to_owned());
    }
    parse_reference(reference).map(|r| r.whole())
}

pub(crate) fn parse_reference(reference: &str) -> Result<Reference, InvalidReferenceError> {
    reference
        .parse::<Reference>()
        .map_err(|source| InvalidReferenceError { reference: reference.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_short_names_are_expanded() {
        assert_eq!(
            normalize_reference("busybox").ok().as_deref(),
            Some("docker.io/library/busybox:latest")
        );
        assert_eq!(
            normalize_reference("user/app:1.0").ok().as_deref(),
            Some("docker.io/user/app:1.0")
        );
    }

    #[test]
    fn registries_with_ports_keep_their_host() {
        assert_eq!(
            normalize_reference("127.0.0.1:5000/test/busybox").ok().as_deref(),
            Some("127.0.0.1:5000/test/busybox:latest")
        );
    }

    #[test]
    fn bare_digests_are_kept_and_garbage_is_refused() {
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(normalize_reference(&digest).ok(), Some(digest.clone()));
        assert!(normalize_reference("has space").is_err());
        assert!(normalize_reference("a:b:c:d").is_err());
        assert!(normalize_reference("").is_err());
    }
}
