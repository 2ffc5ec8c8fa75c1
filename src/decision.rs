//! Turning the shim's answer (or its absence) into what the filter does with the request.
//!
//! Pure: the glue hands in the callout's status and body; time was already folded into the
//! checks (`ttl_ms`), so nothing here reads a clock.

use std::fmt;

use crate::cache;
use crate::check::{Check, CheckKind};
use crate::config::{Config, FailureMode, LocalResponse};
use crate::local::LocalLimiter;
use crate::wire::{self, CheckResult, RequestResult};

/// What the filter does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Resume the request; add these headers to its response (empty when disabled).
    /// `shadow_denials`: the rules in shadow mode that would have denied it.
    Allow {
        response_headers: Vec<(String, String)>,
        shadow_denials: Vec<usize>,
    },
    /// Answer locally; the request never reaches the upstream.
    Deny(LocalReply),
}

/// A local reply: status, headers and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocalReply {
    pub status: u32,
    pub(crate) headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The rules (indexes into `Config::rules`) whose limits denied the request; empty for a
    /// fail-closed reply.
    pub(crate) denied_by: Vec<usize>,
}

/// Why the shim gave no usable answer. Logged, then handed to [`on_failure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The host refused to dispatch the call (unknown cluster, bad argument).
    Dispatch(String),
    /// The callout completed with a non-200 status (Envoy reports timeouts as 504 and
    /// "no healthy upstream" as 503).
    Status(u32),
    /// The callout returned no `:status` at all.
    NoStatus,
    /// Calls are paused after a run of failures (the circuit breaker is open).
    CircuitOpen,
    /// A 200 whose body is not a valid answer to what was asked.
    Malformed(String),
    /// The shim refused this one request (its message names the field); the callout itself
    /// succeeded, so the other requests it carried were decided as usual.
    Refused(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Dispatch(why) => write!(f, "dispatching the shim callout failed: {why}"),
            Failure::Status(504) => write!(f, "shim callout timed out (504)"),
            Failure::Status(status) => write!(f, "shim answered status {status}"),
            Failure::NoStatus => write!(f, "shim callout returned no status"),
            Failure::CircuitOpen => write!(f, "shim calls paused after repeated failures"),
            Failure::Malformed(why) => write!(f, "{why}"),
            Failure::Refused(why) => write!(f, "shim refused the request: {why}"),
        }
    }
}

/// A completed callout as the host delivered it.
#[derive(Debug, Clone, Copy)]
pub struct CalloutReply<'a> {
    /// `:status`; absent when the call itself failed.
    pub status: Option<u32>,
    /// Kong's `:dispatch_status` (e.g. `timeout`, `broken connection`) when the call failed.
    pub dispatch_status: Option<&'a str>,
    pub body: &'a [u8],
}

/// One request's verdict with the over-limit cache entries it teaches, or why the shim
/// refused that request alone.
pub(crate) type RequestVerdict = Result<(Verdict, Vec<cache::Entry>), Failure>;

/// The verdicts of one callout (one per request), and Redis's time from the reply, for
/// clock-skew correction.
#[derive(Debug)]
pub struct Decided {
    pub(crate) verdicts: Vec<RequestVerdict>,
    pub(crate) server_now_ms: Option<u64>,
    /// Leases granted: (request, check, its answer with `lease` > 0).
    pub(crate) grants: Vec<(usize, usize, CheckResult)>,
}

/// Decides every request of a completed callout (`requests[i]`: the checks of request `i` and
/// when they were built), each on its own answer. `Err`: the callout failed as a
/// whole; a request the shim refused alone gets `Err(Failure::Refused)` in its slot.
pub fn from_batch_callout(
    config: &Config,
    requests: &[(&[Check], cache::Clocks)],
    reply: CalloutReply<'_>,
) -> Result<Decided, Failure> {
    match (reply.status, reply.dispatch_status) {
        (Some(200), _) => {
            let shape: Vec<usize> = requests.iter().map(|(c, _)| c.len()).collect();
            let decoded = wire::decode(reply.body, &shape).map_err(Failure::Malformed)?;
            let verdicts = requests
                .iter()
                .zip(&decoded.results)
                .map(|(&(checks, built), result)| {
                    if let Some(why) = &result.refused {
                        return Err(Failure::Refused(why.clone()));
                    }
                    let entries = if result.allowed || !config.over_limit_cache {
                        Vec::new()
                    } else {
                        checks
                            .iter()
                            .zip(&result.checks)
                            .filter_map(|(c, r)| cache::entry_for(c, r, built))
                            .collect()
                    };
                    Ok((decide(config, checks, result), entries))
                })
                .collect();
            let grants = decoded
                .results
                .iter()
                .enumerate()
                .filter(|(_, r)| r.allowed && r.refused.is_none())
                .flat_map(|(i, r)| {
                    r.checks
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| c.lease > 0)
                        .map(move |(j, c)| (i, j, c.clone()))
                })
                .collect();
            Ok(Decided {
                verdicts,
                server_now_ms: decoded.now_ms,
                grants,
            })
        }
        (Some(other), _) => Err(Failure::Status(other)),
        (None, Some(why)) => Err(Failure::Dispatch(why.to_string())),
        (None, None) => Err(Failure::NoStatus),
    }
}

