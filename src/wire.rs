//! The filter ⇄ shim wire format (see `docs/wire-format.md`): encoding the checks, decoding
//! the reply. A body may carry the checks of several gateway requests; each is decided alone.

use serde::{Deserialize, Serialize};

use crate::check::{Check, CheckKind};

#[derive(Serialize)]
struct WireRequestBody<'a> {
    requests: Vec<WireRequest<'a>>,
}

#[derive(Serialize)]
struct WireRequest<'a> {
    checks: Vec<WireCheck<'a>>,
}

/// One check on the wire: `alg` names the variant, whose fields are those that
/// `lua-redis-shim/lib/tollgate/contract.lua` lists for it, in its order (a test below holds
/// them equal); `cost` and `shadow` follow on every check.
#[derive(Serialize)]
#[serde(tag = "alg", rename_all = "snake_case")]
enum WireCheck<'a> {
    FixedWindow {
        key: &'a str,
        limit: u64,
        ttl_ms: u64,
        #[serde(flatten)]
        common: Common,
    },
    SlidingWindow {
        key: &'a str,
        prev_key: &'a str,
        limit: u64,
        window_ms: u64,
        weight_ms: u64,
        #[serde(flatten)]
        common: Common,
    },
    SlidingWindowBounded {
        key: &'a str,
        limit: u64,
        window_ms: u64,
        subwindows: u64,
        #[serde(flatten)]
        common: Common,
    },
    SlidingLog {
        key: &'a str,
        limit: u64,
        window_ms: u64,
        id: &'a str,
        #[serde(flatten)]
        common: Common,
    },
    TokenBucket {
        key: &'a str,
        burst: u64,
        rate: u64,
        period_ms: u64,
        #[serde(flatten)]
        common: Common,
    },
    Gcra {
        key: &'a str,
        burst: u64,
        rate: u64,
        period_ms: u64,
        #[serde(flatten)]
        common: Common,
    },
    Concurrency {
        key: &'a str,
        limit: u64,
        ttl_ms: u64,
        id: &'a str,
        #[serde(flatten)]
        common: Common,
    },
}

/// What every check carries besides its algorithm's fields.
#[derive(Serialize)]
struct Common {
    cost: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    shadow: bool,
    #[serde(skip_serializing_if = "is_zero")]
    lease: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl<'a> WireCheck<'a> {
    fn new(c: &'a Check) -> WireCheck<'a> {
        let key = c.key.as_str();
        let common = Common {
            cost: c.cost,
            shadow: c.shadow,
            lease: c.lease,
        };
        match &c.kind {
            &CheckKind::FixedWindow { limit, ttl_ms, .. } => WireCheck::FixedWindow {
                key,
                limit,
                ttl_ms,
                common,
            },
            CheckKind::SlidingWindow {
                prev_key,
                limit,
                window_ms,
                weight_ms,
            } => WireCheck::SlidingWindow {
                key,
                prev_key,
                limit: *limit,
                window_ms: *window_ms,
                weight_ms: *weight_ms,
                common,
            },
            &CheckKind::SlidingWindowBounded {
                limit,
                window_ms,
                subwindows,
            } => WireCheck::SlidingWindowBounded {
                key,
                limit,
                window_ms,
                subwindows,
                common,
            },
            CheckKind::SlidingLog {
                limit,
                window_ms,
                id,
            } => WireCheck::SlidingLog {
                key,
                limit: *limit,
                window_ms: *window_ms,
                id,
                common,
            },
            &CheckKind::TokenBucket {
                burst,
                rate,
                period_ms,
            } => WireCheck::TokenBucket {
                key,
                burst,
                rate,
                period_ms,
                common,
            },
            &CheckKind::Gcra {
                burst,
                rate,
                period_ms,
            } => WireCheck::Gcra {
                key,
                burst,
                rate,
                period_ms,
                common,
            },
            CheckKind::Concurrency {
                limit,
                timeout_ms,
                id,
            } => WireCheck::Concurrency {
                key,
                limit: *limit,
                ttl_ms: *timeout_ms,
                id,
                common,
            },
        }
    }
}

#[derive(Serialize)]
struct WireReleaseBody<'a> {
    releases: Vec<WireRelease<'a>>,
}

#[derive(Serialize)]
struct WireRelease<'a> {
    key: &'a str,
    id: &'a str,
}

#[derive(Serialize)]
struct WireChargeBody<'a> {
    charges: Vec<WireCharge<'a>>,
}

