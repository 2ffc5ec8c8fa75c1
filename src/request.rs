//! Which rules apply to a request, and the counter key each one checks.

use crate::config::{Config, Descriptor, OnMissing, Rule};
use crate::keys::{counter_key, fixed_window, Value};

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
}

/// What every rule's matcher looks at, read from the host once per request.
struct Facts {
    method: Vec<u8>,
    /// Path without query string.
    path: Vec<u8>,
    query: Vec<u8>,
    /// `:authority` without port, lower-cased.
    host: Vec<u8>,
    route_name: Option<Vec<u8>>,
    policy: Option<Vec<u8>>,
}

impl Facts {
    fn read(config: &Config, view: &impl RequestView) -> Facts {
        let full_path = view.header(":path").unwrap_or_default();
        let (path, query) = match full_path.iter().position(|&b| b == b'?') {
            Some(i) => (full_path[..i].to_vec(), full_path[i + 1..].to_vec()),
            None => (full_path, Vec::new()),
        };
        let mut host = view.header(":authority").unwrap_or_default();
        host.truncate(strip_port(&host).len());
        host.make_ascii_lowercase();
        Facts {
            method: view.header(":method").unwrap_or_default(),
            path,
            query,
            host,
            route_name: config.needs_route_name.then(|| view.route_name()).flatten(),
            policy: config.needs_policy.then(|| view.route_policy()).flatten(),
        }
    }
}

/// One rule's check on one request: the data the shim needs plus what the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Index into `Config::rules`.
    pub rule: usize,
    pub key: String,
    pub limit: u64,
    pub window_ms: u64,
    /// Milliseconds until this window ends, by the gateway clock: the key's TTL and the
    /// earliest moment `Retry-After` may point to.
    pub ttl_ms: u64,
    pub cost: u64,
}

/// The checks for every rule that applies to this request, in rule order.
pub fn checks_for(config: &Config, view: &impl RequestView, now_ms: u64) -> Vec<Check> {
    let facts = Facts::read(config, view);
    let mut checks = Vec::new();
    for (i, rule) in config.rules.iter().enumerate() {
        if !matches(rule, &facts) {
            continue;
        }
        let Some(values) = descriptor_values(rule, &facts, view) else {
            continue;
        };
        let borrowed: Vec<Value<'_>> = values
            .iter()
            .map(|v| match v {
                Some(bytes) => Value::Present(bytes),
                None => Value::Anonymous,
            })
            .collect();
        let window = fixed_window(now_ms, rule.window_ms);
        checks.push(Check {
            rule: i,
            key: counter_key(&config.key_prefix, &rule.name, &borrowed, rule.window_ms, window.index),
            limit: rule.limit,
            window_ms: rule.window_ms,
            ttl_ms: window.remaining_ms,
            cost: 1,
        });
    }
    checks
}

fn matches(rule: &Rule, facts: &Facts) -> bool {
    let m = &rule.matcher;
    let in_list = |list: &[String], value: &[u8]| list.is_empty() || list.iter().any(|s| s.as_bytes() == value);
    let optional_in_list = |list: &[String], value: &Option<Vec<u8>>| {
        list.is_empty() || value.as_deref().is_some_and(|v| in_list(list, v))
    };
    optional_in_list(&m.policies, &facts.policy)
        && optional_in_list(&m.routes, &facts.route_name)
        && m.path_prefix.as_ref().is_none_or(|p| facts.path.starts_with(p.as_bytes()))
        && in_list(&m.methods, &facts.method)
        && in_list(&m.hosts, &facts.host)
}

/// Each descriptor's value (`None`: anonymous), or `None` when the rule is skipped.
fn descriptor_values(rule: &Rule, facts: &Facts, view: &impl RequestView) -> Option<Vec<Option<Vec<u8>>>> {
    let mut values = Vec::with_capacity(rule.descriptors.len());
    for d in &rule.descriptors {
        let value = match d {
            Descriptor::Header(name) => view.header(name),
            Descriptor::ClientIp => view.source_address().map(|a| strip_port(&a).to_vec()),
            Descriptor::Path => Some(facts.path.clone()),
            Descriptor::Method => Some(facts.method.clone()),
            Descriptor::Host => Some(facts.host.clone()),
            Descriptor::Route => facts.route_name.clone(),
            Descriptor::Query(name) => query_param(&facts.query, name.as_bytes()).map(<[u8]>::to_vec),
            Descriptor::Const(value) => Some(value.as_bytes().to_vec()),
        };
        match (value, rule.on_missing) {
            (Some(v), _) => values.push(Some(v)),
            (None, OnMissing::Anonymous) => values.push(None),
            (None, OnMissing::Skip) => return None,
        }
    }
    Some(values)
}

