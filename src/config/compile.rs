//! Phase 2: the schema's values checked and turned into the [`Config`] the filter runs on —
//! every bound (most from [`crate::bounds`], the limits the shim enforces too), names fit for
//! Redis keys, descriptors, rules and their limits. Every error names the field and the value.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use super::parse::{
    RawBypass, RawClientIp, RawConfig, RawCost, RawLeases, RawLimit, RawLocalFallback, RawMatch,
    RawResponse, RawRule, RawShim, RawTiers, RawUsage,
};
use super::{
    ClientIp, ClientIpSource, Config, ConfigError, FailureMode, Leases, LocalResponse, Secret,
    ShimTarget, DEFAULT_SUBWINDOWS, MAX_DESCRIPTORS, MAX_NAME_LEN,
};
use crate::bounds;
use crate::duration::parse_duration;
use crate::ip::Cidr;
use crate::rules::{Algorithm, Bypass, Cost, Descriptor, Limit, Matcher, Rule, Tiers};
use crate::usage::{self, Usage};

/// Most rules per configuration: each makes at least one check, and the shim takes at most
/// [`bounds::MAX_CHECKS`] per request (their limits together are bounded too).
const MAX_RULES: usize = bounds::MAX_CHECKS;
/// Most limits per rule (per tier with `tiers`).
const MAX_LIMITS_PER_RULE: usize = 4;
// The wire bounds this module keeps (docs/wire-format.md).
const MAX_LIMIT: u64 = bounds::MAX_LIMIT;
const MIN_WINDOW: Duration = Duration::from_millis(bounds::MIN_WINDOW_MS);
const MAX_WINDOW: Duration = Duration::from_millis(bounds::MAX_MS);
const MIN_SLOT_TIMEOUT: Duration = Duration::from_millis(bounds::MIN_SLOT_TTL_MS);
const MAX_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_LOG_LIMIT: u64 = bounds::MAX_LOG_LIMIT;
const MAX_RATE: u64 = bounds::MAX_RATE;
const MAX_COST: u64 = bounds::MAX_COST;
/// Default lifetime of an unreleased concurrency slot.
const DEFAULT_SLOT_TIMEOUT_MS: u64 = 60_000;

fn invalid(field: impl Into<String>, value: impl fmt::Display, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, Self::Error> {
        let shim = compile_shim(raw.shim)?;
        check_name("key_prefix", &raw.key_prefix)?;
        let deny = compile_response("deny", raw.deny)?;
        let failure_response = compile_response("failure_response", raw.failure_response)?;

        if raw.rules.is_empty() {
            return Err(invalid("rules", "[]", "at least one rule is required"));
        }
        if raw.rules.len() > MAX_RULES {
            return Err(invalid(
                "rules",
                format!("{} rules", raw.rules.len()),
                &format!("at most {MAX_RULES} rules are allowed"),
            ));
        }
        let mut names = HashSet::new();
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, raw_rule) in raw.rules.into_iter().enumerate() {
            let rule = compile_rule(i, raw_rule)?;
            if !names.insert(rule.name.clone()) {
                return Err(invalid(
                    format!("rules[{i}].name"),
                    format!("{:?}", rule.name),
                    "rule names must be unique",
                ));
            }
            rules.push(rule);
        }
        check_checks_per_request(&rules)?;

        let needs_request_id = rules
            .iter()
            .any(|r| matches!(r.algorithm, Algorithm::Concurrency | Algorithm::SlidingLog));
        let has_usage_rules = rules.iter().any(|r| r.usage.is_some());
        Ok(Config {
            needs_request_id,
            has_usage_rules,
            shim,
            failure_mode: raw.failure_mode,
            key_prefix: raw.key_prefix,
            deny,
            failure_response,
            headers_on_allow: raw.headers_on_allow,
            over_limit_cache: raw.over_limit_cache,
            coalesce: raw.coalesce,
            log_level: raw.log_level.into(),
            local_fallback_replicas: compile_local_fallback(raw.failure_mode, raw.local_fallback)?,
            correct_clock_skew: raw.clock.correct_skew,
            leases: compile_leases(raw.leases)?,
            simulated_skew_ms: compile_simulated_skew(raw.clock.simulated_skew_ms)?,
            client_ip: compile_client_ip(raw.client_ip)?,
            rules,
        })
    }
}

