//! Coalescing callouts: the per-worker state machine that puts the checks of many paused
//! requests into one callout (and so one `EVALSHA`).
//!
//! The rules it follows come from how the proxy-wasm Rust SDK routes callout replies: a reply
//! goes to the context that was *active* when the call was dispatched. So
//! - an HTTP context only ever dispatches a callout holding its own checks — the idle case,
//!   which adds no latency ([`Batcher::idle`]); the engine sends it attributed to the root, so
//!   the host never cancels it and the SDK's token map never keeps a dead entry;
//! - batches of several requests are dispatched from the root context (its tick, and its reply
//!   handler, which chains the next batch at once), and the root hands each request its verdict;
//! - a request whose stream ended while queued is dropped from the queue ([`Batcher::cancel`]);
//! - a request's deadline counts from when it started waiting, queued or not
//!   ([`deadline`]), and a watchdog on the tick fails whatever waited past it
//!   ([`Batcher::expired`]), so no request is ever left paused, whatever the host does.
//!
//! Pure: time is an argument, tokens and context ids are plain numbers.

use std::collections::VecDeque;

use crate::check::Check;

/// A paused request waiting for its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub context_id: u32,
    pub checks: Vec<Check>,
    /// When its checks were built and it started waiting, by the gateway clock: its deadline
    /// counts from here.
    pub since_ms: u64,
    /// The same moment on the skew-corrected clock (its window keys were built on it).
    pub now_ms: u64,
}

/// A callout in flight: a batch the root sent, or one request's own.
#[derive(Debug)]
pub struct InFlight {
    pub token: u32,
    pub sent_ms: u64,
    /// The earliest deadline of its requests (gateway clock).
    pub deadline_ms: u64,
    /// Sent by a request's own context (its reply goes there), not by the root.
    pub alone: bool,
    pub requests: Vec<Pending>,
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

/// The coalescing state of one worker: the queue, and every callout in flight.
#[derive(Debug, Default)]
pub struct Batcher {
    limits: Limits,
    queue: VecDeque<Pending>,
    in_flight: Vec<InFlight>,
}

impl Batcher {
    pub fn new(limits: Limits) -> Batcher {
        Batcher {
            limits,
            ..Batcher::default()
        }
    }

    /// Nothing queued and no callout in flight: a new request may send its own callout now
    /// (the idle case, which adds no latency); otherwise it must [`enqueue`](Self::enqueue).
    pub fn idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight.is_empty()
    }

    /// Queues a request for the root's next batch.
    pub fn enqueue(&mut self, pending: Pending) {
        self.queue.push_back(pending);
    }

