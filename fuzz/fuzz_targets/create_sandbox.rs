//! Create requests from untrusted clients: JSON that parses is either
//! rejected with the field it names or accepted with sane values.
#![no_main]

use hutch_server::model::CreateSandbox;
use hutch_server::validate_create;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = serde_json::from_slice::<CreateSandbox>(data) else { return };
    match validate_create(request) {
        Ok(valid) => {
            assert!(valid.timeout_secs >= 1 && valid.timeout_secs <= 86_400);
            assert!(!valid.spec.image.is_empty());
        }
        Err(invalid) => assert!(!invalid.field.is_empty()),
    }
});
