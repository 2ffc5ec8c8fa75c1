//! The over-limit cache: when Redis says a key is exhausted until T, later requests on that key
//! are denied in the gateway until T, without a callout. Abusive traffic then costs almost
//! nothing, and admission counts are unchanged: the cache only ever denies a request that the
//! shim would deny too (nothing but time can free an exhausted key, concurrency aside). One
//! exception, bounded: in the first moments after a gateway learns a clock skew (its first
//! replies), sliding-window counters written on the uncorrected clock may expire in Redis up
//! to that correction earlier than the corrected clock expects.
//!
//! Entries live in proxy-wasm shared data, so every worker of a gateway sees them. To keep that
//! memory bounded, a key maps to one of [`BUCKETS`] slots (`tollgate.oc.<n>`); a colliding key
//! overwrites the slot, which only costs a callout later. An entry names its check's full
//! [`identity`] — the counter key *and* the limit it was checked against — so a collision, a
//! tier with another limit on the same key, or a limit raised by a reload can never be denied
//! by an entry learned under another limit.
//!
//! Times count from when the request's checks were built — no later than when Redis ran them —
//! not from when the reply arrived, so round trip and queueing never stretch a denial past
//! what Redis would say. Each entry is on the clock its algorithm's time comes from
//! ([`Clocks::for_check`]): Redis's time (token bucket, GCRA, sliding log, the bounded sliding
//! window, the fixed window's TTL) is followed by the gateway's own clock, which does not move
//! when the skew estimate does; the two-window estimate's weight is computed on the
//! skew-corrected clock, so its entries are too.

use std::collections::HashMap;

use crate::check::{Check, CheckKind};
use crate::wire::CheckResult;

/// Shared-data slots per gateway: ~4096 × (key + 16 bytes) at most.
pub(crate) const BUCKETS: u64 = 4096;

/// The two clocks of a gateway at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clocks {
    /// The gateway's own clock.
    pub gateway_ms: u64,
    /// The same moment moved onto Redis's clock by the skew estimate (window keys use it).
    pub corrected_ms: u64,
}

impl Clocks {
    /// The clock an entry for `check` is kept on.
    pub(crate) fn for_check(&self, check: &Check) -> u64 {
        match check.kind {
            CheckKind::SlidingWindow { .. } => self.corrected_ms,
            _ => self.gateway_ms,
        }
    }
}

/// A check exhausted until `until_ms`, fully reset at `reset_at_ms` (on the check's clock, see
/// [`Clocks::for_check`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The check's [`identity`].
    pub(crate) key: String,
    pub(crate) until_ms: u64,
    pub(crate) reset_at_ms: u64,
}

/// The shared-data slot name for a counter key (FNV-1a: fast, and a crafted collision only
/// evicts an entry).
pub(crate) fn slot(id: &str) -> String {
    format!("tollgate.oc.{}", fnv(id) % BUCKETS)
}

/// FNV-1a of a string (shared-data slots: over-limit cache, leases).
pub(crate) fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What an entry is about: the counter key and every parameter of the limit, so that only a
/// check against the same limit on the same key can be denied by it.
pub(crate) fn identity(check: &Check) -> String {
    use std::fmt::Write;
    let mut id = String::with_capacity(check.key.len() + 32);
    id.push_str(&check.key);
    let _ = match &check.kind {
        CheckKind::FixedWindow {
            limit, window_ms, ..
        } => write!(id, "|fw/{limit}/{window_ms}"),
        CheckKind::SlidingWindow {
            limit, window_ms, ..
        } => write!(id, "|sw/{limit}/{window_ms}"),
        CheckKind::SlidingWindowBounded {
            limit,
            window_ms,
            subwindows,
        } => write!(id, "|swb/{limit}/{window_ms}/{subwindows}"),
        CheckKind::SlidingLog {
            limit, window_ms, ..
        } => write!(id, "|sl/{limit}/{window_ms}"),
        CheckKind::TokenBucket {
            burst,
            rate,
            period_ms,
        } => write!(id, "|tb/{burst}/{rate}/{period_ms}"),
        CheckKind::Gcra {
            burst,
            rate,
            period_ms,
        } => write!(id, "|gcra/{burst}/{rate}/{period_ms}"),
        CheckKind::Concurrency { limit, .. } => write!(id, "|conc/{limit}"),
    };
    id
}

