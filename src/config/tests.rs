//! The configuration's tests: every one loads JSON through `Config::from_json`, so each
//! covers both phases (parsing and compiling).

use std::time::Duration;

use super::*;
use crate::rules::{Algorithm, Cost, Descriptor, Limit, OnMissing};

const MINIMAL: &str = r#"{
    "shim": {"upstream": "tollgate_shim"},
    "rules": [{"name": "per_ip", "descriptors": ["client_ip"], "limit": 10, "window": "1m"}]
}"#;

/// Applies `edit` to the minimal config and returns the error line.
fn error_for(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(MINIMAL).unwrap();
    edit(&mut v);
    let bytes = serde_json::to_vec(&v).unwrap();
    Config::from_json(&bytes).unwrap_err().to_string()
}

#[test]
fn minimal_config_gets_the_defaults() {
    let c = Config::from_json(MINIMAL.as_bytes()).unwrap();
    assert_eq!(c.shim.path, "/v1/check");
    assert_eq!(c.shim.authority, "tollgate-shim");
    assert_eq!(c.shim.timeout, Duration::from_millis(50));
    assert_eq!(c.failure_mode, FailureMode::Allow);
    assert_eq!(c.key_prefix, "tollgate");
    assert_eq!(c.deny.status, 429);
    assert_eq!(c.deny.content_type, "application/problem+json");
    assert_eq!(c.failure_response.status, 503);
    assert!(c.headers_on_allow);
    let rule = &c.rules[0];
    assert_eq!(
        rule.limits,
        vec![Limit::Window {
            limit: 10,
            window_ms: 60_000
        }]
    );
    assert_eq!(rule.algorithm, Algorithm::FixedWindow);
    assert_eq!(rule.cost, Cost::Fixed(1));
    assert_eq!(rule.descriptors, vec![Descriptor::ClientIp]);
    assert_eq!(rule.on_missing, OnMissing::Skip);
}

#[test]
fn full_config_compiles() {
    let json = r#"{
        "shim": {"upstream": "shim", "path": "/v1/check", "authority": "s", "timeout": "20ms"},
        "failure_mode": "deny",
        "key_prefix": "tg",
        "deny": {"status": 403, "body": "slow down"},
        "failure_response": {"status": 500, "body": "{}", "content_type": "application/json"},
        "headers_on_allow": false,
        "rules": [{
            "name": "search",
            "match": {"policies": ["search"], "routes": ["r1"], "path_prefix": "/v1/",
                      "methods": ["get"], "hosts": ["API.example.com"]},
            "descriptors": ["header:X-Api-Key", "route", "query:q", "const:v1", "path", "method", "host"],
            "on_missing": "anonymous",
            "limit": 100, "window": "1h"
        }]
    }"#;
    let c = Config::from_json(json.as_bytes()).unwrap();
    assert_eq!(c.failure_mode, FailureMode::Deny);
    assert_eq!(c.deny.content_type, "text/plain; charset=utf-8");
    assert_eq!(c.failure_response.content_type, "application/json");
    let r = &c.rules[0];
    assert_eq!(r.matcher.methods, vec!["GET"]);
    assert_eq!(r.matcher.hosts, vec!["api.example.com"]);
    assert_eq!(r.descriptors[0], Descriptor::Header("x-api-key".into()));
    assert_eq!(r.descriptors[2], Descriptor::Query("q".into()));
    assert_eq!(r.descriptors[3], Descriptor::Const("v1".into()));
    assert_eq!(
        r.limits,
        vec![Limit::Window {
            limit: 100,
            window_ms: 3_600_000
        }]
    );
}

