//! Turning the shim's answer (or its absence) into what the filter does with the request.
//!
//! Pure: the glue hands in the callout's status and body; time was already folded into the
//! checks (`ttl_ms`), so nothing here reads a clock.

use std::fmt;

use crate::config::{Config, FailureMode, LocalResponse};
use crate::request::Check;
use crate::wire::{self, CheckResult, RequestResult};

/// What the filter does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Resume the request; add these headers to its response (empty when disabled).
    Allow { response_headers: Vec<(String, String)> },
    /// Answer locally; the request never reaches the upstream.
    Deny(LocalReply),
}

/// A local reply: status, headers and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
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
    /// A 200 whose body is not a valid answer to what was asked.
    Malformed(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Dispatch(why) => write!(f, "dispatching the shim callout failed: {why}"),
            Failure::Status(504) => write!(f, "shim callout timed out (504)"),
            Failure::Status(status) => write!(f, "shim answered status {status}"),
            Failure::NoStatus => write!(f, "shim callout returned no status"),
            Failure::Malformed(why) => write!(f, "{why}"),
        }
    }
}

/// Decides one request from a completed callout that carried only its checks.
pub fn from_callout(config: &Config, checks: &[Check], status: Option<u32>, body: &[u8]) -> Result<Verdict, Failure> {
    match status {
        None => Err(Failure::NoStatus),
        Some(200) => {
            let mut results = wire::decode(body, &[checks.len()]).map_err(Failure::Malformed)?;
            let result = results.pop().ok_or(Failure::NoStatus)?;
            Ok(decide(config, checks, &result))
        }
        Some(other) => Err(Failure::Status(other)),
    }
}

/// The failure mode, applied in this one place.
pub fn on_failure(config: &Config) -> Verdict {
    match config.failure_mode {
        FailureMode::Allow => Verdict::Allow {
            response_headers: Vec::new(),
        },
        FailureMode::Deny => Verdict::Deny(local_reply(
            &config.failure_response,
            Vec::new(),
            || problem_json(config.failure_response.status, "Rate limit service unavailable", "The rate limit could not be checked; try again shortly.", None),
        )),
    }
}

/// What one check means for the response headers, with the reset made safe.
struct Outcome<'a> {
    rule: &'a str,
    limit: u64,
    remaining: u64,
    window_s: u64,
    /// Whole seconds until the counter resets, rounded up, never before the window's end.
    reset_s: u64,
    allowed: bool,
}

/// Decides one request from the shim's answer for it.
pub fn decide(config: &Config, checks: &[Check], result: &RequestResult) -> Verdict {
    let outcomes: Vec<Outcome<'_>> = checks
        .iter()
        .zip(&result.checks)
        .map(|(check, r): (&Check, &CheckResult)| Outcome {
            rule: config.rules.get(check.rule).map_or("", |rule| rule.name.as_str()),
            limit: check.limit,
            remaining: r.remaining.min(check.limit),
            window_s: check.window_ms / 1000,
            // The gateway's window end is when this key stops being used; Redis's TTL can only
            // be later (another gateway created the key), so take the larger of the two.
            reset_s: ceil_seconds(check.ttl_ms.max(r.reset_ms)),
            allowed: r.allowed,
        })
        .collect();

    if result.allowed {
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
        return Verdict::Allow { response_headers };
    }

    // Denied: the client may retry once every denying rule has reset.
    let denying = outcomes.iter().filter(|o| !o.allowed).max_by_key(|o| o.reset_s);
    let Some(binding) = denying.or_else(|| outcomes.iter().max_by_key(|o| o.reset_s)) else {
        return on_failure(config);
    };
    let mut headers = rate_limit_headers(&outcomes, binding);
    headers.insert(0, ("retry-after".to_string(), binding.reset_s.max(1).to_string()));
    Verdict::Deny(local_reply(&config.deny, headers, || {
        problem_json(
            config.deny.status,
            "Too Many Requests",
            &format!(
                "Rate limit \"{}\" exceeded: {} requests per {}s.",
                binding.rule, binding.limit, binding.window_s
            ),
            Some(binding),
        )
    }))
}

/// `X-RateLimit-*` for the binding rule, and the IETF draft fields for every rule checked.
fn rate_limit_headers(outcomes: &[Outcome<'_>], binding: &Outcome<'_>) -> Vec<(String, String)> {
    let policy = outcomes
        .iter()
        .map(|o| format!("\"{}\";q={};w={}", o.rule, o.limit, o.window_s))
        .collect::<Vec<_>>()
        .join(", ");
    let state = outcomes
        .iter()
        .map(|o| format!("\"{}\";r={};t={}", o.rule, o.remaining, o.reset_s))
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        ("x-ratelimit-limit".to_string(), binding.limit.to_string()),
        ("x-ratelimit-remaining".to_string(), binding.remaining.to_string()),
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
    }
}

/// An RFC 9457 problem document; for a denial it names the rule and its limit.
fn problem_json(status: u32, title: &str, detail: &str, rule: Option<&Outcome<'_>>) -> String {
    let mut doc = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    });
    if let (Some(o), Some(map)) = (rule, doc.as_object_mut()) {
        map.insert("rule".into(), o.rule.into());
        map.insert("limit".into(), o.limit.into());
        map.insert("window_seconds".into(), o.window_s.into());
        map.insert("retry_after_seconds".into(), o.reset_s.max(1).into());
    }
    doc.to_string()
}

