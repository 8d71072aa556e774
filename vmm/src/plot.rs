//! Plots for the measurement subcommands: SVG always, PNG when a system
//! font can be found (the bitmap backend needs one to draw text; the SVG
//! names its font and leaves drawing to the viewer).
//!
//! Two shapes, each written as `<stem>.svg` and `<stem>.png`:
//! * [`line_chart`]: one line per series over x (e.g. latency vs range
//!   size, one series per layer), optionally log-scaled.
//! * [`histogram`]: a latency histogram, one overlaid series per layer,
//!   log-spaced bins.

use std::path::{Path, PathBuf};

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
    /// `None` when no font was found to draw the PNG's text (see
    /// `png_skipped`).
    pub png: Option<PathBuf>,
    pub png_skipped: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("nothing to plot: {0}")]
    Empty(&'static str),
    #[error("drawing {path}: {reason}")]
    Draw { path: PathBuf, reason: String },
    #[error("plots are not implemented yet")]
    NotYet,
}

/// Write `<stem>.svg` and `<stem>.png` of a line chart.
pub fn line_chart(stem: &Path, chart: &LineChart<'_>) -> Result<Written, PlotError> {
    let _ = (stem, chart);
    Err(PlotError::NotYet)
}

/// Write `<stem>.svg` and `<stem>.png` of a histogram.
pub fn histogram(stem: &Path, hist: &Histogram<'_>) -> Result<Written, PlotError> {
    let _ = (stem, hist);
    Err(PlotError::NotYet)
}
