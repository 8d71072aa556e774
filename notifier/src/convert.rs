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

/// `d` in milliseconds, saturating at `u64::MAX`.
pub fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `x` rounded toward zero to a `u64`, saturating: negative values and NaN
/// give 0, values of 2^64 and above `u64::MAX` (what Rust's float-to-int
/// `as` does, spelt out).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn f64_to_u64_saturating(x: f64) -> u64 {
    // `as` from a float saturates at the integer's bounds and maps NaN to 0
    // (Rust reference, "numeric cast"): no bits are lost silently beyond
    // the documented saturation.
    x as u64
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
        assert_eq!(duration_ms(Duration::from_secs(2)), 2000);
        assert_eq!(duration_ms(Duration::MAX), u64::MAX);
        assert_eq!(f64_to_u64_saturating(3.9), 3);
        assert_eq!(f64_to_u64_saturating(-1.0), 0);
        assert_eq!(f64_to_u64_saturating(f64::NAN), 0);
        assert_eq!(f64_to_u64_saturating(1e30), u64::MAX);
    }
}
