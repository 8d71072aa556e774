//! Guest payloads: the Linux image recipe and small built-in test guests.

pub mod linux;
