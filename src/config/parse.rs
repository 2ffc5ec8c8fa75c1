//! Phase 1: the JSON schema. Serde structs (`Raw*`) with `deny_unknown_fields` and explicit
//! defaults; a document that does not fit them is refused with the path of the field
//! (`rules[1].window`) and serde's message. Values are checked in the second phase (`compile`).

use serde::Deserialize;

use super::{ClientIpSource, ConfigError, FailureMode};
use crate::rules::{Algorithm, OnMissing};

/// Reads the JSON document into the schema: the whole input, nothing after it.
pub(super) fn parse(bytes: &[u8]) -> Result<RawConfig, ConfigError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let raw: RawConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::Syntax {
            field: if path == "." {
                "(top level)".to_string()
            } else {
                path
            },
            message: e.into_inner().to_string(),
        }
    })?;
    de.end().map_err(|e| ConfigError::Syntax {
        field: "(top level)".to_string(),
        message: e.to_string(),
    })?;
    Ok(raw)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) shim: RawShim,
    #[serde(default)]
    pub(super) failure_mode: FailureMode,
    #[serde(default = "default_key_prefix")]
    pub(super) key_prefix: String,
    #[serde(default)]
    pub(super) deny: RawResponse,
    #[serde(default = "default_failure_response")]
    pub(super) failure_response: RawResponse,
    #[serde(default = "default_true")]
    pub(super) headers_on_allow: bool,
    #[serde(default = "default_true")]
    pub(super) over_limit_cache: bool,
    #[serde(default = "default_true")]
    pub(super) coalesce: bool,
    #[serde(default)]
    pub(super) log_level: LogLevel,
    #[serde(default)]
    pub(super) local_fallback: Option<RawLocalFallback>,
    #[serde(default)]
    pub(super) clock: RawClock,
    #[serde(default)]
    pub(super) client_ip: RawClientIp,
    #[serde(default)]
    pub(super) leases: RawLeases,
    pub(super) rules: Vec<RawRule>,
}

/// `leases`: how hot keys are spent locally (see `crate::lease`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLeases {
    #[serde(default = "default_true")]
    pub(super) enabled: bool,
    #[serde(default = "default_lease_max_units")]
    pub(super) max_units: u64,
    #[serde(default = "default_lease_horizon_ms")]
    pub(super) horizon_ms: u64,
}

impl Default for RawLeases {
    fn default() -> Self {
        RawLeases {
            enabled: true,
            max_units: default_lease_max_units(),
            horizon_ms: default_lease_horizon_ms(),
        }
    }
}

fn default_lease_max_units() -> u64 {
    1000
}
fn default_lease_horizon_ms() -> u64 {
    100
}

