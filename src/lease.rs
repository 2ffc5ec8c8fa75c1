//! Leases for hot keys: one callout reserves units of a key in Redis, and the gateway's
//! workers spend them locally, without pausing requests.
//!
//! A check of a key this worker sees often asks `lease` units beyond its cost; the check script
//! grants up to that many once every request of its call is decided (never more than
//! 1/`LEASE_SHARE` of what the key has left, so grants shrink to none near the limit) and
//! charges them at once. Nothing is admitted that Redis did not grant, so leases never
//! over-admit; what they cost is units granted and not spent before they expire.
//!
//! The units live in proxy-wasm shared data, one [`Record`] per key and limit ([`identity`],
//! the over-limit cache's), in one of [`SLOTS`] slots (`tollgate.lease.<n>`), so every worker of
//! a gateway spends them and memory stays bounded. The slots are made at configure
//! ([`create_slots`]), so every write of a record (spend, give back, grant) is a
//! compare-and-swap. Units of one key's grants join in one record; before a request is denied
//! (by Redis or the over-limit cache), units its gateway holds are spent instead.
//! A record is valid until `expires_ms` on the gateway's own clock, counted from when the
//! granting check was built (no later than when Redis ran it), so it never outlives what Redis
//! said: the end of the window (fixed window, two-window estimate, whose keys also name their
//! window) or of the current sub-window (bounded sliding window: a unit spent in the sub-window
//! it was charged to counts exactly as if charged when spent).
//!
//! When a spend leaves half of the last grant or less, the worker that made it marks the
//! record (`refill_since_ms`) and asks the next lease from its root, sized from the rate at
//! which the last one was spent; the next requests keep spending meanwhile. A refill that
//! fails leaves the record as it is: when it runs out, requests are checked in Redis (and a
//! failure there takes the failure mode). A gateway that dies loses at most the units it held.

use std::collections::HashMap;

use crate::check::Check;

/// Shared-data slots for lease records per gateway.
pub const SLOTS: u64 = 4096;
/// A key is hot when one worker saw it this many times within this second and the last
/// ([`HEAT_WINDOW_MS`] each).
pub const HOT_HITS: u32 = 3;
pub const HEAT_WINDOW_MS: u64 = 1000;
/// A worker's heat map is forgotten when it tracks more keys than this.
const HEAT_CAPACITY: usize = 4096;
/// Tries of one compare-and-swap before giving up (the request is then checked in Redis).
pub const CAS_TRIES: usize = 4;

/// The shared-data slot of an identity.
pub fn slot(id: &str) -> String {
    slot_name(crate::cache::fnv(id) % SLOTS)
}

/// The name of slot `n` (0 ≤ n < [`SLOTS`]).
pub fn slot_name(n: u64) -> String {
    format!("tollgate.lease.{n}")
}

/// What an empty slot holds: no record.
const EMPTY: &[u8] = &[0];

/// Makes every slot that does not exist yet, holding no record; the engine calls it when it is
/// configured (on Envoy, the main thread does so before any worker serves). A compare-and-swap
/// needs a version, and a key that does not exist has none: two workers storing a key's first
/// grant at once into a slot that does not exist would both write, and the units of one
/// (charged in Redis) would be lost. Once it exists, every write is a compare-and-swap.
pub fn create_slots(host: &impl crate::host::Host) {
    for n in 0..SLOTS {
        create_slot(host, &slot_name(n));
    }
}

/// Makes `slot` if it does not exist (a host that evicts shared data may have dropped it).
pub fn create_slot(host: &impl crate::host::Host, slot: &str) {
    if host.shared_get_cas(slot).0.is_none() {
        let _ = host.shared_set_cas(slot, EMPTY, None);
    }
}

/// Whether a request can be decided from leases: every check takes leases, consumes something
/// and is not in shadow mode, and its limit leaves room for a grant.
pub fn leasable(checks: &[Check]) -> bool {
    !checks.is_empty()
        && checks.iter().all(|c| {
            c.leasable() && !c.shadow && c.cost > 0 && c.limit() >= 2 * crate::bounds::LEASE_SHARE
        })
}