/// Every rejection path: (what to change, text the error must contain).
#[test]
fn every_error_names_the_field_and_value() {
    use serde_json::json;
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|v| v["bogus"] = json!(1)),
            "bogus: unknown field `bogus`, expected one of",
        ),
        (
            Box::new(|v| v["shim"]["port"] = json!(1)),
            "shim.port: unknown field `port`",
        ),
        (
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("shim");
            }),
            "missing field `shim`",
        ),
        (
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("rules");
            }),
            "missing field `rules`",
        ),
        (
            Box::new(|v| v["shim"]["upstream"] = json!(" ")),
            "shim.upstream: must name",
        ),
        (
            Box::new(|v| v["shim"]["upstream"] = json!(7)),
            "shim.upstream: invalid type: integer `7`",
        ),
        (
            Box::new(|v| v["shim"]["path"] = json!("v1")),
            "shim.path: must be an absolute path without spaces (got \"v1\")",
        ),
        (
            Box::new(|v| v["shim"]["secret"] = json!("has space")),
            "shim.secret: must be 1 to 256 printable ASCII characters without spaces (got (hidden))",
        ),
        (
            Box::new(|v| v["shim"]["authority"] = json!("")),
            "shim.authority: must be a non-empty host name",
        ),
        (
            Box::new(|v| v["shim"]["timeout"] = json!("fast")),
            "shim.timeout: ",
        ),
        (
            Box::new(|v| v["shim"]["timeout"] = json!("0ms")),
            "shim.timeout: must be between 1ms and 60s (got \"0ms\")",
        ),
        (
            Box::new(|v| v["shim"]["timeout"] = json!("2m")),
            "shim.timeout: must be between 1ms and 60s (got \"2m\")",
        ),
        (
            Box::new(|v| v["failure_mode"] = json!("open")),
            "failure_mode: unknown variant `open`",
        ),
        (
            Box::new(|v| v["key_prefix"] = json!("a{b}")),
            "key_prefix: must be 1 to 64 characters",
        ),
        (
            Box::new(|v| v["key_prefix"] = json!("")),
            "key_prefix: must be 1 to 64 characters",
        ),
        (
            Box::new(|v| v["deny"] = json!({"status": 200})),
            "deny.status: must be an HTTP error status (400..599) (got 200)",
        ),
        (
            Box::new(|v| v["deny"] = json!({"status": 429, "content_type": "a\nb"})),
            "deny.content_type: must be a media type",
        ),
        (
            Box::new(|v| v["failure_response"] = json!({"status": 302})),
            "failure_response.status: must be an HTTP error status",
        ),
        (
            Box::new(|v| v["headers_on_allow"] = json!("yes")),
            "headers_on_allow: invalid type: string",
        ),
        (
            Box::new(|v| v["rules"] = json!([])),
            "rules: at least one rule is required",
        ),
        (
            Box::new(|v| v["rules"] = json!(vec![v["rules"][0].clone(); 33])),
            "rules: at most 32 rules are allowed (got 33 rules)",
        ),
        (
            Box::new(|v| {
                let r = v["rules"][0].clone();
                v["rules"] = json!([r.clone(), r]);
            }),
            "rules[1].name: rule names must be unique (got \"per_ip\")",
        ),
        (
            Box::new(|v| v["rules"][0]["name"] = json!("a b")),
            "rules[0].name: must be 1 to 64 characters",
        ),
        (
            Box::new(|v| v["rules"][0]["name"] = json!("x".repeat(65))),
            "rules[0].name: must be 1 to 64 characters",
        ),
        (
            Box::new(|v| v["rules"][0]["limit"] = json!(0)),
            "rules[0].limit: must be between 1 and 1000000000000 (got 0)",
        ),
        (
            Box::new(|v| v["rules"][0]["limit"] = json!(-1)),
            "rules[0].limit: invalid value: integer `-1`",
        ),
        (
            Box::new(|v| v["rules"][0]["limit"] = json!("10")),
            "rules[0].limit: invalid type: string \"10\"",
        ),
        (
            Box::new(|v| v["rules"][0]["limit"] = json!(2_000_000_000_000u64)),
            "rules[0].limit: must be between 1 and 1000000000000",
        ),
        (
            Box::new(|v| {
                v["rules"][0].as_object_mut().unwrap().remove("limit");
            }),
            "rules[0].limit: is required by algorithm fixed_window (got nothing)",
        ),
        (
            Box::new(|v| v["rules"][0]["window"] = json!("500ms")),
            "rules[0].window: must be between 1s and 1d (got \"500ms\")",
        ),
        (
            Box::new(|v| v["rules"][0]["window"] = json!("2d")),
            "rules[0].window: must be between 1s and 1d (got \"2d\")",
        ),
        (
            Box::new(|v| v["rules"][0]["window"] = json!("1500ms")),
            "rules[0].window: must be a whole number of seconds",
        ),
        (
            Box::new(|v| v["rules"][0]["window"] = json!("1 minute")),
            "rules[0].window: ",
        ),
        (
            Box::new(|v| v["rules"][0]["window"] = json!(60)),
            "rules[0].window: invalid type: integer `60`",
        ),
        (
            Box::new(|v| v["rules"][0]["on_missing"] = json!("deny")),
            "rules[0].on_missing: unknown variant `deny`",
        ),
        (
            Box::new(|v| v["rules"][0]["descriptors"] = json!(["cookie"])),
            "rules[0].descriptors[0]: unknown descriptor",
        ),
        (
            Box::new(|v| v["rules"][0]["descriptors"] = json!(["client_ip", "header:"])),
            "rules[0].descriptors[1]: header:NAME needs a valid header name (got \"header:\")",
        ),
        (
            Box::new(|v| v["rules"][0]["descriptors"] = json!(["header:a b"])),
            "rules[0].descriptors[0]: header:NAME",
        ),
        (
            Box::new(|v| v["rules"][0]["descriptors"] = json!(["query:"])),
            "rules[0].descriptors[0]: query:NAME needs a parameter name",
        ),
        (
            Box::new(|v| v["rules"][0]["descriptors"] = json!(["const:"])),
            "rules[0].descriptors[0]: const:VALUE needs a value",
        ),
        (
            Box::new(|v| v["rules"][0]["descriptors"] = json!(["path:x"])),
            "rules[0].descriptors[0]: unknown descriptor",
        ),
        (
            Box::new(|v| v["rules"][0]["descriptors"] = json!(vec!["path"; 9])),
            "rules[0].descriptors: at most 8 descriptors",
        ),
        (
            Box::new(|v| v["rules"][0]["match"] = json!({"path": "/"})),
            "rules[0].match.path: unknown field `path`",
        ),
        (
            Box::new(|v| v["rules"][0]["match"] = json!({"policies": ["a|b"]})),
            "rules[0].match.policies[0]: must be 1 to 64 characters",
        ),
        (
            Box::new(|v| v["rules"][0]["match"] = json!({"routes": [""]})),
            "rules[0].match.routes[0]: must not be empty",
        ),
        (
            Box::new(|v| v["rules"][0]["match"] = json!({"path_prefix": "v1"})),
            "rules[0].match.path_prefix: must start with '/' (got \"v1\")",
        ),
        (
            Box::new(|v| v["rules"][0]["match"] = json!({"methods": ["GE T"]})),
            "rules[0].match.methods[0]: must be an HTTP method",
        ),
        (
            Box::new(|v| v["rules"][0]["match"] = json!({"hosts": ["http://x"]})),
            "rules[0].match.hosts[0]: must be a host name",
        ),
    ];
    // The policy model: algorithms, limits, tiers, costs, bypass, client IP.
    let rule = |extra: serde_json::Value| -> Edit {
        Box::new(move |v| {
            let mut r = json!({"name": "r"});
            for (k, x) in extra.as_object().unwrap() {
                r[k] = x.clone();
            }
            v["rules"] = json!([r]);
        })
    };
    let policy_cases: Vec<(Edit, &str)> = vec![
        (
            rule(json!({"algorithm": "leaky", "limit": 1, "window": "1s"})),
            "rules[0].algorithm: unknown variant `leaky`",
        ),
        (
            rule(json!({"algorithm": "token_bucket", "rate": 1, "period": "1s"})),
            "rules[0].burst: is required by algorithm token_bucket",
        ),
        (
            rule(json!({"algorithm": "gcra", "burst": 1, "rate": 1})),
            "rules[0].period: is required by algorithm gcra",
        ),
        (
            rule(json!({"algorithm": "gcra", "burst": 1, "rate": 0, "period": "1s"})),
            "rules[0].rate: must be between 1 and 1000000000 (got 0)",
        ),
        (
            rule(
                json!({"algorithm": "token_bucket", "burst": 1, "rate": 1, "period": "1s", "window": "1s"}),
            ),
            "rules[0].window: is not used by algorithm token_bucket",
        ),
        (
            rule(
                json!({"algorithm": "token_bucket", "burst": 1, "rate": 10000, "period": "1ms"}),
            ),
            "rules[0].rate: is more than one per microsecond",
        ),
        (
            rule(json!({"algorithm": "gcra", "burst": 1, "rate": 1001, "period": "1ms"})),
            "rules[0].rate: is more than one per microsecond of period: at most 1000 for a \
             period of 1 ms (got 1001)",
        ),
        (
            rule(
                json!({"algorithm": "gcra", "limits": [{"burst": 1, "rate": 1, "period": "1s"}, {"burst": 1, "rate": 5_000_001, "period": "5s"}]}),
            ),
            "rules[0].limits[1].rate: is more than one per microsecond of period: at most \
             5000000 for a period of 5000 ms (got 5000001)",
        ),
        (
            rule(
                json!({"algorithm": "gcra", "burst": 1, "rate": 1_000_000_001u64, "period": "1d"}),
            ),
            "rules[0].rate: must be between 1 and 1000000000 (got 1000000001)",
        ),
        (
            rule(
                json!({"algorithm": "token_bucket", "burst": 1_000_000_000_001u64, "rate": 1, "period": "1s"}),
            ),
            "rules[0].burst: must be between 1 and 1000000000000 (got 1000000000001)",
        ),
        (
            rule(json!({"algorithm": "gcra", "burst": 1, "rate": 1, "period": "2d"})),
            "rules[0].period: must be between 1ms and 1d (got \"2d\")",
        ),
        (
            rule(json!({"algorithm": "concurrency", "limit": 1, "timeout": "999ms"})),
            "rules[0].timeout: must be between 1s and 1d (got \"999ms\")",
        ),
        (
            rule(json!({"algorithm": "concurrency", "limit": 1, "timeout": "2d"})),
            "rules[0].timeout: must be between 1s and 1d (got \"2d\")",
        ),
        (
            rule(
                json!({"algorithm": "concurrency", "limit": 1_000_000_000_001u64, "timeout": "1s"}),
            ),
            "rules[0].limit: must be between 1 and 1000000000000 (got 1000000000001)",
        ),
        (
            rule(json!({"algorithm": "sliding_window", "limit": 1, "window": "999ms"})),
            "rules[0].window: must be between 1s and 1d (got \"999ms\")",
        ),
        (
            rule(json!({"limit": 1, "window": "1s", "burst": 3})),
            "rules[0].burst: is not used by algorithm fixed_window",
        ),
        (
            rule(json!({"limit": 1, "window": "1s", "subwindows": 4})),
            "rules[0].subwindows: is not used by algorithm fixed_window (got 4)",
        ),
        (
            rule(
                json!({"algorithm": "sliding_window", "limit": 1, "window": "1s", "subwindows": 0}),
            ),
            "rules[0].subwindows: must be between 1 and 100 (got 0)",
        ),
        (
            rule(
                json!({"algorithm": "sliding_window", "limit": 1, "window": "1s", "subwindows": 101}),
            ),
            "rules[0].subwindows: must be between 1 and 100 (got 101)",
        ),
        (
            rule(json!({"algorithm": "sliding_window", "subwindows": 3,
                        "limits": [{"limit": 1, "window": "3s"}, {"limit": 5, "window": "1m"}, {"limit": 9, "window": "1s"}]})),
            "rules[0].subwindows: must divide every window in ms (not 1000) (got 3)",
        ),
        (
            rule(json!({"algorithm": "sliding_log", "limit": 10001, "window": "1s"})),
            "rules[0].limit: must be between 1 and 10000 (got 10001)",
        ),
        (
            rule(json!({"algorithm": "concurrency", "limit": 1, "timeout": "0s"})),
            "rules[0].timeout: must be between 1s and 1d",
        ),
        (
            rule(json!({"limit": 1, "window": "1h", "usage": {"from": "xml:a"}})),
            "rules[0].usage.from: must be header:NAME, json:PATH",
        ),
        (
            rule(
                json!({"algorithm": "token_bucket", "burst": 1, "rate": 1, "period": "1s",
                        "usage": {"from": "bytes"}}),
            ),
            "rules[0].usage: usage is charged to a window counter",
        ),
        (
            rule(json!({"algorithm": "sliding_window", "limit": 1, "window": "1h",
                        "usage": {"from": "bytes"}})),
            "rules[0].usage: usage is charged to a window counter: use algorithm fixed_window or sliding_window_estimate (got sliding_window)",
        ),
        (
            rule(json!({"limit": 1, "window": "1h", "cost": 2, "usage": {"from": "bytes"}})),
            "rules[0].cost: a usage rule's request-time cost is usage.reserve",
        ),
        (
            rule(
                json!({"limit": 1, "window": "1h", "usage": {"from": "bytes", "reserve": 2_000_000_000u64}}),
            ),
            "rules[0].usage.reserve: must be between 0 and 10^9",
        ),
        (
            rule(
                json!({"limit": 1, "window": "1h", "usage": {"from": "bytes", "unit": "gi ga"}}),
            ),
            "rules[0].usage.unit: must match",
        ),
        (
            rule(json!({"limit": 1, "window": "1h", "usage": {"from": "bytes", "typo": 1}})),
            "rules[0].usage.typo: unknown field",
        ),
        (
            rule(json!({"algorithm": "concurrency", "limit": 1, "cost": 2})),
            "rules[0].cost: a concurrency rule counts requests in flight",
        ),
        (
            rule(json!({"algorithm": "concurrency", "limits": [{"limit": 1}, {"limit": 2}]})),
            "rules[0].limits: a concurrency rule has one limit",
        ),
        (
            rule(json!({"limit": 1, "window": "1s", "limits": [{"limit": 1, "window": "1s"}]})),
            "rules[0].limits: give one of",
        ),
        (
            rule(json!({"limits": []})),
            "rules[0].limits: give 1 to 4 limits (got 0 limits)",
        ),
        (
            rule(json!({"limits": [{"limit": 1}]})),
            "rules[0].limits[0].window: is required by algorithm fixed_window",
        ),
        (
            rule(json!({"limits": [{"limit": 1, "window": "1s", "extra": 1}]})),
            "rules[0].limits[0].extra: unknown field `extra`",
        ),
        (
            rule(
                json!({"tiers": {"descriptor": "plan", "values": {}, "default": [{"limit": 1, "window": "1s"}]}}),
            ),
            "rules[0].tiers.descriptor: unknown descriptor",
        ),
        (
            rule(
                json!({"tiers": {"descriptor": "header:x-plan", "values": {"pro": [{"limit": 0, "window": "1s"}]}, "default": [{"limit": 1, "window": "1s"}]}}),
            ),
            "rules[0].tiers.values.pro[0].limit: must be between 1 and",
        ),
        (
            rule(json!({"tiers": {"descriptor": "header:x-plan", "values": {}}})),
            "rules[0].tiers: missing field `default`",
        ),
        (
            rule(json!({"limit": 1, "window": "1s", "cost": 2_000_000_000u64})),
            "rules[0].cost: must be between 0 and 10^9",
        ),
        (
            rule(json!({"limit": 1, "window": "1s", "cost": "2"})),
            "rules[0].cost: data did not match any variant",
        ),
        (
            rule(json!({"limit": 1, "window": "1s", "cost": {"header": "x cost", "max": 5}})),
            "rules[0].cost.header: must be a header name",
        ),
        (
            rule(json!({"limit": 1, "window": "1s", "cost": {"header": "x-cost", "max": 0}})),
            "rules[0].cost.max: must be between 1 and 10^9",
        ),
        (
            rule(
                json!({"limit": 1, "window": "1s", "cost": {"header": "x-cost", "max": 5, "default": 6}}),
            ),
            "rules[0].cost.default: must not exceed cost.max (got 6)",
        ),
        (
            rule(json!({"limit": 1, "window": "1s", "bypass": {"cidrs": ["10.0.0.0/33"]}})),
            "rules[0].bypass.cidrs[0]: expected an address range",
        ),
        (
            rule(json!({"limit": 1, "window": "1s", "bypass": {"values": {"cookie": ["x"]}}})),
            "rules[0].bypass.values.cookie: unknown descriptor",
        ),
        (
            rule(json!({"limit": 1, "window": "1s", "shadow": "yes"})),
            "rules[0].shadow: invalid type: string",
        ),
        (
            Box::new(|v| v["client_ip"] = json!({"trusted_hops": 2})),
            "client_ip.trusted_hops: only applies with \"from\": \"x-forwarded-for\"",
        ),
        (
            Box::new(|v| {
                v["client_ip"] = json!({"from": "x-forwarded-for", "trusted_hops": 0})
            }),
            "client_ip.trusted_hops: must be between 1 and 16 (got 0)",
        ),
        (
            Box::new(|v| v["client_ip"] = json!({"ipv6_prefix": 0})),
            "client_ip.ipv6_prefix: must be between 1 and 128 (got 0)",
        ),
        (
            Box::new(|v| v["client_ip"] = json!({"ipv4_prefix": 33})),
            "client_ip.ipv4_prefix: must be between 1 and 32 (got 33)",
        ),
        (
            Box::new(|v| v["client_ip"] = json!({"from": "header"})),
            "client_ip.from: unknown variant `header`",
        ),
        (
            Box::new(|v| v["failure_mode"] = json!("local")),
            "local_fallback: is required with failure_mode \"local\"",
        ),
        (
            Box::new(|v| {
                v["failure_mode"] = json!("local");
                v["local_fallback"] = json!({"replicas": 0});
            }),
            "local_fallback.replicas: must be between 1 and 100000 (got 0)",
        ),
        (
            Box::new(|v| v["local_fallback"] = json!({"replicas": 2})),
            "local_fallback: only applies with failure_mode \"local\"",
        ),
    ];
    let cases = cases.into_iter().chain(policy_cases);
    for (edit, expected) in cases {
        let message = error_for(edit);
        assert!(
            message.starts_with("invalid plugin configuration: "),
            "{message}"
        );
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message:?}"
        );
    }
}

