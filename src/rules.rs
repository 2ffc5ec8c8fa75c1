//! The core rule types: what a compiled rule says — which requests it applies to, what forms
//! the counter's identity, its algorithm and limits, what a request costs. `config` builds them
//! from the plugin's JSON; `request` builds checks from them, `decision` and `engine` read a
//! rule's name and usage.

use serde::Deserialize;

use crate::ip::Cidr;
use crate::usage::Usage;

/// What to do when a rule's descriptor has no value on a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMissing {
    /// The rule does not apply to this request.
    #[default]
    Skip,
    /// Count the request in one shared bucket for everyone without a value.
    Anonymous,
}

/// One piece of a counter's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Descriptor {
    /// A request header, by lower-case name.
    Header(String),
    /// The downstream peer's IP address (without port).
    ClientIp,
    /// The request path without its query string.
    Path,
    Method,
    /// `:authority` without the port, lower-cased.
    Host,
    /// The route name the gateway matched (Envoy `xds.route_name`, Kong `kong.route_name`).
    Route,
    /// The upstream service (Envoy `xds.cluster_name`, Kong `kong.service_name`).
    Service,
    /// A query-string parameter, by name.
    Query(String),
    /// A fixed value.
    Const(String),
}

/// Which requests a rule applies to. Every condition given must hold; an empty list means "any".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    /// The route's policy (route metadata `filter_metadata.tollgate.policy`) is one of these.
    pub policies: Vec<String>,
    /// The route name is one of these.
    pub routes: Vec<String>,
    pub path_prefix: Option<String>,
    /// Upper-case method names.
    pub methods: Vec<String>,
    /// Lower-case host names, compared without port.
    pub hosts: Vec<String>,
}

/// How a rule counts. Each has a Redis script under `lua-redis-shim/scripts/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// One counter per window; cheapest; up to 2× the limit across a window edge.
    #[default]
    FixedWindow,
    /// `subwindows` counters per window, the oldest counted whole: never more than the limit in
    /// any window length; a client held at its limit gets at least n/(n+1) of it.
    SlidingWindow,
    /// Two weighted fixed windows: the cheapest sliding estimate, but up to 2 × limit − 1 in a
    /// window length when traffic packs at the end of a window (docs/algorithms.md).
    SlidingWindowEstimate,
    /// A sorted set of timestamps: exact, memory grows with the limit.
    SlidingLog,
    /// Tokens refilled continuously up to a burst capacity.
    TokenBucket,
    /// Generic cell rate algorithm: one timestamp per key, exact retry-after.
    Gcra,
    /// At most N requests in flight per key.
    Concurrency,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::SlidingWindowEstimate => "sliding_window_estimate",
            Algorithm::SlidingLog => "sliding_log",
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::Gcra => "gcra",
            Algorithm::Concurrency => "concurrency",
        }
    }
}

/// One limit of a rule, in the shape its algorithm needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `limit` per `window_ms` (fixed window, the sliding windows, sliding log).
    Window { limit: u64, window_ms: u64 },
    /// Up to `burst` at once, refilled at `rate` per `period_ms` (token bucket, GCRA).
    Rate {
        burst: u64,
        rate: u64,
        period_ms: u64,
    },
    /// At most `limit` in flight; a slot not released within `timeout_ms` frees itself.
    InFlight { limit: u64, timeout_ms: u64 },
}

/// How much a request consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cost {
    Fixed(u64),
    /// Read from a request header; absent or not a whole number → `default`; capped at `max`.
    Header {
        name: String,
        default: u64,
        max: u64,
    },
}

/// Limits that depend on a descriptor's value, e.g. `x-plan: free | pro | enterprise`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiers {
    pub descriptor: Descriptor,
    pub values: Vec<(String, Vec<Limit>)>,
}

/// Requests a rule never applies to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bypass {
    /// A request whose descriptor has one of these values is exempt.
    pub values: Vec<(Descriptor, Vec<String>)>,
    /// A client whose address is in one of these ranges is exempt.
    pub cidrs: Vec<Cidr>,
}

/// A compiled rate-limit rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub matcher: Matcher,
    pub descriptors: Vec<Descriptor>,
    pub on_missing: OnMissing,
    pub algorithm: Algorithm,
    /// Sub-windows per window (`sliding_window` only; [`crate::config::DEFAULT_SUBWINDOWS`] otherwise).
    pub subwindows: u64,
    /// The limits checked (all of them, in one callout); with `tiers`, the default tier's.
    pub limits: Vec<Limit>,
    pub tiers: Option<Tiers>,
    pub cost: Cost,
    /// The real cost comes from the response and is charged when it ends (`cost` is then the
    /// reserve charged at request time).
    pub usage: Option<Usage>,
    /// Count and report, never deny.
    pub shadow: bool,
    pub bypass: Bypass,
}
