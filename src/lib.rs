//! Tollgate: distributed rate limiting for API gateways.
//!
//! The pure logic (config, matching, keys, wire format, decisions) is plain Rust tested on the
//! host; only [`filter`] and [`host`] touch proxy-wasm.

pub mod algorithms;
pub mod batch;
pub mod cache;
pub mod clock;
pub mod config;
pub mod decision;
pub mod duration;
pub mod ip;
pub mod keys;
pub mod local;
pub mod metrics;
pub mod properties;
pub mod request;
pub mod throttle;
pub mod wire;

#[cfg(target_arch = "wasm32")]
mod filter;
#[cfg(target_arch = "wasm32")]
mod host;