/// The filter's own log level. The filter does not ask the host for its level: Envoy's
/// `proxy_get_log_level` is typed differently on Kong (ngx_wasm_module), and importing it at
/// all stops the module from loading there.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(level: LogLevel) -> log::LevelFilter {
        match level {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClock {
    #[serde(default = "default_true")]
    pub(super) correct_skew: bool,
    #[serde(default)]
    pub(super) simulated_skew_ms: i64,
}

impl Default for RawClock {
    fn default() -> Self {
        RawClock {
            correct_skew: true,
            simulated_skew_ms: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLocalFallback {
    pub(super) replicas: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClientIp {
    #[serde(default)]
    pub(super) from: ClientIpSource,
    #[serde(default)]
    pub(super) trusted_hops: Option<u32>,
    #[serde(default)]
    pub(super) ipv4_prefix: Option<u8>,
    #[serde(default)]
    pub(super) ipv6_prefix: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShim {
    pub(super) upstream: String,
    #[serde(default = "default_shim_path")]
    pub(super) path: String,
    #[serde(default = "default_shim_authority")]
    pub(super) authority: String,
    #[serde(default = "default_timeout")]
    pub(super) timeout: String,
    #[serde(default)]
    pub(super) secret: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResponse {
    pub(super) status: u32,
    #[serde(default)]
    pub(super) body: Option<String>,
    #[serde(default)]
    pub(super) content_type: Option<String>,
}

impl Default for RawResponse {
    fn default() -> Self {
        RawResponse {
            status: 429,
            body: None,
            content_type: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) name: String,
    #[serde(default, rename = "match")]
    pub(super) matcher: RawMatch,
    #[serde(default)]
    pub(super) descriptors: Vec<String>,
    #[serde(default)]
    pub(super) on_missing: OnMissing,
    #[serde(default)]
    pub(super) algorithm: Algorithm,
    /// Sub-windows of a `sliding_window` rule (each of its windows is split in that many).
    #[serde(default)]
    pub(super) subwindows: Option<u64>,
    // The one-limit shorthand: these fields, or `limits`, not both.
    #[serde(default)]
    pub(super) limit: Option<u64>,
    #[serde(default)]
    pub(super) window: Option<String>,
    #[serde(default)]
    pub(super) burst: Option<u64>,
    #[serde(default)]
    pub(super) rate: Option<u64>,
    #[serde(default)]
    pub(super) period: Option<String>,
    #[serde(default)]
    pub(super) timeout: Option<String>,
    #[serde(default)]
    pub(super) limits: Option<Vec<RawLimit>>,
    #[serde(default)]
    pub(super) tiers: Option<RawTiers>,
    #[serde(default)]
    pub(super) cost: Option<RawCost>,
    #[serde(default)]
    pub(super) usage: Option<RawUsage>,
    #[serde(default)]
    pub(super) shadow: bool,
    #[serde(default)]
    pub(super) bypass: Option<RawBypass>,
}

/// A cost read from the response (see `usage`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUsage {
    pub(super) from: String,
    #[serde(default = "default_reserve")]
    pub(super) reserve: u64,
    #[serde(default)]
    pub(super) unit: Option<String>,
}

fn default_reserve() -> u64 {
    1
}

/// One limit; which fields it needs depends on the rule's algorithm.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimit {
    #[serde(default)]
    pub(super) limit: Option<u64>,
    #[serde(default)]
    pub(super) window: Option<String>,
    #[serde(default)]
    pub(super) burst: Option<u64>,
    #[serde(default)]
    pub(super) rate: Option<u64>,
    #[serde(default)]
    pub(super) period: Option<String>,
    #[serde(default)]
    pub(super) timeout: Option<String>,
}

impl RawLimit {
    pub(super) fn is_empty(&self) -> bool {
        self.limit.is_none()
            && self.window.is_none()
            && self.burst.is_none()
            && self.rate.is_none()
            && self.period.is_none()
            && self.timeout.is_none()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTiers {
    pub(super) descriptor: String,
    pub(super) values: std::collections::BTreeMap<String, Vec<RawLimit>>,
    pub(super) default: Vec<RawLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawCost {
    Fixed(u64),
    Header(RawHeaderCost),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeaderCost {
    pub(super) header: String,
    #[serde(default = "default_one")]
    pub(super) default: u64,
    pub(super) max: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBypass {
    #[serde(default)]
    pub(super) values: std::collections::BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub(super) cidrs: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatch {
    #[serde(default)]
    pub(super) policies: Vec<String>,
    #[serde(default)]
    pub(super) routes: Vec<String>,
    #[serde(default)]
    pub(super) path_prefix: Option<String>,
    #[serde(default)]
    pub(super) methods: Vec<String>,
    #[serde(default)]
    pub(super) hosts: Vec<String>,
}

fn default_key_prefix() -> String {
    "tollgate".to_string()
}
fn default_shim_path() -> String {
    "/v1/check".to_string()
}
fn default_shim_authority() -> String {
    "tollgate-shim".to_string()
}
fn default_timeout() -> String {
    "50ms".to_string()
}
fn default_true() -> bool {
    true
}
fn default_one() -> u64 {
    1
}
fn default_failure_response() -> RawResponse {
    RawResponse {
        status: 503,
        body: None,
        content_type: None,
    }
}
