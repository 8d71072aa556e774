//! A cheap monotonic clock for hot loops: the TSC, calibrated once against
//! `Instant`. Reading it costs ~10 ns here against ~25 ns for
//! `Instant::now()` (a vDSO call), which matters at one sample per 64 zapped
//! leaves. Non-x86-64 builds fall back to `Instant`.

use notifier::convert::duration_ns;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Clock ticks (TSC cycles on x86-64, nanoseconds elsewhere).
pub type Ticks = u64;

static SCALE: OnceLock<u64> = OnceLock::new();

/// Nanoseconds per tick, scaled by 2^32.
fn scale() -> u64 {
    *SCALE.get_or_init(calibrate)
}

/// Calibrate now if not done yet (a ~1 ms spin). Whoever builds something
/// that will read the clock under a lock calls this first: the lazy
/// calibration inside the first zap held `mmu_lock` ~1 ms longer (seen as
/// a 1 ms "stretch" in the first zap of every `vmm latency` run).
pub fn calibrate_once() {
    scale();
}

/// Whether [`calibrate_once`] (or any conversion) has run.
pub fn calibrated() -> bool {
    SCALE.get().is_some()
}

#[cfg(target_arch = "x86_64")]
fn raw() -> Ticks {
    // SAFETY: RDTSC has no memory effects and is available on every x86-64
    // CPU; user-space RDTSC is only disabled by CR4.TSD, which Linux does
    // not set for ordinary processes.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(target_arch = "x86_64")]
fn calibrate() -> u64 {
    // ~1 ms against the monotonic clock: enough for a 0.1 % scale error,
    // paid once per process.
    let (t0, c0) = (Instant::now(), raw());
    while t0.elapsed() < Duration::from_millis(1) {
        std::hint::spin_loop();
    }
    let (ns, cycles) = (duration_ns(t0.elapsed()), raw().wrapping_sub(c0));
    // A scale past u64 (over 2^32 ns per cycle: a TSC that barely moved
    // while the spin was descheduled) saturates; it cannot come from a
    // working TSC.
    ((ns as u128) << 32)
        .checked_div(cycles as u128)
        .map_or(1 << 32, |s| u64::try_from(s).unwrap_or(u64::MAX))
        .max(1)
}

#[cfg(not(target_arch = "x86_64"))]
fn raw() -> Ticks {
    static START: OnceLock<Instant> = OnceLock::new();
    duration_ns(START.get_or_init(Instant::now).elapsed())
}

#[cfg(not(target_arch = "x86_64"))]
fn calibrate() -> u64 {
    1 << 32
}

/// Now, in ticks.
#[inline]
pub fn now() -> Ticks {
    raw()
}

/// Ticks to nanoseconds.
pub fn nanos(ticks: Ticks) -> u64 {
    u64::try_from((ticks as u128 * scale() as u128) >> 32).unwrap_or(u64::MAX)
}

/// A duration in ticks (at least 1 for a non-zero duration).
pub fn ticks(d: Duration) -> Ticks {
    let ns = duration_ns(d) as u128;
    if ns == 0 {
        return 0;
    }
    u64::try_from((ns << 32) / scale() as u128)
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_agrees_with_instant() {
        let (t0, c0) = (Instant::now(), now());
        std::thread::sleep(Duration::from_millis(20));
        let (wall, tsc) = (t0.elapsed().as_nanos() as f64, nanos(now() - c0) as f64);
        assert!(
            (tsc / wall - 1.0).abs() < 0.05,
            "tsc {tsc} ns vs wall {wall} ns"
        );
    }

    #[test]
    fn round_trip() {
        let d = Duration::from_micros(20);
        let back = nanos(ticks(d));
        assert!((19_900..=20_100).contains(&back), "{back}");
        assert_eq!(ticks(Duration::ZERO), 0);
    }
}
