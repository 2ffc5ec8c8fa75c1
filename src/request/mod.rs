//! Which rules apply to a request, and the checks (keys, limits, costs) each one sends. The
//! request's attributes come from the host through [`RequestView`], read once each (`facts`).

use crate::algorithms::sliding_weight_ms;
use crate::check::{Check, CheckKind};
use crate::config::Config;
use crate::keys::{counter_key, fixed_window, suffix, Value};
use crate::rules::{Algorithm, Cost, Limit, OnMissing, Rule};

mod facts;
use facts::Facts;

/// The few request attributes the pure logic reads, provided by the host (Envoy, Kong, a test).
pub trait RequestView {
    /// A request header by lower-case name (pseudo-headers such as `:path` included).
    fn header(&self, name: &str) -> Option<Vec<u8>>;
    /// The downstream peer's address as the host reports it (`ip:port`, `[v6]:port`, or bare).
    fn source_address(&self) -> Option<Vec<u8>>;
    /// The route name the gateway matched.
    fn route_name(&self) -> Option<Vec<u8>>;
    /// The route's Tollgate policy (Envoy: route metadata `filter_metadata.tollgate.policy`).
    fn route_policy(&self) -> Option<Vec<u8>>;
    /// The upstream service (Envoy cluster, Kong service).
    fn service_name(&self) -> Option<Vec<u8>>;
}

/// The checks for every rule that applies to this request, in rule order.
/// `request_id` must be unique per request across all gateways (it names concurrency slots).
pub fn checks_for(
    config: &Config,
    view: &impl RequestView,
    now_ms: u64,
    request_id: &str,
) -> Vec<Check> {
    let facts = Facts::new(config, view);
    let mut checks = Vec::new();
    for (i, rule) in config.rules.iter().enumerate() {
        if !matches(rule, &facts) || bypassed(rule, &facts) {
            continue;
        }
        let Some(values) = descriptor_values(rule, &facts) else {
            continue;
        };
        let borrowed: Vec<Value<'_>> = values
            .iter()
            .map(|v| v.as_deref().map_or(Value::Anonymous, Value::Present))
            .collect();
        let cost = cost_of(&rule.cost, &facts);
        for limit in limits_for(rule, &facts) {
            let key = |tail: String| counter_key(&config.key_prefix, &rule.name, &borrowed, &tail);
            // Each algorithm's state has its own key shape (see `keys`); the window counters of
            // fixed and sliding windows are the same kind of key.
            let (key, kind) = match (*limit, rule.algorithm) {
                (Limit::Window { limit, window_ms }, Algorithm::FixedWindow) => {
                    let w = fixed_window(now_ms, window_ms);
                    let kind = CheckKind::FixedWindow {
                        limit,
                        window_ms,
                        ttl_ms: w.remaining_ms,
                    };
                    (key(suffix::window(window_ms, w.index)), kind)
                }
                (Limit::Window { limit, window_ms }, Algorithm::SlidingWindowEstimate) => {
                    let index = now_ms / window_ms;
                    let prev_key = key(suffix::window(window_ms, index.saturating_sub(1)));
                    let weight_ms = sliding_weight_ms(now_ms, window_ms);
                    let kind = CheckKind::SlidingWindow {
                        prev_key,
                        limit,
                        window_ms,
                        weight_ms,
                    };
                    (key(suffix::window(window_ms, index)), kind)
                }
                (Limit::Window { limit, window_ms }, Algorithm::SlidingWindow) => (
                    key(suffix::sub_windows(window_ms, rule.subwindows)),
                    CheckKind::SlidingWindowBounded {
                        limit,
                        window_ms,
                        subwindows: rule.subwindows,
                    },
                ),
                (Limit::Window { limit, window_ms }, _) => (
                    key(suffix::log(window_ms)),
                    CheckKind::SlidingLog {
                        limit,
                        window_ms,
                        id: request_id.to_string(),
                    },
                ),
                (
                    Limit::Rate {
                        burst,
                        rate,
                        period_ms,
                    },
                    Algorithm::Gcra,
                ) => (
                    key(suffix::gcra(burst, rate, period_ms)),
                    CheckKind::Gcra {
                        burst,
                        rate,
                        period_ms,
                    },
                ),
                (
                    Limit::Rate {
                        burst,
                        rate,
                        period_ms,
                    },
                    _,
                ) => (
                    key(suffix::token_bucket(burst, rate, period_ms)),
                    CheckKind::TokenBucket {
                        burst,
                        rate,
                        period_ms,
                    },
                ),
                (Limit::InFlight { limit, timeout_ms }, _) => (
                    key(suffix::CONCURRENCY.to_string()),
                    CheckKind::Concurrency {
                        limit,
                        timeout_ms,
                        id: request_id.to_string(),
                    },
                ),
            };
            // A concurrency slot is one request in flight, whatever the cost.
            let cost = if matches!(kind, CheckKind::Concurrency { .. }) {
                1
            } else {
                cost
            };
            checks.push(Check {
                lease: 0,
                rule: i,
                key,
                cost,
                shadow: rule.shadow,
                kind,
            });
        }
    }
    checks
}