/// The most checks one request can carry: every rule may match it, each with its longest list
/// of limits (a tier's or the default). The shim refuses a request of more than
/// [`bounds::MAX_CHECKS`], so such a configuration would silently fail every request it
/// matches; it is refused here instead.
fn check_checks_per_request(rules: &[Rule]) -> Result<(), ConfigError> {
    let most = |r: &Rule| {
        let tiers = r.tiers.iter().flat_map(|t| &t.values);
        tiers.map(|(_, l)| l.len()).fold(r.limits.len(), usize::max)
    };
    let total: usize = rules.iter().map(most).sum();
    if total > bounds::MAX_CHECKS {
        return Err(invalid(
            "rules",
            format!("{} rules, {total} limits", rules.len()),
            &format!(
                "a request can match {} rules with up to {total} limits in all; the shim takes \
                 at most {} checks per request",
                rules.len(),
                bounds::MAX_CHECKS
            ),
        ));
    }
    Ok(())
}

fn compile_shim(raw: RawShim) -> Result<ShimTarget, ConfigError> {
    if raw.upstream.trim().is_empty() {
        return Err(invalid(
            "shim.upstream",
            "\"\"",
            "must name the shim's Envoy cluster (or host:port on Kong)",
        ));
    }
    if !raw.path.starts_with('/') || raw.path.chars().any(|c| c.is_whitespace()) {
        return Err(invalid(
            "shim.path",
            format!("{:?}", raw.path),
            "must be an absolute path without spaces",
        ));
    }
    if raw.authority.is_empty() || raw.authority.chars().any(|c| c.is_whitespace()) {
        return Err(invalid(
            "shim.authority",
            format!("{:?}", raw.authority),
            "must be a non-empty host name",
        ));
    }
    let timeout = parse_duration(&raw.timeout)
        .map_err(|reason| invalid("shim.timeout", format!("{:?}", raw.timeout), reason))?;
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        return Err(invalid(
            "shim.timeout",
            format!("{:?}", raw.timeout),
            "must be between 1ms and 60s",
        ));
    }
    if let Some(secret) = &raw.secret {
        // The value itself is never echoed: config errors end up in logs.
        let printable = secret.bytes().all(|b| (0x21..=0x7e).contains(&b));
        if secret.is_empty() || secret.len() > bounds::MAX_SECRET_BYTES || !printable {
            return Err(invalid(
                "shim.secret",
                "(hidden)",
                &format!(
                    "must be 1 to {} printable ASCII characters without spaces",
                    bounds::MAX_SECRET_BYTES
                ),
            ));
        }
    }
    let dir = raw.path.rsplit_once('/').map_or("", |(dir, _)| dir);
    let release_path = format!("{dir}/release");
    let charge_path = format!("{dir}/charge");
    Ok(ShimTarget {
        upstream: raw.upstream,
        release_path,
        charge_path,
        path: raw.path,
        secret: raw.secret.map(Secret),
        authority: raw.authority,
        timeout,
    })
}

fn compile_response(field: &str, raw: RawResponse) -> Result<LocalResponse, ConfigError> {
    if !(400..=599).contains(&raw.status) {
        return Err(invalid(
            format!("{field}.status"),
            raw.status,
            "must be an HTTP error status (400..599)",
        ));
    }
    let content_type = match (&raw.body, raw.content_type) {
        (_, Some(ct)) if ct.trim().is_empty() || ct.contains(['\r', '\n']) => {
            return Err(invalid(
                format!("{field}.content_type"),
                format!("{ct:?}"),
                "must be a media type such as text/plain",
            ));
        }
        (_, Some(ct)) => ct,
        (Some(_), None) => "text/plain; charset=utf-8".to_string(),
        (None, None) => "application/problem+json".to_string(),
    };
    Ok(LocalResponse {
        status: raw.status,
        body: raw.body,
        content_type,
    })
}