    /// The next batch to send, if anything waits and a slot is free.
    pub fn next_batch(&mut self) -> Option<Vec<Pending>> {
        if self.queue.is_empty() || self.batches_in_flight() >= self.limits.max_in_flight {
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

    /// A callout went out as `token` carrying `requests`.
    pub fn sent(
        &mut self,
        token: u32,
        requests: Vec<Pending>,
        now_ms: u64,
        timeout_ms: u64,
        alone: bool,
    ) {
        let deadline_ms = deadline(&requests, timeout_ms);
        self.in_flight.push(InFlight {
            token,
            sent_ms: now_ms,
            deadline_ms,
            alone,
            requests,
        });
    }

    /// The reply to callout `token` arrived: the callout, or `None` if it is not ours (any
    /// more: the watchdog may have failed it already).
    pub fn complete(&mut self, token: u32) -> Option<InFlight> {
        let i = self.in_flight.iter().position(|b| b.token == token)?;
        Some(self.in_flight.swap_remove(i))
    }

    /// A queued request's stream ended: forget it. True if it was still queued.
    pub fn cancel(&mut self, context_id: u32) -> bool {
        let before = self.queue.len();
        self.queue.retain(|p| p.context_id != context_id);
        self.queue.len() != before
    }

    /// What waited past its deadline plus `grace_ms`: queued requests (whose deadline is
    /// `since + timeout`), and callouts whose reply is overdue (the host's own callout timeout
    /// should have answered first).
    pub fn expired(
        &mut self,
        now_ms: u64,
        timeout_ms: u64,
        grace_ms: u64,
    ) -> (Vec<Pending>, Vec<InFlight>) {
        let late = |deadline: u64| now_ms > deadline.saturating_add(grace_ms);
        let mut queued = Vec::new();
        while self
            .queue
            .front()
            .is_some_and(|p| late(p.since_ms.saturating_add(timeout_ms)))
        {
            queued.extend(self.queue.pop_front());
        }
        // The root ticks every millisecond: rebuild the list only when something is overdue.
        if !self.in_flight.iter().any(|b| late(b.deadline_ms)) {
            return (queued, Vec::new());
        }
        let (overdue, kept): (Vec<InFlight>, Vec<InFlight>) =
            self.in_flight.drain(..).partition(|b| late(b.deadline_ms));
        self.in_flight = kept;
        (queued, overdue)
    }

    /// Puts back a callout [`expired`](Batcher::expired) returned, to wait for its reply.
    pub fn restore(&mut self, callout: InFlight) {
        self.in_flight.push(callout);
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Root batches waiting for their reply.
    pub fn batches_in_flight(&self) -> usize {
        self.in_flight.iter().filter(|b| !b.alone).count()
    }

    /// Callouts of either kind waiting for their reply.
    #[cfg(test)]
    pub fn callouts_in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// When a callout carrying `requests` must have answered: the oldest request's start plus the
/// timeout, so waiting in the queue counts against a request's budget.
pub fn deadline(requests: &[Pending], timeout_ms: u64) -> u64 {
    requests
        .iter()
        .map(|p| p.since_ms)
        .min()
        .unwrap_or(0)
        .saturating_add(timeout_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::CheckKind;

    fn checks(n: usize) -> Vec<Check> {
        (0..n)
            .map(|i| Check {
                lease: 0,
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

    fn pending(context_id: u32, n: usize, since_ms: u64) -> Pending {
        Pending {
            context_id,
            checks: checks(n),
            since_ms,
            now_ms: since_ms,
        }
    }

    #[test]
    fn idle_worker_sends_alone_then_queues_behind_it() {
        let mut b = Batcher::new(Limits::default());
        assert!(b.idle());
        b.sent(60, vec![pending(1, 1, 0)], 0, 100, true);
        assert!(!b.idle(), "one callout in flight: queue");
        assert_eq!(
            b.batches_in_flight(),
            0,
            "a request's own callout is no batch"
        );
        b.enqueue(pending(2, 1, 0));
        b.enqueue(pending(3, 1, 0));
        let batch = b.next_batch().unwrap();
        assert_eq!(ids(&batch), [2, 3]);
        b.sent(70, batch, 1, 100, false);
        assert_eq!(b.complete(60).map(|c| c.alone), Some(true));
        assert!(!b.idle(), "a batch is in flight: still queue");
        b.enqueue(pending(4, 1, 2));
        let done = b.complete(70).unwrap();
        assert_eq!((done.sent_ms, ids(&done.requests)), (1, vec![2, 3]));
        assert!(b.complete(70).is_none(), "a reply is taken once");
        assert_eq!(ids(&b.next_batch().unwrap()), [4]);
        assert_eq!(b.next_batch(), None);
        assert!(b.idle(), "idle again");
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
            b.enqueue(pending(id, 2, 0));
        }
        assert_eq!(ids(&b.next_batch().unwrap()), [1, 2], "4 checks at most");
        let tiny = Limits {
            max_bytes: 10,
            ..limits
        };
        let mut t = Batcher::new(tiny);
        t.enqueue(pending(1, 3, 0));
        t.enqueue(pending(2, 1, 0));
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
        b.enqueue(pending(1, 1, 0));
        let first = b.next_batch().unwrap();
        b.sent(10, first, 0, 100, false);
        b.enqueue(pending(2, 1, 0));
        assert_eq!(b.next_batch(), None, "one batch in flight at most");
        b.complete(10);
        assert_eq!(ids(&b.next_batch().unwrap()), [2]);
    }

    #[test]
    fn cancelled_requests_leave_the_queue() {
        let mut b = Batcher::new(Limits::default());
        b.enqueue(pending(1, 1, 0));
        b.enqueue(pending(2, 1, 0));
        assert!(b.cancel(1));
        assert!(!b.cancel(1));
        assert_eq!(ids(&b.next_batch().unwrap()), [2]);
    }

    #[test]
    fn deadlines_count_from_when_a_request_started_waiting() {
        let mut b = Batcher::new(Limits::default());
        b.enqueue(pending(1, 1, 0));
        b.enqueue(pending(2, 1, 30));
        let batch = b.next_batch().unwrap();
        assert_eq!(deadline(&batch, 100), 100, "the oldest request's budget");
        // Sent at 60 after waiting in the queue: due at 100, not 160.
        b.sent(9, batch, 60, 100, false);
        b.enqueue(pending(3, 1, 95));
        let (queued, overdue) = b.expired(150, 100, 50);
        assert!(queued.is_empty() && overdue.is_empty());
        let (queued, overdue) = b.expired(151, 100, 50);
        assert!(queued.is_empty());
        assert_eq!(ids(&overdue[0].requests), [1, 2]);
        assert!(
            b.complete(9).is_none(),
            "a late reply finds nothing to decide"
        );
        let (queued, _) = b.expired(246, 100, 50);
        assert_eq!(ids(&queued), [3]);
        assert_eq!(b.queued(), 0);
    }
}
