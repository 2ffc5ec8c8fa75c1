//! The filter ⇄ shim wire format (see `docs/wire-format.md`): encoding the checks, decoding
//! the reply. A body may carry the checks of several gateway requests; each is decided alone.

use serde::{Deserialize, Serialize};

use crate::request::{Check, CheckKind};

#[derive(Serialize)]
struct WireRequestBody<'a> {
    requests: Vec<WireRequest<'a>>,
}

#[derive(Serialize)]
struct WireRequest<'a> {
    checks: Vec<WireCheck<'a>>,
}

/// One check on the wire; which optional fields are set depends on `alg`.
#[derive(Serialize)]
struct WireCheck<'a> {
    alg: &'static str,
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    weight_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subwindows: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    burst: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    period_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    cost: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    shadow: bool,
}

impl<'a> WireCheck<'a> {
    fn new(c: &'a Check) -> WireCheck<'a> {
        let mut w = WireCheck {
            alg: "fixed_window",
            key: &c.key,
            prev_key: None,
            limit: None,
            ttl_ms: None,
            window_ms: None,
            weight_ms: None,
            subwindows: None,
            burst: None,
            rate: None,
            period_ms: None,
            id: None,
            cost: c.cost,
            shadow: c.shadow,
        };
        match &c.kind {
            CheckKind::FixedWindow { limit, ttl_ms, .. } => {
                w.limit = Some(*limit);
                w.ttl_ms = Some(*ttl_ms);
            }
            CheckKind::SlidingWindow {
                prev_key,
                limit,
                window_ms,
                weight_ms,
            } => {
                w.alg = "sliding_window";
                w.prev_key = Some(prev_key);
                w.limit = Some(*limit);
                w.window_ms = Some(*window_ms);
                w.weight_ms = Some(*weight_ms);
            }
            CheckKind::SlidingWindowBounded {
                limit,
                window_ms,
                subwindows,
            } => {
                w.alg = "sliding_window_bounded";
                w.limit = Some(*limit);
                w.window_ms = Some(*window_ms);
                w.subwindows = Some(*subwindows);
            }
            CheckKind::SlidingLog {
                limit,
                window_ms,
                id,
            } => {
                w.alg = "sliding_log";
                w.limit = Some(*limit);
                w.window_ms = Some(*window_ms);
                w.id = Some(id);
            }
            CheckKind::TokenBucket {
                burst,
                rate,
                period_ms,
            }
            | CheckKind::Gcra {
                burst,
                rate,
                period_ms,
            } => {
                w.alg = if matches!(c.kind, CheckKind::Gcra { .. }) {
                    "gcra"
                } else {
                    "token_bucket"
                };
                w.burst = Some(*burst);
                w.rate = Some(*rate);
                w.period_ms = Some(*period_ms);
            }
            CheckKind::Concurrency {
                limit,
                timeout_ms,
                id,
            } => {
                w.alg = "concurrency";
                w.limit = Some(*limit);
                w.ttl_ms = Some(*timeout_ms);
                w.id = Some(id);
            }
        }
        w
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
