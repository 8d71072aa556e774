//! Plots for the measurement subcommands, each written as `<stem>.svg` and
//! `<stem>.png`.
//!
//! * [`line_chart`]: one line per series over x (e.g. latency vs range
//!   size, one series per layer), optionally log-scaled.
//! * [`histogram`]: a latency histogram, one overlaid series per label,
//!   log-spaced bins.
//!
//! Text is laid out with a TrueType font read from the system (DejaVu Sans,
//! Debian's `fonts-dejavu-core`, or `$VMM_PLOT_FONT`); without one no plot
//! is drawn and the error says why. Log axes are drawn as linear axes over
//! `log10` of the values with `10^v` tick labels, so both scales share one
//! drawing path.

use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One labelled line: `(x, y)` points, drawn in x order.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart of several series.
#[derive(Debug, Clone, Copy)]
pub struct LineChart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_x: bool,
    pub log_y: bool,
    pub series: &'a [Series],
}

/// A histogram of samples (e.g. microseconds), one overlaid series per
/// label.
#[derive(Debug, Clone, Copy)]
pub struct Histogram<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub samples: &'a [(String, Vec<f64>)],
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Written {
    pub svg: PathBuf,
    pub png: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("nothing to plot: {0}")]
    Empty(&'static str),
    #[error("drawing {path}: {reason}")]
    Draw { path: PathBuf, reason: String },
    #[error("no TrueType font to draw text with (tried {tried}; install fonts-dejavu-core or set VMM_PLOT_FONT)")]
    NoFont { tried: String },
}

const SIZE: (u32, u32) = (960, 600);
const FONT: &str = "sans-serif";
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];
/// Line colours, one per series in order (colour-blind safe, Okabe-Ito).
/// Okabe-Ito's colour-blind-safe colours, then darker and lighter ones,
/// so a plot of up to 14 series repeats none.
const PALETTE: [RGBColor; 14] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
    RGBColor(128, 0, 0),
    RGBColor(0, 0, 128),
    RGBColor(128, 128, 0),
    RGBColor(0, 128, 128),
    RGBColor(128, 0, 128),
    RGBColor(150, 150, 150),
    RGBColor(240, 228, 66),
];

/// Register the system font with plotters once; the error is remembered.
fn font() -> Result<(), PlotError> {
    static FONT_STATE: OnceLock<Result<(), String>> = OnceLock::new();
    FONT_STATE
        .get_or_init(|| {
            let env = std::env::var("VMM_PLOT_FONT").ok();
            let candidates: Vec<&str> = env
                .iter()
                .map(String::as_str)
                .chain(FONT_PATHS.iter().copied())
                .collect();
            for p in &candidates {
                if let Ok(bytes) = std::fs::read(p) {
                    // plotters keeps the font for the process' lifetime.
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                        return Ok(());
                    }
                }
            }
            Err(candidates.join(", "))
        })
        .clone()
        .map_err(|tried| PlotError::NoFont { tried })
}

fn axis(v: f64, log: bool) -> Option<f64> {
    if !v.is_finite() {
        return None;
    }
    if log {
        (v > 0.0).then(|| v.log10())
    } else {
        Some(v)
    }
}

/// A compact tick label: about 3 significant digits, k/M/G suffixes.
fn tick(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let digits = match x.abs() {
        a if a >= 100.0 => 0,
        a if a >= 10.0 => 1,
        _ => 2,
    };
    let s = format!("{x:.digits$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    format!("{s}{suffix}")
}

/// How many tick labels an axis over `(lo, hi)` gets: on a log axis one
/// per decade (so they land on powers of ten), else plotters' usual 10.
fn labels((lo, hi): (f64, f64), log: bool) -> usize {
    if log {
        let decades = notifier::convert::f64_to_u64_saturating((hi - lo).ceil());
        notifier::convert::u64_to_usize(decades.saturating_add(1).clamp(2, 12))
    } else {
        10
    }
}

/// `[lo, hi]` of `vals`, widened so that a single value still spans a range.
fn span(vals: impl Iterator<Item = f64>, pad_frac: f64) -> Option<(f64, f64)> {
    let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return None;
    }
    let w = (hi - lo).max(1e-9 + hi.abs() * 0.1).max(0.5);
    Some((lo - w * pad_frac, hi + w * pad_frac))
}

fn draw_err<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError::Draw {
        path: path.to_path_buf(),
        reason: format!("{e:?}"),
    }
}