/// The first value of query parameter `name`, raw (not percent-decoded: the key encodes bytes
/// anyway, and decoding would let `a%3Db` and `a=b` spellings collide differently per client).
fn query_param<'q>(query: &'q [u8], name: &[u8]) -> Option<&'q [u8]> {
    query.split(|&b| b == b'&').find_map(|pair| {
        let (k, v) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        (k == name).then_some(v)
    })
}

/// `1.2.3.4:80` → `1.2.3.4`, `[::1]:80` → `::1`, `host:8080` → `host`, a bare address unchanged.
fn strip_port(addr: &[u8]) -> &[u8] {
    if let Some(rest) = addr.strip_prefix(b"[") {
        return match rest.iter().position(|&b| b == b']') {
            Some(end) => &rest[..end],
            None => addr,
        };
    }
    let colons = addr.iter().filter(|&&b| b == b':').count();
    match addr.iter().rposition(|&b| b == b':') {
        // Exactly one colon: host:port. More than one: a bare IPv6 address.
        Some(i) if colons == 1 => &addr[..i],
        _ => addr,
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
    }

    impl FakeRequest {
        pub fn get(path: &str) -> FakeRequest {
            let mut r = FakeRequest::default();
            r.headers.insert(":method".into(), b"GET".to_vec());
            r.headers.insert(":path".into(), path.as_bytes().to_vec());
            r.headers.insert(":authority".into(), b"API.example.com:10000".to_vec());
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
    }

    fn config(rules: &str) -> Config {
        let json = format!(r#"{{"shim": {{"upstream": "s"}}, "rules": {rules}}}"#);
        Config::from_json(json.as_bytes()).unwrap()
    }

    fn keys(c: &Config, r: &FakeRequest) -> Vec<String> {
        checks_for(c, r, 120_500).into_iter().map(|c| c.key).collect()
    }

    #[test]
    fn builds_one_check_per_matching_rule() {
        let c = config(
            r#"[{"name": "a", "descriptors": ["client_ip"], "limit": 5, "window": "1m"},
                {"name": "b", "descriptors": ["header:x-api-key", "method", "path", "host"], "limit": 7, "window": "1s"}]"#,
        );
        let checks = checks_for(&c, &FakeRequest::get("/v1/search?q=1").with("x-api-key", "k1"), 120_500);
        assert_eq!(checks.len(), 2);
        assert_eq!(checks[0].key, "tollgate:{a|=10.1.2.3}:60000:2");
        assert_eq!((checks[0].limit, checks[0].ttl_ms, checks[0].window_ms), (5, 59_500, 60_000));
        assert_eq!(checks[1].key, "tollgate:{b|=k1|=GET|=%2Fv1%2Fsearch|=api.example.com}:1000:120");
        assert_eq!((checks[1].rule, checks[1].ttl_ms, checks[1].cost), (1, 500, 1));
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
            checks_for(&c, r, 0).iter().map(|ch| c.rules[ch.rule].name.clone()).collect()
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
        assert_eq!(keys(&c, &FakeRequest::get("/")), ["tollgate:{anon|-|-}:1000:120"]);
        assert_eq!(
            keys(&c, &FakeRequest::get("/?tenant=t1&x=2").with("x-user", "")),
            ["tollgate:{skip|=}:1000:120", "tollgate:{anon|=|=t1}:1000:120"]
        );
    }

    #[test]
    fn route_descriptor_and_route_name_read_only_when_needed() {
        let c = config(r#"[{"name": "r", "descriptors": ["route", "const:v1"], "limit": 1, "window": "1s"}]"#);
        assert!(c.needs_route_name && !c.needs_policy);
        let mut req = FakeRequest::get("/");
        req.route = Some("search".into());
        assert_eq!(keys(&c, &req), ["tollgate:{r|=search|=v1}:1000:120"]);
        req.route = None;
        assert!(keys(&c, &req).is_empty(), "no route name: rule skipped");
    }

    #[test]
    fn query_params_are_matched_by_exact_name() {
        let q = b"a=1&ab=2&b&c=x%3Dy&a=3";
        assert_eq!(query_param(q, b"a"), Some(&b"1"[..]));
        assert_eq!(query_param(q, b"ab"), Some(&b"2"[..]));
        assert_eq!(query_param(q, b"b"), Some(&b""[..]));
        assert_eq!(query_param(q, b"c"), Some(&b"x%3Dy"[..]));
        assert_eq!(query_param(q, b"d"), None);
        assert_eq!(query_param(b"", b"a"), None);
    }

    #[test]
    fn ports_are_stripped_from_addresses() {
        let table: [(&[u8], &[u8]); 7] = [
            (b"1.2.3.4:80", b"1.2.3.4"),
            (b"1.2.3.4", b"1.2.3.4"),
            (b"[2001:db8::1]:443", b"2001:db8::1"),
            (b"2001:db8::1", b"2001:db8::1"),
            (b"[::1]", b"::1"),
            (b"example.com:8080", b"example.com"),
            (b"", b""),
        ];
        for (input, expected) in table {
            assert_eq!(strip_port(input), expected);
        }
    }
}
