//! The model beside the kernel (`--plane kernel --model`): the kernel
//! plane's range sizes zapped on the project's MMU model (`mmu::model`, an
//! L1 of the same size, `--density` of it mapped into an L2), in three
//! modes - the blind walk without yielding (what the kernel does), the
//! blind walk yielding at every head (the fix, empty heads included) and
//! the summary walk (`mmu::populated`: empty runs skipped) - each on a
//! fresh model, timed per rmap head; beside the kernel's `dontneed` per
//! 4 KiB gfn measured in the same run.

use std::time::Instant;

use mmu::model::{build_nested, ModelError, NestedModelConfig};
use mmu::shadow::{WalkMode, ZapOptions};
use mmu::{RemoteTlb, YieldPolicy};
use notifier::convert::duration_ns;

use super::kernel::{KernelInval, KernelPoint};

/// A way of zapping the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelMode {
    BlindNeverYield,
    BlindYield,
    Summary,
}

impl ModelMode {
    pub const ALL: [ModelMode; 3] = [
        ModelMode::BlindNeverYield,
        ModelMode::BlindYield,
        ModelMode::Summary,
    ];

    fn options(self) -> ZapOptions<'static> {
        let (policy, mode) = match self {
            ModelMode::BlindNeverYield => (YieldPolicy::never(), WalkMode::Blind),
            ModelMode::BlindYield => (YieldPolicy::default(), WalkMode::Blind),
            ModelMode::Summary => (YieldPolicy::default(), WalkMode::Summary),
        };
        ZapOptions {
            policy,
            mode,
            progress: None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ModelMode::BlindNeverYield => "blind, never yield",
            ModelMode::BlindYield => "blind, yield",
            ModelMode::Summary => "summary, yield",
        }
    }
}

/// One zap of the model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelPoint {
    pub mode: ModelMode,
    pub bytes: u64,
    pub zap_ns: u64,
    pub rmap_heads_visited: u64,
    /// The longest stretch without a yield (ns).
    pub stretch_ns: u64,
}

/// The model's zaps and the per-head against per-gfn comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SideBySide {
    pub density: f64,
    pub points: Vec<ModelPoint>,
    /// The kernel's `dontneed` at the largest range: syscall ns per 4 KiB gfn.
    pub kernel_ns_per_gfn: Option<f64>,
    /// The model's blind walk without yielding at the largest range: ns per
    /// rmap head (all levels).
    pub model_ns_per_head: Option<f64>,
    /// `model_ns_per_head / kernel_ns_per_gfn`.
    pub model_over_kernel: Option<f64>,
}

/// The model at `l1` bytes and `density`, zapped over each of `sizes`
/// from gfn 0 in every [`ModelMode`] (a fresh model per zap), beside the
/// kernel's `points`.
pub fn measure(
    l1: u64,
    density: f64,
    sizes: &[u64],
    kernel: &[KernelPoint],
) -> Result<SideBySide, ModelError> {
    let cfg = NestedModelConfig {
        l1_bytes: l1,
        density,
        ..Default::default()
    };
    let mut points = Vec::new();
    for &bytes in sizes {
        for mode in ModelMode::ALL {
            let m = build_nested(cfg, RemoteTlb::default())?;
            let t = Instant::now();
            let r = m.mmu.zap_gfn_range(0, bytes >> 12, &mode.options());
            points.push(ModelPoint {
                mode,
                bytes,
                zap_ns: duration_ns(t.elapsed()),
                rmap_heads_visited: r.rmap_heads_visited,
                stretch_ns: r.yields.longest.ns,
            });
        }
    }
    let largest = sizes.iter().copied().max();
    let kernel_ns_per_gfn = kernel
        .iter()
        .filter(|p| p.kind == KernelInval::Dontneed && Some(p.bytes) == largest)
        .map(|p| p.syscall_ns as f64 / (p.bytes >> 12).max(1) as f64)
        .next();
    let model_ns_per_head = points
        .iter()
        .filter(|p| p.mode == ModelMode::BlindNeverYield && Some(p.bytes) == largest)
        .map(|p| p.zap_ns as f64 / p.rmap_heads_visited.max(1) as f64)
        .next();
    Ok(SideBySide {
        density,
        points,
        kernel_ns_per_gfn,
        model_ns_per_head,
        model_over_kernel: model_ns_per_head.zip(kernel_ns_per_gfn).map(|(m, k)| m / k),
    })
}

impl SideBySide {
    /// The text lines of the kernel plane's report.
    pub fn text(&self) -> String {
        let mut s = format!(
            "the model beside it (mmu::model, density {}, a fresh model per zap):\n",
            self.density
        );
        s += &format!(
            "{:<20} {:>10} {:>10} {:>12} {:>12}\n",
            "mode", "range", "zap ms", "stretch ms", "ns per head"
        );
        for p in &self.points {
            s += &format!(
                "{:<20} {:>6} MiB {:>10.2} {:>12.3} {:>12.3}\n",
                p.mode.name(),
                p.bytes >> 20,
                p.zap_ns as f64 / 1e6,
                p.stretch_ns as f64 / 1e6,
                p.zap_ns as f64 / p.rmap_heads_visited.max(1) as f64
            );
        }
        if let (Some(m), Some(k), Some(r)) = (
            self.model_ns_per_head,
            self.kernel_ns_per_gfn,
            self.model_over_kernel,
        ) {
            s += &format!(
                "per unit of walk at the largest range: the model's blind walk {m:.3} ns per rmap head, the kernel's dontneed {k:.3} ns per gfn ({r:.2}x)\n"
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_zaps_every_range_and_the_blind_walks_visit_every_head() {
        let sizes = [64 << 20, 1 << 30];
        let s = measure(1 << 30, 0.001, &sizes, &[]).unwrap();
        assert_eq!(s.points.len(), 6);
        for &b in &sizes {
            let at = |m| {
                s.points
                    .iter()
                    .find(|p| p.bytes == b && p.mode == m)
                    .unwrap()
            };
            let (never, yielding, summary) = (
                at(ModelMode::BlindNeverYield),
                at(ModelMode::BlindYield),
                at(ModelMode::Summary),
            );
            // Heads of all three levels in the range.
            let pages = b >> 12;
            let heads = pages + pages.div_ceil(512) + pages.div_ceil(512 * 512);
            assert_eq!(never.rmap_heads_visited, heads, "{never:?}");
            assert_eq!(yielding.rmap_heads_visited, heads, "{yielding:?}");
            assert!(summary.rmap_heads_visited < heads / 100, "{summary:?}");
        }
        // No kernel points: nothing to compare.
        assert!(s.model_ns_per_head.is_some() && s.kernel_ns_per_gfn.is_none());
        assert!(s.model_over_kernel.is_none());
        assert!(s.text().contains("blind, never yield"));
    }
}
