//! Integer conversions the workspace relies on, in one place. The project
//! runs on x86-64 only (KVM, userfaultfd and the tracepoint it needs), so a
//! `usize` is 64 bits wide - asserted at compile time - and `u64 <-> usize`
//! never loses bits; durations in nanoseconds saturate instead of wrapping.

use std::time::Duration;

const _: () = assert!(usize::BITS == 64, "the project targets 64-bit hosts");

/// `n` as a `usize`: lossless on the 64-bit hosts the project builds for.
#[allow(clippy::cast_possible_truncation)]
pub const fn u64_to_usize(n: u64) -> usize {
    n as usize
}

/// `n` as a `usize`: lossless (`usize` is 64 bits wide here).
pub const fn u32_to_usize(n: u32) -> usize {
    n as usize
}

/// `n` as a `u64`: lossless (`usize` is at most 64 bits wide).
pub const fn usize_to_u64(n: usize) -> u64 {
    n as u64
}

/// `d` in nanoseconds, saturating at `u64::MAX` (584 years).
pub fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        assert_eq!(u64_to_usize(u64::MAX), usize::MAX);
        assert_eq!(usize_to_u64(usize::MAX), u64::MAX);
        assert_eq!(u32_to_usize(u32::MAX), 0xffff_ffff);
        assert_eq!(duration_ns(Duration::from_micros(3)), 3000);
        assert_eq!(duration_ns(Duration::MAX), u64::MAX);
    }
}
