//! Outpost's registry: an OCI Distribution v1.1 registry on crash-safe local storage.
//!
//! Layers, top to bottom (data flows down, never back up): [`cli`] → [`server`] → [`api`] →
//! [`service`] → [`sync`] → [`content`] → [`storage`] ([`auth`] beside [`service`]).

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod content;
pub mod leader;
pub mod metrics;
pub mod server;
pub mod service;
pub mod storage;
pub mod sync;
pub mod tls;
