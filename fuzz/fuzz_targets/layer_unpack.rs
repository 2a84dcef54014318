//! Image layers are untrusted archives. Entry-path validation must accept
//! only plain relative components, and unpacking arbitrary bytes (any
//! compression) must never panic nor create anything outside the layer.
#![no_main]

use hutch_image::extract::{UnpackLimits, unpack_layer_with_limits, validate_entry_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(path) = validate_entry_path(data) {
        for component in path.components() {
            assert!(!component.is_empty());
            assert!(component != b"." && component != b"..");
            assert!(!component.contains(&b'/') && !component.contains(&0));
        }
    }
    let root = tempfile::tempdir().unwrap();
    let layer = root.path().join("layer");
    std::fs::create_dir(&layer).unwrap();
    // Small limits keep every run fast; a decompression bomb must stop at them.
    let limits = UnpackLimits { max_file_bytes: 1 << 20, max_entries: 1000 };
    let _ = unpack_layer_with_limits(data, &layer, limits);
    for entry in std::fs::read_dir(root.path()).unwrap() {
        assert_eq!(entry.unwrap().file_name(), "layer", "an entry escaped the layer directory");
    }
});