/// The failure mode, applied in this one place. `local` holds the worker's fallback counters
/// (used only by `failure_mode: "local"`).
pub(crate) fn on_failure(
    config: &Config,
    checks: &[Check],
    local: &mut LocalLimiter,
    now_ms: u64,
) -> Verdict {
    match config.failure_mode {
        FailureMode::Allow => Verdict::Allow {
            response_headers: Vec::new(),
            shadow_denials: Vec::new(),
        },
        FailureMode::Deny => {
            Verdict::Deny(local_reply(&config.failure_response, Vec::new(), || {
                problem_json(
                    config.failure_response.status,
                    UNAVAILABLE,
                    "The rate limit could not be checked; try again shortly.",
                    None,
                )
            }))
        }
        FailureMode::Local => {
            let denying = local.check(checks, config.local_fallback_replicas, now_ms);
            if denying.is_empty() {
                return Verdict::Allow {
                    response_headers: Vec::new(),
                    shadow_denials: Vec::new(),
                };
            }
            // Deny as the shim would, for the checks that denied, until their local window ends.
            let denied: Vec<Check> = denying.iter().map(|&i| checks[i].clone()).collect();
            let result = RequestResult::local(
                false,
                denied
                    .iter()
                    .map(|c| {
                        let window_ms = c.window_s().unwrap_or(1).max(1) * 1000;
                        let left = window_ms - now_ms % window_ms;
                        CheckResult {
                            lease: 0,
                            lease_ms: 0,
                            allowed: false,
                            limit: c.limit(),
                            remaining: 0,
                            reset_ms: left,
                            retry_after_ms: left,
                        }
                    })
                    .collect(),
            );
            decide(config, &denied, &result)
        }
    }
}

/// Denies a request locally from over-limit cache entries (`hits`: index into `checks`, entry),
/// with the fields a denial from Redis would carry: every policy checked in `RateLimit-Policy`,
/// and in `RateLimit` and the problem's `violated-policies` every policy the cache knows to be
/// exhausted. (The state of the other policies is unknown without a callout, so `RateLimit`
/// leaves them out rather than guess; the draft lets a server list a subset.)
pub(crate) fn from_cache(
    config: &Config,
    checks: &[Check],
    hits: &[(usize, cache::Entry)],
    now: cache::Clocks,
) -> Verdict {
    let known: Vec<Option<CheckResult>> = (0..checks.len())
        .map(|i| {
            hits.iter()
                .find(|(hit, _)| *hit == i)
                .map(|(_, e)| cache::as_result(e, &checks[i], now.for_check(&checks[i])))
        })
        .collect();
    decide_known(config, checks, false, &known)
}

/// What one check means for the response headers, with the times made safe.
struct Outcome<'a> {
    rule: &'a str,
    limit: u64,
    /// `qu="concurrent-requests"`: the quota counts requests in flight, not requests.
    concurrent: bool,
    /// Known from Redis (or the cache); `false` for a check the over-limit cache knows
    /// nothing about, listed in `RateLimit-Policy` only.
    known: bool,
    remaining: u64,
    window_s: Option<u64>,
    /// Whole seconds until the quota is whole again (`r` back to `q`), rounded up: the
    /// window's end, or for token bucket and GCRA the time a full burst takes to come back.
    reset_s: u64,
    /// Whole seconds until this request would fit again (0 when it fits), rounded up;
    /// for a fixed window never before the window's end.
    retry_s: u64,
    allowed: bool,
    shadow: bool,
    /// A usage rule's unit (`tokens`, `content-bytes`); requests otherwise.
    unit: Option<&'a str>,
}

/// Decides one request from the shim's answer for it.
pub(crate) fn decide(config: &Config, checks: &[Check], result: &RequestResult) -> Verdict {
    let known: Vec<Option<CheckResult>> = result.checks.iter().cloned().map(Some).collect();
    decide_known(config, checks, result.allowed, &known)
}

