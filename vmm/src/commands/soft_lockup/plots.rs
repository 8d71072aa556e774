//! `vmm soft-lockup --plane kernel --out DIR [--with FILE]...`: the run's
//! `report.json` and `table.txt`, and one log-log plot of the stretch
//! against the range per kernel and kind - this run's and those of the
//! earlier runs' `--json` outputs given with `--with` (an emulated host's
//! 6.1 and 6.12, say: `vmm host` prints the inner JSON as its last line),
//! so an A/B across hosts is one plot; with `--model`, the model's modes
//! too.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::kernel::KernelPlaneReport;
use crate::cli::Report;
use crate::report::plot;

#[derive(Debug, thiserror::Error)]
pub enum PlotsError {
    #[error("--with {path}: {why}")]
    With { path: PathBuf, why: String },
    #[error("--out {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the plot: {0}")]
    Plot(#[from] plot::PlotError),
    #[error("--emulated-hosts {kernel}: {why}")]
    Host { kernel: String, why: String },
}

/// One kernel's run: its label, points, verdicts and detector lines.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Run {
    pub label: String,
    pub points: Vec<RunPoint>,
    /// (kind, verdict).
    pub verdicts: Vec<(String, String)>,
    pub kernel_reports: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RunPoint {
    pub kind: String,
    pub gib: f64,
    pub stretch_ms: f64,
    pub syscall_ms: f64,
}

/// The kernel-plane report in `v` (the JSON of `--plane kernel --json`,
/// with or without `vmm host`'s `emulated_host` beside it).
pub fn run_of(v: &Value) -> Option<Run> {
    if v["plane"] != "kernel" {
        return None;
    }
    let kernel = v["kernel"].as_str()?;
    let host = match v["emulated_host"]["kernel"].as_str() {
        Some(k) => format!("emulated {k}"),
        None => "this host".into(),
    };
    let rmaps = match v["populate"]["mode"].as_str() {
        Some(m) => format!("{m} populate"),
        None => "empty rmaps".into(),
    };
    let points = v["points"]
        .as_array()?
        .iter()
        .filter_map(|p| {
            Some(RunPoint {
                kind: p["kind"].as_str()?.to_string(),
                gib: p["bytes"].as_u64()? as f64 / (1u64 << 30) as f64,
                stretch_ms: p["lateness_ns"].as_u64()? as f64 / 1e6,
                syscall_ms: p["syscall_ns"].as_u64().unwrap_or(0) as f64 / 1e6,
            })
        })
        .collect();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let verdicts = v["fits"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| Some((f["kind"].as_str()?.into(), f["verdict"].as_str()?.into())))
                .collect()
        })
        .unwrap_or_default();
    Some(Run {
        label: format!("{kernel} ({host}, {rmaps})"),
        points,
        verdicts,
        kernel_reports: strings(&v["kernel_reports"]),
    })
}

/// The kernel-plane report of a saved output: its last line that is one.
fn read_run(path: &Path) -> Result<Run, PlotsError> {
    let err = |why: String| PlotsError::With {
        path: path.to_path_buf(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find_map(|v| run_of(&v))
        .ok_or_else(|| err("no `vmm soft-lockup --plane kernel --json` report in it".into()))
}

/// The earlier runs of `with`, read before the measurement starts (a bad
/// file is an error before minutes of work).
pub fn read_runs(with: &[PathBuf]) -> Result<Vec<Run>, PlotsError> {
    with.iter().map(|p| read_run(p)).collect()
}

/// Writes report.json, table.txt and stretch-vs-range.{svg,png} (this
/// run and `rep.earlier`); returns the plot's path.
pub fn write_out(dir: &Path, rep: &KernelPlaneReport) -> Result<PathBuf, PlotsError> {
    let io = |path: PathBuf| move |source| PlotsError::Write { path, source };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let json = rep.json();
    let write =
        |name: &str, body: String| std::fs::write(dir.join(name), body).map_err(io(dir.join(name)));
    write(
        "report.json",
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    )?;
    write("table.txt", rep.text())?;
    let mut runs: Vec<Run> = rep.earlier.clone();
    runs.extend(run_of(&json));
    let mut series = series(&runs);
    // `--model`: the model's longest stretch per mode, same ranges.
    if let Some(m) = &rep.model {
        for mode in super::side_by_side::ModelMode::ALL {
            series.push(plot::Series {
                label: format!("model: {}", mode.name()),
                points: m
                    .points
                    .iter()
                    .filter(|p| p.mode == mode)
                    .map(|p| {
                        (
                            p.bytes as f64 / (1u64 << 30) as f64,
                            p.stretch_ns as f64 / 1e6,
                        )
                    })
                    .collect(),
            });
        }
    }
    let stem = dir.join("stretch-vs-range");
    let w = plot::line_chart(
        &stem,
        &plot::LineChart {
            title: "host invalidation: longest stretch without a reschedule",
            x_label: "range (GiB)",
            y_label: "stretch (ms)",
            log_x: true,
            log_y: true,
            series: &series,
        },
    )?;
    Ok(w.png)
}

/// One series per run and kind.
fn series(runs: &[Run]) -> Vec<plot::Series> {
    let mut out = Vec::new();
    for r in runs {
        let mut kinds: Vec<&str> = r.points.iter().map(|p| p.kind.as_str()).collect();
        kinds.dedup();
        for k in kinds {
            out.push(plot::Series {
                label: format!("{k}: {}", r.label),
                points: r
                    .points
                    .iter()
                    .filter(|p| p.kind == k)
                    .map(|p| (p.gib, p.stretch_ms))
                    .collect(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_host_run_is_read_from_its_last_report_line() {
        let dir = std::env::temp_dir().join(format!("sl-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.json");
        std::fs::write(
            &f,
            "[host] booting\n{\"plane\":\"kernel\",\"kernel\":\"6.1.0\",\"emulated_host\":{\"kernel\":\"debian-6.1\"},\"populate\":{\"mode\":\"nested\"},\"points\":[{\"kind\":\"dontneed\",\"bytes\":68719476736,\"lateness_ns\":2000000},{\"kind\":\"dontneed\",\"bytes\":137438953472,\"lateness_ns\":4000000}]}\n",
        )
        .unwrap();
        let runs = read_runs(std::slice::from_ref(&f)).unwrap();
        assert_eq!(
            runs[0].label,
            "6.1.0 (emulated debian-6.1, nested populate)"
        );
        let p = &runs[0].points[1];
        assert_eq!(
            (p.kind.as_str(), p.gib, p.stretch_ms),
            ("dontneed", 128.0, 4.0)
        );
        let s = series(&runs);
        assert_eq!(s.len(), 1);
        std::fs::write(&f, "{\"plane\":\"model\"}\n").unwrap();
        let e = read_runs(&[f]).unwrap_err().to_string();
        assert!(
            e.contains("no `vmm soft-lockup --plane kernel --json` report"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