/// One key's lease on this gateway, in shared data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// The check's identity (key and limit): a record is only ever spent by the same limit.
    pub id: String,
    /// Units left to spend.
    pub units: u64,
    /// Gateway ms after which none may be spent.
    pub expires_ms: u64,
    /// What Redis said was left, leases aside, when it last answered for this key.
    pub base_remaining: u64,
    /// Units spent since then (the remaining reported is `base_remaining − spent`).
    pub spent: u64,
    /// Gateway ms when the key's quota is whole again (for `RateLimit` reset).
    pub reset_at_ms: u64,
    /// Gateway ms of the last grant, and its size.
    pub granted_ms: u64,
    pub grant: u64,
    /// A refill was asked at this gateway ms (0: none in flight).
    pub refill_since_ms: u64,
}

const FIELDS: usize = 8;

pub fn encode(r: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIELDS * 8 + r.id.len());
    for v in [
        r.units,
        r.expires_ms,
        r.base_remaining,
        r.spent,
        r.reset_at_ms,
        r.granted_ms,
        r.grant,
        r.refill_since_ms,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(r.id.as_bytes());
    out
}

pub fn decode(bytes: &[u8]) -> Option<Record> {
    if bytes.len() < FIELDS * 8 {
        return None;
    }
    let (nums, id) = bytes.split_at(FIELDS * 8);
    let mut v = [0u64; FIELDS];
    for (i, chunk) in nums.chunks_exact(8).enumerate() {
        v[i] = u64::from_le_bytes(chunk.try_into().ok()?);
    }
    Some(Record {
        id: String::from_utf8(id.to_vec()).ok()?,
        units: v[0],
        expires_ms: v[1],
        base_remaining: v[2],
        spent: v[3],
        reset_at_ms: v[4],
        granted_ms: v[5],
        grant: v[6],
        refill_since_ms: v[7],
    })
}

/// What a spend tells the request: the `RateLimit` fields, and whether this worker should ask
/// the next lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub remaining: u64,
    pub reset_ms: u64,
    pub refill: bool,
}

/// Takes `cost` units from `rec` (whose identity the caller has matched) at gateway ms `now` if
/// it holds them and has not expired. `stale_ms`: a refill asked longer ago than this has
/// failed; ask again.
fn spend(rec: &mut Record, cost: u64, now: u64, stale_ms: u64) -> Option<Taken> {
    if now >= rec.expires_ms || rec.units < cost {
        return None;
    }
    rec.units -= cost;
    rec.spent += cost;
    let low = rec.units.saturating_mul(2) <= rec.grant;
    let refill = low && !in_flight(rec, now, stale_ms);
    if refill {
        rec.refill_since_ms = now;
    }
    Some(Taken {
        remaining: rec.base_remaining.saturating_sub(rec.spent),
        reset_ms: rec.reset_at_ms.saturating_sub(now),
        refill,
    })
}