fn compile_rule(i: usize, raw: RawRule) -> Result<Rule, ConfigError> {
    let at = |field: &str| format!("rules[{i}].{field}");
    check_name(&at("name"), &raw.name)?;

    if raw.descriptors.len() > MAX_DESCRIPTORS {
        return Err(invalid(
            at("descriptors"),
            format!("{} descriptors", raw.descriptors.len()),
            &format!("at most {MAX_DESCRIPTORS} descriptors are allowed"),
        ));
    }
    let descriptors = raw
        .descriptors
        .iter()
        .enumerate()
        .map(|(j, d)| {
            parse_descriptor(d)
                .map_err(|r| invalid(at(&format!("descriptors[{j}]")), format!("{d:?}"), r))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let shorthand = RawLimit {
        limit: raw.limit,
        window: raw.window,
        burst: raw.burst,
        rate: raw.rate,
        period: raw.period,
        timeout: raw.timeout,
    };
    let algorithm = raw.algorithm;
    let (limits, tiers) = compile_rule_limits(&at, algorithm, shorthand, raw.limits, raw.tiers)?;
    let usage = compile_usage(&at, algorithm, raw.cost.is_some(), raw.usage)?;
    let cost = match &usage {
        Some(u) => Cost::Fixed(u.reserve),
        None => compile_cost(&at, algorithm, raw.cost)?,
    };
    let subwindows = compile_subwindows(&at, algorithm, raw.subwindows, &limits, &tiers)?;
    Ok(Rule {
        name: raw.name,
        matcher: compile_match(&at("match"), raw.matcher)?,
        descriptors,
        on_missing: raw.on_missing,
        algorithm,
        subwindows,
        limits,
        tiers,
        cost,
        usage,
        shadow: raw.shadow,
        bypass: compile_bypass(&at, raw.bypass)?,
    })
}

/// A rule's limits come from exactly one of: the one-limit fields, `limits`, or `tiers`
/// (whose `default` then plays the part of `limits`).
fn compile_rule_limits(
    at: &dyn Fn(&str) -> String,
    algorithm: Algorithm,
    shorthand: RawLimit,
    limits: Option<Vec<RawLimit>>,
    tiers: Option<RawTiers>,
) -> Result<(Vec<Limit>, Option<Tiers>), ConfigError> {
    let given = [!shorthand.is_empty(), limits.is_some(), tiers.is_some()];
    if given.iter().filter(|&&g| g).count() > 1 {
        return Err(invalid(
            at("limits"),
            "more than one of them",
            "give one of: the one-limit fields (limit, window, burst, rate, period, timeout), `limits`, or `tiers`",
        ));
    }
    if let Some(list) = limits {
        return Ok((compile_limits(&at("limits"), algorithm, &list)?, None));
    }
    let Some(t) = tiers else {
        return Ok((vec![compile_limit(&at(""), algorithm, &shorthand)?], None));
    };
    let descriptor = parse_descriptor(&t.descriptor)
        .map_err(|r| invalid(at("tiers.descriptor"), format!("{:?}", t.descriptor), r))?;
    let mut values = Vec::with_capacity(t.values.len());
    for (name, list) in &t.values {
        let field = at(&format!("tiers.values.{name}"));
        values.push((name.clone(), compile_limits(&field, algorithm, list)?));
    }
    let default = compile_limits(&at("tiers.default"), algorithm, &t.default)?;
    Ok((default, Some(Tiers { descriptor, values })))
}

/// A usage rule: fixed_window or sliding_window_estimate (a charge after the response adds to
/// a counter), and its request-time cost is the reserve, not `cost`.
fn compile_usage(
    at: &dyn Fn(&str) -> String,
    algorithm: Algorithm,
    has_cost: bool,
    raw: Option<RawUsage>,
) -> Result<Option<Usage>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let source =
        usage::Source::parse(&raw.from).map_err(|r| invalid(at("usage.from"), &raw.from, &r))?;
    // The charge after the response adds to one counter: a fixed window's, or the estimate's
    // current window (the bounded sliding window keeps a hash of sub-windows instead).
    if !matches!(
        algorithm,
        Algorithm::FixedWindow | Algorithm::SlidingWindowEstimate
    ) {
        return Err(invalid(
            at("usage"),
            algorithm.name(),
            "usage is charged to a window counter: use algorithm fixed_window or sliding_window_estimate",
        ));
    }
    if has_cost {
        return Err(invalid(
            at("cost"),
            "given with usage",
            "a usage rule's request-time cost is usage.reserve",
        ));
    }
    if raw.reserve > MAX_COST {
        return Err(invalid(
            at("usage.reserve"),
            raw.reserve,
            "must be between 0 and 10^9",
        ));
    }
    let unit = raw
        .unit
        .unwrap_or_else(|| source.default_unit().to_string());
    if unit.is_empty()
        || unit.len() > 32
        || !unit
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid(
            at("usage.unit"),
            &unit,
            "must match [A-Za-z0-9_-]{1,32}",
        ));
    }
    Ok(Some(Usage {
        source,
        reserve: raw.reserve,
        unit,
    }))
}