/// Usage charged after a response: `delta` added to the window counter `key` (negative: the
/// unused part of the reserve handed back), `ttl_ms` its lifetime if it must be created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WireCharge<'a> {
    pub key: &'a str,
    pub delta: i64,
    pub ttl_ms: u64,
}

/// The shim's answer for one gateway request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RequestResult {
    /// Every check fits: admitted, and every counter was charged.
    #[serde(default)]
    pub allowed: bool,
    #[serde(default)]
    pub checks: Vec<CheckResult>,
    /// The shim refused this request alone (it named the bad field); nothing was charged for
    /// it, and the other requests of the callout were checked as usual.
    #[serde(default)]
    pub refused: Option<String>,
}

impl RequestResult {
    /// An answer made in the gateway (over-limit cache, local fallback).
    pub fn local(allowed: bool, checks: Vec<CheckResult>) -> RequestResult {
        RequestResult {
            allowed,
            checks,
            refused: None,
        }
    }
}

/// The shim's answer for one check.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CheckResult {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: u64,
    /// When the same request would fit again; 0 when allowed.
    #[serde(default)]
    pub retry_after_ms: u64,
    /// Units granted as a lease beyond the cost (already charged in Redis), and for how many
    /// ms from when Redis ran the check they may be spent.
    #[serde(default)]
    pub lease: u64,
    #[serde(default)]
    pub lease_ms: u64,
}

#[derive(Deserialize)]
struct WireReply {
    results: Vec<RequestResult>,
    /// Redis's clock when it ran the checks (absent from older shims).
    #[serde(default)]
    now_ms: Option<u64>,
}

/// A decoded reply: one result per request, and Redis's time if the shim sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub results: Vec<RequestResult>,
    pub now_ms: Option<u64>,
}

