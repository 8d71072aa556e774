//! What the VMM reports: the one percentile type, the boot timeline of a
//! Linux guest, and the plots the measurement subcommands draw.

pub mod percentiles;
pub mod plot;
pub mod timeline;

pub use percentiles::Percentiles;
