//! Atomics used by the lock-free parts of this crate, swapped for loom's
//! under `--cfg loom` so the same code is model-checked (see
//! `tests/loom_seq.rs`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
