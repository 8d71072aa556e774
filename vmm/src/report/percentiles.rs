//! The one percentile type: p50, p99 and max of a set of samples, in
//! microseconds (JSON `{"p50", "p99", "max"}`).

use notifier::convert::usize_to_u64;

/// p50/p99/max in microseconds, nearest-rank.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of nanosecond samples (all zero for none).
    pub fn from_ns(samples: &[u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut s = samples.to_vec();
        s.sort_unstable();
        let n = usize_to_u64(s.len());
        // Nearest rank: the smallest sample with at least q of them at or
        // below it, ceil(q * n) in 1..=n.
        let at = |per_mille: u64| {
            let rank = (per_mille * n).div_ceil(1000).clamp(1, n);
            s[notifier::convert::u64_to_usize(rank - 1)] as f64 / 1000.0
        };
        Percentiles {
            p50: at(500),
            p99: at(990),
            max: at(1000),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let ns: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        let p = Percentiles::from_ns(&ns);
        assert_eq!((p.p50, p.p99, p.max), (50.0, 99.0, 100.0));
        assert_eq!(Percentiles::from_ns(&[]), Percentiles::default());
        let p = Percentiles::from_ns(&[1000, 2000, 3000]);
        assert_eq!((p.p50, p.max), (2.0, 3.0));
        let p = Percentiles::from_ns(&[7000]);
        assert_eq!((p.p50, p.p99, p.max), (7.0, 7.0, 7.0));
    }
}
