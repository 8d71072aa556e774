//! Does a stretch grow with the range? A least-squares line through
//! (range size, stretch) points, the range at which the line reaches a
//! threshold (the kernel's soft-lockup threshold, 2 x
//! `kernel.watchdog_thresh`), and a verdict: a kernel that yields holds the
//! CPU for a bounded stretch however large the range; one that does not
//! holds it in proportion to the range.

/// `y = intercept + slope * x`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Line {
    pub intercept: f64,
    pub slope: f64,
}

impl Line {
    /// The least-squares line through `points` (x, y); `None` with fewer
    /// than two distinct x or a non-finite value.
    pub fn least_squares(points: &[(f64, f64)]) -> Option<Line> {
        if points.iter().any(|(x, y)| !x.is_finite() || !y.is_finite()) {
            return None;
        }
        let n = f64::from(u32::try_from(points.len()).ok()?);
        let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
        let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
        let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
        let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
        if sxx <= 0.0 {
            return None;
        }
        let slope = sxy / sxx;
        Some(Line {
            intercept: mean_y - slope * mean_x,
            slope,
        })
    }

    pub fn at(&self, x: f64) -> f64 {
        self.intercept + self.slope * x
    }

    /// The x at which the line reaches `y`, if it rises to it there (a flat
    /// or falling line never does).
    pub fn x_at(&self, y: f64) -> Option<f64> {
        (self.slope > 0.0).then(|| (y - self.intercept) / self.slope)
    }
}

/// What a sweep of range sizes says about a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The stretch stays bounded as the range grows.
    Yields,
    /// The stretch grows with the range.
    DoesNotYield,
    /// Too few sizes, or too narrow a sweep, to tell.
    Undecided,
}

impl Verdict {
    /// As in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Yields => "yields",
            Verdict::DoesNotYield => "does-not-yield",
            Verdict::Undecided => "undecided",
        }
    }
}

/// How much wider than the smallest range the largest must be to judge.
pub const MIN_SPAN: f64 = 4.0;

/// The verdict on (range size, stretch) points: "does not yield" when the
/// fitted stretch at the largest range is above `floor` (the probe's own
/// lateness on a quiet CPU: below it nothing was held) and grows from the
/// smallest range to the largest by at least half of what a stretch
/// proportional to the range would (a walk without a yield is
/// proportional; one that yields every N heads is flat); "yields"
/// otherwise. The growth is judged on the fitted line, not on the points,
/// so that one noisy point does not decide.
pub fn verdict(points: &[(f64, f64)], floor: f64) -> Verdict {
    let (Some(min_x), Some(max_x)) = (
        points.iter().map(|p| p.0).reduce(f64::min),
        points.iter().map(|p| p.0).reduce(f64::max),
    ) else {
        return Verdict::Undecided;
    };
    if min_x <= 0.0 || max_x / min_x < MIN_SPAN {
        return Verdict::Undecided;
    }
    let Some(line) = Line::least_squares(points) else {
        return Verdict::Undecided;
    };
    let (lo, hi) = (line.at(min_x), line.at(max_x));
    if hi <= floor {
        return Verdict::Yields;
    }
    let proportional = hi * (1.0 - min_x / max_x);
    if hi - lo >= 0.5 * proportional {
        Verdict::DoesNotYield
    } else {
        Verdict::Yields
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_through_exact_points_and_its_threshold_crossing() {
        let l = Line::least_squares(&[(64.0, 8.0), (128.0, 16.0), (256.0, 32.0)]).unwrap();
        assert!((l.slope - 0.125).abs() < 1e-12);
        assert!(l.intercept.abs() < 1e-9);
        // 20 s (2 x watchdog_thresh 10) = 20,000 ms at 0.125 ms/GiB.
        assert!((l.x_at(20_000.0).unwrap() - 160_000.0).abs() < 1e-6);
        assert_eq!(Line::least_squares(&[(1.0, 1.0)]), None);
        assert_eq!(Line::least_squares(&[(1.0, 1.0), (1.0, 2.0)]), None);
        assert_eq!(Line::least_squares(&[(1.0, f64::NAN), (2.0, 2.0)]), None);
        let flat = Line::least_squares(&[(1.0, 3.0), (9.0, 3.0)]).unwrap();
        assert_eq!(flat.x_at(10.0), None);
    }

    #[test]
    fn verdicts_on_the_measured_shapes() {
        // PLATFORM.md: 6.1 npt=0 over empty slots, 64 -> 256 GiB: 93 ->
        // 385 ms of lateness - proportional.
        assert_eq!(
            verdict(&[(64.0, 93.0), (128.0, 190.0), (256.0, 385.0)], 6.0),
            Verdict::DoesNotYield
        );
        // The TDP MMU: 0.3-6 ms whatever the size (under the probe floor).
        assert_eq!(verdict(&[(64.0, 5.0), (256.0, 4.0)], 6.0), Verdict::Yields);
        // Bounded above the floor: a yield every N heads.
        assert_eq!(
            verdict(&[(64.0, 20.0), (256.0, 24.0), (1024.0, 25.0)], 6.0),
            Verdict::Yields
        );
        // Measured here (6.18 PVM, 256 GiB L1, a busy machine: quiet-CPU
        // lateness 11.8 ms): proportional above a high floor.
        assert_eq!(
            verdict(&[(16.0, 1.28), (64.0, 7.14), (256.0, 32.07)], 23.6),
            Verdict::DoesNotYield
        );
        // Too narrow or too few.
        assert_eq!(
            verdict(&[(64.0, 93.0), (128.0, 190.0)], 6.0),
            Verdict::Undecided
        );
        assert_eq!(verdict(&[(64.0, 93.0)], 6.0), Verdict::Undecided);
        assert_eq!(verdict(&[], 6.0), Verdict::Undecided);
    }
}
