//! Host side of the secondary MMU: every way a host page-table invalidation of
//! guest RAM becomes visible to this process, turned into one stream of
//! `invalidate_range_start` / `invalidate_range_end` for the project's MMUs.
//!
//! Data flows one way: host event -> a source in this crate -> a
//! [`subscriber::InvalidationSubscriber`] (implemented by `mmu`). Nothing in
//! this crate knows about SPTEs.

pub mod seq;
pub mod subscriber;
mod sync;

pub use seq::{InvalidationSeq, SeqSnapshot};
pub use subscriber::{
    Delivery, HvaRange, Invalidation, InvalidationSubscriber, MmuNotifyEvent, Subscribers,
};
