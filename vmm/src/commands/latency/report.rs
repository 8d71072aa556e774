//! What `vmm latency` reports: one row per scenario and layer (host
//! syscall, kernel tracepoint, guest probe, the project's TDP and shadow
//! MMUs), the plain-KVM comparison, what was skipped and why; as a table
//! and as JSON.

use super::measure::{self, Op, Sample};
use super::session::TscCheck;
use super::Measured;
use crate::cli::Guest;
use crate::report::Percentiles;

#[derive(Debug, Clone, serde::Serialize)]
pub struct HostLayer {
    #[serde(flatten)]
    pub fig: Percentiles,
    /// The restoring syscall (mprotect RW, write-protect off).
    pub restore: Option<Percentiles>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelLayer {
    /// First notifier to syscall return (trace_clock mono); zeros for a
    /// no-op.
    #[serde(flatten)]
    pub fig: Percentiles,
    /// Tracepoint ranges over guest RAM per iteration (the fewest seen).
    pub ranges: u64,
    pub ranges_total: u64,
    /// Iterations whose syscall left no range in the trace.
    pub iterations_without_range: u64,
    pub restore_ranges_total: u64,
    /// Syscall entry to the first notifier.
    pub entry_to_notify: Option<Percentiles>,
    /// Whether timestamps were CLOCK_MONOTONIC.
    pub timed: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GuestLayer {
    /// The probe's longest gap per iteration.
    #[serde(flatten)]
    pub fig: Percentiles,
    /// Mean stall (gap above 2 us: refault) per iteration that had any.
    pub refault: Option<Percentiles>,
    pub stalls_total: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MmuLayer {
    /// Total zap time per iteration (TDP).
    #[serde(flatten)]
    pub fig: Percentiles,
    /// Most leaves visited by one iteration's zaps.
    pub leaves: u64,
    pub max_stretch_us: f64,
    pub yields: u64,
    pub zaps: u64,
    /// The restoring syscall's zaps, total time.
    pub restore: Option<Percentiles>,
}

/// The shadow MMU's zaps (rmap walk) for the operation's syscall.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShadowLayer {
    /// Total zap time per iteration.
    #[serde(flatten)]
    pub fig: Percentiles,
    /// Most rmap heads visited by one iteration's zaps.
    pub rmaps: u64,
    /// Most shadow pages zapped by one iteration's zaps.
    pub shadow_pages: u64,
    pub max_stretch_us: f64,
    pub yields: u64,
    pub zaps: u64,
}

/// Plain KVM against the project, in the same run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Compare {
    pub plain_host: Percentiles,
    pub plain_guest: Option<Percentiles>,
    /// project p50 / plain p50.
    pub host_ratio: f64,
    pub guest_ratio: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub config: String,
    pub op: Op,
    pub size: String,
    pub state: measure::State,
    pub range_bytes: u64,
    pub iterations: usize,
    /// The layers this scenario has figures for.
    pub layers: Vec<&'static str>,
    pub host: Option<HostLayer>,
    pub kernel: Option<KernelLayer>,
    pub guest: Option<GuestLayer>,
    /// The project's TDP MMU.
    pub mmu: Option<MmuLayer>,
    /// The project's shadow MMU (guest page tables shadowed, rmap zaps).
    pub mmu_shadow: Option<ShadowLayer>,
    pub compare: Option<Compare>,
    pub note: Option<String>,
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub what: String,
    pub why: String,
}

/// A configuration that started and then failed (an error, a dead
/// thread): unlike a skip, it makes the run fail.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failed {
    pub what: String,
    pub error: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LatencyReport {
    pub guest: Guest,
    pub scenarios: Vec<ScenarioReport>,
    pub skipped: Vec<Skipped>,
    pub failed: Vec<Failed>,
    /// KVM_RUN EFAULT re-entries (guest stores while RAM was read-only).
    pub efault_retries: u64,
    pub trace_clock_mono: bool,
    /// Per session: the guest's TSC against the host's.
    pub tsc: Vec<(String, TscCheck)>,
    pub plots: Vec<String>,
    pub elapsed_s: f64,
}

pub(super) fn summarize(
    config: &str,
    m: Measured,
    traced: bool,
    mono: bool,
    plain: Option<&Measured>,
) -> ScenarioReport {
    let smp = &m.samples;
    let numa = m.sc.op.is_numa();
    let mut layers = Vec::new();
    let host = (!numa).then(|| {
        layers.push("host");
        let restore: Vec<u64> = smp.iter().filter_map(|x| x.restore_ns).collect();
        HostLayer {
            fig: Percentiles::from_ns(&smp.iter().map(|x| x.host_ns).collect::<Vec<_>>()),
            restore: (!restore.is_empty()).then(|| Percentiles::from_ns(&restore)),
        }
    });
    let kernel = traced.then(|| {
        layers.push("kernel");
        let n2r: Vec<u64> = smp.iter().filter_map(|x| x.notify_to_return_ns).collect();
        let e2n: Vec<u64> = smp.iter().filter_map(|x| x.entry_to_notify_ns).collect();
        KernelLayer {
            fig: Percentiles::from_ns(&n2r),
            ranges: smp.iter().map(|x| x.ranges).min().unwrap_or(0),
            ranges_total: smp.iter().map(|x| x.ranges).sum(),
            iterations_without_range: smp.iter().filter(|x| x.ranges == 0).count() as u64,
            restore_ranges_total: smp.iter().map(|x| x.restore_ranges).sum(),
            entry_to_notify: (!e2n.is_empty()).then(|| Percentiles::from_ns(&e2n)),
            timed: mono && !n2r.is_empty(),
        }
    });
    let gaps: Vec<u64> = smp.iter().filter_map(|x| x.guest_max_gap_ns).collect();
    let guest = (!gaps.is_empty()).then(|| {
        layers.push("guest");
        let refault: Vec<u64> = smp
            .iter()
            .filter(|x| x.guest_stalls > 0)
            .map(|x| x.guest_stall_ns / x.guest_stalls)
            .collect();
        GuestLayer {
            fig: Percentiles::from_ns(&gaps),
            refault: (!refault.is_empty()).then(|| Percentiles::from_ns(&refault)),
            stalls_total: smp.iter().map(|x| x.guest_stalls).sum(),
        }
    });
    let mmus: Vec<_> = smp.iter().filter_map(|x| x.mmu).collect();
    let mmu = (!mmus.is_empty()).then(|| {
        layers.push("mmu");
        let restore: Vec<u64> = smp
            .iter()
            .filter_map(|x| x.restore_mmu)
            .map(|r| r.total_ns)
            .collect();
        MmuLayer {
            fig: Percentiles::from_ns(&mmus.iter().map(|x| x.total_ns).collect::<Vec<_>>()),
            leaves: mmus.iter().map(|x| x.units).max().unwrap_or(0),
            max_stretch_us: mmus.iter().map(|x| x.longest_ns).max().unwrap_or(0) as f64 / 1000.0,
            yields: mmus.iter().map(|x| x.yields).sum(),
            zaps: mmus.iter().map(|x| x.zaps).sum(),
            restore: (!restore.is_empty()).then(|| Percentiles::from_ns(&restore)),
        }
    });
    let shadows: Vec<_> = smp.iter().filter_map(|x| x.shadow).collect();
    let mmu_shadow = (!shadows.is_empty()).then(|| {
        layers.push("mmu_shadow");
        ShadowLayer {
            fig: Percentiles::from_ns(&shadows.iter().map(|x| x.total_ns).collect::<Vec<_>>()),
            rmaps: shadows.iter().map(|x| x.rmaps).max().unwrap_or(0),
            shadow_pages: shadows.iter().map(|x| x.shadow_pages).max().unwrap_or(0),
            max_stretch_us: shadows.iter().map(|x| x.longest_ns).max().unwrap_or(0) as f64 / 1000.0,
            yields: shadows.iter().map(|x| x.yields).sum(),
            zaps: shadows.iter().map(|x| x.zaps).sum(),
        }
    });
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let compare = plain.and_then(|p| {
        let h = host.as_ref()?;
        let plain_host =
            Percentiles::from_ns(&p.samples.iter().map(|x| x.host_ns).collect::<Vec<_>>());
        let pg: Vec<u64> = p
            .samples
            .iter()
            .filter_map(|x| x.guest_max_gap_ns)
            .collect();
        let plain_guest = (!pg.is_empty()).then(|| Percentiles::from_ns(&pg));
        Some(Compare {
            host_ratio: ratio(h.fig.p50, plain_host.p50),
            guest_ratio: match (&guest, &plain_guest) {
                (Some(g), Some(pg)) => Some(ratio(g.fig.p50, pg.p50)),
                _ => None,
            },
            plain_host,
            plain_guest,
        })
    });
    ScenarioReport {
        name: format!("{config}/{}", m.sc.name()),
        config: config.to_string(),
        op: m.sc.op,
        size: m.sc.size.clone(),
        state: m.sc.state,
        range_bytes: m.sc.range_bytes(),
        iterations: smp.len(),
        layers,
        host,
        kernel,
        guest,
        mmu,
        mmu_shadow,
        compare,
        note: m.note,
        samples: m.samples,
    }
}

fn fmt_fig(f: &Percentiles) -> String {
    format!("{:>10.1} {:>10.1} {:>10.1}", f.p50, f.p99, f.max)
}

/// The terminal table: one row per scenario and layer (microseconds).
pub fn table(rep: &LatencyReport) -> String {
    let mut t = String::new();
    let w = rep
        .scenarios
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(8)
        .max(8);
    t += &format!(
        "{:<w$} {:<6} {:>10} {:>10} {:>10}  {}\n",
        "scenario", "layer", "p50 us", "p99 us", "max us", "notes"
    );
    for s in &rep.scenarios {
        let mut first = true;
        let mut row = |layer: &str, f: &Percentiles, extra: String| {
            let name = if first { s.name.as_str() } else { "" };
            first = false;
            t += &format!("{name:<w$} {layer:<6} {}  {extra}\n", fmt_fig(f));
        };
        if let Some(h) = &s.host {
            let mut extra = h
                .restore
                .map(|r| format!("restore p50 {:.1}", r.p50))
                .unwrap_or_default();
            if let Some(c) = &s.compare {
                extra += &format!(
                    "  x{:.2} vs plain KVM ({:.1})",
                    c.host_ratio, c.plain_host.p50
                );
            }
            row("host", &h.fig, extra);
        }
        if let Some(k) = &s.kernel {
            row(
                "kernel",
                &k.fig,
                format!(
                    "{} range(s)/iter, {} without{}",
                    k.ranges,
                    k.iterations_without_range,
                    if k.timed { "" } else { ", untimed" }
                ),
            );
        }
        if let Some(g) = &s.guest {
            let mut extra = g
                .refault
                .map(|r| format!("refault p50 {:.1}, {} stalls", r.p50, g.stalls_total))
                .unwrap_or_else(|| format!("{} stalls", g.stalls_total));
            if let Some(r) = s.compare.as_ref().and_then(|c| c.guest_ratio) {
                extra += &format!("  x{r:.2} vs plain KVM");
            }
            row("guest", &g.fig, extra);
        }
        if let Some(m) = &s.mmu {
            row(
                "mmu",
                &m.fig,
                format!(
                    "{} leaves, stretch {:.1} us, {} yields",
                    m.leaves, m.max_stretch_us, m.yields
                ),
            );
        }
        if let Some(m) = &s.mmu_shadow {
            row(
                "shadow",
                &m.fig,
                format!(
                    "{} rmaps, {} shadow pages, stretch {:.1} us, {} yields",
                    m.rmaps, m.shadow_pages, m.max_stretch_us, m.yields
                ),
            );
        }
        if let Some(n) = &s.note {
            t += &format!("{:<w$} note: {n}\n", "");
        }
    }
    for k in &rep.skipped {
        t += &format!("skipped: {}: {}\n", k.what, k.why);
    }
    for f in &rep.failed {
        t += &format!("FAILED: {}: {}\n", f.what, f.error);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_and_table() {
        let f = Percentiles::from_ns(&[1000, 2000, 3000]);
        assert_eq!((f.p50, f.max), (2.0, 3.0));
        let sc = measure::Scenario {
            op: Op::Protect,
            state: measure::State::Populated,
            gs: 0,
            ge: 2 << 20,
            size: "2M".into(),
        };
        let smp = Sample {
            host_ns: 5000,
            ranges: 2,
            notify_to_return_ns: Some(3000),
            guest_max_gap_ns: Some(9000),
            mmu: Some(measure::MmuSample {
                zaps: 1,
                total_ns: 1000,
                ..Default::default()
            }),
            ..Default::default()
        };
        let m = Measured {
            sc,
            samples: vec![smp; 3],
            note: None,
        };
        let r = summarize("shared-2M", m, true, true, None);
        assert_eq!(r.layers, vec!["host", "kernel", "guest", "mmu"]);
        assert_eq!(r.kernel.as_ref().unwrap().iterations_without_range, 0);
        let rep = LatencyReport {
            scenarios: vec![r],
            ..Default::default()
        };
        let t = table(&rep);
        assert!(t.contains("shared-2M/protect/2M/populated"), "{t}");
        assert!(t.contains("kernel"));
        let v = serde_json::to_value(&rep).unwrap();
        assert_eq!(v["scenarios"][0]["host"]["p50"], 5.0);
        assert_eq!(v["scenarios"][0]["kernel"]["ranges"], 2);
    }
}
