//! `failure_mode: "local"`: while the shim cannot answer, each worker keeps enforcing every rule
//! on its own, with a share of the limit (`limit ÷ local_fallback.replicas`) in fixed windows.
//! Abuse stays bounded during an outage; on recovery decisions come from Redis again.
//!
//! Also the circuit breaker that spares requests a doomed callout: after a run of failures the
//! filter stops calling the shim for a short while and applies the failure mode at once, then
//! lets one request probe.

use std::collections::HashMap;

use crate::check::{Check, CheckKind};

/// Per-worker fixed-window counters for the fallback: key and window index → (count, when the
/// window ends).
#[derive(Debug, Default)]
pub struct LocalLimiter {
    counters: HashMap<String, (u64, u64)>,
}

/// Most counters a worker keeps; past it, the stale ones (ended windows) are dropped, and only
/// if every one is live does the worker forget them all.
pub const MAX_COUNTERS: usize = 100_000;

impl LocalLimiter {
    /// Decides one request locally: admitted only if every enforced check fits its share, and
    /// then every check is charged (all-or-nothing, as in the shim). Returns the denying checks
    /// (indexes), empty when admitted.
    pub fn check(&mut self, checks: &[Check], replicas: u64, now_ms: u64) -> Vec<usize> {
        if self.counters.len() >= MAX_COUNTERS {
            self.counters
                .retain(|_, &mut (_, ends_ms)| now_ms < ends_ms);
            if self.counters.len() >= MAX_COUNTERS {
                self.counters.clear();
            }
        }
        let slots: Vec<Option<(String, u64, u64)>> = checks
            .iter()
            .map(|c| local_slot(c, replicas, now_ms))
            .collect();
        let denying: Vec<usize> = checks
            .iter()
            .zip(&slots)
            .enumerate()
            .filter(|(_, (c, slot))| {
                !c.shadow
                    && slot.as_ref().is_some_and(|(key, limit, _)| {
                        self.counters.get(key).map_or(0, |&(n, _)| n) + c.cost > *limit
                    })
            })
            .map(|(i, _)| i)
            .collect();
        if denying.is_empty() {
            for (c, slot) in checks.iter().zip(slots) {
                if let Some((key, _, ends_ms)) = slot {
                    self.counters.entry(key).or_insert((0, ends_ms)).0 += c.cost;
                }
            }
        }
        denying
    }
}

/// The local counter, limit and window end for a check: its window (or period) and its share
/// of the limit. Concurrency is not enforced locally (slots are only known to Redis).
fn local_slot(check: &Check, replicas: u64, now_ms: u64) -> Option<(String, u64, u64)> {
    let (limit, window_ms) = match check.kind {
        CheckKind::FixedWindow {
            limit, window_ms, ..
        }
        | CheckKind::SlidingWindow {
            limit, window_ms, ..
        }
        | CheckKind::SlidingWindowBounded {
            limit, window_ms, ..
        }
        | CheckKind::SlidingLog {
            limit, window_ms, ..
        } => (limit, window_ms),
        // A burst, then `rate` per period: at most burst + rate in any period.
        CheckKind::TokenBucket {
            burst,
            rate,
            period_ms,
        }
        | CheckKind::Gcra {
            burst,
            rate,
            period_ms,
        } => (burst.max(rate), period_ms),
        CheckKind::Concurrency { .. } => return None,
    };
    let share = (limit / replicas.max(1)).max(1);
    let window_ms = window_ms.max(1);
    let index = now_ms / window_ms;
    Some((
        format!("{}|{index}", check.key),
        share,
        (index + 1).saturating_mul(window_ms),
    ))
}

/// Stops calling a shim that keeps failing. It counts failed *callouts* (one per callout,
/// whatever it carried), never requests: a request the shim refuses alone is not a failure.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Breaker {
    consecutive_failures: u32,
    state: BreakerState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    #[default]
    Closed,
    /// No calls until then.
    Open { until_ms: u64 },
    /// The pause is over and one probe is out: no other call until it succeeds or fails.
    Probing,
}

/// Failures in a row that open the breaker, and how long it stays open.
pub const BREAKER_THRESHOLD: u32 = 5;
pub const BREAKER_OPEN_MS: u64 = 500;

