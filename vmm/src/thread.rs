//! Thread placement for the VMM's helper threads (one implementation for
//! the workspace, in `notifier::sched`).

pub use notifier::sched::pin_to_cpu;