/// A `sliding_window` rule's sub-windows: 1..=MAX_SUBWINDOWS, dividing every window of the rule
/// (the shim splits a window into whole milliseconds).
fn compile_subwindows(
    at: &dyn Fn(&str) -> String,
    algorithm: Algorithm,
    raw: Option<u64>,
    limits: &[Limit],
    tiers: &Option<Tiers>,
) -> Result<u64, ConfigError> {
    if algorithm != Algorithm::SlidingWindow {
        return match raw {
            Some(n) => Err(invalid(
                at("subwindows"),
                n,
                &format!("is not used by algorithm {}", algorithm.name()),
            )),
            None => Ok(DEFAULT_SUBWINDOWS),
        };
    }
    let n = raw.unwrap_or(DEFAULT_SUBWINDOWS);
    if n == 0 || n > bounds::MAX_SUBWINDOWS {
        return Err(invalid(
            at("subwindows"),
            n,
            &format!("must be between 1 and {}", bounds::MAX_SUBWINDOWS),
        ));
    }
    let tiered = tiers
        .iter()
        .flat_map(|t| t.values.iter().flat_map(|v| &v.1));
    for limit in limits.iter().chain(tiered) {
        if let Limit::Window { window_ms, .. } = limit {
            if window_ms % n != 0 {
                return Err(invalid(
                    at("subwindows"),
                    n,
                    &format!("must divide every window in ms (not {window_ms})"),
                ));
            }
        }
    }
    Ok(n)
}

fn compile_cost(
    at: &dyn Fn(&str) -> String,
    algorithm: Algorithm,
    raw: Option<RawCost>,
) -> Result<Cost, ConfigError> {
    let cost = match raw {
        None => Cost::Fixed(1),
        Some(RawCost::Fixed(n)) if n > MAX_COST => {
            return Err(invalid(at("cost"), n, "must be between 0 and 10^9"))
        }
        Some(RawCost::Fixed(n)) => Cost::Fixed(n),
        Some(RawCost::Header(h)) => {
            if !is_token(&h.header) {
                return Err(invalid(
                    at("cost.header"),
                    format!("{:?}", h.header),
                    "must be a header name",
                ));
            }
            if h.max == 0 || h.max > MAX_COST {
                return Err(invalid(at("cost.max"), h.max, "must be between 1 and 10^9"));
            }
            if h.default > h.max {
                return Err(invalid(
                    at("cost.default"),
                    h.default,
                    "must not exceed cost.max",
                ));
            }
            Cost::Header {
                name: h.header.to_ascii_lowercase(),
                default: h.default,
                max: h.max,
            }
        }
    };
    if algorithm == Algorithm::Concurrency && cost != Cost::Fixed(1) {
        return Err(invalid(
            at("cost"),
            format!("{cost:?}"),
            "a concurrency rule counts requests in flight: its cost is always 1",
        ));
    }
    Ok(cost)
}