/// Decides one request from what is known of each check (`None`: nothing, see [`from_cache`]).
fn decide_known(
    config: &Config,
    checks: &[Check],
    allowed: bool,
    results: &[Option<CheckResult>],
) -> Verdict {
    let unknown = CheckResult {
        lease: 0,
        lease_ms: 0,
        allowed: true,
        limit: 0,
        remaining: 0,
        reset_ms: 0,
        retry_after_ms: 0,
    };
    let outcomes: Vec<Outcome<'_>> = checks
        .iter()
        .zip(results)
        .map(|(check, r): (&Check, &Option<CheckResult>)| {
            let known = r.is_some();
            let r = r.as_ref().unwrap_or(&unknown);
            // A fixed window's key is retired when the gateway's window ends; Redis's TTL can
            // only be later (another gateway created the key), so take the later of the two.
            let floor = check.min_retry_ms();
            let rule = config.rules.get(check.rule);
            Outcome {
                rule: rule.map_or("", |rule| rule.name.as_str()),
                unit: rule.and_then(|r| r.usage.as_ref()).map(|u| u.unit.as_str()),
                limit: check.limit(),
                concurrent: matches!(check.kind, CheckKind::Concurrency { .. }),
                known,
                remaining: r.remaining.min(check.limit()),
                window_s: check.window_s(),
                reset_s: ceil_seconds(floor.max(r.reset_ms)),
                retry_s: match (r.allowed, &check.kind) {
                    (true, _) => 0,
                    (false, CheckKind::FixedWindow { .. }) => {
                        ceil_seconds(floor.max(r.reset_ms).max(r.retry_after_ms))
                    }
                    (false, _) => ceil_seconds(r.retry_after_ms.min(MAX_RETRY_MS)),
                },
                allowed: r.allowed,
                shadow: check.shadow,
            }
        })
        .collect();

    if allowed {
        let shadow_denials = checks
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| o.shadow && !o.allowed)
            .map(|(c, _)| c.rule)
            .collect();
        let response_headers = if config.headers_on_allow {
            // The most restrictive rule: fewest remaining, then the longest wait.
            outcomes
                .iter()
                .min_by_key(|o| (o.remaining, std::cmp::Reverse(o.reset_s)))
                .map(|binding| rate_limit_headers(&outcomes, binding))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        return Verdict::Allow {
            response_headers,
            shadow_denials,
        };
    }

    // Denied: the client may retry once every enforced rule that denied it lets it through.
    let denying = outcomes
        .iter()
        .filter(|o| !o.allowed && !o.shadow)
        .max_by_key(|o| o.retry_s);
    let Some(binding) = denying.or_else(|| outcomes.iter().max_by_key(|o| o.retry_s)) else {
        return on_failure(config, checks, &mut LocalLimiter::default(), 0);
    };
    let retry_after = binding.retry_s.max(1);
    let mut headers = rate_limit_headers(&outcomes, binding);
    headers.insert(0, ("retry-after".to_string(), retry_after.to_string()));
    let violated: Vec<(usize, &str)> = checks
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| !o.allowed && !o.shadow)
        .map(|(c, o)| (c.rule, o.rule))
        .collect();
    let denied_by = violated.iter().map(|&(i, _)| i).collect();
    let mut reply = local_reply(&config.deny, headers, || {
        let unit = binding.unit.unwrap_or("requests");
        let per = match binding.window_s {
            Some(w) => format!("{} {unit} per {w}s", binding.limit),
            None => format!("{} requests in flight", binding.limit),
        };
        let what = if binding.unit.is_some() {
            "Usage budget"
        } else {
            "Rate limit"
        };
        let names: Vec<&str> = violated.iter().map(|&(_, name)| name).collect();
        problem_json(
            config.deny.status,
            QUOTA_EXCEEDED,
            &format!("{what} \"{}\" exceeded: {per}.", binding.rule),
            Some(Denial {
                binding,
                retry_after,
                violated: names,
            }),
        )
    });
    reply.denied_by = denied_by;
    Verdict::Deny(reply)
}