/// What to cache after the shim denied a request, for one of its checks. `built`: when the
/// request's checks were built.
///
/// Only a key with nothing left is cached, and only until a request of cost 1 would fit again:
/// for cost 1 that is the shim's retry-after; for a fixed window, whatever the cost, the end of
/// the window (or the key's TTL in Redis, if sooner). Both count from `now_ms`, which is no
/// later than the moment Redis answered, so an entry never outlives Redis's own denial. Shadow and concurrency checks are never cached (slots free up at any moment).
pub(crate) fn entry_for(check: &Check, result: &CheckResult, built: Clocks) -> Option<Entry> {
    if result.allowed || result.remaining > 0 || check.shadow {
        return None;
    }
    let wait_ms = match (&check.kind, check.cost) {
        (CheckKind::Concurrency { .. }, _) => return None,
        // The window's end, unless Redis's key expires first (it was made by a gateway whose
        // clock ran ahead): past its TTL Redis would count afresh under the same key.
        (CheckKind::FixedWindow { ttl_ms, .. }, _) => (*ttl_ms).min(result.reset_ms),
        (_, 1) => result.retry_after_ms,
        _ => return None,
    };
    if wait_ms == 0 {
        return None;
    }
    let now_ms = built.for_check(check);
    Some(Entry {
        key: identity(check),
        until_ms: now_ms + wait_ms,
        reset_at_ms: now_ms + result.reset_ms.max(wait_ms),
    })
}

/// Whether a cached entry denies this check now: same key and limit, still exhausted, and the
/// request consumes something (cost 0 only reads and is always let through to the shim).
/// `id`: the check's [`identity`]; `now_ms`: [`Clocks::for_check`].
pub(crate) fn denies(entry: &Entry, check: &Check, id: &str, now_ms: u64) -> bool {
    entry.key == id && now_ms < entry.until_ms && check.cost > 0 && !check.shadow
}