/// Takes `cost` units from an encoded record, in place: no copy of the identity, no allocation. `Err`
/// when the record is not this identity's, has expired or lacks the units (`Err(true)`: a
/// refill is in flight); otherwise the record in `bytes` is updated and what the spend tells
/// the request is returned, with the record's values a refill needs (spent, granted_ms).
pub fn take_encoded(
    bytes: &mut [u8],
    id: &str,
    cost: u64,
    now: u64,
    stale_ms: u64,
) -> Result<(Taken, u64, u64), bool> {
    if bytes.len() < FIELDS * 8 || &bytes[FIELDS * 8..] != id.as_bytes() {
        return Err(false);
    }
    let get = |b: &[u8], i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    let mut rec = Record {
        id: String::new(),
        units: get(bytes, 0),
        expires_ms: get(bytes, 1),
        base_remaining: get(bytes, 2),
        spent: get(bytes, 3),
        reset_at_ms: get(bytes, 4),
        granted_ms: get(bytes, 5),
        grant: get(bytes, 6),
        refill_since_ms: get(bytes, 7),
    };
    let Some(taken) = spend(&mut rec, cost, now, stale_ms) else {
        return Err(in_flight(&rec, now, stale_ms));
    };
    for (i, v) in [(0, rec.units), (3, rec.spent), (7, rec.refill_since_ms)] {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    Ok((taken, rec.spent, rec.granted_ms))
}

/// Gives back units taken for a request that could not be decided locally after all.
pub fn give_back(rec: &mut Record, id: &str, cost: u64) -> bool {
    if rec.id != id {
        return false;
    }
    rec.units += cost;
    rec.spent = rec.spent.saturating_sub(cost);
    true
}

/// A refill was asked less than `stale_ms` ago.
fn in_flight(rec: &Record, now: u64, stale_ms: u64) -> bool {
    rec.refill_since_ms != 0 && now < rec.refill_since_ms.saturating_add(stale_ms)
}

/// What Redis answered for a check that asked a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub units: u64,
    /// From when the check was built (gateway ms): how long the units may be spent.
    pub since_ms: u64,
    pub lease_ms: u64,
    pub remaining: u64,
    pub reset_ms: u64,
}

/// The record after a grant (`units` may be 0: a refill that got nothing ends the refill), and
/// the units it leaves unspent (`wasted`). Units still held of the same identity join the new
/// ones, and all expire at the earlier of the two expiries: both are of one window (or
/// sub-window), whatever the time their checks waited before Redis ran them, because a grant
/// of a later one is run after the earlier one ended, when its units have expired here. Held
/// units of another identity (the slot is shared) or expired ones are replaced: wasted.
pub fn merge(old: Option<Record>, id: &str, g: Grant, now: u64) -> (Record, u64) {
    let expires = g.since_ms.saturating_add(g.lease_ms);
    let live = old.filter(|r| r.units > 0);
    let held = live
        .as_ref()
        .filter(|r| r.id == id && now < r.expires_ms)
        .map(|r| (r.units, r.expires_ms, r.grant));
    let wasted = match (&live, held) {
        (Some(r), None) => r.units,
        _ => 0,
    };
    let (units, expires_ms) = match held {
        Some((units, until, _)) if g.units == 0 => (units, until),
        Some((units, until, _)) => (units + g.units, until.min(expires)),
        None => (g.units, expires),
    };
    // Units still held were charged before Redis answered: they are left too.
    let joined = units - g.units;
    let rec = Record {
        id: id.to_string(),
        units,
        expires_ms,
        base_remaining: g.remaining + joined,
        spent: 0,
        reset_at_ms: g.since_ms.saturating_add(g.reset_ms),
        granted_ms: now,
        grant: if g.units > 0 {
            g.units
        } else {
            held.map_or(0, |h| h.2)
        },
        refill_since_ms: 0,
    };
    (rec, wasted)
}

/// The next lease to ask: enough for `horizon_ms` at the rate the last grant (at `granted_ms`)
/// was spent (`spent` so far), within 1..=max.
pub fn refill_size(spent: u64, granted_ms: u64, now: u64, horizon_ms: u64, max: u64) -> u64 {
    let elapsed = now.saturating_sub(granted_ms).max(1);
    let spent = spent.max(1);
    (spent.saturating_mul(horizon_ms) / elapsed).clamp(1, max)
}

/// A worker's view of which keys are hot: hits per identity (by its FNV hash: a collision only
/// makes a key look hotter) in the current second and the one before, so a key kept hot stays
/// hot when a second ends.
#[derive(Debug, Default)]
pub struct Heat {
    /// Hash → (start of the current second, hits in it, hits in the second before).
    seen: HashMap<u64, (u64, u32, u32)>,
}

