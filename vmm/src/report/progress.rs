//! The progress bar of long measurement runs: drawn on stderr when it is a
//! terminal, hidden otherwise (CI logs) or when `VMM_PROGRESS=0` (the
//! emulated host's `/init` sets it: its console is a terminal whose output
//! the outer `vmm host` streams as a log).

use std::io::IsTerminal;

/// A bar of `total` steps.
pub fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let off = std::env::var_os("VMM_PROGRESS").is_some_and(|v| v == "0");
    if std::io::stderr().is_terminal() && !off {
        let pb = indicatif::ProgressBar::new(total);
        if let Ok(st) = indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} {msg}",
        ) {
            pb.set_style(st.progress_chars("=> "));
        }
        pb
    } else {
        indicatif::ProgressBar::hidden()
    }
}