fn ceil_seconds(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn checks() -> Vec<Check> {
        vec![
            Check { rule: 0, key: "k0".into(), limit: 100, window_ms: 60_000, ttl_ms: 41_500, cost: 1 },
            Check { rule: 1, key: "k1".into(), limit: 20, window_ms: 10_000, ttl_ms: 3_001, cost: 1 },
        ]
    }

    fn result(allowed: bool, checks: &[(bool, u64, u64, u64)]) -> RequestResult {
        RequestResult {
            allowed,
            checks: checks
                .iter()
                .map(|&(allowed, limit, remaining, reset_ms)| CheckResult { allowed, limit, remaining, reset_ms })
                .collect(),
        }
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
        headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()).unwrap_or("<none>")
    }

    #[test]
    fn allow_carries_the_most_restrictive_rules_headers() {
        let verdict = decide(&config(), &checks(), &result(true, &[(true, 100, 63, 41_400), (true, 20, 5, 3_000)]));
        let Verdict::Allow { response_headers: h } = verdict else { panic!("{verdict:?}") };
        assert_eq!(header(&h, "x-ratelimit-limit"), "20");
        assert_eq!(header(&h, "x-ratelimit-remaining"), "5");
        assert_eq!(header(&h, "x-ratelimit-reset"), "4", "3001 ms rounds up to 4 s");
        assert_eq!(header(&h, "ratelimit-policy"), "\"search\";q=100;w=60, \"per_ip\";q=20;w=10");
        assert_eq!(header(&h, "ratelimit"), "\"search\";r=63;t=42, \"per_ip\";r=5;t=4");
        assert_eq!(header(&h, "retry-after"), "<none>");
    }

    #[test]
    fn allow_without_headers_when_disabled() {
        let mut c = config();
        c.headers_on_allow = false;
        let verdict = decide(&c, &checks(), &result(true, &[(true, 100, 1, 1), (true, 20, 1, 1)]));
        assert_eq!(verdict, Verdict::Allow { response_headers: vec![] });
    }

    #[test]
    fn deny_names_the_rule_and_never_retries_before_the_window_ends() {
        // Redis says 2 s left, but the gateway window has 3001 ms left: Retry-After is 4.
        let verdict = decide(&config(), &checks(), &result(false, &[(true, 100, 63, 41_400), (false, 20, 0, 2_000)]));
        let Verdict::Deny(reply) = verdict else { panic!("{verdict:?}") };
        assert_eq!(reply.status, 429);
        assert_eq!(header(&reply.headers, "retry-after"), "4");
        assert_eq!(header(&reply.headers, "x-ratelimit-limit"), "20");
        assert_eq!(header(&reply.headers, "x-ratelimit-remaining"), "0");
        assert_eq!(header(&reply.headers, "x-ratelimit-reset"), "4");
        assert_eq!(header(&reply.headers, "content-type"), "application/problem+json");
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["status"], 429);
        assert_eq!(body["rule"], "per_ip");
        assert_eq!(body["limit"], 20);
        assert_eq!(body["window_seconds"], 10);
        assert_eq!(body["retry_after_seconds"], 4);
        assert_eq!(body["detail"], "Rate limit \"per_ip\" exceeded: 20 requests per 10s.");
    }

    #[test]
    fn deny_by_several_rules_waits_for_the_last_reset() {
        let verdict = decide(&config(), &checks(), &result(false, &[(false, 100, 0, 41_400), (false, 20, 0, 3_000)]));
        let Verdict::Deny(reply) = verdict else { panic!("{verdict:?}") };
        assert_eq!(header(&reply.headers, "retry-after"), "42");
        assert_eq!(header(&reply.headers, "x-ratelimit-limit"), "100");
    }

    #[test]
    fn redis_ttl_longer_than_the_window_wins() {
        let verdict = decide(&config(), &checks(), &result(false, &[(true, 100, 1, 1), (false, 20, 0, 9_999)]));
        let Verdict::Deny(reply) = verdict else { panic!("{verdict:?}") };
        assert_eq!(header(&reply.headers, "retry-after"), "10");
    }

    #[test]
    fn custom_deny_body_keeps_the_headers() {
        let mut c = config();
        c.deny.body = Some("slow down".into());
        c.deny.content_type = "text/plain".into();
        let verdict = decide(&c, &checks(), &result(false, &[(false, 100, 0, 1), (true, 20, 3, 1)]));
        let Verdict::Deny(reply) = verdict else { panic!("{verdict:?}") };
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
            (Some(503), &br#"{"error":"backend_unavailable"}"#[..], Failure::Status(503)),
            (Some(400), &b"{}"[..], Failure::Status(400)),
        ];
        for (status, body, expected) in cases {
            assert_eq!(from_callout(&c, &checks(), status, body), Err(expected));
        }
        assert!(matches!(from_callout(&c, &checks(), Some(200), b"garbage"), Err(Failure::Malformed(_))));
        assert!(matches!(from_callout(&c, &checks(), Some(200), br#"{"results":[]}"#), Err(Failure::Malformed(_))));

        assert_eq!(on_failure(&c), Verdict::Allow { response_headers: vec![] });
        c.failure_mode = FailureMode::Deny;
        let Verdict::Deny(reply) = on_failure(&c) else { panic!() };
        assert_eq!(reply.status, 503);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["title"], "Rate limit service unavailable");
        assert_eq!(Failure::Status(504).to_string(), "shim callout timed out (504)");
    }

    #[test]
    fn a_good_reply_decides() {
        let body = br#"{"results":[{"allowed":true,"checks":[
            {"allowed":true,"limit":100,"count":1,"remaining":99,"reset_ms":41000},
            {"allowed":true,"limit":20,"count":1,"remaining":19,"reset_ms":3000}]}]}"#;
        let verdict = from_callout(&config(), &checks(), Some(200), body).unwrap();
        assert!(matches!(verdict, Verdict::Allow { .. }));
    }
}
