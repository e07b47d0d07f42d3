//! Synchronisation with the parent registry. So far: the connection string that names the
//! parent (the transfer, schedule and state arrive with the sync issue).

pub mod connection;
