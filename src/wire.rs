//! The filter ⇄ shim wire format (see `docs/wire-format.md`): encoding the checks, decoding
//! the reply. A body may carry the checks of several gateway requests; each is decided alone.

use serde::{Deserialize, Serialize};

use crate::request::Check;

#[derive(Serialize)]
struct WireRequestBody<'a> {
    requests: Vec<WireRequest<'a>>,
}

#[derive(Serialize)]
struct WireRequest<'a> {
    checks: Vec<WireCheck<'a>>,
}

#[derive(Serialize)]
struct WireCheck<'a> {
    key: &'a str,
    limit: u64,
    ttl_ms: u64,
    cost: u64,
}

/// The shim's answer for one gateway request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RequestResult {
    /// Every check fits: admitted, and every counter was charged.
    pub allowed: bool,
    pub checks: Vec<CheckResult>,
}

/// The shim's answer for one check.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CheckResult {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: u64,
}

#[derive(Deserialize)]
struct WireReply {
    results: Vec<RequestResult>,
}

/// Encodes the checks of several gateway requests into one `POST /v1/check` body.
pub fn encode(requests: &[&[Check]]) -> Vec<u8> {
    let body = WireRequestBody {
        requests: requests
            .iter()
            .map(|checks| WireRequest {
                checks: checks
                    .iter()
                    .map(|c| WireCheck {
                        key: &c.key,
                        limit: c.limit,
                        ttl_ms: c.ttl_ms,
                        cost: c.cost,
                    })
                    .collect(),
            })
            .collect(),
    };
    // Serializing plain structs of strings and integers cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Decodes a `200` reply and checks that it answers exactly the requests and checks sent
/// (`shape[i]` = number of checks of request `i`).
pub fn decode(body: &[u8], shape: &[usize]) -> Result<Vec<RequestResult>, String> {
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
        if result.checks.len() != n {
            return Err(format!(
                "shim reply results[{i}] has {} checks for {n} sent",
                result.checks.len()
            ));
        }
    }
    Ok(reply.results)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(key: &str, limit: u64) -> Check {
        Check { rule: 0, key: key.into(), limit, window_ms: 60_000, ttl_ms: 42_000, cost: 1 }
    }

    #[test]
    fn encodes_the_documented_shape() {
        let a = [check("tollgate:{a|=x}:60000:1", 100), check("tollgate:{b}:60000:1", 5)];
        let b = [check("tollgate:{a|=y}:60000:1", 100)];
        let body = String::from_utf8(encode(&[&a, &b])).unwrap();
        assert_eq!(
            body,
            r#"{"requests":[{"checks":[{"key":"tollgate:{a|=x}:60000:1","limit":100,"ttl_ms":42000,"cost":1},{"key":"tollgate:{b}:60000:1","limit":5,"ttl_ms":42000,"cost":1}]},{"checks":[{"key":"tollgate:{a|=y}:60000:1","limit":100,"ttl_ms":42000,"cost":1}]}]}"#
        );
    }

    #[test]
    fn decodes_a_reply_and_ignores_extra_fields() {
        let body = br#"{"results":[{"allowed":false,"checks":[
            {"allowed":true,"limit":100,"count":37,"remaining":63,"reset_ms":41990},
            {"allowed":false,"limit":20,"count":20,"remaining":0,"reset_ms":3990}]}]}"#;
        let results = decode(body, &[2]).unwrap();
        assert!(!results[0].allowed);
        assert_eq!(
            results[0].checks[1],
            CheckResult { allowed: false, limit: 20, remaining: 0, reset_ms: 3990 }
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
            (br#"{"results":[{"allowed":"yes","checks":[]}]}"#, &[0], "malformed shim reply"),
        ];
        for (body, shape, expected) in cases {
            let err = decode(body, shape).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
        let negative = br#"{"results":[{"allowed":true,"checks":[{"allowed":true,"limit":1,"remaining":-1,"reset_ms":1}]}]}"#;
        assert!(decode(negative, &[1]).is_err());
    }
}
