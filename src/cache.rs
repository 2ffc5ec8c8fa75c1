//! The over-limit cache: when Redis says a key is exhausted until T, later requests on that key
//! are denied in the gateway until T, without a callout. Abusive traffic then costs almost
//! nothing, and admission counts are unchanged: the cache only ever denies a request that the
//! shim would deny too (nothing but time can free an exhausted key, concurrency aside).
//!
//! Entries live in proxy-wasm shared data, so every worker of a gateway sees them. To keep that
//! memory bounded, a key maps to one of [`BUCKETS`] slots (`tollgate.oc.<n>`); a colliding key
//! overwrites the slot, which only costs a callout later. An entry names its full key, so a
//! collision can never deny the wrong key.

use std::collections::HashMap;

use crate::request::{Check, CheckKind};
use crate::wire::CheckResult;

/// Shared-data slots per gateway: ~4096 × (key + 16 bytes) at most.
pub const BUCKETS: u64 = 4096;

/// A key exhausted until `until_ms` (gateway clock), fully reset at `reset_at_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub until_ms: u64,
    pub reset_at_ms: u64,
}

/// The shared-data slot name for a counter key (FNV-1a: fast, and a crafted collision only
/// evicts an entry).
pub fn slot(key: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("tollgate.oc.{}", h % BUCKETS)
}

/// What to cache after the shim denied a request, for one of its checks.
///
/// Only a key with nothing left is cached, and only until a request of cost 1 would fit again:
/// for cost 1 that is the shim's retry-after; for a fixed window, whatever the cost, the end of
/// the window. Shadow and concurrency checks are never cached (slots free up at any moment).
pub fn entry_for(check: &Check, result: &CheckResult, now_ms: u64) -> Option<Entry> {
    if result.allowed || result.remaining > 0 || check.shadow {
        return None;
    }
    let wait_ms = match (&check.kind, check.cost) {
        (CheckKind::Concurrency { .. }, _) => return None,
        (CheckKind::FixedWindow { ttl_ms, .. }, _) => (*ttl_ms).max(result.reset_ms),
        (_, 1) => result.retry_after_ms,
        _ => return None,
    };
    if wait_ms == 0 {
        return None;
    }
    Some(Entry {
        key: check.key.clone(),
        until_ms: now_ms + wait_ms,
        reset_at_ms: now_ms + result.reset_ms.max(wait_ms),
    })
}

/// Whether a cached entry denies this check now: same key, still exhausted, and the request
/// consumes something (cost 0 only reads and is always let through to the shim).
pub fn denies(entry: &Entry, check: &Check, now_ms: u64) -> bool {
    entry.key == check.key && now_ms < entry.until_ms && check.cost > 0 && !check.shadow
}

/// The answer the shim would give for a check that the cache denies.
pub fn as_result(entry: &Entry, check: &Check, now_ms: u64) -> CheckResult {
    CheckResult {
        allowed: false,
        limit: check.limit(),
        remaining: 0,
        reset_ms: entry.reset_at_ms.saturating_sub(now_ms),
        retry_after_ms: entry.until_ms.saturating_sub(now_ms),
    }
}

/// A worker's own copy of the entries it has written or read, consulted before shared data:
/// a key under attack is then denied without a host call. An entry only ever says "exhausted
/// until T", so a copy is as good as the shared one; what this worker has not seen yet it
/// still finds in shared data.
#[derive(Debug, Default)]
pub struct Near {
    entries: HashMap<String, Entry>,
}

impl Near {
    /// Entries kept per worker, like the shared slots.
    pub const CAPACITY: usize = BUCKETS as usize;

    /// The entry for `key` if it still denies at `now_ms`; a stale one is dropped.
    pub fn get(&mut self, key: &str, now_ms: u64) -> Option<&Entry> {
        let live = self.entries.get(key).is_some_and(|e| now_ms < e.until_ms);
        if !live {
            self.entries.remove(key);
            return None;
        }
        self.entries.get(key)
    }