/// A request can match every rule: their limits together must fit the shim's checks per
/// request, counting each rule's longest list of limits (a tier's or the default).
#[test]
fn checks_per_request_are_bounded_at_load() {
    use serde_json::json;
    let four = json!([{"limit": 1, "window": "1s"}, {"limit": 2, "window": "2s"},
                      {"limit": 3, "window": "3s"}, {"limit": 4, "window": "4s"}]);
    let one = json!([{"limit": 1, "window": "1s"}]);
    let config = |rules: Vec<serde_json::Value>| {
        let v = json!({"shim": {"upstream": "s"}, "rules": rules});
        Config::from_json(&serde_json::to_vec(&v).unwrap())
    };
    let with_limits = |n: usize, limits: &serde_json::Value| {
        (0..n)
            .map(|i| json!({"name": format!("r{i}"), "limits": limits}))
            .collect::<Vec<_>>()
    };
    // 8 × 4 and 32 × 1 are exactly the bound.
    assert!(config(with_limits(8, &four)).is_ok());
    assert!(config(with_limits(32, &one)).is_ok());
    // The issue's case: 9 rules × 4 limits.
    assert_eq!(
        config(with_limits(9, &four)).unwrap_err().to_string(),
        "invalid plugin configuration: rules: a request can match 9 rules with up to 36 \
         limits in all; the shim takes at most 32 checks per request (got 9 rules, 36 limits)"
    );
    // A tier's list counts when it is the longest, even if the default is shorter.
    let mut rules = with_limits(7, &four);
    rules.push(
        json!({"name": "tiered", "tiers": {"descriptor": "header:x-plan",
        "values": {"free": one, "pro": four}, "default": one}}),
    );
    assert!(config(rules.clone()).is_ok());
    rules.push(json!({"name": "extra", "limit": 1, "window": "1s"}));
    let err = config(rules).unwrap_err().to_string();
    assert!(
        err.contains("rules: a request can match 9 rules with up to 33 limits in all"),
        "{err}"
    );
    // The default's list counts when it is the longest.
    let mut rules = with_limits(7, &four);
    rules.push(
        json!({"name": "tiered", "tiers": {"descriptor": "header:x-plan",
        "values": {"free": one}, "default": four}}),
    );
    rules.push(json!({"name": "extra", "limit": 1, "window": "1s"}));
    assert!(config(rules)
        .unwrap_err()
        .to_string()
        .contains("up to 33 limits"));
}