impl Heat {
    /// Counts a request for `id` at `now`; when the key is hot (at least [`HOT_HITS`] within
    /// this second and the last), the lease to ask: enough for `horizon_ms` at the rate seen
    /// over both, within 1..=max.
    pub fn hit(&mut self, id: &str, now: u64, horizon_ms: u64, max: u64) -> Option<u64> {
        let h = crate::cache::fnv(id);
        if self.seen.len() >= HEAT_CAPACITY && !self.seen.contains_key(&h) {
            self.seen.clear();
        }
        let entry = self.seen.entry(h).or_insert((now, 0, 0));
        let age = now.saturating_sub(entry.0);
        if age >= 2 * HEAT_WINDOW_MS {
            *entry = (now, 0, 0);
        } else if age >= HEAT_WINDOW_MS {
            *entry = (entry.0 + HEAT_WINDOW_MS, 0, entry.1);
        }
        entry.1 += 1;
        let hits = entry.1 + entry.2;
        if hits < HOT_HITS {
            return None;
        }
        let since = if entry.2 > 0 {
            entry.0 - HEAT_WINDOW_MS
        } else {
            entry.0
        };
        let elapsed = now.saturating_sub(since).max(1);
        Some((u64::from(hits).saturating_mul(horizon_ms) / elapsed).clamp(1, max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`take_encoded`] on a record, as the engine spends one.
    fn take(rec: &mut Record, id: &str, cost: u64, now: u64, stale_ms: u64) -> Option<Taken> {
        let mut bytes = encode(rec);
        let (taken, _, _) = take_encoded(&mut bytes, id, cost, now, stale_ms).ok()?;
        *rec = decode(&bytes).unwrap();
        Some(taken)
    }

    fn refilling(rec: &Record, id: &str, now: u64, stale_ms: u64) -> bool {
        rec.id == id && in_flight(rec, now, stale_ms)
    }

    fn rec(units: u64) -> Record {
        Record {
            id: "k|fw/10/1000".into(),
            units,
            expires_ms: 2_000,
            base_remaining: 50,
            grant: units,
            granted_ms: 1_000,
            reset_at_ms: 2_000,
            ..Record::default()
        }
    }

    #[test]
    fn a_record_round_trips() {
        let mut r = rec(7);
        r.refill_since_ms = 99;
        r.spent = 3;
        assert_eq!(decode(&encode(&r)), Some(r));
        assert_eq!(decode(b"short"), None);
    }

    #[test]
    fn only_the_same_identity_spends_and_never_after_expiry_or_beyond_the_units() {
        let mut r = rec(4);
        assert_eq!(take(&mut r, "other|fw/10/1000", 1, 1_500, 100), None);
        assert_eq!(take(&mut r, "k|fw/10/1000", 5, 1_500, 100), None);
        assert_eq!(take(&mut r.clone(), "k|fw/10/1000", 1, 2_000, 100), None);
        let t = take(&mut r, "k|fw/10/1000", 1, 1_500, 100).unwrap();
        assert_eq!((t.remaining, t.reset_ms, t.refill), (49, 500, false));
        assert_eq!(r.units, 3);
        // Half the grant left or less: this spend asks the next lease, and only this one.
        let t = take(&mut r, "k|fw/10/1000", 1, 1_501, 100).unwrap();
        assert!(t.refill);
        assert_eq!(r.refill_since_ms, 1_501);
        assert!(!take(&mut r, "k|fw/10/1000", 1, 1_502, 100).unwrap().refill);
        assert!(refilling(&r, "k|fw/10/1000", 1_502, 100));
        // A refill that never answered is asked again.
        r.units = 1;
        assert!(take(&mut r, "k|fw/10/1000", 1, 1_700, 100).unwrap().refill);
        assert_eq!(r.units, 0);
        assert!(give_back(&mut r, "k|fw/10/1000", 1));
        assert_eq!(r.units, 1);
    }

    #[test]
    fn grants_in_the_same_window_join_and_keep_the_earlier_expiry() {
        let g = |units, since_ms, lease_ms| Grant {
            units,
            since_ms,
            lease_ms,
            remaining: 40,
            reset_ms: 500,
        };
        let (r, wasted) = merge(None, "k", g(10, 1_000, 1_000), 1_001);
        assert_eq!((r.units, r.expires_ms, r.grant, wasted), (10, 2_000, 10, 0));
        let (r2, wasted) = merge(Some(r.clone()), "k", g(6, 1_100, 920), 1_101);
        assert_eq!((r2.units, r2.expires_ms, wasted), (16, 2_000, 0));
        // Redis's remaining leaves out the units held (charged earlier): they are left too.
        assert_eq!(r2.base_remaining, 40 + 10);
        let (r3, wasted) = merge(Some(r2.clone()), "k", g(6, 1_100, 890), 1_101);
        assert_eq!((r3.units, r3.expires_ms, wasted), (22, 1_990, 0));
        // The held units' check waited long before Redis ran it (a loaded gateway queues it),
        // so they expire well before the new ones of the same window: they still join, and
        // all are spent before the earlier expiry. (A grant of a later window or sub-window
        // cannot find units of the earlier one: Redis ran it after they expired.)
        let (r4, wasted) = merge(Some(r.clone()), "k", g(5, 1_100, 1_200), 1_101);
        assert_eq!((r4.units, r4.expires_ms, wasted), (15, 2_000, 0));
        // Nothing granted: the held units stay, the refill is over.
        let mut asked = r.clone();
        asked.refill_since_ms = 1_500;
        let (r5, _) = merge(Some(asked), "k", g(0, 1_500, 0), 1_501);
        assert_eq!(
            (r5.units, r5.expires_ms, r5.refill_since_ms),
            (10, 2_000, 0)
        );
        // Another identity's (the slot is shared): replaced, and its units counted as wasted.
        let (r6, wasted) = merge(Some(r.clone()), "other", g(3, 1_000, 100), 1_001);
        assert_eq!((r6.units, r6.id.as_str(), wasted), (3, "other", 10));
        // Expired: replaced, its units unspent are wasted too.
        let (r7, wasted) = merge(Some(r), "k", g(3, 2_000, 100), 2_001);
        assert_eq!((r7.units, r7.expires_ms, wasted), (3, 2_100, 10));
    }

    #[test]
    fn a_key_is_hot_after_a_few_hits_within_a_second_and_leases_follow_its_rate() {
        let mut heat = Heat::default();
        assert_eq!(heat.hit("k", 1_000, 100, 1000), None);
        assert_eq!(heat.hit("k", 1_001, 100, 1000), None);
        // 3 hits in 2 ms: 150 per 100 ms.
        assert_eq!(heat.hit("k", 1_002, 100, 1000), Some(150));
        assert_eq!(heat.hit("k", 1_003, 100, 1000), Some(133));
        assert_eq!(heat.hit("k", 1_004, 100, 10), Some(10));
        // Still hot in the next second, at the rate of both: 6 hits in 1.1 s, 1 per 100 ms.
        assert_eq!(heat.hit("k", 2_100, 100, 1000), Some(1));
        assert_eq!(heat.hit("k", 2_200, 100, 1000), Some(1));
        // A key not seen for a whole second starts over.
        assert_eq!(heat.hit("k", 4_000, 100, 1000), None);
        assert_eq!(heat.hit("k", 4_001, 100, 1000), None);
        assert_eq!(heat.hit("k", 4_002, 100, 1000), Some(150));
        let mut r = rec(10);
        r.spent = 30;
        r.granted_ms = 1_000;
        assert_eq!(refill_size(r.spent, r.granted_ms, 1_010, 100, 1000), 300);
        assert_eq!(refill_size(r.spent, r.granted_ms, 1_010, 100, 50), 50);
        assert_eq!(refill_size(r.spent, r.granted_ms, 901_000, 100, 50), 1);
    }
}