fn matches<V: RequestView>(rule: &Rule, facts: &Facts<'_, V>) -> bool {
    // Each attribute is read from the host only when the matcher constrains it.
    let m = &rule.matcher;
    let optional_in_list = |list: &[String], value: &dyn Fn() -> Option<Vec<u8>>| {
        list.is_empty() || value().is_some_and(|v| contains(list, &v))
    };
    m.path_prefix
        .as_ref()
        .is_none_or(|p| facts.path().starts_with(p.as_bytes()))
        && (m.methods.is_empty() || contains(&m.methods, facts.method()))
        && (m.hosts.is_empty() || contains(&m.hosts, facts.host()))
        && optional_in_list(&m.policies, &|| facts.policy().clone())
        && optional_in_list(&m.routes, &|| facts.route_name().clone())
}

fn contains(list: &[String], value: &[u8]) -> bool {
    list.iter().any(|s| s.as_bytes() == value)
}

/// An exempt descriptor value, or a client inside an exempt range.
fn bypassed<V: RequestView>(rule: &Rule, facts: &Facts<'_, V>) -> bool {
    let b = &rule.bypass;
    let by_value = b.values.iter().any(|(d, exempt)| {
        facts
            .value(d)
            .is_some_and(|v| exempt.iter().any(|e| e.as_bytes() == v.as_slice()))
    });
    by_value
        || (!b.cidrs.is_empty()
            && facts
                .client()
                .as_ref()
                .and_then(|c| c.addr)
                .is_some_and(|a| b.cidrs.iter().any(|c| c.contains(a))))
}

/// Each descriptor's value (`None`: anonymous), or `None` when the rule is skipped.
fn descriptor_values<V: RequestView>(
    rule: &Rule,
    facts: &Facts<'_, V>,
) -> Option<Vec<Option<Vec<u8>>>> {
    let mut values = Vec::with_capacity(rule.descriptors.len());
    for d in &rule.descriptors {
        match (facts.value(d), rule.on_missing) {
            (Some(v), _) => values.push(Some(v)),
            (None, OnMissing::Anonymous) => values.push(None),
            (None, OnMissing::Skip) => return None,
        }
    }
    Some(values)
}

/// The tier's limits for this request's tier value, else the rule's default limits.
fn limits_for<'r, V: RequestView>(rule: &'r Rule, facts: &Facts<'_, V>) -> &'r [Limit] {
    let tiered = rule.tiers.as_ref().and_then(|t| {
        let value = facts.value(&t.descriptor)?;
        t.values
            .iter()
            .find(|(name, _)| name.as_bytes() == value.as_slice())
            .map(|(_, l)| l.as_slice())
    });
    tiered.unwrap_or(&rule.limits)
}