/// Both files of `stem`: the SVG drawn by `svg`, the PNG by `png` (the
/// same drawing code instantiated for each backend).
fn write_both_impl<S, P>(stem: &Path, svg_draw: S, png_draw: P) -> Result<Written, PlotError>
where
    S: Fn(&DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), String>,
    P: Fn(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), String>,
{
    font()?;
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(draw_err(dir))?;
    }
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        svg_draw(&root).map_err(draw_err(&svg))?;
        root.present().map_err(draw_err(&svg))?;
    }
    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        png_draw(&root).map_err(draw_err(&png))?;
        root.present().map_err(draw_err(&png))?;
    }
    Ok(Written { svg, png })
}

/// Write `<stem>.svg` and `<stem>.png` of a line chart. Points that a log
/// axis cannot show (zero, negative, NaN) are left out.
pub fn line_chart(stem: &Path, chart: &LineChart<'_>) -> Result<Written, PlotError> {
    let series: Vec<(&str, Vec<(f64, f64)>)> = chart
        .series
        .iter()
        .map(|s| {
            let mut pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter_map(|&(x, y)| Some((axis(x, chart.log_x)?, axis(y, chart.log_y)?)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (s.label.as_str(), pts)
        })
        .filter(|(_, p)| !p.is_empty())
        .collect();
    let xs = span(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)), 0.05)
        .ok_or(PlotError::Empty("no plottable points"))?;
    let ys = span(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)), 0.08)
        .ok_or(PlotError::Empty("no plottable points"))?;
    let (log_x, log_y) = (chart.log_x, chart.log_y);
    let label = move |v: &f64, log: bool| tick(if log { 10f64.powf(*v) } else { *v });
    macro_rules! draw {
        ($root:expr) => {{
            let root = $root;
            root.fill(&WHITE).map_err(|e| format!("{e:?}"))?;
            let mut c = ChartBuilder::on(root)
                .caption(chart.title, (FONT, 22))
                .margin(14)
                .x_label_area_size(44)
                .y_label_area_size(64)
                .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)
                .map_err(|e| format!("{e:?}"))?;
            c.configure_mesh()
                .x_desc(chart.x_label)
                .y_desc(chart.y_label)
                .x_labels(labels(xs, log_x))
                .y_labels(labels(ys, log_y))
                .x_label_formatter(&|v| label(v, log_x))
                .y_label_formatter(&|v| label(v, log_y))
                .label_style((FONT, 14))
                .draw()
                .map_err(|e| format!("{e:?}"))?;
            for (i, (name, pts)) in series.iter().enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                let style = color.stroke_width(2);
                c.draw_series(LineSeries::new(pts.iter().copied(), style))
                    .map_err(|e| format!("{e:?}"))?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                c.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(|e| format!("{e:?}"))?;
            }
            c.configure_series_labels()
                .label_font((FONT, 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(|e| format!("{e:?}"))?;
            Ok(())
        }};
    }
    write_both_impl(
        stem,
        |root: &DrawingArea<SVGBackend<'_>, Shift>| draw!(root),
        |root: &DrawingArea<BitMapBackend<'_>, Shift>| draw!(root),
    )
}

/// Bins for a histogram over `[lo, hi]` (`lo > 0`): `n` log-spaced edges.
fn log_bins(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let (a, b) = (lo.log10(), (hi * 1.0001).log10());
    (0..=n)
        .map(|i| 10f64.powf(a + (b - a) * i as f64 / n as f64))
        .collect()
}