impl Breaker {
    /// Whether to call the shim now. While open, no; once the pause is over, exactly one call
    /// (the probe) is let through, and none after it until it has succeeded or failed (a
    /// failed probe re-opens the breaker at once).
    pub fn allows_call(&mut self, now_ms: u64) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { until_ms } if now_ms >= until_ms => {
                self.state = BreakerState::Probing;
                true
            }
            BreakerState::Open { .. } | BreakerState::Probing => false,
        }
    }

    /// A callout was answered.
    pub fn succeeded(&mut self) {
        self.consecutive_failures = 0;
        self.state = BreakerState::Closed;
    }

    /// A callout failed (not answered, or not understood).
    pub fn failed(&mut self, now_ms: u64) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.consecutive_failures >= BREAKER_THRESHOLD || self.state == BreakerState::Probing {
            self.state = BreakerState::Open {
                until_ms: now_ms + BREAKER_OPEN_MS,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(key: &str, kind: CheckKind, cost: u64) -> Check {
        Check {
            lease: 0,
            rule: 0,
            key: key.into(),
            cost,
            shadow: false,
            kind,
        }
    }

    fn fixed(limit: u64) -> CheckKind {
        CheckKind::FixedWindow {
            limit,
            window_ms: 1000,
            ttl_ms: 1000,
        }
    }

    #[test]
    fn each_worker_enforces_its_share() {
        let mut l = LocalLimiter::default();
        let c = [check("k", fixed(10), 1)];
        // 10 per second over 4 replicas: 2 per worker per second.
        let admitted: Vec<bool> = (0..4).map(|_| l.check(&c, 4, 100).is_empty()).collect();
        assert_eq!(admitted, [true, true, false, false]);
        assert!(l.check(&c, 4, 1000).is_empty(), "next window");
        assert!(
            l.check(&[check("other", fixed(10), 1)], 4, 100).is_empty(),
            "own counter per key"
        );
    }

    #[test]
    fn all_or_nothing_and_shadow_never_denies() {
        let mut l = LocalLimiter::default();
        let a = check("a", fixed(5), 1);
        let b = check("b", fixed(1), 1);
        assert!(l.check(&[a.clone(), b.clone()], 1, 0).is_empty());
        assert_eq!(l.check(&[a.clone(), b.clone()], 1, 0), vec![1]);
        // `a` was not charged by the denied request: 4 more fit.
        let fits = (0..5)
            .filter(|_| l.check(std::slice::from_ref(&a), 1, 0).is_empty())
            .count();
        assert_eq!(fits, 4);
        let mut shadow = b.clone();
        shadow.shadow = true;
        assert!(l.check(&[shadow], 1, 0).is_empty());
    }

    #[test]
    fn rate_algorithms_use_their_period_and_concurrency_is_not_local() {
        let mut l = LocalLimiter::default();
        let tb = [check(
            "t",
            CheckKind::TokenBucket {
                burst: 3,
                rate: 1,
                period_ms: 1000,
            },
            1,
        )];
        let n = (0..10).filter(|_| l.check(&tb, 1, 0).is_empty()).count();
        assert_eq!(n, 3);
        let conc = [check(
            "c",
            CheckKind::Concurrency {
                limit: 1,
                timeout_ms: 1000,
                id: "x".into(),
            },
            1,
        )];
        assert!((0..5).all(|_| l.check(&conc, 1, 0).is_empty()));
    }

    #[test]
    fn breaker_opens_after_a_run_of_failures_and_probes_later() {
        let mut b = Breaker::default();
        for t in 0..4 {
            b.failed(t);
            assert!(b.allows_call(t), "below the threshold");
        }
        b.failed(10);
        assert!(!b.allows_call(10));
        assert!(!b.allows_call(509));
        assert!(b.allows_call(510), "probe");
        assert!(
            !b.allows_call(510),
            "one probe, not everyone after the pause"
        );
        assert!(!b.allows_call(2000), "still waiting for the probe");
        b.failed(2000);
        assert!(!b.allows_call(2001), "a failed probe re-opens it");
        assert!(b.allows_call(2500), "next probe");
        b.succeeded();
        assert!(b.allows_call(2501));
        assert!(b.allows_call(2501), "closed: everyone");
    }

    #[test]
    fn the_fallback_drops_ended_windows_not_live_counters() {
        let mut l = LocalLimiter::default();
        // A live counter at its limit, then enough other keys to fill the table.
        let hot = [check("hot", fixed(2), 1)];
        assert!(l.check(&hot, 1, 5_000).is_empty());
        assert!(l.check(&hot, 1, 5_000).is_empty());
        for i in 0..MAX_COUNTERS - 1 {
            let c = [check(&format!("old{i}"), fixed(10), 1)];
            assert!(l.check(&c, 1, 100).is_empty());
        }
        // At 5 000 every `old` window (0..1000) has ended: they go, the hot counter stays.
        let fresh = [check("fresh", fixed(10), 1)];
        assert!(l.check(&fresh, 1, 5_001).is_empty());
        assert_eq!(l.check(&hot, 1, 5_002), vec![0], "still at its limit");
        assert!(l.counters.len() < 10);
    }
}