/// Encodes the checks of several gateway requests into one `POST /v1/check` body.
pub fn encode(requests: &[&[Check]]) -> Vec<u8> {
    let body = WireRequestBody {
        requests: requests
            .iter()
            .map(|checks| WireRequest {
                checks: checks.iter().map(WireCheck::new).collect(),
            })
            .collect(),
    };
    // Serializing plain structs of strings and integers cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Encodes `POST /v1/release`: the concurrency slots `(key, id)` a finished request held.
pub fn encode_release(slots: &[(&str, &str)]) -> Vec<u8> {
    let body = WireReleaseBody {
        releases: slots
            .iter()
            .map(|&(key, id)| WireRelease { key, id })
            .collect(),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Encodes `POST /v1/charge`: usage to add to window counters after responses ended.
pub fn encode_charges(charges: &[WireCharge<'_>]) -> Vec<u8> {
    let body = WireChargeBody {
        charges: charges.to_vec(),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Decodes a `200` reply and checks that it answers exactly the requests and checks sent
/// (`shape[i]` = number of checks of request `i`).
pub fn decode(body: &[u8], shape: &[usize]) -> Result<Reply, String> {
    let reply: WireReply =
        serde_json::from_slice(body).map_err(|e| format!("malformed shim reply: {e}"))?;
    if reply.results.len() != shape.len() {
        return Err(format!(
            "shim reply has {} results for {} requests",
            reply.results.len(),
            shape.len()
        ));
    }
    for (i, (result, &n)) in reply.results.iter().zip(shape).enumerate() {
        if result.refused.is_none() && result.checks.len() != n {
            return Err(format!(
                "shim reply results[{i}] has {} checks for {n} sent",
                result.checks.len()
            ));
        }
    }
    Ok(Reply {
        results: reply.results,
        now_ms: reply.now_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(key: &str, limit: u64) -> Check {
        Check {
            lease: 0,
            rule: 0,
            key: key.into(),
            cost: 1,
            shadow: false,
            kind: CheckKind::FixedWindow {
                limit,
                window_ms: 60_000,
                ttl_ms: 42_000,
            },
        }
    }

    #[test]
    fn encodes_the_documented_shape() {
        let a = [
            check("tollgate:{a|=x}:60000:1", 100),
            check("tollgate:{b}:60000:1", 5),
        ];
        let b = [check("tollgate:{a|=y}:60000:1", 100)];
        let body = String::from_utf8(encode(&[&a, &b])).unwrap();
        assert_eq!(
            body,
            r#"{"requests":[{"checks":[{"alg":"fixed_window","key":"tollgate:{a|=x}:60000:1","limit":100,"ttl_ms":42000,"cost":1},{"alg":"fixed_window","key":"tollgate:{b}:60000:1","limit":5,"ttl_ms":42000,"cost":1}]},{"checks":[{"alg":"fixed_window","key":"tollgate:{a|=y}:60000:1","limit":100,"ttl_ms":42000,"cost":1}]}]}"#
        );
    }

    #[test]
    fn encodes_every_algorithm() {
        let mk = |kind, shadow| Check {
            lease: 0,
            rule: 0,
            key: "k".into(),
            cost: 2,
            shadow,
            kind,
        };
        let checks = [
            mk(
                CheckKind::SlidingWindow {
                    prev_key: "p".into(),
                    limit: 10,
                    window_ms: 1000,
                    weight_ms: 250,
                },
                true,
            ),
            mk(
                CheckKind::SlidingLog {
                    limit: 10,
                    window_ms: 1000,
                    id: "r1".into(),
                },
                false,
            ),
            mk(
                CheckKind::TokenBucket {
                    burst: 5,
                    rate: 1,
                    period_ms: 200,
                },
                false,
            ),
            mk(
                CheckKind::Gcra {
                    burst: 5,
                    rate: 1,
                    period_ms: 200,
                },
                false,
            ),
            mk(
                CheckKind::Concurrency {
                    limit: 3,
                    timeout_ms: 60_000,
                    id: "r1".into(),
                },
                false,
            ),
        ];
        let body: serde_json::Value = serde_json::from_slice(&encode(&[&checks])).unwrap();
        let c = &body["requests"][0]["checks"];
        assert_eq!(
            c[0],
            serde_json::json!({"alg":"sliding_window","key":"k","prev_key":"p","limit":10,"window_ms":1000,"weight_ms":250,"cost":2,"shadow":true})
        );
        assert_eq!(
            c[1],
            serde_json::json!({"alg":"sliding_log","key":"k","limit":10,"window_ms":1000,"id":"r1","cost":2})
        );
        assert_eq!(
            c[2],
            serde_json::json!({"alg":"token_bucket","key":"k","burst":5,"rate":1,"period_ms":200,"cost":2})
        );
        assert_eq!(c[3]["alg"], "gcra");
        let bounded = mk(
            CheckKind::SlidingWindowBounded {
                limit: 20,
                window_ms: 2000,
                subwindows: 10,
            },
            false,
        );
        let body: serde_json::Value = serde_json::from_slice(&encode(&[&[bounded]])).unwrap();
        assert_eq!(
            body["requests"][0]["checks"][0],
            serde_json::json!({"alg":"sliding_window_bounded","key":"k","limit":20,"window_ms":2000,"subwindows":10,"cost":2})
        );
        assert_eq!(
            c[4],
            serde_json::json!({"alg":"concurrency","key":"k","limit":3,"ttl_ms":60000,"id":"r1","cost":2})
        );
        assert_eq!(
            String::from_utf8(encode_release(&[("k", "r1")])).unwrap(),
            r#"{"releases":[{"key":"k","id":"r1"}]}"#
        );
        let charge = WireCharge {
            key: "k",
            delta: -3,
            ttl_ms: 500,
        };
        assert_eq!(
            String::from_utf8(encode_charges(&[charge])).unwrap(),
            r#"{"charges":[{"key":"k","delta":-3,"ttl_ms":500}]}"#
        );
    }

    /// `lua-redis-shim/lib/tollgate/contract.lua`, read line by line: algorithm → its fields
    /// in order, each with its kind and bounds (as written there).
    fn contract() -> Vec<(String, Vec<Vec<String>>)> {
        let text = include_str!("../lua-redis-shim/lib/tollgate/contract.lua");
        let mut algs: Vec<(String, Vec<Vec<String>>)> = Vec::new();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("{ name = \"") {
                let name = rest.split('"').next().unwrap().to_string();
                algs.push((name, Vec::new()));
            } else if line.starts_with("{ \"") && line.ends_with("},") {
                let inner = line.trim_start_matches('{').trim_end_matches("},").trim();
                let parts: Vec<String> = inner
                    .split(',')
                    .map(|p| p.trim().trim_matches('"').to_string())
                    .collect();
                algs.last_mut().unwrap().1.push(parts);
            }
        }
        algs
    }

    fn sample(kind: CheckKind) -> Check {
        Check {
            lease: 0,
            rule: 0,
            key: "tollgate:{r}:k".into(),
            cost: 1,
            shadow: true,
            kind,
        }
    }

    #[test]
    fn the_encoder_sends_exactly_the_contracts_fields() {
        let kinds = [
            CheckKind::FixedWindow {
                limit: 1,
                window_ms: 1000,
                ttl_ms: 1,
            },
            CheckKind::SlidingWindow {
                prev_key: "tollgate:{r}:p".into(),
                limit: 1,
                window_ms: 1000,
                weight_ms: 1,
            },
            CheckKind::SlidingWindowBounded {
                limit: 1,
                window_ms: 1000,
                subwindows: 10,
            },
            CheckKind::SlidingLog {
                limit: 1,
                window_ms: 1000,
                id: "i".into(),
            },
            CheckKind::TokenBucket {
                burst: 1,
                rate: 1,
                period_ms: 1,
            },
            CheckKind::Gcra {
                burst: 1,
                rate: 1,
                period_ms: 1,
            },
            CheckKind::Concurrency {
                limit: 1,
                timeout_ms: 1000,
                id: "i".into(),
            },
        ];
        let contract = contract();
        assert_eq!(contract.len(), kinds.len(), "one variant per algorithm");
        let bound_names: Vec<&str> = crate::bounds::tests::RUST.iter().map(|(n, _)| *n).collect();
        // The algorithms whose checks may ask a lease: `lease = true` on their line.
        let leasable: Vec<&str> = include_str!("../lua-redis-shim/lib/tollgate/contract.lua")
            .lines()
            .filter(|l| l.contains("lease = true"))
            .filter_map(|l| l.split("name = \"").nth(1)?.split('"').next())
            .collect();
        for kind in kinds {
            let mut check = sample(kind);
            check.lease = u64::from(check.leasable());
            let body: serde_json::Value =
                serde_json::from_slice(&encode(&[std::slice::from_ref(&check)])).unwrap();
            let sent = body["requests"][0]["checks"][0]
                .as_object()
                .unwrap()
                .clone();
            let alg = sent["alg"].as_str().unwrap().to_string();
            let (_, fields) = contract
                .iter()
                .find(|(name, _)| *name == alg)
                .unwrap_or_else(|| panic!("{alg} is not in contract.lua"));
            assert_eq!(check.leasable(), leasable.contains(&alg.as_str()), "{alg}");
            // In wire order: alg, key, the contract's fields, cost, shadow, lease.
            let names: Vec<&str> = sent.keys().map(String::as_str).collect();
            let mut expected = vec!["alg", "key"];
            expected.extend(fields.iter().map(|f| f[0].as_str()));
            expected.extend(["cost", "shadow"]);
            if check.leasable() {
                expected.push("lease");
            }
            let mut sorted_names = names.clone();
            sorted_names.sort_unstable();
            let mut sorted_expected = expected.clone();
            sorted_expected.sort_unstable();
            assert_eq!(sorted_names, sorted_expected, "{alg}");
            for f in fields {
                // Named bounds exist in bounds.rs (and so in bounds.lua).
                for b in f.iter().skip(2) {
                    let named = !b.chars().all(|c| c.is_ascii_digit());
                    let field_ref = fields.iter().any(|g| &g[0] == b);
                    assert!(
                        !named || field_ref || bound_names.contains(&b.as_str()),
                        "{alg}.{}: unknown bound {b}",
                        f[0]
                    );
                }
            }
        }
    }

    #[test]
    fn decodes_a_reply_and_ignores_extra_fields() {
        let body = br#"{"results":[{"allowed":false,"checks":[
            {"allowed":true,"limit":100,"count":37,"remaining":63,"reset_ms":41990},
            {"allowed":false,"limit":20,"count":20,"remaining":0,"reset_ms":3990}]}]}"#;
        let results = decode(body, &[2]).unwrap().results;
        assert!(!results[0].allowed);
        assert_eq!(
            results[0].checks[1],
            CheckResult {
                lease: 0,
                lease_ms: 0,
                allowed: false,
                limit: 20,
                remaining: 0,
                reset_ms: 3990,
                retry_after_ms: 0
            }
        );
    }

    #[test]
    fn decodes_a_request_the_shim_refused_alone() {
        // The second request was refused: no checks, its field named; the others as usual.
        let body = br#"{"results":[
            {"allowed":true,"checks":[{"allowed":true,"limit":5,"count":1,"remaining":4,"reset_ms":900}]},
            {"refused":"requests[1].checks[0].key: must be a string of 1..512 printable ASCII characters (0x21..0x7e)"},
            {"allowed":false,"checks":[{"allowed":false,"limit":1,"remaining":0,"reset_ms":10,"retry_after_ms":10},
                                       {"allowed":true,"limit":9,"remaining":8,"reset_ms":10}]}],
            "now_ms":1763929716123}"#;
        let reply = decode(body, &[1, 3, 2]).unwrap();
        assert_eq!(reply.now_ms, Some(1_763_929_716_123));
        let r = &reply.results;
        assert_eq!(r[0].refused, None);
        assert!(r[0].allowed);
        assert_eq!(
            r[1],
            RequestResult {
                allowed: false,
                checks: vec![],
                refused: Some(
                    "requests[1].checks[0].key: must be a string of 1..512 printable ASCII \
                     characters (0x21..0x7e)"
                        .into()
                ),
            }
        );
        assert_eq!(r[2].checks.len(), 2);
        assert!(!r[2].allowed);
    }

    #[test]
    fn decodes_a_reply_where_every_request_was_refused() {
        // No request reached Redis: no now_ms either.
        let body =
            br#"{"results":[{"refused":"requests[0].checks: must be an array of 1..32 checks"},
                                    {"refused":"requests[1]: must be an object"}]}"#;
        let reply = decode(body, &[33, 1]).unwrap();
        assert_eq!(reply.now_ms, None);
        assert!(reply
            .results
            .iter()
            .all(|r| r.refused.is_some() && !r.allowed && r.checks.is_empty()));
        // A refusal must be a message: anything else is a malformed reply.
        for bad in [
            &br#"{"results":[{"refused":true}]}"#[..],
            br#"{"results":[{"refused":7}]}"#,
        ] {
            let err = decode(bad, &[1]).unwrap_err();
            assert!(err.contains("malformed shim reply"), "{err}");
        }
        // `"refused": null` is no refusal: the checks must then be there.
        let err = decode(br#"{"results":[{"refused":null,"checks":[]}]}"#, &[1]).unwrap_err();
        assert!(err.contains("results[0] has 0 checks for 1 sent"), "{err}");
    }

    /// The largest request a valid config can make (32 checks, two keys of the wire's longest
    /// each, the largest numbers) fits one body on its own.
    #[test]
    fn the_largest_request_fits_one_body() {
        let key = format!(
            "tollgate:{{{}}}:1",
            "k".repeat(crate::bounds::MAX_KEY_BYTES - 13)
        );
        assert_eq!(key.len(), crate::bounds::MAX_KEY_BYTES);
        let checks: Vec<Check> = (0..crate::bounds::MAX_CHECKS)
            .map(|_| Check {
                lease: 0,
                rule: 0,
                key: key.clone(),
                cost: crate::bounds::MAX_COST,
                shadow: true,
                kind: CheckKind::SlidingWindow {
                    prev_key: key.clone(),
                    limit: crate::bounds::MAX_LIMIT,
                    window_ms: crate::bounds::MAX_MS,
                    weight_ms: crate::bounds::MAX_MS,
                },
            })
            .collect();
        let body = encode(&[&checks]);
        assert!(
            body.len() <= crate::bounds::MAX_BODY_BYTES,
            "{}",
            body.len()
        );
    }

    #[test]
    fn rejects_replies_that_do_not_fit() {
        let one = br#"{"results":[{"allowed":true,"checks":[{"allowed":true,"limit":1,"remaining":0,"reset_ms":1}]}]}"#;
        let cases: [(&[u8], &[usize], &str); 6] = [
            (b"", &[1], "malformed shim reply"),
            (b"<html>", &[1], "malformed shim reply"),
            (br#"{"results":[]}"#, &[1], "0 results for 1 requests"),
            (one, &[1, 1], "1 results for 2 requests"),
            (one, &[2], "results[0] has 1 checks for 2 sent"),
            (
                br#"{"results":[{"allowed":"yes","checks":[]}]}"#,
                &[0],
                "malformed shim reply",
            ),
        ];
        for (body, shape, expected) in cases {
            let err = decode(body, shape).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
        let negative = br#"{"results":[{"allowed":true,"checks":[{"allowed":true,"limit":1,"remaining":-1,"reset_ms":1}]}]}"#;
        assert!(decode(negative, &[1]).is_err());
    }
}
