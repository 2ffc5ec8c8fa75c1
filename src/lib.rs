//! Tollgate: distributed rate limiting for API gateways.
//!
//! The pure logic (config, matching, keys, wire format, decisions, and the request lifecycle
//! in [`engine`]) is plain Rust tested on the host; only `filter` and `wasm_host` touch
//! proxy-wasm, and they only forward to [`engine`] through the [`host::Host`] seam.

pub mod algorithms;
pub mod batch;
pub mod bounds;
pub mod cache;
pub mod clock;
pub mod config;
pub mod decision;
pub mod duration;
pub mod engine;
pub mod host;
pub mod ip;
pub mod keys;
pub mod local;
pub mod metrics;
pub mod properties;
pub mod request;
pub mod throttle;
pub mod usage;
pub mod wire;

#[cfg(target_arch = "wasm32")]
mod filter;
#[cfg(target_arch = "wasm32")]
mod wasm_host;
