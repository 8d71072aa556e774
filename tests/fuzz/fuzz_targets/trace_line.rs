//! `notifier::trace::parse_line` on arbitrary text: never panics, and every
//! line it understands prints back (in the kernel's format) to a line that
//! parses to the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use notifier::trace::{parse_line, TraceLine};

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    for line in s.lines().chain(std::iter::once(s.as_ref())) {
        let parsed = parse_line(line);
        let again = match &parsed {
            TraceLine::Event(e) => {
                let secs = e.timestamp_ns / 1_000_000_000;
                let frac = e.timestamp_ns % 1_000_000_000;
                let task = if e.tid >= 0 {
                    format!("vmm-{}", e.tid)
                } else {
                    "vmm".to_string()
                };
                format!(
                    "  {task}  [001] ..... {secs}.{frac:09}: kvm_unmap_hva_range: mmu notifier unmap range: {:#x} -- {:#x}",
                    e.range.start, e.range.end
                )
            }
            TraceLine::Sentinel(n) => {
                format!("  vmm-1  [000] ..... 1.000001: tracing_mark_write: notifier-sentinel {n}")
            }
            TraceLine::Lost { cpu, events } => format!("CPU:{cpu} [LOST {events} EVENTS]"),
            TraceLine::Other => continue,
        };
        let reparsed = parse_line(&again);
        match (&parsed, &reparsed) {
            // The tid of a task token that does not parse is -1 either way.
            (TraceLine::Event(a), TraceLine::Event(b)) => {
                assert_eq!(a.range, b.range, "{line:?} -> {again:?}");
                assert_eq!(a.timestamp_ns, b.timestamp_ns, "{line:?} -> {again:?}");
                assert!(
                    a.tid == b.tid || (a.tid < 0 && b.tid < 0),
                    "{line:?} -> {again:?}"
                );
            }
            (a, b) => assert_eq!(a, b, "{line:?} -> {again:?}"),
        }
    }
});
