//! What the VMM reports: the one percentile type, the boot timeline of a
//! Linux guest, the plots the measurement subcommands draw, and the fit
//! that says whether a stretch grows with the range.

pub mod fit;
pub mod percentiles;
pub mod plot;
pub mod progress;
pub mod timeline;

pub use percentiles::Percentiles;
pub use progress::progress_bar;
