//! Coalescing callouts: the per-worker state machine that puts the checks of many paused
//! requests into one callout (and so one `EVALSHA`).
//!
//! The rules it follows come from how the proxy-wasm Rust SDK routes callout replies: a reply
//! goes to the context that was *active* when the call was dispatched. So
//! - an HTTP context only ever dispatches a callout holding its own checks — the idle case,
//!   which adds no latency ([`Batcher::try_alone`]);
//! - batches of several requests are dispatched from the root context (its tick, and its reply
//!   handler, which chains the next batch at once), and the root hands each request its verdict;
//! - a request whose stream ended while queued is dropped from the queue ([`Batcher::cancel`]);
//! - a watchdog on the tick fails whatever waited past its deadline ([`Batcher::expired`]), so
//!   no request is ever left paused, whatever the host does.
//!
//! Pure: time is an argument, tokens and context ids are plain numbers.

use std::collections::VecDeque;

use crate::request::Check;

/// A paused request waiting for its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub context_id: u32,
    pub checks: Vec<Check>,
    pub since_ms: u64,
}

#[derive(Debug)]
struct InFlight {
    token: u32,
    sent_ms: u64,
    requests: Vec<Pending>,
}

/// Limits of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests per batch (the shim takes up to 256).
    pub max_requests: usize,
    /// Checks per batch (the shim takes up to 1024).
    pub max_checks: usize,
    /// Approximate body budget: sum of key lengths plus a per-check overhead (the shim
    /// takes up to 64 KiB).
    pub max_bytes: usize,
    /// Root batches in flight at once.
    pub max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_requests: 128,
            max_checks: 1024,
            max_bytes: 48 * 1024,
            max_in_flight: 2,
        }
    }
}

/// Per-check bytes on the wire besides the key(s): field names, numbers, punctuation.
const CHECK_OVERHEAD: usize = 120;

/// The coalescing state of one worker.
#[derive(Debug, Default)]
pub struct Batcher {
    limits: Limits,
    queue: VecDeque<Pending>,
    in_flight: Vec<InFlight>,
    /// Callouts HTTP contexts sent for themselves and have not seen answered yet.
    alone: usize,
}

impl Batcher {
    pub fn new(limits: Limits) -> Batcher {
        Batcher {
            limits,
            ..Batcher::default()
        }
    }

    /// An HTTP context has checks to send. If the worker is idle it may send them in a callout
    /// of its own, now (true); otherwise it must [`enqueue`](Self::enqueue) them.
    pub fn try_alone(&mut self) -> bool {
        let idle = self.queue.is_empty() && self.in_flight.is_empty() && self.alone == 0;
        if idle {
            self.alone += 1;
        }
        idle
    }

    /// Queues a request for the root's next batch.
    pub fn enqueue(&mut self, context_id: u32, checks: Vec<Check>, now_ms: u64) {
        self.queue.push_back(Pending {
            context_id,
            checks,
            since_ms: now_ms,
        });
    }

    /// A callout sent alone was answered, failed to send, or its request went away.
    pub fn alone_done(&mut self) {
        self.alone = self.alone.saturating_sub(1);
    }

    /// The next batch to send, if anything waits and a slot is free.
    pub fn next_batch(&mut self) -> Option<Vec<Pending>> {
        if self.queue.is_empty() || self.in_flight.len() >= self.limits.max_in_flight {
            return None;
        }
        let mut batch = Vec::new();
        let (mut checks, mut bytes) = (0, 0);
        while let Some(next) = self.queue.front() {
            let n = next.checks.len();
            let b: usize = next
                .checks
                .iter()
                .map(|c| c.key.len() * 2 + CHECK_OVERHEAD)
                .sum();
            let fits = batch.len() < self.limits.max_requests
                && checks + n <= self.limits.max_checks
                && bytes + b <= self.limits.max_bytes;
            if !fits && !batch.is_empty() {
                break;
            }
            checks += n;
            bytes += b;
            batch.extend(self.queue.pop_front());
        }
        Some(batch)
    }

    /// A batch went out as callout `token`.
    pub fn sent(&mut self, token: u32, requests: Vec<Pending>, now_ms: u64) {
        self.in_flight.push(InFlight {
            token,
            sent_ms: now_ms,
            requests,
        });
    }

    /// The reply to callout `token` arrived: when it was sent and its requests, or `None` if
    /// it is not a batch (anymore: the watchdog may have failed it already).
    pub fn complete(&mut self, token: u32) -> Option<(u64, Vec<Pending>)> {
        let i = self.in_flight.iter().position(|b| b.token == token)?;
        let batch = self.in_flight.swap_remove(i);
        Some((batch.sent_ms, batch.requests))
    }

    /// A queued request's stream ended: forget it. True if it was still queued.
    pub fn cancel(&mut self, context_id: u32) -> bool {
        let before = self.queue.len();
        self.queue.retain(|p| p.context_id != context_id);
        self.queue.len() != before
    }