/// The answer the shim would give for a check that the cache denies.
pub(crate) fn as_result(entry: &Entry, check: &Check, now_ms: u64) -> CheckResult {
    CheckResult {
        lease: 0,
        lease_ms: 0,
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
pub(crate) struct Near {
    entries: HashMap<String, Entry>,
}

impl Near {
    /// Entries kept per worker, like the shared slots.
    pub(crate) const CAPACITY: usize = BUCKETS as usize;

    /// The entry for `key` if it still denies at `now_ms`; a stale one is dropped.
    pub(crate) fn get(&mut self, key: &str, now_ms: u64) -> Option<&Entry> {
        let live = self.entries.get(key).is_some_and(|e| now_ms < e.until_ms);
        if !live {
            self.entries.remove(key);
            return None;
        }
        self.entries.get(key)
    }

    /// Keeps `entry`; when full, stale entries go first, and if none is stale, all of them.
    pub(crate) fn put(&mut self, entry: Entry, now_ms: u64) {
        if self.entries.len() >= Self::CAPACITY && !self.entries.contains_key(&entry.key) {
            self.entries.retain(|_, e| now_ms < e.until_ms);
            if self.entries.len() >= Self::CAPACITY {
                self.entries.clear();
            }
        }
        self.entries.insert(entry.key.clone(), entry);
    }
}

/// `until (8 bytes LE) | reset_at (8 bytes LE) | key`.
pub(crate) fn encode(entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + entry.key.len());
    out.extend_from_slice(&entry.until_ms.to_le_bytes());
    out.extend_from_slice(&entry.reset_at_ms.to_le_bytes());
    out.extend_from_slice(entry.key.as_bytes());
    out
}

pub(crate) fn decode(bytes: &[u8]) -> Option<Entry> {
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
            lease: 0,
            rule: 0,
            key: "tollgate:{r|=k}:1000:5".into(),
            cost,
            shadow: false,
            kind,
        }
    }

    fn at(ms: u64) -> Clocks {
        Clocks {
            gateway_ms: ms,
            corrected_ms: ms,
        }
    }

    fn denied(remaining: u64, reset_ms: u64, retry_after_ms: u64) -> CheckResult {
        CheckResult {
            lease: 0,
            lease_ms: 0,
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
            // The window ends in 400 ms, Redis's key in 390 (made by a gateway ahead of us).
            (FIXED, 1, denied(0, 390, 390), Some(1390)),
            (FIXED, 5, denied(0, 390, 390), Some(1390)),
            (FIXED, 1, denied(0, 900, 900), Some(1400)),
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
            let got = entry_for(&check(kind.clone(), cost), &result, at(1000)).map(|e| e.until_ms);
            assert_eq!(got, until, "{kind:?} cost {cost}");
        }
        let mut allowed = denied(0, 1, 1);
        allowed.allowed = true;
        assert_eq!(entry_for(&check(FIXED, 1), &allowed, at(0)), None);
        let mut shadow = check(FIXED, 1);
        shadow.shadow = true;
        assert_eq!(entry_for(&shadow, &denied(0, 1, 1), at(0)), None);
    }

    #[test]
    fn an_entry_denies_its_own_key_until_it_expires() {
        let c = check(BUCKET, 1);
        let id = identity(&c);
        let e = entry_for(&c, &denied(0, 1000, 60), at(1000)).unwrap();
        assert!(denies(&e, &c, &id, 1000));
        assert!(denies(&e, &c, &id, 1059));
        assert!(!denies(&e, &c, &id, 1060));
        assert!(
            !denies(&e, &check(BUCKET, 0), &id, 1000),
            "cost 0 only reads"
        );
        let mut other = c.clone();
        other.key.push('x');
        assert!(
            !denies(&e, &other, &identity(&other), 1000),
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
    fn an_entry_never_denies_the_same_key_under_another_limit() {
        // Tiers whose descriptor is not part of the key, and a limit raised by a reload, share
        // the counter key: only a check against the very same limit may be denied.
        let free = check(FIXED, 1);
        let e = entry_for(&free, &denied(0, 390, 390), at(1000)).unwrap();
        let mut pro = free.clone();
        pro.kind = CheckKind::FixedWindow {
            limit: 100,
            window_ms: 1000,
            ttl_ms: 400,
        };
        assert_eq!(free.key, pro.key);
        assert!(denies(&e, &free, &identity(&free), 1001));
        assert!(!denies(&e, &pro, &identity(&pro), 1001));
        let mut faster = check(BUCKET, 1);
        let eb = entry_for(&faster, &denied(0, 1000, 60), at(1000)).unwrap();
        faster.kind = CheckKind::TokenBucket {
            burst: 10,
            rate: 2,
            period_ms: 100,
        };
        assert!(!denies(&eb, &faster, &identity(&faster), 1001));
        let ids: std::collections::HashSet<String> = [FIXED, BUCKET]
            .into_iter()
            .map(|k| identity(&check(k, 1)))
            .collect();
        assert_eq!(ids.len(), 2);
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
        assert!(
            near.entries.is_empty(),
            "a stale entry is dropped when read"
        );

        for i in 0..Near::CAPACITY {
            near.put(
                entry(&format!("k{i}"), if i % 2 == 0 { 50 } else { 500 }),
                0,
            );
        }
        near.put(entry("new", 500), 60);
        assert_eq!(
            near.entries.len(),
            Near::CAPACITY / 2 + 1,
            "the stale half went first"
        );
        for i in 0..Near::CAPACITY {
            near.put(entry(&format!("x{i}"), 500), 60);
        }
        assert!(near.entries.len() <= Near::CAPACITY);
        assert!(near.get("x4095", 60).is_some());
    }
}
