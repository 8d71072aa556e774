//! Guest payloads: the Linux image recipe and small built-in test guests.

pub mod builtin;
pub mod host;
pub mod l1hv;
pub mod l1svm;
pub mod linux;
pub mod probe;