    /// Everything that has waited longer than `deadline_ms`: queued requests, and batches whose
    /// reply is overdue (the host's own callout timeout should have answered first).
    pub fn expired(&mut self, now_ms: u64, deadline_ms: u64) -> Vec<Pending> {
        let late = |since: u64| now_ms.saturating_sub(since) > deadline_ms;
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|p| late(p.since_ms)) {
            out.extend(self.queue.pop_front());
        }
        let (overdue, kept): (Vec<InFlight>, Vec<InFlight>) =
            self.in_flight.drain(..).partition(|b| late(b.sent_ms));
        self.in_flight = kept;
        out.extend(overdue.into_iter().flat_map(|b| b.requests));
        out
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Root batches waiting for their reply.
    pub fn batches_in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::CheckKind;

    fn checks(n: usize) -> Vec<Check> {
        (0..n)
            .map(|i| Check {
                rule: i,
                key: format!("tollgate:{{r{i}}}:1000:1"),
                cost: 1,
                shadow: false,
                kind: CheckKind::FixedWindow {
                    limit: 1,
                    window_ms: 1000,
                    ttl_ms: 1000,
                },
            })
            .collect()
    }

    fn ids(batch: &[Pending]) -> Vec<u32> {
        batch.iter().map(|p| p.context_id).collect()
    }

    #[test]
    fn idle_worker_sends_alone_then_queues_behind_it() {
        let mut b = Batcher::new(Limits::default());
        assert!(b.try_alone());
        assert!(!b.try_alone(), "one callout in flight: queue");
        b.enqueue(2, checks(1), 0);
        b.enqueue(3, checks(1), 0);
        let batch = b.next_batch().unwrap();
        assert_eq!(ids(&batch), [2, 3]);
        b.sent(70, batch, 1);
        b.alone_done();
        assert!(!b.try_alone(), "a batch is in flight: still queue");
        b.enqueue(4, checks(1), 2);
        let (sent_ms, done) = b.complete(70).unwrap();
        assert_eq!((sent_ms, ids(&done)), (1, vec![2, 3]));
        assert!(b.complete(70).is_none(), "a reply is taken once");
        assert_eq!(ids(&b.next_batch().unwrap()), [4]);
        assert_eq!(b.next_batch(), None);
        assert!(b.try_alone(), "idle again");
    }

    #[test]
    fn batches_respect_every_limit() {
        let limits = Limits {
            max_requests: 3,
            max_checks: 4,
            max_bytes: 10_000,
            max_in_flight: 2,
        };
        let mut b = Batcher::new(limits);
        for id in 1..=5 {
            b.enqueue(id, checks(2), 0);
        }
        assert_eq!(ids(&b.next_batch().unwrap()), [1, 2], "4 checks at most");
        let tiny = Limits {
            max_bytes: 10,
            ..limits
        };
        let mut t = Batcher::new(tiny);
        t.enqueue(1, checks(3), 0);
        t.enqueue(2, checks(1), 0);
        assert_eq!(
            ids(&t.next_batch().unwrap()),
            [1],
            "an oversized request still goes, alone"
        );
    }

    #[test]
    fn in_flight_batches_are_bounded() {
        let mut b = Batcher::new(Limits {
            max_in_flight: 1,
            ..Limits::default()
        });
        b.enqueue(1, checks(1), 0);
        let first = b.next_batch().unwrap();
        b.sent(10, first, 0);
        b.enqueue(2, checks(1), 0);
        assert_eq!(b.next_batch(), None, "one batch in flight at most");
        b.complete(10);
        assert_eq!(ids(&b.next_batch().unwrap()), [2]);
    }

    #[test]
    fn cancelled_requests_leave_the_queue() {
        let mut b = Batcher::new(Limits::default());
        b.enqueue(1, checks(1), 0);
        b.enqueue(2, checks(1), 0);
        assert!(b.cancel(1));
        assert!(!b.cancel(1));
        assert_eq!(ids(&b.next_batch().unwrap()), [2]);
    }

    #[test]
    fn the_watchdog_fails_what_waited_too_long() {
        let mut b = Batcher::new(Limits::default());
        b.enqueue(1, checks(1), 0);
        let batch = b.next_batch().unwrap();
        b.sent(9, batch, 10);
        b.enqueue(2, checks(1), 20);
        b.enqueue(3, checks(1), 95);
        assert!(b.expired(100, 100).is_empty());
        // At 121: request 2 queued since 20, the batch sent at 10.
        let failed = b.expired(121, 100);
        assert_eq!(ids(&failed), [2, 1]);
        assert_eq!(b.queued(), 1);
        assert!(
            b.complete(9).is_none(),
            "a late reply finds nothing to decide"
        );
    }
}
