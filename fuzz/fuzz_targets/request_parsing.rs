//! Everything sandboxd parses from a request: JSON bodies, WebSocket
//! messages, tags, signals, ranges and listen addresses. None may panic,
//! and an accepted range must lie inside the file.
#![no_main]

use hutch_api::{
    ExecRequest, MoveRequest, PtySize, SignalRequest, StartProcessRequest, WsClientMessage,
};
use hutch_sandboxd::range::{RangeOutcome, parse_range};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<StartProcessRequest>(data);
    let _ = serde_json::from_slice::<ExecRequest>(data);
    let _ = serde_json::from_slice::<MoveRequest>(data);
    let _ = serde_json::from_slice::<PtySize>(data);
    if let Ok(request) = serde_json::from_slice::<SignalRequest>(data) {
        let _ = hutch_api::parse_signal(&request.signal);
    }
    if let Ok(WsClientMessage::Signal { signal }) = serde_json::from_slice(data) {
        let _ = hutch_api::parse_signal(&signal);
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = hutch_api::validate_tag(text);
    let _ = text.parse::<hutch_sandboxd::ListenAddr>();
    let size = data.len() as u64 * 7;
    if let RangeOutcome::Partial { start, end } = parse_range(Some(text), size) {
        assert!(start <= end && end < size, "{text:?} -> {start}-{end} of {size}");
    }
});