/// The request's cost: fixed, or a whole number from a header (absent or invalid → default),
/// capped at the configured maximum.
fn cost_of<V: RequestView>(cost: &Cost, facts: &Facts<'_, V>) -> u64 {
    match cost {
        Cost::Fixed(n) => *n,
        Cost::Header { name, default, max } => facts
            .view
            .header(name)
            .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<u64>().ok())
            .unwrap_or(*default)
            .min(*max),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A request for tests: headers plus the properties the host would give.
    #[derive(Default)]
    pub struct FakeRequest {
        pub headers: HashMap<String, Vec<u8>>,
        pub source: Option<String>,
        pub route: Option<String>,
        pub policy: Option<String>,
        pub service: Option<String>,
        /// Every header read, in order: each is a host call on a real gateway.
        pub reads: std::cell::RefCell<Vec<String>>,
    }

    impl FakeRequest {
        pub fn get(path: &str) -> FakeRequest {
            let mut r = FakeRequest::default();
            r.headers.insert(":method".into(), b"GET".to_vec());
            r.headers.insert(":path".into(), path.as_bytes().to_vec());
            r.headers
                .insert(":authority".into(), b"API.example.com:10000".to_vec());
            r.source = Some("10.1.2.3:5555".into());
            r
        }
        pub fn with(mut self, name: &str, value: &str) -> FakeRequest {
            self.headers.insert(name.into(), value.as_bytes().to_vec());
            self
        }
    }

    impl RequestView for FakeRequest {
        fn header(&self, name: &str) -> Option<Vec<u8>> {
            self.reads.borrow_mut().push(name.to_string());
            self.headers.get(name).cloned()
        }
        fn source_address(&self) -> Option<Vec<u8>> {
            self.source.clone().map(String::into_bytes)
        }
        fn route_name(&self) -> Option<Vec<u8>> {
            self.route.clone().map(String::into_bytes)
        }
        fn route_policy(&self) -> Option<Vec<u8>> {
            self.policy.clone().map(String::into_bytes)
        }
        fn service_name(&self) -> Option<Vec<u8>> {
            self.service.clone().map(String::into_bytes)
        }
    }

    fn config(rules: &str) -> Config {
        let json = format!(r#"{{"shim": {{"upstream": "s"}}, "rules": {rules}}}"#);
        Config::from_json(json.as_bytes()).unwrap()
    }

    fn keys(c: &Config, r: &FakeRequest) -> Vec<String> {
        checks_for(c, r, 120_500, "id")
            .into_iter()
            .map(|c| c.key)
            .collect()
    }

    #[test]
    fn builds_one_check_per_matching_rule() {
        let c = config(
            r#"[{"name": "a", "descriptors": ["client_ip"], "limit": 5, "window": "1m"},
                {"name": "b", "descriptors": ["header:x-api-key", "method", "path", "host"], "limit": 7, "window": "1s"}]"#,
        );
        let req = FakeRequest::get("/v1/search?q=1").with("x-api-key", "k1");
        let checks = checks_for(&c, &req, 120_500, "id");
        assert_eq!(checks.len(), 2);
        assert_eq!(checks[0].key, "tollgate:{a|=10.1.2.3}:60000:2");
        assert_eq!(
            checks[0].kind,
            CheckKind::FixedWindow {
                limit: 5,
                window_ms: 60_000,
                ttl_ms: 59_500
            }
        );
        assert_eq!(
            checks[1].key,
            "tollgate:{b|=k1|=GET|=%2Fv1%2Fsearch|=api.example.com}:1000:120"
        );
        assert_eq!(
            (checks[1].rule, checks[1].cost, checks[1].shadow),
            (1, 1, false)
        );
    }

    #[test]
    fn every_algorithm_has_its_key_and_parameters() {
        let c = config(
            r#"[{"name": "fw", "limits": [{"limit": 10, "window": "1s"}, {"limit": 1000, "window": "1h"}]},
                {"name": "sw", "algorithm": "sliding_window_estimate", "limit": 10, "window": "1s"},
                {"name": "log", "algorithm": "sliding_log", "limit": 10, "window": "1m"},
                {"name": "swb", "algorithm": "sliding_window", "limit": 10, "window": "2s", "subwindows": 4},
                {"name": "tb", "algorithm": "token_bucket", "burst": 5, "rate": 1, "period": "200ms"},
                {"name": "gcra", "algorithm": "gcra", "burst": 5, "rate": 10, "period": "1s", "shadow": true},
                {"name": "conc", "algorithm": "concurrency", "limit": 3, "timeout": "30s", "cost": 1}]"#,
        );
        let checks = checks_for(&c, &FakeRequest::get("/"), 120_250, "req-1");
        let got: Vec<(&str, &CheckKind)> =
            checks.iter().map(|c| (c.key.as_str(), &c.kind)).collect();
        assert_eq!(
            got,
            [
                (
                    "tollgate:{fw}:1000:120",
                    &CheckKind::FixedWindow {
                        limit: 10,
                        window_ms: 1000,
                        ttl_ms: 750
                    }
                ),
                (
                    "tollgate:{fw}:3600000:0",
                    &CheckKind::FixedWindow {
                        limit: 1000,
                        window_ms: 3_600_000,
                        ttl_ms: 3_479_750
                    }
                ),
                (
                    "tollgate:{sw}:1000:120",
                    &CheckKind::SlidingWindow {
                        prev_key: "tollgate:{sw}:1000:119".into(),
                        limit: 10,
                        window_ms: 1000,
                        weight_ms: 750
                    }
                ),
                (
                    "tollgate:{log}:log:60000",
                    &CheckKind::SlidingLog {
                        limit: 10,
                        window_ms: 60_000,
                        id: "req-1".into(),
                    }
                ),
                (
                    "tollgate:{swb}:swb:2000:4",
                    &CheckKind::SlidingWindowBounded {
                        limit: 10,
                        window_ms: 2000,
                        subwindows: 4,
                    }
                ),
                (
                    "tollgate:{tb}:tb:5:1:200",
                    &CheckKind::TokenBucket {
                        burst: 5,
                        rate: 1,
                        period_ms: 200
                    }
                ),
                (
                    "tollgate:{gcra}:gcra:5:10:1000",
                    &CheckKind::Gcra {
                        burst: 5,
                        rate: 10,
                        period_ms: 1000
                    }
                ),
                (
                    "tollgate:{conc}:conc",
                    &CheckKind::Concurrency {
                        limit: 3,
                        timeout_ms: 30_000,
                        id: "req-1".into()
                    }
                ),
            ]
        );
        assert!(checks[6].shadow && !checks[5].shadow);
        assert_eq!(checks[7].slot(), Some(("tollgate:{conc}:conc", "req-1")));
        assert_eq!(checks[0].slot(), None);
        assert_eq!(checks[4].window_s(), Some(2));
        assert_eq!(
            checks[5].window_s(),
            Some(1),
            "5 tokens at 1 per 200 ms come back in 1 s"
        );
        assert_eq!(checks[7].window_s(), None);
    }

    #[test]
    fn tiers_pick_limits_by_descriptor_value() {
        let c = config(
            r#"[{"name": "plan", "descriptors": ["header:x-user"],
                 "tiers": {"descriptor": "header:x-plan",
                           "values": {"free": [{"limit": 10, "window": "1s"}], "pro": [{"limit": 100, "window": "1s"}]},
                           "default": [{"limit": 1, "window": "1s"}]}}]"#,
        );
        let limit_for = |plan: Option<&str>| {
            let mut r = FakeRequest::get("/").with("x-user", "u");
            if let Some(p) = plan {
                r = r.with("x-plan", p);
            }
            checks_for(&c, &r, 0, "id")[0].limit()
        };
        assert_eq!(limit_for(Some("free")), 10);
        assert_eq!(limit_for(Some("pro")), 100);
        assert_eq!(limit_for(Some("PRO")), 1, "tier names are exact");
        assert_eq!(limit_for(None), 1);
    }

    #[test]
    fn cost_from_a_header_is_bounded() {
        let c = config(
            r#"[{"name": "c", "limit": 100, "window": "1s", "cost": {"header": "x-cost", "default": 2, "max": 10}},
                {"name": "fixed", "limit": 100, "window": "1s", "cost": 0}]"#,
        );
        let costs = |v: Option<&str>| {
            let mut r = FakeRequest::get("/");
            if let Some(v) = v {
                r = r.with("x-cost", v);
            }
            checks_for(&c, &r, 0, "id")
                .iter()
                .map(|c| c.cost)
                .collect::<Vec<_>>()
        };
        assert_eq!(costs(Some("5")), [5, 0]);
        assert_eq!(costs(Some(" 7 ")), [7, 0]);
        assert_eq!(costs(Some("0")), [0, 0]);
        assert_eq!(costs(Some("1000")), [10, 0], "capped at max");
        assert_eq!(costs(Some("-1")), [2, 0], "invalid: default");
        assert_eq!(costs(Some("1e3")), [2, 0]);
        assert_eq!(costs(None), [2, 0]);
    }

    #[test]
    fn bypass_by_value_and_by_cidr() {
        let c = config(
            r#"[{"name": "b", "descriptors": ["header:x-api-key"], "limit": 1, "window": "1s",
                 "bypass": {"values": {"header:x-api-key": ["internal"]}, "cidrs": ["10.0.0.0/8", "2001:db8::/32"]}}]"#,
        );
        let n = |key: &str, source: &str| {
            let mut r = FakeRequest::get("/").with("x-api-key", key);
            r.source = Some(source.into());
            checks_for(&c, &r, 0, "id").len()
        };
        assert_eq!(n("k", "192.0.2.1:1"), 1);
        assert_eq!(n("internal", "192.0.2.1:1"), 0);
        assert_eq!(n("k", "10.9.9.9:1"), 0);
        assert_eq!(n("k", "[2001:db8::5]:1"), 0);
        assert_eq!(n("k", "[2001:db9::5]:1"), 1);
    }

    #[test]
    fn client_ip_from_forwarded_for_and_aggregated_v6() {
        let c = Config::from_json(
            br#"{"shim": {"upstream": "s"},
                 "client_ip": {"from": "x-forwarded-for", "trusted_hops": 2},
                 "rules": [{"name": "ip", "descriptors": ["client_ip"], "limit": 1, "window": "1s"}]}"#,
        )
        .unwrap();
        let key = |xff: Option<&str>| {
            let mut r = FakeRequest::get("/");
            if let Some(x) = xff {
                r = r.with("x-forwarded-for", x);
            }
            checks_for(&c, &r, 0, "id")[0].key.clone()
        };
        assert_eq!(
            key(Some("6.6.6.6, 1.1.1.1, 10.0.0.2")),
            "tollgate:{ip|=1.1.1.1}:1000:0"
        );
        assert_eq!(
            key(Some("spoofed, 2001:db8:1:2::77, 10.0.0.2")),
            "tollgate:{ip|=2001%3Adb8%3A1%3A2%3A%3A%2F64}:1000:0"
        );
        assert_eq!(
            key(Some("10.0.0.2")),
            "tollgate:{ip|=10.1.2.3}:1000:0",
            "too few hops: the connection"
        );
        assert_eq!(key(None), "tollgate:{ip|=10.1.2.3}:1000:0");
    }

    #[test]
    fn matchers_filter_rules() {
        let c = config(
            r#"[{"name": "p", "match": {"path_prefix": "/v1/search"}, "limit": 1, "window": "1s"},
                {"name": "m", "match": {"methods": ["POST"]}, "limit": 1, "window": "1s"},
                {"name": "h", "match": {"hosts": ["api.example.com"]}, "limit": 1, "window": "1s"},
                {"name": "h2", "match": {"hosts": ["other.example.com"]}, "limit": 1, "window": "1s"},
                {"name": "pol", "match": {"policies": ["search"]}, "limit": 1, "window": "1s"},
                {"name": "rt", "match": {"routes": ["search_route"]}, "limit": 1, "window": "1s"}]"#,
        );
        let names = |r: &FakeRequest| -> Vec<String> {
            checks_for(&c, r, 0, "id")
                .iter()
                .map(|ch| c.rules[ch.rule].name.clone())
                .collect()
        };
        assert_eq!(names(&FakeRequest::get("/v1/search")), ["p", "h"]);
        assert_eq!(names(&FakeRequest::get("/v1/other")), ["h"]);
        let mut post = FakeRequest::get("/v1/searchable").with(":method", "POST");
        post.policy = Some("search".into());
        post.route = Some("search_route".into());
        assert_eq!(names(&post), ["p", "m", "h", "pol", "rt"]);
        post.policy = Some("other".into());
        post.route = Some("x".into());
        assert_eq!(names(&post), ["p", "m", "h"]);
    }

    #[test]
    fn missing_values_skip_or_share_the_anonymous_bucket() {
        let c = config(
            r#"[{"name": "skip", "descriptors": ["header:x-user"], "limit": 1, "window": "1s"},
                {"name": "anon", "descriptors": ["header:x-user", "query:tenant"], "on_missing": "anonymous", "limit": 1, "window": "1s"}]"#,
        );
        assert_eq!(
            keys(&c, &FakeRequest::get("/")),
            ["tollgate:{anon|-|-}:1000:120"]
        );
        assert_eq!(
            keys(&c, &FakeRequest::get("/?tenant=t1&x=2").with("x-user", "")),
            [
                "tollgate:{skip|=}:1000:120",
                "tollgate:{anon|=|=t1}:1000:120"
            ]
        );
    }

    #[test]
    fn route_descriptor_and_route_name_read_only_when_needed() {
        let c = config(
            r#"[{"name": "r", "descriptors": ["route", "const:v1"], "limit": 1, "window": "1s"}]"#,
        );
        let mut req = FakeRequest::get("/");
        req.route = Some("search".into());
        assert_eq!(keys(&c, &req), ["tollgate:{r|=search|=v1}:1000:120"]);
        req.route = None;
        assert!(keys(&c, &req).is_empty(), "no route name: rule skipped");
    }

    #[test]
    fn headers_are_read_only_when_a_rule_needs_them() {
        let by_policy = config(
            r#"[{"name": "r", "match": {"policies": ["p"]}, "descriptors": ["client_ip"], "limit": 1, "window": "1s"}]"#,
        );
        let mut req = FakeRequest::get("/a");
        req.policy = Some("p".into());
        assert_eq!(keys(&by_policy, &req).len(), 1);
        assert!(req.reads.borrow().is_empty(), "{:?}", req.reads.borrow());

        let by_prefix = config(
            r#"[{"name": "r", "match": {"path_prefix": "/never"}, "descriptors": ["host"], "limit": 1, "window": "1s"},
                {"name": "q", "match": {"methods": ["POST"]}, "descriptors": ["query:x", "path"], "limit": 1, "window": "1s"}]"#,
        );
        let req = FakeRequest::get("/a?x=1");
        assert!(keys(&by_prefix, &req).is_empty());
        assert_eq!(*req.reads.borrow(), [":path", ":method"], "read once each");
    }

    /// Whatever the client sends, no key the filter builds passes the shim's bound: 8 header
    /// descriptors of 64 bytes each, the longest prefix and rule name, every algorithm at the
    /// largest numbers the config accepts.
    #[test]
    fn keys_stay_within_the_wire_bound_whatever_the_client_sends() {
        let prefix = "p".repeat(crate::config::MAX_NAME_LEN);
        let name = "r".repeat(crate::config::MAX_NAME_LEN);
        let descriptors: Vec<String> = (0..crate::config::MAX_DESCRIPTORS)
            .map(|i| format!("\"header:x-d{i}\""))
            .collect();
        let descriptors = descriptors.join(", ");
        let limits = [
            ("fixed_window", r#""limit": 1000000000000, "window": "1d""#),
            (
                "sliding_window_estimate",
                r#""limit": 1000000000000, "window": "1d""#,
            ),
            (
                "sliding_window",
                r#""limit": 1000000000000, "window": "1d", "subwindows": 100"#,
            ),
            ("sliding_log", r#""limit": 10000, "window": "1d""#),
            (
                "token_bucket",
                r#""burst": 1000000000000, "rate": 1000000000, "period": "1d""#,
            ),
            (
                "gcra",
                r#""burst": 1000000000000, "rate": 1000000000, "period": "1d""#,
            ),
            ("concurrency", r#""limit": 1000000000000, "timeout": "1d""#),
        ];
        for value in ["a".repeat(64), "\u{ff}".repeat(21), "{".repeat(1000)] {
            let mut req = FakeRequest::get("/");
            for i in 0..crate::config::MAX_DESCRIPTORS {
                req = req.with(&format!("x-d{i}"), &value);
            }
            for (alg, limit) in limits {
                let json = format!(
                    r#"{{"shim": {{"upstream": "s"}}, "key_prefix": "{prefix}",
                        "rules": [{{"name": "{name}", "algorithm": "{alg}",
                                    "descriptors": [{descriptors}], {limit}}}]}}"#
                );
                let c = Config::from_json(json.as_bytes()).unwrap();
                // Year 2286 (the key tests cover a 20-digit window index).
                let checks = checks_for(&c, &req, 9_999_999_999_999, "id");
                assert_eq!(checks.len(), 1, "{alg}");
                let mut keys = vec![checks[0].key.clone()];
                if let CheckKind::SlidingWindow { prev_key, .. } = &checks[0].kind {
                    let tag = |k: &str| k[k.find('{').unwrap()..=k.find('}').unwrap()].to_string();
                    assert_eq!(tag(prev_key), tag(&keys[0]), "one Redis Cluster slot");
                    keys.push(prev_key.clone());
                }
                for k in keys {
                    assert!(
                        k.len() <= crate::bounds::MAX_KEY_BYTES,
                        "{alg}: {} bytes: {k}",
                        k.len()
                    );
                }
            }
        }
    }
}
