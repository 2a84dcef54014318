//! The proxy's routing of untrusted requests: never a panic, and whatever it
//! accepts names a valid sandbox id, a non-zero port and a forwardable path.
#![no_main]

use hutch_dataplane::{Route, route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Fields separated by NUL: uri, host header, id header, port header, domain.
    let mut fields = data.split(|b| *b == 0);
    let mut next = || fields.next().unwrap_or_default();
    let (uri, host, id, port, domain) = (next(), next(), next(), next(), next());
    let Ok(uri) = http::Uri::try_from(uri) else { return };
    let mut headers = http::HeaderMap::new();
    for (name, value) in
        [("host", host), ("hutch-sandbox-id", id), ("hutch-sandbox-port", port)]
    {
        if value.is_empty() {
            continue;
        }
        if let Ok(value) = http::HeaderValue::from_bytes(value) {
            headers.insert(name, value);
        }
    }
    let domain = std::str::from_utf8(domain).ok().filter(|d| !d.is_empty());
    if let Ok(Route::Sandbox { id, port, rewrite }) = route(&headers, &uri, domain) {
        assert_ne!(port, 0);
        assert!(hutch_isolate::SandboxId::new(id).is_ok());
        if let Some(rewrite) = rewrite {
            assert!(rewrite.starts_with('/'));
        }
    }
});