fn compile_bypass(
    at: &dyn Fn(&str) -> String,
    raw: Option<RawBypass>,
) -> Result<Bypass, ConfigError> {
    let Some(b) = raw else {
        return Ok(Bypass::default());
    };
    let mut values = Vec::with_capacity(b.values.len());
    for (spec, list) in b.values {
        let d = parse_descriptor(&spec)
            .map_err(|r| invalid(at(&format!("bypass.values.{spec}")), format!("{spec:?}"), r))?;
        values.push((d, list));
    }
    let cidrs = b
        .cidrs
        .iter()
        .enumerate()
        .map(|(j, c)| {
            Cidr::parse(c)
                .map_err(|r| invalid(at(&format!("bypass.cidrs[{j}]")), format!("{c:?}"), r))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Bypass { values, cidrs })
}

fn compile_limits(
    at: &str,
    algorithm: Algorithm,
    list: &[RawLimit],
) -> Result<Vec<Limit>, ConfigError> {
    if list.is_empty() || list.len() > MAX_LIMITS_PER_RULE {
        return Err(invalid(
            at,
            format!("{} limits", list.len()),
            &format!("give 1 to {MAX_LIMITS_PER_RULE} limits"),
        ));
    }
    if algorithm == Algorithm::Concurrency && list.len() > 1 {
        return Err(invalid(
            at,
            format!("{} limits", list.len()),
            "a concurrency rule has one limit",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(j, raw)| compile_limit(&format!("{at}[{j}]."), algorithm, raw))
        .collect()
}

/// Compiles one limit; `at` ends with `.` (or is `rules[i].`) so fields append to it.
fn compile_limit(at: &str, algorithm: Algorithm, raw: &RawLimit) -> Result<Limit, ConfigError> {
    let field = |name: &str| format!("{at}{name}");
    let forbid = |name: &str, present: bool| -> Result<(), ConfigError> {
        if present {
            Err(invalid(
                field(name),
                "a value",
                &format!("is not used by algorithm {}", algorithm.name()),
            ))
        } else {
            Ok(())
        }
    };
    let require_u64 = |name: &str, v: Option<u64>, max: u64| -> Result<u64, ConfigError> {
        match v {
            None => Err(invalid(
                field(name),
                "nothing",
                &format!("is required by algorithm {}", algorithm.name()),
            )),
            Some(n) if n == 0 || n > max => Err(invalid(
                field(name),
                n,
                &format!("must be between 1 and {max}"),
            )),
            Some(n) => Ok(n),
        }
    };
    let duration = |name: &str,
                    v: &Option<String>,
                    min: Duration,
                    max: Duration,
                    what: &str|
     -> Result<Option<u64>, ConfigError> {
        let Some(text) = v else { return Ok(None) };
        let d = parse_duration(text).map_err(|r| invalid(field(name), format!("{text:?}"), r))?;
        if d < min || d > max {
            return Err(invalid(field(name), format!("{text:?}"), what));
        }
        Ok(Some(d.as_millis() as u64))
    };
    match algorithm {
        Algorithm::FixedWindow
        | Algorithm::SlidingWindow
        | Algorithm::SlidingWindowEstimate
        | Algorithm::SlidingLog => {
            forbid("burst", raw.burst.is_some())?;
            forbid("rate", raw.rate.is_some())?;
            forbid("period", raw.period.is_some())?;
            forbid("timeout", raw.timeout.is_some())?;
            let max = if algorithm == Algorithm::SlidingLog {
                MAX_LOG_LIMIT
            } else {
                MAX_LIMIT
            };
            let limit = require_u64("limit", raw.limit, max)?;
            let window_ms = duration(
                "window",
                &raw.window,
                MIN_WINDOW,
                MAX_WINDOW,
                "must be between 1s and 1d",
            )?
            .ok_or_else(|| {
                invalid(
                    field("window"),
                    "nothing",
                    &format!("is required by algorithm {}", algorithm.name()),
                )
            })?;
            if window_ms % 1000 != 0 {
                return Err(invalid(
                    field("window"),
                    format!("{:?}", raw.window.as_deref().unwrap_or("")),
                    "must be a whole number of seconds",
                ));
            }
            Ok(Limit::Window { limit, window_ms })
        }
        Algorithm::TokenBucket | Algorithm::Gcra => {
            forbid("limit", raw.limit.is_some())?;
            forbid("window", raw.window.is_some())?;
            forbid("timeout", raw.timeout.is_some())?;
            let burst = require_u64("burst", raw.burst, MAX_LIMIT)?;
            let rate = require_u64("rate", raw.rate, MAX_RATE)?;
            let period_ms = duration(
                "period",
                &raw.period,
                Duration::from_millis(1),
                MAX_WINDOW,
                "must be between 1ms and 1d",
            )?
            .ok_or_else(|| {
                invalid(
                    field("period"),
                    "nothing",
                    &format!("is required by algorithm {}", algorithm.name()),
                )
            })?;
            // GCRA's emission interval is period_ms × 1000 / rate µs (scripts/gcra.lua): 0
            // when faster, which admits everything, so the shim refuses such a GCRA check. A
            // token bucket has no such zero (it counts milli-tokens per ms) but keeps the same
            // bound, as it always has: the two algorithms share their fields.
            let most = period_ms * bounds::MAX_RATE_PER_PERIOD_MS;
            if rate > most {
                return Err(invalid(
                    field("rate"),
                    rate,
                    &format!(
                        "is more than one per microsecond of period: at most {most} for a \
                         period of {period_ms} ms"
                    ),
                ));
            }
            Ok(Limit::Rate {
                burst,
                rate,
                period_ms,
            })
        }
        Algorithm::Concurrency => {
            forbid("window", raw.window.is_some())?;
            forbid("burst", raw.burst.is_some())?;
            forbid("rate", raw.rate.is_some())?;
            forbid("period", raw.period.is_some())?;
            let limit = require_u64("limit", raw.limit, MAX_LIMIT)?;
            let timeout_ms = duration(
                "timeout",
                &raw.timeout,
                MIN_SLOT_TIMEOUT,
                MAX_WINDOW,
                "must be between 1s and 1d",
            )?
            .unwrap_or(DEFAULT_SLOT_TIMEOUT_MS);
            Ok(Limit::InFlight { limit, timeout_ms })
        }
    }
}

fn compile_local_fallback(
    mode: FailureMode,
    raw: Option<RawLocalFallback>,
) -> Result<u64, ConfigError> {
    match (mode, raw) {
        (FailureMode::Local, None) => Err(invalid(
            "local_fallback",
            "nothing",
            "is required with failure_mode \"local\": {\"replicas\": N}",
        )),
        (FailureMode::Local, Some(r)) if r.replicas == 0 || r.replicas > 100_000 => Err(invalid(
            "local_fallback.replicas",
            r.replicas,
            "must be between 1 and 100000",
        )),
        (FailureMode::Local, Some(r)) => Ok(r.replicas),
        (_, Some(_)) => Err(invalid(
            "local_fallback",
            "a value",
            "only applies with failure_mode \"local\"",
        )),
        (_, None) => Ok(1),
    }
}

fn compile_leases(raw: RawLeases) -> Result<Leases, ConfigError> {
    if raw.max_units == 0 || raw.max_units > bounds::MAX_LEASE {
        return Err(invalid(
            "leases.max_units",
            raw.max_units,
            &format!("must be between 1 and {}", bounds::MAX_LEASE),
        ));
    }
    if raw.horizon_ms == 0 || raw.horizon_ms > 10_000 {
        return Err(invalid(
            "leases.horizon_ms",
            raw.horizon_ms,
            "must be between 1 and 10000",
        ));
    }
    Ok(Leases {
        enabled: raw.enabled,
        max_units: raw.max_units,
        horizon_ms: raw.horizon_ms,
    })
}

fn compile_simulated_skew(ms: i64) -> Result<i64, ConfigError> {
    if ms.unsigned_abs() > MAX_WINDOW.as_millis() as u64 {
        return Err(invalid(
            "clock.simulated_skew_ms",
            ms,
            "must be within one day",
        ));
    }
    Ok(ms)
}

fn compile_client_ip(raw: RawClientIp) -> Result<ClientIp, ConfigError> {
    let ipv4_prefix = raw.ipv4_prefix.unwrap_or(32);
    let ipv6_prefix = raw.ipv6_prefix.unwrap_or(64);
    if ipv4_prefix == 0 || ipv4_prefix > 32 {
        return Err(invalid(
            "client_ip.ipv4_prefix",
            ipv4_prefix,
            "must be between 1 and 32",
        ));
    }
    if ipv6_prefix == 0 || ipv6_prefix > 128 {
        return Err(invalid(
            "client_ip.ipv6_prefix",
            ipv6_prefix,
            "must be between 1 and 128",
        ));
    }
    let trusted_hops = match (raw.from, raw.trusted_hops) {
        (ClientIpSource::Connection, Some(n)) => {
            return Err(invalid(
                "client_ip.trusted_hops",
                n,
                "only applies with \"from\": \"x-forwarded-for\"",
            ))
        }
        (ClientIpSource::Connection, None) => 0,
        (ClientIpSource::XForwardedFor, None) => 1,
        (ClientIpSource::XForwardedFor, Some(n)) if (1..=16).contains(&n) => n,
        (ClientIpSource::XForwardedFor, Some(n)) => {
            return Err(invalid(
                "client_ip.trusted_hops",
                n,
                "must be between 1 and 16",
            ))
        }
    };
    Ok(ClientIp {
        from: raw.from,
        trusted_hops,
        ipv4_prefix,
        ipv6_prefix,
    })
}

fn compile_match(at: &str, raw: RawMatch) -> Result<Matcher, ConfigError> {
    for (j, p) in raw.policies.iter().enumerate() {
        check_name(&format!("{at}.policies[{j}]"), p)?;
    }
    for (j, r) in raw.routes.iter().enumerate() {
        if r.is_empty() {
            return Err(invalid(
                format!("{at}.routes[{j}]"),
                "\"\"",
                "must not be empty",
            ));
        }
    }
    if let Some(prefix) = &raw.path_prefix {
        if !prefix.starts_with('/') {
            return Err(invalid(
                format!("{at}.path_prefix"),
                format!("{prefix:?}"),
                "must start with '/'",
            ));
        }
    }
    let mut methods = Vec::with_capacity(raw.methods.len());
    for (j, m) in raw.methods.iter().enumerate() {
        if !is_token(m) {
            return Err(invalid(
                format!("{at}.methods[{j}]"),
                format!("{m:?}"),
                "must be an HTTP method such as GET",
            ));
        }
        methods.push(m.to_ascii_uppercase());
    }
    let mut hosts = Vec::with_capacity(raw.hosts.len());
    for (j, h) in raw.hosts.iter().enumerate() {
        if h.is_empty() || h.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(invalid(
                format!("{at}.hosts[{j}]"),
                format!("{h:?}"),
                "must be a host name without scheme or path",
            ));
        }
        hosts.push(h.to_ascii_lowercase());
    }
    Ok(Matcher {
        policies: raw.policies,
        routes: raw.routes,
        path_prefix: raw.path_prefix,
        methods,
        hosts,
    })
}

/// Parses `header:NAME`, `client_ip`, `path`, `method`, `host`, `route`, `service`,
/// `query:NAME`, `const:VALUE`.
fn parse_descriptor(s: &str) -> Result<Descriptor, &'static str> {
    let (kind, arg) = match s.split_once(':') {
        Some((kind, arg)) => (kind, Some(arg)),
        None => (s, None),
    };
    match (kind, arg) {
        ("header", Some(name)) if is_token(name) => Ok(Descriptor::Header(name.to_ascii_lowercase())),
        ("header", _) => Err("header:NAME needs a valid header name"),
        ("query", Some(name)) if !name.is_empty() => Ok(Descriptor::Query(name.to_string())),
        ("query", _) => Err("query:NAME needs a parameter name"),
        ("const", Some(value)) if !value.is_empty() => Ok(Descriptor::Const(value.to_string())),
        ("const", _) => Err("const:VALUE needs a value"),
        ("client_ip", None) => Ok(Descriptor::ClientIp),
        ("path", None) => Ok(Descriptor::Path),
        ("method", None) => Ok(Descriptor::Method),
        ("host", None) => Ok(Descriptor::Host),
        ("route", None) => Ok(Descriptor::Route),
        ("service", None) => Ok(Descriptor::Service),
        _ => Err("unknown descriptor; expected header:NAME, client_ip, path, method, host, route, service, query:NAME or const:VALUE"),
    }
}

/// Names that go into Redis keys: 1..=64 of `[A-Za-z0-9_.-]`, so they never contain a key separator.
fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?}"),
            "must be 1 to 64 characters of A-Z a-z 0-9 _ - .",
        ))
    }
}

/// An HTTP token (RFC 9110 §5.6.2): what header names and methods are made of.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