/// `X-RateLimit-*` for the binding rule, and the fields of the IETF draft
/// (draft-ietf-httpapi-ratelimit-headers-12) for every rule checked:
/// - `RateLimit-Policy`: `"name";q=<quota>;w=<seconds>` (token bucket / GCRA: `q` = burst,
///   `w` = the time a full burst takes to come back, so `q/w` is the sustained rate);
///   concurrency: `"name";q=<limit>;qu="concurrent-requests"` (no window).
/// - `RateLimit`: `"name";r=<quota units left now>;t=<seconds until the quota is whole
///   again>` (window end; token bucket / GCRA: until the bucket is full). A concurrency quota
///   has no reset time, so no `t` (optional in the draft). A policy whose state is unknown
///   (over-limit cache hit) is only in `RateLimit-Policy`.
fn rate_limit_headers(outcomes: &[Outcome<'_>], binding: &Outcome<'_>) -> Vec<(String, String)> {
    let policy = outcomes
        .iter()
        .map(|o| {
            // `qu`: what the quota counts, when it is not requests (draft-12).
            let unit = match (o.concurrent, o.unit) {
                (true, _) => ";qu=\"concurrent-requests\"".to_string(),
                (false, Some(u)) => format!(";qu=\"{u}\""),
                (false, None) => String::new(),
            };
            match (o.concurrent, o.window_s) {
                (false, Some(w)) => format!("\"{}\";q={};w={w}{unit}", o.rule, o.limit),
                _ => format!("\"{}\";q={}{unit}", o.rule, o.limit),
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let state = outcomes
        .iter()
        .filter(|o| o.known)
        .map(|o| {
            if o.concurrent {
                format!("\"{}\";r={}", o.rule, o.remaining)
            } else {
                format!("\"{}\";r={};t={}", o.rule, o.remaining, o.reset_s)
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        ("x-ratelimit-limit".to_string(), binding.limit.to_string()),
        (
            "x-ratelimit-remaining".to_string(),
            binding.remaining.to_string(),
        ),
        ("x-ratelimit-reset".to_string(), binding.reset_s.to_string()),
        ("ratelimit-policy".to_string(), policy),
        ("ratelimit".to_string(), state),
    ]
}

fn local_reply(
    response: &LocalResponse,
    mut headers: Vec<(String, String)>,
    default_body: impl FnOnce() -> String,
) -> LocalReply {
    let body = match &response.body {
        Some(body) => body.clone(),
        None => default_body(),
    };
    headers.push(("content-type".to_string(), response.content_type.clone()));
    LocalReply {
        status: response.status,
        headers,
        body: body.into_bytes(),
        denied_by: Vec::new(),
    }
}

/// The draft's problem type for a request denied by one or more quota policies.
const QUOTA_EXCEEDED: (&str, &str) = (
    "https://iana.org/assignments/http-problem-types#quota-exceeded",
    "Request cannot be satisfied as assigned quota has been exceeded",
);
/// RFC 9457's default type, for a failure (no quota was exceeded).
const UNAVAILABLE: (&str, &str) = ("about:blank", "Rate limit service unavailable");

/// What a denial's problem document says beyond RFC 9457's members.
struct Denial<'a> {
    /// The rule `Retry-After` waits for.
    binding: &'a Outcome<'a>,
    retry_after: u64,
    /// Every enforced rule that denied the request (the draft's `violated-policies`).
    violated: Vec<&'a str>,
}

/// An RFC 9457 problem document. A denial uses the draft's `quota-exceeded` type with its
/// `violated-policies` member (the policy names of `RateLimit-Policy`), and keeps naming the
/// binding rule, its limit and the retry time.
#[derive(serde::Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u32,
    detail: &'a str,
    #[serde(rename = "violated-policies", skip_serializing_if = "Option::is_none")]
    violated_policies: Option<&'a [&'a str]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_seconds: Option<u64>,
}

fn problem_json(
    status: u32,
    (kind, title): (&str, &str),
    detail: &str,
    denial: Option<Denial<'_>>,
) -> String {
    let d = denial.as_ref();
    let problem = Problem {
        kind,
        title,
        status,
        detail,
        violated_policies: d.map(|d| d.violated.as_slice()),
        rule: d.map(|d| d.binding.rule),
        limit: d.map(|d| d.binding.limit),
        window_seconds: d.and_then(|d| d.binding.window_s),
        retry_after_seconds: d.map(|d| d.retry_after),
    };
    // Serializing borrowed strings and integers cannot fail.
    serde_json::to_string(&problem).unwrap_or_default()
}

/// A request that can never fit (cost above the limit) is told to come back in a day, not in
/// the 585 million years `u64::MAX` ms would say.
const MAX_RETRY_MS: u64 = 86_400_000;

fn ceil_seconds(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decides one request from a completed callout that carried only its checks. With the
    /// verdict come the over-limit cache entries a denial teaches (empty when allowed or
    /// disabled). The filter always decides a batch; this is the one-request case tests read.
    fn from_callout(
        config: &Config,
        checks: &[Check],
        reply: CalloutReply<'_>,
        now_ms: u64,
    ) -> Result<(Verdict, Vec<cache::Entry>), Failure> {
        let clocks = cache::Clocks {
            gateway_ms: now_ms,
            corrected_ms: now_ms,
        };
        let mut decided = from_batch_callout(config, &[(checks, clocks)], reply)?;
        decided.verdicts.pop().ok_or(Failure::NoStatus)?
    }

    const CONFIG: &str = r#"{
        "shim": {"upstream": "s"},
        "rules": [
            {"name": "search", "descriptors": ["header:x-api-key"], "limit": 100, "window": "1m"},
            {"name": "per_ip", "descriptors": ["client_ip"], "limit": 20, "window": "10s"}
        ]
    }"#;

    fn config() -> Config {
        Config::from_json(CONFIG.as_bytes()).unwrap()
    }

    fn fixed(rule: usize, limit: u64, window_ms: u64, ttl_ms: u64) -> Check {
        Check {
            lease: 0,
            rule,
            key: format!("k{rule}"),
            cost: 1,
            shadow: false,
            kind: CheckKind::FixedWindow {
                limit,
                window_ms,
                ttl_ms,
            },
        }
    }

    fn checks() -> Vec<Check> {
        vec![fixed(0, 100, 60_000, 41_500), fixed(1, 20, 10_000, 3_001)]
    }

    fn reply<'a>(status: Option<u32>, body: &'a [u8]) -> CalloutReply<'a> {
        CalloutReply {
            status,
            dispatch_status: None,
            body,
        }
    }

    fn at(ms: u64) -> cache::Clocks {
        cache::Clocks {
            gateway_ms: ms,
            corrected_ms: ms,
        }
    }

    fn result(allowed: bool, checks: &[(bool, u64, u64, u64)]) -> RequestResult {
        RequestResult {
            allowed,
            refused: None,
            checks: checks
                .iter()
                .map(|&(allowed, limit, remaining, reset_ms)| CheckResult {
                    lease: 0,
                    lease_ms: 0,
                    allowed,
                    limit,
                    remaining,
                    reset_ms,
                    retry_after_ms: 0,
                })
                .collect(),
        }
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("<none>")
    }

    #[test]
    fn allow_carries_the_most_restrictive_rules_headers() {
        let verdict = decide(
            &config(),
            &checks(),
            &result(true, &[(true, 100, 63, 41_400), (true, 20, 5, 3_000)]),
        );
        let Verdict::Allow {
            response_headers: h,
            ..
        } = verdict
        else {
            panic!("{verdict:?}")
        };
        assert_eq!(header(&h, "x-ratelimit-limit"), "20");
        assert_eq!(header(&h, "x-ratelimit-remaining"), "5");
        assert_eq!(
            header(&h, "x-ratelimit-reset"),
            "4",
            "3001 ms rounds up to 4 s"
        );
        assert_eq!(
            header(&h, "ratelimit-policy"),
            "\"search\";q=100;w=60, \"per_ip\";q=20;w=10"
        );
        assert_eq!(
            header(&h, "ratelimit"),
            "\"search\";r=63;t=42, \"per_ip\";r=5;t=4"
        );
        assert_eq!(header(&h, "retry-after"), "<none>");
    }

    #[test]
    fn allow_without_headers_when_disabled() {
        let mut c = config();
        c.headers_on_allow = false;
        let verdict = decide(
            &c,
            &checks(),
            &result(true, &[(true, 100, 1, 1), (true, 20, 1, 1)]),
        );
        assert_eq!(
            verdict,
            Verdict::Allow {
                response_headers: vec![],
                shadow_denials: vec![]
            }
        );
    }

    #[test]
    fn deny_names_the_rule_and_never_retries_before_the_window_ends() {
        // Redis says 2 s left, but the gateway window has 3001 ms left: Retry-After is 4.
        let verdict = decide(
            &config(),
            &checks(),
            &result(false, &[(true, 100, 63, 41_400), (false, 20, 0, 2_000)]),
        );
        let Verdict::Deny(reply) = verdict else {
            panic!("{verdict:?}")
        };
        assert_eq!(reply.status, 429);
        assert_eq!(reply.denied_by, vec![1]);
        assert_eq!(header(&reply.headers, "retry-after"), "4");
        assert_eq!(header(&reply.headers, "x-ratelimit-limit"), "20");
        assert_eq!(header(&reply.headers, "x-ratelimit-remaining"), "0");
        assert_eq!(header(&reply.headers, "x-ratelimit-reset"), "4");
        assert_eq!(
            header(&reply.headers, "content-type"),
            "application/problem+json"
        );
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["status"], 429);
        assert_eq!(body["rule"], "per_ip");
        assert_eq!(body["limit"], 20);
        assert_eq!(body["window_seconds"], 10);
        assert_eq!(body["retry_after_seconds"], 4);
        assert_eq!(
            body["detail"],
            "Rate limit \"per_ip\" exceeded: 20 requests per 10s."
        );
    }

    #[test]
    fn deny_by_several_rules_waits_for_the_last_reset() {
        let verdict = decide(
            &config(),
            &checks(),
            &result(false, &[(false, 100, 0, 41_400), (false, 20, 0, 3_000)]),
        );
        let Verdict::Deny(reply) = verdict else {
            panic!("{verdict:?}")
        };
        assert_eq!(header(&reply.headers, "retry-after"), "42");
        assert_eq!(header(&reply.headers, "x-ratelimit-limit"), "100");
    }

    #[test]
    fn redis_ttl_longer_than_the_window_wins() {
        let verdict = decide(
            &config(),
            &checks(),
            &result(false, &[(true, 100, 1, 1), (false, 20, 0, 9_999)]),
        );
        let Verdict::Deny(reply) = verdict else {
            panic!("{verdict:?}")
        };
        assert_eq!(header(&reply.headers, "retry-after"), "10");
    }

    #[test]
    fn custom_deny_body_keeps_the_headers() {
        let mut c = config();
        c.deny.body = Some("slow down".into());
        c.deny.content_type = "text/plain".into();
        let verdict = decide(
            &c,
            &checks(),
            &result(false, &[(false, 100, 0, 1), (true, 20, 3, 1)]),
        );
        let Verdict::Deny(reply) = verdict else {
            panic!("{verdict:?}")
        };
        assert_eq!(reply.body, b"slow down");
        assert_eq!(header(&reply.headers, "content-type"), "text/plain");
        assert_eq!(header(&reply.headers, "retry-after"), "42");
    }

    #[test]
    fn failures_follow_the_failure_mode() {
        let mut c = config();
        let cases = [
            (None, &b""[..], Failure::NoStatus),
            (Some(504), &b""[..], Failure::Status(504)),
            (
                Some(503),
                &br#"{"error":"backend_unavailable"}"#[..],
                Failure::Status(503),
            ),
            (Some(400), &b"{}"[..], Failure::Status(400)),
        ];
        for (status, body, expected) in cases {
            assert_eq!(
                from_callout(&c, &checks(), reply(status, body), 0).map(|(v, _)| v),
                Err(expected)
            );
        }
        assert!(matches!(
            from_callout(&c, &checks(), reply(Some(200), b"garbage"), 0),
            Err(Failure::Malformed(_))
        ));
        assert!(matches!(
            from_callout(&c, &checks(), reply(Some(200), br#"{"results":[]}"#), 0),
            Err(Failure::Malformed(_))
        ));

        assert_eq!(
            on_failure(&c, &checks(), &mut LocalLimiter::default(), 0),
            Verdict::Allow {
                response_headers: vec![],
                shadow_denials: vec![]
            }
        );
        c.failure_mode = FailureMode::Deny;
        let Verdict::Deny(reply) = on_failure(&c, &checks(), &mut LocalLimiter::default(), 0)
        else {
            panic!()
        };
        assert_eq!(reply.status, 503);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["title"], "Rate limit service unavailable");
        assert_eq!(
            Failure::Status(504).to_string(),
            "shim callout timed out (504)"
        );
    }

    #[test]
    fn local_failure_mode_enforces_a_share_in_the_gateway() {
        let mut c = config();
        c.failure_mode = FailureMode::Local;
        c.local_fallback_replicas = 10; // per worker: 10 of 100 and 2 of 20
        let mut local = LocalLimiter::default();
        let statuses: Vec<bool> = (0..3)
            .map(|_| {
                matches!(
                    on_failure(&c, &checks(), &mut local, 1_000),
                    Verdict::Allow { .. }
                )
            })
            .collect();
        assert_eq!(statuses, [true, true, false]);
        let Verdict::Deny(reply) = on_failure(&c, &checks(), &mut local, 1_500) else {
            panic!()
        };
        assert_eq!(reply.status, 429);
        assert_eq!(reply.denied_by, vec![1]);
        assert_eq!(
            header(&reply.headers, "retry-after"),
            "9",
            "the per_ip rule's 10 s window ends at 10 s"
        );
    }

    #[test]
    fn kong_reports_failed_calls_as_dispatch_status() {
        let kong_timeout = CalloutReply {
            status: None,
            dispatch_status: Some("timeout"),
            body: b"",
        };
        assert_eq!(
            from_callout(&config(), &checks(), kong_timeout, 0).map(|(v, _)| v),
            Err(Failure::Dispatch("timeout".into()))
        );
    }

    #[test]
    fn other_algorithms_take_retry_after_from_the_shim() {
        let bucket = Check {
            lease: 0,
            rule: 0,
            key: "k".into(),
            cost: 1,
            shadow: false,
            kind: CheckKind::TokenBucket {
                burst: 5,
                rate: 1,
                period_ms: 200,
            },
        };
        let mut r = result(false, &[(false, 5, 0, 1_000)]);
        r.checks[0].retry_after_ms = 150;
        let Verdict::Deny(reply) = decide(&config(), &[bucket], &r) else {
            panic!()
        };
        assert_eq!(
            header(&reply.headers, "retry-after"),
            "1",
            "150 ms rounds up to 1 s"
        );
        assert_eq!(header(&reply.headers, "x-ratelimit-reset"), "1");
        assert_eq!(
            header(&reply.headers, "ratelimit-policy"),
            "\"search\";q=5;w=1"
        );
    }

    #[test]
    fn shadow_checks_never_deny_but_are_reported() {
        let mut shadowed = checks();
        shadowed[1].shadow = true;
        let verdict = decide(
            &config(),
            &shadowed,
            &result(true, &[(true, 100, 50, 1_000), (false, 20, 0, 3_000)]),
        );
        let Verdict::Allow {
            shadow_denials,
            response_headers,
        } = verdict
        else {
            panic!("{verdict:?}")
        };
        assert_eq!(shadow_denials, vec![1]);
        assert_eq!(header(&response_headers, "x-ratelimit-remaining"), "0");
    }

    #[test]
    fn a_denial_teaches_the_cache_and_the_cache_answers_alike() {
        let body = br#"{"results":[{"allowed":false,"checks":[
            {"allowed":true,"limit":100,"remaining":50,"reset_ms":41000,"retry_after_ms":0},
            {"allowed":false,"limit":20,"remaining":0,"reset_ms":3000,"retry_after_ms":3000}]}]}"#;
        let (verdict, entries) =
            from_callout(&config(), &checks(), reply(Some(200), body), 1_000).unwrap();
        assert_eq!(entries.len(), 1, "only the exhausted key");
        assert_eq!(
            (entries[0].key.as_str(), entries[0].until_ms),
            ("k1|fw/20/10000", 4_000)
        );
        let Verdict::Deny(from_shim) = verdict else {
            panic!()
        };
        // 500 ms later the cache denies by itself, with the same Retry-After.
        let hits = [(1, entries[0].clone())];
        let Verdict::Deny(cached) = from_cache(&config(), &checks(), &hits, at(1_500)) else {
            panic!()
        };
        assert_eq!(cached.status, 429);
        assert_eq!(cached.denied_by, vec![1]);
        assert_eq!(
            header(&cached.headers, "retry-after"),
            header(&from_shim.headers, "retry-after")
        );
        assert_eq!(header(&cached.headers, "x-ratelimit-remaining"), "0");

        let mut off = config();
        off.over_limit_cache = false;
        let (_, entries) = from_callout(&off, &checks(), reply(Some(200), body), 1_000).unwrap();
        assert!(entries.is_empty());
    }

    #[test]
    fn a_batch_reply_decides_each_request_on_its_own() {
        let body = br#"{"results":[
            {"allowed":true,"checks":[{"allowed":true,"limit":100,"remaining":1,"reset_ms":1000},
                                      {"allowed":true,"limit":20,"remaining":1,"reset_ms":1000}]},
            {"allowed":false,"checks":[{"allowed":false,"limit":100,"remaining":0,"reset_ms":1000}]}]}"#;
        let two = checks();
        let one = &two[..1];
        let decided = from_batch_callout(
            &config(),
            &[(&two, at(0)), (one, at(0))],
            reply(Some(200), body),
        )
        .unwrap();
        let v: Vec<_> = decided.verdicts.into_iter().map(Result::unwrap).collect();
        assert!(matches!(v[0].0, Verdict::Allow { .. }));
        assert!(matches!(v[1].0, Verdict::Deny(_)));
        assert_eq!(decided.server_now_ms, None);
        assert_eq!(v[1].1.len(), 1);
        let wrong_shape = from_batch_callout(
            &config(),
            &[(one, at(0)), (one, at(0))],
            reply(Some(200), body),
        );
        assert!(matches!(wrong_shape, Err(Failure::Malformed(_))));
    }

    #[test]
    fn a_request_the_shim_refuses_fails_alone() {
        let body = br#"{"results":[
            {"refused":"requests[0].checks[0].key: must be a string of 1..512 printable ASCII characters (0x21..0x7e)"},
            {"allowed":false,"checks":[{"allowed":false,"limit":100,"remaining":0,"reset_ms":1000}]}]}"#;
        let two = checks();
        let one = &two[..1];
        let decided = from_batch_callout(
            &config(),
            &[(&two, at(0)), (one, at(0))],
            reply(Some(200), body),
        )
        .unwrap();
        assert!(
            matches!(&decided.verdicts[0], Err(Failure::Refused(why)) if why.contains("checks[0].key")),
            "{:?}",
            decided.verdicts[0]
        );
        assert!(matches!(decided.verdicts[1], Ok((Verdict::Deny(_), _))));
    }

    #[test]
    fn a_good_reply_decides() {
        let body = br#"{"results":[{"allowed":true,"checks":[
            {"allowed":true,"limit":100,"count":1,"remaining":99,"reset_ms":41000},
            {"allowed":true,"limit":20,"count":1,"remaining":19,"reset_ms":3000}]}]}"#;
        let (verdict, entries) =
            from_callout(&config(), &checks(), reply(Some(200), body), 0).unwrap();
        assert!(
            entries.is_empty(),
            "an allowed request teaches the cache nothing"
        );
        assert!(matches!(verdict, Verdict::Allow { .. }));
    }

    // --- draft-ietf-httpapi-ratelimit-headers-12 -----------------------------------------------

    fn check_of(rule: usize, kind: CheckKind) -> Check {
        Check {
            lease: 0,
            rule,
            key: format!("k{rule}"),
            cost: 1,
            shadow: false,
            kind,
        }
    }

    fn problem(reply: &LocalReply) -> serde_json::Value {
        serde_json::from_slice(&reply.body).unwrap()
    }

    #[test]
    fn a_concurrency_quota_counts_requests_in_flight_and_has_no_reset() {
        let conc = check_of(
            0,
            CheckKind::Concurrency {
                limit: 3,
                timeout_ms: 60_000,
                id: "r1".into(),
            },
        );
        let mut r = result(true, &[(true, 3, 2, 60_000)]);
        r.checks[0].retry_after_ms = 0;
        let Verdict::Allow {
            response_headers: h,
            ..
        } = decide(&config(), &[conc], &r)
        else {
            panic!()
        };
        assert_eq!(
            header(&h, "ratelimit-policy"),
            "\"search\";q=3;qu=\"concurrent-requests\""
        );
        assert_eq!(header(&h, "ratelimit"), "\"search\";r=2");
    }

    #[test]
    fn token_bucket_and_gcra_r_is_left_now_and_t_is_until_the_burst_is_whole() {
        // burst 10, 1 per second: w = 10 s (q/w is the sustained rate). 3 left now, full again
        // in 6.5 s (t = 7); this request would fit again at once, so no Retry-After.
        for kind in [
            CheckKind::TokenBucket {
                burst: 10,
                rate: 1,
                period_ms: 1_000,
            },
            CheckKind::Gcra {
                burst: 10,
                rate: 1,
                period_ms: 1_000,
            },
        ] {
            let c = check_of(0, kind);
            let Verdict::Allow {
                response_headers: h,
                ..
            } = decide(
                &config(),
                std::slice::from_ref(&c),
                &result(true, &[(true, 10, 3, 6_500)]),
            )
            else {
                panic!()
            };
            assert_eq!(header(&h, "ratelimit-policy"), "\"search\";q=10;w=10");
            assert_eq!(header(&h, "ratelimit"), "\"search\";r=3;t=7");
            // Denied: r = 0, t = until whole (10 s), Retry-After = until one token (1 s).
            let mut r = result(false, &[(false, 10, 0, 10_000)]);
            r.checks[0].retry_after_ms = 1_000;
            let Verdict::Deny(reply) = decide(&config(), &[c], &r) else {
                panic!()
            };
            assert_eq!(header(&reply.headers, "ratelimit"), "\"search\";r=0;t=10");
            assert_eq!(header(&reply.headers, "retry-after"), "1");
        }
    }

    #[test]
    fn a_denial_is_the_drafts_quota_exceeded_problem_listing_every_violated_policy() {
        let Verdict::Deny(reply) = decide(
            &config(),
            &checks(),
            &result(false, &[(false, 100, 0, 41_400), (false, 20, 0, 3_000)]),
        ) else {
            panic!()
        };
        let body = problem(&reply);
        assert_eq!(
            body["type"],
            "https://iana.org/assignments/http-problem-types#quota-exceeded"
        );
        assert_eq!(
            body["title"],
            "Request cannot be satisfied as assigned quota has been exceeded"
        );
        assert_eq!(body["status"], 429);
        assert_eq!(
            body["violated-policies"],
            serde_json::json!(["search", "per_ip"])
        );
        // A shadow rule that would deny is not violated.
        let mut shadowed = checks();
        shadowed[1].shadow = true;
        let Verdict::Deny(reply) = decide(
            &config(),
            &shadowed,
            &result(false, &[(false, 100, 0, 41_400), (false, 20, 0, 3_000)]),
        ) else {
            panic!()
        };
        assert_eq!(
            problem(&reply)["violated-policies"],
            serde_json::json!(["search"])
        );
    }

    #[test]
    fn a_failure_is_not_a_quota_problem() {
        let mut c = config();
        c.failure_mode = FailureMode::Deny;
        let Verdict::Deny(reply) = on_failure(&c, &checks(), &mut LocalLimiter::default(), 0)
        else {
            panic!()
        };
        let body = problem(&reply);
        assert_eq!(body["type"], "about:blank");
        assert!(body.get("violated-policies").is_none());
    }

    #[test]
    fn a_cache_hit_carries_the_same_fields_as_the_denial_it_learned_from() {
        let body = br#"{"results":[{"allowed":false,"checks":[
            {"allowed":true,"limit":100,"remaining":50,"reset_ms":41000,"retry_after_ms":0},
            {"allowed":false,"limit":20,"remaining":0,"reset_ms":3000,"retry_after_ms":3000}]}]}"#;
        let (Verdict::Deny(shim), entries) =
            from_callout(&config(), &checks(), reply(Some(200), body), 1_000).unwrap()
        else {
            panic!()
        };
        let hits = [(1, entries[0].clone())];
        let Verdict::Deny(cached) = from_cache(&config(), &checks(), &hits, at(1_000)) else {
            panic!()
        };
        let names = |r: &LocalReply| -> Vec<String> {
            let mut n: Vec<String> = r.headers.iter().map(|(n, _)| n.clone()).collect();
            n.sort();
            n
        };
        assert_eq!(names(&cached), names(&shim), "the same header fields");
        for field in [
            "ratelimit-policy",
            "retry-after",
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ] {
            assert_eq!(
                header(&cached.headers, field),
                header(&shim.headers, field),
                "{field}"
            );
        }
        // Every policy checked, not only the cached one.
        assert_eq!(
            header(&cached.headers, "ratelimit-policy"),
            "\"search\";q=100;w=60, \"per_ip\";q=20;w=10"
        );
        // The exhausted policy's state; the other's is unknown without a callout.
        assert_eq!(header(&cached.headers, "ratelimit"), "\"per_ip\";r=0;t=4");
        let (a, b) = (problem(&cached), problem(&shim));
        for member in [
            "type",
            "title",
            "status",
            "detail",
            "violated-policies",
            "rule",
            "limit",
            "window_seconds",
            "retry_after_seconds",
        ] {
            assert_eq!(a[member], b[member], "{member}");
        }
        assert_eq!(cached.denied_by, shim.denied_by);
    }
}
