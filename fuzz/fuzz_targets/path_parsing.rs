//! Client paths: parsing never panics, and what it accepts is absolute,
//! normalized and stable under a second parse.
#![no_main]

use std::path::Component;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    if let Ok(path) = hutch_api::parse_absolute_path(raw) {
        assert!(path.is_absolute());
        assert!(path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_))));
        let again = hutch_api::parse_absolute_path(path.to_str().unwrap()).unwrap();
        assert_eq!(again, path);
    }
});
