//! Tollgate: distributed rate limiting for API gateways.
//!
//! The pure logic (config, matching, keys, wire format, decisions, and the request lifecycle
//! in `engine`) is plain Rust tested on the host; only `filter` and `wasm_host` touch
//! proxy-wasm, and they only forward to `engine` through the `host::Host` seam. Modules are
//! crate-private unless the fuzz targets (`fuzz/`) need them, and in those only what the
//! targets use is `pub`, so the compiler points at dead code — on the `wasm32` build, where
//! the filter is the entry point (`make lint` runs clippy there with warnings denied); on the
//! host only tests drive the engine.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

pub(crate) mod algorithms;
pub(crate) mod batch;
pub(crate) mod bounds;
pub mod cache;
pub(crate) mod check;
pub(crate) mod clock;
pub mod config;
pub mod decision;
pub(crate) mod duration;
pub(crate) mod engine;
pub(crate) mod host;
pub(crate) mod ip;
pub mod keys;
pub(crate) mod lease;
pub(crate) mod local;
pub(crate) mod metrics;
pub(crate) mod properties;
pub mod request;
pub(crate) mod rules;
pub(crate) mod throttle;
pub(crate) mod usage;
pub(crate) mod wire;

#[cfg(target_arch = "wasm32")]
mod filter;
#[cfg(target_arch = "wasm32")]
mod wasm_host;