    /// Keeps `entry`; when full, stale entries go first, and if none is stale, all of them.
    pub fn put(&mut self, entry: Entry, now_ms: u64) {
        if self.entries.len() >= Self::CAPACITY && !self.entries.contains_key(&entry.key) {
            self.entries.retain(|_, e| now_ms < e.until_ms);
            if self.entries.len() >= Self::CAPACITY {
                self.entries.clear();
            }
        }
        self.entries.insert(entry.key.clone(), entry);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `until (8 bytes LE) | reset_at (8 bytes LE) | key`.
pub fn encode(entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + entry.key.len());
    out.extend_from_slice(&entry.until_ms.to_le_bytes());
    out.extend_from_slice(&entry.reset_at_ms.to_le_bytes());
    out.extend_from_slice(entry.key.as_bytes());
    out
}

pub fn decode(bytes: &[u8]) -> Option<Entry> {
    let until = bytes.get(..8)?.try_into().ok()?;
    let reset = bytes.get(8..16)?.try_into().ok()?;
    Some(Entry {
        until_ms: u64::from_le_bytes(until),
        reset_at_ms: u64::from_le_bytes(reset),
        key: String::from_utf8(bytes.get(16..)?.to_vec()).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(kind: CheckKind, cost: u64) -> Check {
        Check {
            rule: 0,
            key: "tollgate:{r|=k}:1000:5".into(),
            cost,
            shadow: false,
            kind,
        }
    }

    fn denied(remaining: u64, reset_ms: u64, retry_after_ms: u64) -> CheckResult {
        CheckResult {
            allowed: false,
            limit: 10,
            remaining,
            reset_ms,
            retry_after_ms,
        }
    }

    const FIXED: CheckKind = CheckKind::FixedWindow {
        limit: 10,
        window_ms: 1000,
        ttl_ms: 400,
    };
    const BUCKET: CheckKind = CheckKind::TokenBucket {
        burst: 10,
        rate: 1,
        period_ms: 100,
    };

    #[test]
    fn caches_only_exhausted_keys_until_a_unit_request_fits() {
        let cases = [
            // (kind, cost, result) → cached until (from now = 1000)
            (FIXED, 1, denied(0, 390, 390), Some(1400)),
            (FIXED, 5, denied(0, 390, 390), Some(1400)),
            (FIXED, 5, denied(3, 390, 390), None), // a smaller request may still fit
            (BUCKET, 1, denied(0, 1000, 60), Some(1060)),
            (BUCKET, 2, denied(0, 1000, 160), None), // retry-after is for cost 2, not 1
            (
                CheckKind::Concurrency {
                    limit: 1,
                    timeout_ms: 1000,
                    id: "x".into(),
                },
                1,
                denied(0, 900, 900),
                None,
            ),
        ];
        for (kind, cost, result, until) in cases {
            let got = entry_for(&check(kind.clone(), cost), &result, 1000).map(|e| e.until_ms);
            assert_eq!(got, until, "{kind:?} cost {cost}");
        }
        let mut allowed = denied(0, 1, 1);
        allowed.allowed = true;
        assert_eq!(entry_for(&check(FIXED, 1), &allowed, 0), None);
        let mut shadow = check(FIXED, 1);
        shadow.shadow = true;
        assert_eq!(entry_for(&shadow, &denied(0, 1, 1), 0), None);
    }

    #[test]
    fn an_entry_denies_its_own_key_until_it_expires() {
        let c = check(BUCKET, 1);
        let e = entry_for(&c, &denied(0, 1000, 60), 1000).unwrap();
        assert!(denies(&e, &c, 1000));
        assert!(denies(&e, &c, 1059));
        assert!(!denies(&e, &c, 1060));
        assert!(!denies(&e, &check(BUCKET, 0), 1000), "cost 0 only reads");
        let mut other = c.clone();
        other.key.push('x');
        assert!(
            !denies(&e, &other, 1000),
            "a colliding slot never denies another key"
        );
        let r = as_result(&e, &c, 1010);
        assert_eq!(
            (
                r.allowed,
                r.remaining,
                r.retry_after_ms,
                r.reset_ms,
                r.limit
            ),
            (false, 0, 50, 990, 10)
        );
    }

    #[test]
    fn entries_round_trip_and_garbage_is_ignored() {
        let e = Entry {
            key: "tollgate:{a}:1".into(),
            until_ms: 7,
            reset_at_ms: 9,
        };
        assert_eq!(decode(&encode(&e)), Some(e));
        assert_eq!(decode(b""), None);
        assert_eq!(decode(&[0; 15]), None);
        assert_eq!(decode(&[0xff; 20]), None, "not UTF-8");
    }

    #[test]
    fn slots_are_bounded_and_stable() {
        assert_eq!(slot("a"), slot("a"));
        let n: std::collections::HashSet<String> =
            (0..20_000).map(|i| slot(&format!("k{i}"))).collect();
        assert!(n.len() <= BUCKETS as usize && n.len() > 4000);
        assert!(slot("x").starts_with("tollgate.oc."));
    }

    #[test]
    fn near_copies_expire_and_stay_bounded() {
        let mut near = Near::default();
        let entry = |key: &str, until_ms| Entry {
            key: key.into(),
            until_ms,
            reset_at_ms: until_ms,
        };
        near.put(entry("a", 100), 0);
        assert_eq!(near.get("a", 99).map(|e| e.until_ms), Some(100));
        assert!(near.get("a", 100).is_none(), "expired at until_ms");
        assert!(near.is_empty(), "a stale entry is dropped when read");

        for i in 0..Near::CAPACITY {
            near.put(
                entry(&format!("k{i}"), if i % 2 == 0 { 50 } else { 500 }),
                0,
            );
        }
        near.put(entry("new", 500), 60);
        assert_eq!(
            near.len(),
            Near::CAPACITY / 2 + 1,
            "the stale half went first"
        );
        for i in 0..Near::CAPACITY {
            near.put(entry(&format!("x{i}"), 500), 60);
        }
        assert!(near.len() <= Near::CAPACITY);
        assert!(near.get("x4095", 60).is_some());
    }
}
