//! Plugin configuration: JSON → serde structs (`Raw*`, in `parse`) → a validated, compiled
//! [`Config`] (`compile`). This module is what the rest of the filter sees: the compiled types,
//! the error, and the bounds other modules rely on (names and descriptors fit in a key).
//!
//! Every error names the field (as a path such as `rules[1].window`) and the bad value, so
//! `on_configure` can log one line that tells the operator exactly what to fix.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::bounds;
use crate::rules::Rule;

mod compile;
mod parse;

/// Longest rule name, policy name or key prefix we accept (they end up in every Redis key;
/// the shim takes a prefix of at most this many bytes).
pub(crate) const MAX_NAME_LEN: usize = bounds::MAX_PREFIX_BYTES;
/// Most descriptors per rule.
pub(crate) const MAX_DESCRIPTORS: usize = 8;
/// Default sub-windows of a `sliding_window`: a client held at its limit gets at least
/// 10/11 of it (docs/algorithms.md).
pub(crate) const DEFAULT_SUBWINDOWS: u64 = 10;

/// Why a configuration was rejected. The `Display` form is the line `on_configure` logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The JSON did not parse or did not fit the schema (unknown field, wrong type, …).
    Syntax { field: String, message: String },
    /// The JSON parsed but a value is not acceptable.
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Syntax { field, message } => {
                write!(f, "invalid plugin configuration: {field}: {message}")
            }
            ConfigError::Invalid {
                field,
                value,
                reason,
            } => write!(
                f,
                "invalid plugin configuration: {field}: {reason} (got {value})"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// What to do when the shim cannot give an answer (unreachable, slow, broken reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum FailureMode {
    /// Let the request through: availability over protection.
    #[default]
    Allow,
    /// Refuse the request with `failure_response`: protection over availability.
    Deny,
    /// Keep enforcing every rule in each worker with a share of its limit
    /// (`limit ÷ local_fallback.replicas`) until the shim answers again.
    Local,
}

/// Where the filter sends its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShimTarget {
    /// Envoy cluster name (on Kong: `host:port`).
    pub(crate) upstream: String,
    pub(crate) path: String,
    /// Where concurrency slots are released: `release` beside `path` (`/v1/check` → `/v1/release`).
    pub(crate) release_path: String,
    /// Where usage is charged after responses: `charge` beside `path`.
    pub(crate) charge_path: String,
    pub(crate) authority: String,
    pub(crate) timeout: Duration,
    /// Sent as `x-tollgate-secret` on every callout when the shim requires it. Never logged.
    pub(crate) secret: Option<Secret>,
}

/// A shared secret: usable, but never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(hidden)")
    }
}

/// A local reply the filter sends (deny or fail-closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocalResponse {
    pub(crate) status: u32,
    /// `None`: the built-in `application/problem+json` body.
    pub(crate) body: Option<String>,
    pub(crate) content_type: String,
}

/// Where the client address comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum ClientIpSource {
    /// The downstream connection's peer address.
    #[default]
    Connection,
    /// `X-Forwarded-For`, trusting `trusted_hops` proxies in front of the gateway.
    XForwardedFor,
}

/// How the `client_ip` descriptor and bypass ranges see the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientIp {
    pub(crate) from: ClientIpSource,
    pub(crate) trusted_hops: u32,
    /// Clients are counted per prefix: /32 (each IPv4 host) and /64 (an IPv6 subnet, since one
    /// host usually owns a whole /64 and could rotate addresses inside it).
    pub(crate) ipv4_prefix: u8,
    pub(crate) ipv6_prefix: u8,
}

/// `leases`, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Leases {
    /// Hot keys get leases (the default); `false`: every request is checked in Redis.
    pub(crate) enabled: bool,
    /// The most units one lease asks (and so the most a gateway wastes per key and window).
    pub(crate) max_units: u64,
    /// A lease is sized to last about this long at the key's current rate.
    pub(crate) horizon_ms: u64,
}

/// The validated plugin configuration, shared by every HTTP context of a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub(crate) shim: ShimTarget,
    pub(crate) failure_mode: FailureMode,
    pub(crate) key_prefix: String,
    pub(crate) deny: LocalResponse,
    pub(crate) failure_response: LocalResponse,
    pub(crate) headers_on_allow: bool,
    /// Deny locally, without a callout, while Redis has said a key is exhausted.
    pub(crate) over_limit_cache: bool,
    /// Put the checks of requests that arrive while a callout is in flight into one callout.
    pub(crate) coalesce: bool,
    /// The most verbose lines the filter logs (`log_level`, default `info`).
    pub(crate) log_level: log::LevelFilter,
    /// With `failure_mode: "local"`: how many workers share each limit during an outage
    /// (gateway replicas × workers per replica for a strict bound).
    pub(crate) local_fallback_replicas: u64,
    /// Compute window keys on Redis's clock (learned from shim replies), not the gateway's.
    pub(crate) correct_clock_skew: bool,
    /// Leases for hot keys (`leases`; see [`crate::lease`]).
    pub(crate) leases: Leases,
    /// Moves this gateway's clock, to rehearse skew in tests and drills. 0 in production.
    pub(crate) simulated_skew_ms: i64,
    pub(crate) client_ip: ClientIp,
    pub(crate) rules: Vec<Rule>,
    /// Some rule keeps per-request state (concurrency slots, sliding-log entries), which needs
    /// a unique request id; otherwise none is made.
    pub(crate) needs_request_id: bool,
    /// Some rule charges usage after the response.
    pub(crate) has_usage_rules: bool,
}

impl Config {
    /// Parses and validates the plugin configuration bytes: the schema (`parse`), then every
    /// value (`compile`, the `TryFrom`).
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        Config::try_from(parse::parse(bytes)?)
    }
}

#[cfg(test)]
mod tests;
