//! The wire bounds: what the shim accepts (`docs/wire-format.md`).
//!
//! `lua-redis-shim/lib/tollgate/bounds.lua` is the same list, read by the shim's validation; a
//! test below parses that file and holds every value equal and every name present on both
//! sides. The configuration ([`crate::config`]) and the key builder ([`crate::keys`]) are
//! written against these constants so that a valid configuration can never make the filter
//! send what the shim refuses. The list is complete, so some constants only the shim enforces
//! (body size, depth, ids) have no reader in the filter.
#![allow(dead_code)]

// Per body.

/// Largest `POST /v1/check` or `/v1/release` body (also `client_max_body_size` in nginx).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most gateway requests (`requests[]`) in one body.
pub const MAX_REQUESTS: usize = 256;
/// Most checks in one body, over all its requests.
pub const MAX_TOTAL_CHECKS: usize = 1024;
/// Most slots in one `POST /v1/release`.
pub const MAX_RELEASES: usize = 256;
/// Deepest JSON nesting the shim decodes (a valid body nests 5 deep).
pub const MAX_DEPTH: usize = 16;

// Per request.

/// Most checks (`requests[i].checks[]`) one gateway request may carry.
pub const MAX_CHECKS: usize = 32;

// Per check.

/// Longest `key` or `prev_key`.
pub const MAX_KEY_BYTES: usize = 512;
/// Longest `id` (sliding log entries, concurrency slots).
pub const MAX_ID_BYTES: usize = 128;
/// Largest `limit` or `burst`.
pub const MAX_LIMIT: u64 = 1_000_000_000_000;
/// Largest `limit` of a sliding log (its memory grows with the limit).
pub const MAX_LOG_LIMIT: u64 = 10_000;
/// Largest `rate` of a token bucket or GCRA.
pub const MAX_RATE: u64 = 1_000_000_000;
/// GCRA's emission interval is `period_ms × 1000 / rate` µs: a `rate` above `period_ms` times
/// this makes it 0, and every request admitted.
pub const MAX_RATE_PER_PERIOD_MS: u64 = 1_000;
/// Largest `ttl_ms`, `window_ms`, `weight_ms` or `period_ms`: one day.
pub const MAX_MS: u64 = 86_400_000;
/// Shortest `window_ms` (fixed-window and sliding algorithms).
pub const MIN_WINDOW_MS: u64 = 1_000;
/// Shortest concurrency slot lifetime (`ttl_ms` of a `concurrency` check).
pub const MIN_SLOT_TTL_MS: u64 = 1_000;
/// Largest `cost`.
pub const MAX_COST: u64 = 1_000_000_000;
/// Most sub-windows of a bounded sliding window (each check reads up to this many + 2 fields).
pub const MAX_SUBWINDOWS: u64 = 100;
/// Most units a check may ask as a lease beyond its cost (`lease`).
pub const MAX_LEASE: u64 = 1_000_000;
/// A grant takes at most 1/`LEASE_SHARE` of what the key has left after the call, so leases
/// shrink near the limit (to none when less than this is left).
pub const LEASE_SHARE: u64 = 4;
/// A fixed window's counter lives this long past its window's end, so that a check reaching
/// Redis late still counts in its window (reported times leave it out).
pub const COUNTER_GRACE_MS: u64 = 1000;

// Settings both sides share.

/// Longest key prefix (the filter's `key_prefix`, the shim's `TOLLGATE_KEY_PREFIX`).
pub const MAX_PREFIX_BYTES: usize = 64;
/// Longest shared secret (the filter's `shim.secret`, the shim's `TOLLGATE_SHIM_SECRET`).
pub const MAX_SECRET_BYTES: usize = 256;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Every constant above, by name (other tests check names against it).
    pub(crate) const RUST: &[(&str, u64)] = &[
        ("MAX_BODY_BYTES", MAX_BODY_BYTES as u64),
        ("MAX_REQUESTS", MAX_REQUESTS as u64),
        ("MAX_TOTAL_CHECKS", MAX_TOTAL_CHECKS as u64),
        ("MAX_RELEASES", MAX_RELEASES as u64),
        ("MAX_DEPTH", MAX_DEPTH as u64),
        ("MAX_CHECKS", MAX_CHECKS as u64),
        ("MAX_KEY_BYTES", MAX_KEY_BYTES as u64),
        ("MAX_ID_BYTES", MAX_ID_BYTES as u64),
        ("MAX_LIMIT", MAX_LIMIT),
        ("MAX_LOG_LIMIT", MAX_LOG_LIMIT),
        ("MAX_RATE", MAX_RATE),
        ("MAX_RATE_PER_PERIOD_MS", MAX_RATE_PER_PERIOD_MS),
        ("MAX_MS", MAX_MS),
        ("MIN_WINDOW_MS", MIN_WINDOW_MS),
        ("MIN_SLOT_TTL_MS", MIN_SLOT_TTL_MS),
        ("MAX_COST", MAX_COST),
        ("MAX_SUBWINDOWS", MAX_SUBWINDOWS),
        ("MAX_LEASE", MAX_LEASE),
        ("LEASE_SHARE", LEASE_SHARE),
        ("COUNTER_GRACE_MS", COUNTER_GRACE_MS),
        ("MAX_PREFIX_BYTES", MAX_PREFIX_BYTES as u64),
        ("MAX_SECRET_BYTES", MAX_SECRET_BYTES as u64),
    ];

    /// `64 * 1024`, `1e12`, `10000`: the forms bounds.lua uses.
    fn lua_number(text: &str) -> u64 {
        text.split('*')
            .map(|factor| {
                let factor = factor.trim();
                match factor.split_once('e') {
                    Some((m, e)) => {
                        m.parse::<u64>().unwrap() * 10u64.pow(e.parse::<u32>().unwrap())
                    }
                    None => factor.parse::<u64>().unwrap(),
                }
            })
            .product()
    }

    /// `_M.NAME = value -- comment` lines of bounds.lua.
    fn lua_bounds() -> BTreeMap<String, u64> {
        include_str!("../lua-redis-shim/lib/tollgate/bounds.lua")
            .lines()
            .filter_map(|line| line.strip_prefix("_M."))
            .map(|rest| {
                let (name, value) = rest.split_once('=').unwrap();
                let value = value.split("--").next().unwrap();
                (name.trim().to_string(), lua_number(value))
            })
            .collect()
    }

    #[test]
    fn every_bound_equals_its_lua_twin() {
        let lua = lua_bounds();
        let rust: BTreeMap<String, u64> = RUST.iter().map(|&(n, v)| (n.to_string(), v)).collect();
        for (name, value) in &rust {
            assert_eq!(
                lua.get(name),
                Some(value),
                "{name}: bounds.lua says otherwise"
            );
        }
        for name in lua.keys() {
            assert!(rust.contains_key(name), "{name} is in bounds.lua only");
        }
        // RUST lists every `pub const` of this file, no more.
        let declared: Vec<&str> = include_str!("bounds.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("pub const "))
            .map(|l| l.split(':').next().unwrap_or_default())
            .collect();
        let listed: Vec<&str> = RUST.iter().map(|&(n, _)| n).collect();
        assert_eq!(declared, listed);
    }

    #[test]
    fn the_parser_reads_every_form() {
        assert_eq!(lua_number(" 64 * 1024 "), 65_536);
        assert_eq!(lua_number("1e12"), 1_000_000_000_000);
        assert_eq!(lua_number("86400000"), 86_400_000);
    }
}
