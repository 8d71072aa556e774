//! One module per subcommand: its arguments, its run, its report. A
//! command composes the library below it (machines, memory, host sources,
//! the MMU) and never reaches into another command.

pub mod bench;
pub mod boot;
pub mod host;
pub mod latency;
pub mod nested_run;
pub mod notifier_check;
pub mod run;
pub mod soak;
pub mod soft_lockup;