/// The filter configurations embedded in the shipped Kong declarative config are valid.
#[test]
fn shipped_kong_configs_validate() {
    let yaml = include_str!("../../deploy/kong/kong.yaml");
    let mut found = 0;
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        if !line.trim_start().starts_with("config: |") {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            if !next.trim().is_empty() && next.len() - next.trim_start().len() <= indent {
                break;
            }
            block.push_str(lines.next().unwrap_or_default());
            block.push('\n');
        }
        let config = Config::from_json(block.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{block}"));
        assert!(
            config.shim.upstream.contains(':'),
            "on Kong the shim is host:port"
        );
        assert!(!config.coalesce, "ngx_wasm_module cannot coalesce: say so");
        assert!(
            config.rules.iter().all(|r| r.matcher.routes.is_empty()),
            "kong.route_name needs Kong 3.9.3+: scope rules by filter chain"
        );
        found += 1;
    }
    assert_eq!(found, 2);
}

#[test]
fn the_shim_secret_never_shows() {
    let json = r#"{"shim": {"upstream": "s", "secret": "s3cr3t-value"},
                   "rules": [{"name": "r", "limit": 1, "window": "1s"}]}"#;
    let c = Config::from_json(json.as_bytes()).unwrap();
    assert_eq!(
        c.shim.secret.as_ref().map(|s| s.0.as_str()),
        Some("s3cr3t-value")
    );
    assert!(!format!("{c:?}").contains("s3cr3t"));
    let bad = json.replace("s3cr3t-value", "s3cr3t value");
    let err = Config::from_json(bad.as_bytes()).unwrap_err().to_string();
    assert!(!err.contains("s3cr3t"), "{err}");
}

#[test]
fn not_json_and_trailing_garbage_are_rejected() {
    for bad in ["", "nope", "[]", "{} {}"] {
        let err = Config::from_json(bad.as_bytes()).unwrap_err().to_string();
        assert!(err.starts_with("invalid plugin configuration: "), "{err}");
    }
    let err = Config::from_json(format!("{MINIMAL} x").as_bytes()).unwrap_err();
    assert!(
        err.to_string().contains("(top level): trailing characters"),
        "{err}"
    );
}
