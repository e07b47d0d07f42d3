//! The registry's rules, between the HTTP edge and storage.

pub mod fsck;
pub mod gc;
pub mod pull_through;
pub mod retention;
pub mod staging;
pub mod usage;
