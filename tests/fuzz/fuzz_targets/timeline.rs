//! The boot timeline fed arbitrary serial bytes: never panics, the report
//! and JSON always render, and what it concludes does not depend on how
//! the bytes were split into `feed` calls.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use vmm::report::timeline::Timeline;

fn summary(
    t: &Timeline,
) -> (
    bool,
    bool,
    bool,
    Option<String>,
    Option<String>,
    Option<String>,
) {
    (
        t.first_serial.is_some(),
        t.run_init.is_some(),
        t.marker.is_some(),
        t.init_killed.clone(),
        t.panic.clone(),
        t.init_fault.clone(),
    )
}

fuzz_target!(|data: &[u8]| {
    // First byte: a split point; the rest, the console output.
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let marker = "HVMM-INIT-OK";
    let start = Instant::now();
    let mut whole = Timeline::new(start, marker);
    whole.feed(bytes);
    let mut parts = Timeline::new(start, marker);
    let cut = usize::from(split).min(bytes.len());
    parts.feed(&bytes[..cut]);
    parts.feed(&[]);
    for chunk in bytes[cut..].chunks(7) {
        parts.feed(chunk);
    }
    assert_eq!(summary(&whole), summary(&parts));
    assert_eq!(whole.first_serial.is_some(), !bytes.is_empty());
    // Milestones need a complete line: without a newline there is none.
    if !bytes.contains(&b'\n') {
        assert!(whole.run_init.is_none() && whole.marker.is_none());
        assert!(whole.init_killed.is_none() && whole.panic.is_none());
    }
    whole.mark_reboot();
    for stop in [None, Some("stopped".to_string())] {
        let exit = whole.classify(stop);
        let assists = [("int3".to_string(), 1)];
        let _ = whole.report(&exit, &assists);
        // The JSON report prints and reads back as the same value.
        let j = whole.json(&exit, &assists, serde_json::json!({}));
        let text = serde_json::to_string(&j).unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), j);
    }
});
