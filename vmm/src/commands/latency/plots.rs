//! `vmm latency --out DIR`: report.json, samples.json, table.txt, and the
//! plots (latency vs range size per layer, a histogram per scenario).

use super::measure::{self, Op};
use super::report::{table, LatencyReport, ScenarioReport};
use super::skip;
use crate::report::plot;

/// Write report.json, samples.json, table.txt and the plots under `dir`.
pub(super) fn write_out(dir: &std::path::Path, rep: &mut LatencyReport) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    rep.plots = plots(dir, rep);
    let samples: Vec<_> = rep
        .scenarios
        .iter()
        .map(|s| serde_json::json!({"name": s.name, "samples": s.samples}))
        .collect();
    let w = |name: &str, body: String| {
        std::fs::write(dir.join(name), body)
            .map_err(|e| format!("{}: {e}", dir.join(name).display()))
    };
    w(
        "samples.json",
        serde_json::to_string_pretty(&samples).unwrap_or_default(),
    )?;
    w("table.txt", table(rep))?;
    w(
        "report.json",
        serde_json::to_string_pretty(rep).unwrap_or_default(),
    )?;
    Ok(())
}

/// Latency vs range size per layer (protect, populated) per configuration,
/// and a histogram per scenario. Failures are reported, not fatal.
fn plots(dir: &std::path::Path, rep: &mut LatencyReport) -> Vec<String> {
    let mut written = Vec::new();
    let mut errors = Vec::new();
    let mut configs: Vec<String> = rep.scenarios.iter().map(|s| s.config.clone()).collect();
    configs.dedup();
    for c in &configs {
        let prot: Vec<&ScenarioReport> = rep
            .scenarios
            .iter()
            .filter(|s| {
                &s.config == c && s.op == Op::Protect && s.state == measure::State::Populated
            })
            .collect();
        let mut series = Vec::new();
        let layer = |name: &str, f: &dyn Fn(&ScenarioReport) -> Option<f64>| plot::Series {
            label: name.into(),
            points: prot
                .iter()
                .filter_map(|s| Some((s.range_bytes as f64, f(s)?)))
                .collect(),
        };
        series.push(layer("host", &|s| s.host.as_ref().map(|h| h.fig.p50)));
        series.push(layer("kernel", &|s| {
            s.kernel.as_ref().filter(|k| k.timed).map(|k| k.fig.p50)
        }));
        series.push(layer("guest", &|s| s.guest.as_ref().map(|g| g.fig.p50)));
        series.push(layer("mmu", &|s| s.mmu.as_ref().map(|m| m.fig.p50)));
        series.push(layer("mmu_shadow", &|s| {
            s.mmu_shadow.as_ref().map(|m| m.fig.p50)
        }));
        series.retain(|s| !s.points.is_empty());
        let title = format!("{c}: mprotect RO, populated RAM: p50 vs range size");
        let stem = dir.join(format!("{c}-protect-vs-size"));
        match plot::line_chart(
            &stem,
            &plot::LineChart {
                title: &title,
                x_label: "range (bytes)",
                y_label: "p50 (us)",
                log_x: true,
                log_y: true,
                series: &series,
            },
        ) {
            Ok(w) => written.push(w.svg.display().to_string()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    for s in &rep.scenarios {
        let us = |v: Vec<u64>| {
            v.into_iter()
                .map(|x| x as f64 / 1000.0)
                .collect::<Vec<f64>>()
        };
        let mut samples = Vec::new();
        if s.host.is_some() {
            samples.push((
                "host".to_string(),
                us(s.samples.iter().map(|x| x.host_ns).collect()),
            ));
        }
        samples.push((
            "kernel".to_string(),
            us(s.samples
                .iter()
                .filter_map(|x| x.notify_to_return_ns)
                .collect()),
        ));
        samples.push((
            "guest".to_string(),
            us(s.samples
                .iter()
                .filter_map(|x| x.guest_max_gap_ns)
                .collect()),
        ));
        samples.push((
            "mmu".to_string(),
            us(s.samples
                .iter()
                .filter_map(|x| x.mmu)
                .map(|m| m.total_ns)
                .collect()),
        ));
        samples.push((
            "mmu_shadow".to_string(),
            us(s.samples
                .iter()
                .filter_map(|x| x.shadow)
                .map(|m| m.total_ns)
                .collect()),
        ));
        samples.retain(|(_, v)| v.iter().any(|&x| x > 0.0));
        if samples.is_empty() {
            // A measured no-op (NUMA hinting without a guest layer).
            continue;
        }
        let stem = dir.join(format!("hist-{}", s.name.replace('/', "-")));
        let title = format!("{}: latency histogram", s.name);
        match plot::histogram(
            &stem,
            &plot::Histogram {
                title: &title,
                x_label: "latency (us)",
                samples: &samples,
            },
        ) {
            Ok(w) => written.push(w.svg.display().to_string()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    errors.sort();
    errors.dedup();
    for e in errors {
        skip(rep, "plots", e);
    }
    written
}