/// Write `<stem>.svg` and `<stem>.png` of a histogram: log-spaced bins
/// over x (non-positive samples are left out), counts on y, one outlined
/// series per label.
pub fn histogram(stem: &Path, hist: &Histogram<'_>) -> Result<Written, PlotError> {
    const BINS: usize = 40;
    let positive = |v: &&f64| v.is_finite() && **v > 0.0;
    let (lo, hi) = hist
        .samples
        .iter()
        .flat_map(|(_, s)| s.iter().filter(positive))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return Err(PlotError::Empty("no positive samples"));
    }
    let hi = if hi <= lo { lo * 2.0 } else { hi };
    let edges = log_bins(lo, hi, BINS);
    // Per series: (log10 bin centre, count) steps.
    let counts: Vec<(&str, Vec<(f64, f64)>)> = hist
        .samples
        .iter()
        .map(|(name, s)| {
            let mut c = vec![0u64; BINS];
            for v in s.iter().filter(positive) {
                let i = edges
                    .partition_point(|e| e <= v)
                    .saturating_sub(1)
                    .min(BINS - 1);
                c[i] += 1;
            }
            let steps = (0..BINS)
                .flat_map(|i| {
                    let y = c[i] as f64;
                    [(edges[i].log10(), y), (edges[i + 1].log10(), y)]
                })
                .collect();
            (name.as_str(), steps)
        })
        .collect();
    let ymax = counts
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let xr = edges[0].log10()..edges[BINS].log10();
    macro_rules! draw {
        ($root:expr) => {{
            let root = $root;
            root.fill(&WHITE).map_err(|e| format!("{e:?}"))?;
            let mut c = ChartBuilder::on(root)
                .caption(hist.title, (FONT, 22))
                .margin(14)
                .x_label_area_size(44)
                .y_label_area_size(64)
                .build_cartesian_2d(xr.clone(), 0.0..ymax * 1.1)
                .map_err(|e| format!("{e:?}"))?;
            c.configure_mesh()
                .x_desc(hist.x_label)
                .y_desc("count")
                .x_labels(labels((xr.start, xr.end), true))
                .x_label_formatter(&|v| tick(10f64.powf(*v)))
                .y_label_formatter(&|v| tick(*v))
                .label_style((FONT, 14))
                .draw()
                .map_err(|e| format!("{e:?}"))?;
            for (i, (name, steps)) in counts.iter().enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                let style = color.stroke_width(2);
                c.draw_series(
                    AreaSeries::new(steps.iter().copied(), 0.0, color.mix(0.15))
                        .border_style(style),
                )
                .map_err(|e| format!("{e:?}"))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            }
            c.configure_series_labels()
                .label_font((FONT, 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| format!("{e:?}"))?;
            Ok(())
        }};
    }
    write_both_impl(
        stem,
        |root: &DrawingArea<SVGBackend<'_>, Shift>| draw!(root),
        |root: &DrawingArea<BitMapBackend<'_>, Shift>| draw!(root),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-plot-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn font_available() -> bool {
        match font() {
            Ok(()) => true,
            Err(e) => {
                // CI installs fonts-dejavu-core; elsewhere say why nothing ran.
                assert!(std::env::var("CI").is_err(), "CI=true but {e}");
                eprintln!("skipped: {e}");
                false
            }
        }
    }

    fn assert_files(w: &Written, title: &str) {
        let svg = std::fs::read_to_string(&w.svg).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains(title), "the SVG names its title");
        let png = std::fs::read(&w.png).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() > 1000);
    }

    #[test]
    fn line_chart_writes_svg_and_png_with_log_axes() {
        if !font_available() {
            return;
        }
        let d = tmp("line");
        let series = [
            Series {
                label: "host".into(),
                points: vec![(2.0, 10.0), (1024.0, 300.0), (2048.0, 650.0)],
            },
            Series {
                label: "mmu".into(),
                // A zero cannot be drawn on a log axis: left out, no error.
                points: vec![(2.0, 0.0), (1024.0, 40.0), (2048.0, 80.0)],
            },
        ];
        let w = line_chart(
            &d.join("protect"),
            &LineChart {
                title: "protect latency vs range",
                x_label: "range (MiB)",
                y_label: "us",
                log_x: true,
                log_y: true,
                series: &series,
            },
        )
        .unwrap();
        assert_files(&w, "protect latency vs range");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn histogram_writes_svg_and_png() {
        if !font_available() {
            return;
        }
        let d = tmp("hist");
        let samples = vec![
            (
                "host".to_string(),
                (1..500).map(|i| i as f64 * 0.7).collect(),
            ),
            ("guest".to_string(), vec![3.0; 20]),
        ];
        let w = histogram(
            &d.join("discard"),
            &Histogram {
                title: "discard",
                x_label: "us",
                samples: &samples,
            },
        )
        .unwrap();
        assert_files(&w, "discard");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn nothing_plottable_is_a_typed_error() {
        let d = tmp("empty");
        let only_zero = [Series {
            label: "x".into(),
            points: vec![(0.0, 1.0)],
        }];
        let c = LineChart {
            title: "t",
            x_label: "x",
            y_label: "y",
            log_x: true,
            log_y: false,
            series: &only_zero,
        };
        assert!(matches!(
            line_chart(&d.join("a"), &c),
            Err(PlotError::Empty(_))
        ));
        let h = Histogram {
            title: "t",
            x_label: "x",
            samples: &[("a".to_string(), vec![0.0, -1.0, f64::NAN])],
        };
        assert!(matches!(
            histogram(&d.join("b"), &h),
            Err(PlotError::Empty(_))
        ));
    }

    #[test]
    fn ticks_are_compact() {
        assert_eq!(tick(2.0), "2");
        assert_eq!(tick(1024.0), "1.02k");
        assert_eq!(tick(630.957), "631");
        assert_eq!(tick(100.0), "100");
        assert_eq!(tick(2_500_000.0), "2.5M");
        assert_eq!(tick(0.25), "0.25");
    }
}
