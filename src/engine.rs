//! The request lifecycle: one worker's engine, driven by the host's callbacks.
//!
//! Everything that happens to a request between "headers arrived" and "stream ended" lives
//! here, generic over the [`Host`] seam so that it runs natively against a fake host
//! (`engine::tests`). The proxy-wasm contexts (`filter`) only forward callbacks.
//!
//! A checked request moves through these phases ([`Phase`]), each owned by the engine's
//! `requests` map (context id → [`Req`]):
//!
//! ```text
//!            ┌─ cache hit / breaker open / dispatch failed ─▶ decided at once
//! headers ───┼─ worker idle ─▶ InFlight (its own callout) ─┐
//!            └─ worker busy ─▶ Queued ─▶ InFlight (batch) ─┴─▶ reply / failure / watchdog
//!                                                             ├─▶ Allowed ─▶ response headers ─▶ done
//!                                                             └─▶ Answered (local reply) ─▶ done
//! client leaves: Queued → forgotten; InFlight → Abandoned until its callout ends.
//! ```
//!
//! Invariants (checked by the seeded property test below):
//! - a paused request is resumed or answered exactly once, unless its client left first;
//! - a concurrency slot the shim may have taken is released: at the stream's end when
//!   allowed, at once when denied or when the outcome is unknown (a failed or abandoned
//!   callout), and once more after the callout's deadline when the outcome is unknown
//!   (releasing twice is harmless; releasing before a late commit is not);
//! - a failed callout affects only the requests it carried; a request the shim refuses fails
//!   alone; the breaker counts failed callouts, not requests, and lets one probe through;
//! - every request that gets a verdict is counted once in the metrics;
//! - the over-limit cache only denies what Redis would deny (see `cache`).
//!
//! What the host can do is a [`HostCaps`] value given to [`Engine::new`]: on ngx_wasm_module
//! (Kong) a verdict is only delivered in the request's own callback (no coalescing; the
//! watchdog leaves live requests to the host's timeout) and releases wait for the root's tick.
//! The property test runs every third seed on a model of that host.

use std::collections::HashMap;

use log::{debug, warn};

use crate::batch::{self, Batcher, InFlight, Limits, Pending};
use crate::bounds;
use crate::cache;
use crate::check::{Check, CheckKind};
use crate::clock::{self, SkewEstimator};
use crate::config::{Config, FailureMode};
use crate::decision::{self, CalloutReply, Failure, Verdict};
use crate::host::{Host, HostCaps, HostError, MetricKind};
use crate::lease;
use crate::local::{Breaker, LocalLimiter};
use crate::metrics::{self, Counter, Outcome};
use crate::request::checks_for;
use crate::throttle::LogThrottle;
use crate::usage;
use crate::wire::{self, CheckResult, RequestResult};

/// A recurring failure or shadow denial is logged at most this often per worker; the rest at
/// debug.
const LOG_INTERVAL_MS: u64 = 10_000;
/// How often the root ticks when coalescing without a kick queue: the tick is then what sends
/// the queue (and runs the watchdog).
pub const TICK_MS: u64 = 1;
/// How often it ticks when coalescing with a kick queue, which sends the queue when needed (as
/// do batch replies): the tick is only the fallback, the watchdog and lease refills' timer. A
/// 1 ms tick costs a worker ~1,000 wake-ups a second whether or not requests come.
pub const KICKED_TICK_MS: u64 = 10;
/// How often it ticks otherwise: the watchdog, late releases and the shared clock offset.
pub const IDLE_TICK_MS: u64 = 100;
/// How often it ticks on a host where concurrency releases wait for the tick
/// ([`HostCaps::dispatch_anywhere`] false): a slot is held at most this much longer.
pub const RELEASE_TICK_MS: u64 = 10;
/// Grace beyond a request's deadline before the watchdog fails it itself (the host's callout
/// timeout should have answered first).
pub const WATCHDOG_GRACE_MS: u64 = 50;
/// Shared-data key of the clock offset every worker of a gateway uses.
const CLOCK_OFFSET_KEY: &str = "tollgate.clock_offset";

/// Concurrency slots `(key, id)`.
pub type Slots = Vec<(String, String)>;
/// Response headers to add.
type Headers = Vec<(String, String)>;

/// What the host should do with the request after `on_request_headers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// Where one checked request is.
#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Paused in the worker's queue; the root will send it in a batch.
    Queued,
    /// Paused; its checks are in a callout in flight.
    InFlight,
    /// Let through: headers to add to its response.
    Allowed(Headers),
    /// Answered locally (denied, or failed closed).
    Answered,
    /// Its client left while its callout was in flight: settled when that callout ends.
    Abandoned,
}

/// One checked request, from its headers to the end of its stream.
#[derive(Debug)]
struct Req {
    phase: Phase,
    /// Concurrency slots to give back when the stream ends (only once allowed by the shim).
    slots: Slots,
    /// Usage rules: what the response consumed, charged when the stream ends.
    usage: Option<Box<Metering>>,
}

/// The usage rules of one admitted request: a meter per rule, and the counters to charge.
#[derive(Debug)]
struct Metering {
    /// (rule index, its meter).
    meters: Vec<(usize, usage::Meter)>,
    /// (rule index, counter key, lifetime if the charge creates it, reserve already charged).
    targets: Vec<(usize, String, u64, u64)>,
}

/// A charge callout in flight: its token, deadline, and how many counters it carries.
#[derive(Debug)]
struct ChargeCallout {
    token: u32,
    deadline_ms: u64,
    charges: usize,
}

/// One usage charge waiting to go out.
#[derive(Debug, Clone)]
struct Charge {
    key: String,
    delta: i64,
    ttl_ms: u64,
}

/// How a verdict was reached, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Shim,
    Cache,
    /// Spent from a lease Redis granted this gateway.
    Lease,
    FailureMode,
}

/// What leases did for a request ([`Engine::spend_leases`]).
enum Leased {
    /// Every check had units: the answers to report.
    Spent(Vec<CheckResult>),
    /// A key is hot here, but a check lacked units: it asks a lease from Redis.
    Missed,
    /// No key is hot on this worker: no record was read.
    Cold,
}

/// A lease refill in flight: its token, when it was sent, its deadline, and the checks (cost
/// 0, each asking a lease) it carries, one per request.
#[derive(Debug)]
struct LeaseCallout {
    token: u32,
    sent_ms: u64,
    deadline_ms: u64,
    checks: Vec<Check>,
}

/// Metric ids from the host, defined once per plugin.
struct MetricIds {
    counters: Vec<(Counter, u32)>,
    callout_ms: u32,
    /// Per rule: (denied, shadow-denied).
    rules: Vec<(u32, u32)>,
}

impl MetricIds {
    fn define(host: &impl Host, config: &Config) -> Result<MetricIds, HostError> {
        let counters = Counter::ALL
            .iter()
            .map(|&c| Ok((c, host.define_metric(MetricKind::Counter, c.name())?)))
            .collect::<Result<_, HostError>>()?;
        let rules = config
            .rules
            .iter()
            .map(|r| {
                Ok((
                    host.define_metric(MetricKind::Counter, &metrics::rule_denied(&r.name))?,
                    host.define_metric(MetricKind::Counter, &metrics::rule_shadow_denied(&r.name))?,
                ))
            })
            .collect::<Result<_, HostError>>()?;
        Ok(MetricIds {
            counters,
            callout_ms: host.define_metric(MetricKind::Histogram, metrics::CALLOUT_DURATION)?,
            rules,
        })
    }
}

/// One worker's engine for one plugin configuration.
pub struct Engine<H: Host> {
    host: H,
    config: Config,
    /// What this host can do (Envoy or ngx_wasm_module): every host difference is asked here.
    caps: HostCaps,
    /// `config.coalesce`, unless the host cannot deliver a root-sent batch's verdicts.
    coalesce: bool,
    root_context_id: u32,
    metrics: MetricIds,
    requests: HashMap<u32, Req>,
    batcher: Batcher,
    breaker: Breaker,
    /// `failure_mode: "local"` counters.
    local: LocalLimiter,
    /// This worker's copy of over-limit cache entries (the shared ones are the truth).
    near: cache::Near,
    /// Gateway clock → Redis clock, learned from replies and shared by the workers.
    skew: SkewEstimator,
    failures: LogThrottle,
    shadow_denials: LogThrottle,
    /// Request ids: a random per-VM prefix and a counter, unique across gateways and workers.
    id_prefix: u64,
    next_id: u64,
    /// A shared queue only this worker's root listens to: kicking it has the root send the
    /// queue now instead of at the next tick.
    kick_queue: Option<u32>,
    kick_pending: bool,
    /// Releases to send again once a callout whose outcome was unknown can no longer commit:
    /// (gateway ms when due, slots).
    late_releases: Vec<(u64, Slots)>,
    /// Usage charges of ended responses, sent by the root at its next tick (so that their
    /// replies, which count failures, reach it).
    charges: Vec<Charge>,
    charge_callouts: Vec<ChargeCallout>,
    /// Releases waiting for the root's tick, on a host that cannot dispatch them where they
    /// arise (see [`HostCaps::dispatch_anywhere`]).
    deferred_releases: Vec<Slots>,
    /// Which keys this worker sees often (they get leases).
    heat: lease::Heat,
    /// Lease refills to send from the root: checks of cost 0 asking a lease.
    refills: Vec<Check>,
    lease_callouts: Vec<LeaseCallout>,
}

impl<H: Host> Engine<H> {
    /// Builds the engine of a configured plugin: defines its metrics, sets the tick (once),
    /// and (when coalescing) registers the worker's kick queue. `vm_id` is random per VM and
    /// stable across reloads, so a reload reuses the queue instead of registering another.
    /// Coalescing is on only where the host can deliver a batch's verdicts from the root
    /// ([`HostCaps::deliver_from_root`]); see [`Engine::coalescing`].
    pub fn new(
        host: H,
        config: Config,
        caps: HostCaps,
        root_context_id: u32,
        vm_id: u64,
    ) -> Result<Engine<H>, HostError> {
        let metrics = MetricIds::define(&host, &config)?;
        // Shared data once, at configure: ngx_wasm_module traps when nginx has no `shm_kv`
        // zone (Kong: `nginx_wasm_shm_kv`), and failing to load there names the missing zone,
        // where a trap on the first request would fail every request.
        let _ = host.shared_get(CLOCK_OFFSET_KEY);
        if config.leases.enabled {
            lease::create_slots(&host);
        }
        let coalesce = config.coalesce && caps.deliver_from_root;
        let kick_queue = if coalesce && caps.shared_queues {
            host.register_queue(&format!("tollgate.kick.{vm_id:016x}"))
                .ok()
        } else {
            None
        };
        host.set_tick_period_ms(match (coalesce, kick_queue) {
            (true, Some(_)) => KICKED_TICK_MS,
            (true, None) => TICK_MS,
            (false, _) if !caps.dispatch_anywhere => RELEASE_TICK_MS,
            (false, _) => IDLE_TICK_MS,
        });
        Ok(Engine {
            host,
            config,
            caps,
            coalesce,
            root_context_id,
            metrics,
            requests: HashMap::new(),
            batcher: Batcher::new(Limits::default()),
            breaker: Breaker::default(),
            local: LocalLimiter::default(),
            near: cache::Near::default(),
            skew: SkewEstimator::default(),
            failures: LogThrottle::default(),
            shadow_denials: LogThrottle::default(),
            id_prefix: vm_id,
            next_id: 0,
            kick_queue,
            kick_pending: false,
            late_releases: Vec::new(),
            charges: Vec::new(),
            charge_callouts: Vec::new(),
            deferred_releases: Vec::new(),
            heat: lease::Heat::default(),
            refills: Vec::new(),
            lease_callouts: Vec::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether requests are coalesced into root-sent batches: the configuration's `coalesce`,
    /// turned off on a host that cannot deliver their verdicts from the root.
    pub fn coalescing(&self) -> bool {
        self.coalesce
    }

    // --- Callbacks ---------------------------------------------------------------------------

    /// A request's headers arrived (its context is the effective one).
    pub fn on_request_headers(&mut self, ctx: u32) -> Action {
        let request_id = if self.config.needs_request_id {
            self.request_id()
        } else {
            String::new()
        };
        let since_ms = self.gateway_ms();
        let now_ms = self.corrected(since_ms);
        let mut checks = checks_for(&self.config, &self.host, now_ms, &request_id);
        if checks.is_empty() {
            return Action::Continue;
        }
        let clocks = cache::Clocks {
            gateway_ms: since_ms,
            corrected_ms: now_ms,
        };
        // Leases first: units Redis granted this gateway are spent even when another gateway
        // has since exhausted the key (which the over-limit cache may have learned).
        let leasing = self.lease_eligible(&checks);
        let mut leased = Leased::Cold;
        if leasing {
            leased = self.spend_leases(&mut checks, since_ms);
            if let Leased::Spent(results) = leased {
                let verdict =
                    decision::decide(&self.config, &checks, &RequestResult::local(true, results));
                return self.decide_now(ctx, &checks, verdict, Source::Lease);
            }
        }
        if self.config.over_limit_cache {
            let hits = self.cached_denials(&checks, clocks);
            if !hits.is_empty() {
                if leasing && matches!(leased, Leased::Cold) {
                    if let Some(results) = self.spend_held(&checks, since_ms) {
                        let verdict = decision::decide(
                            &self.config,
                            &checks,
                            &RequestResult::local(true, results),
                        );
                        return self.decide_now(ctx, &checks, verdict, Source::Lease);
                    }
                }
                let verdict = decision::from_cache(&self.config, &checks, &hits, clocks);
                return self.decide_now(ctx, &checks, verdict, Source::Cache);
            }
        }
        let pending = Pending {
            context_id: ctx,
            checks,
            since_ms,
            now_ms,
        };
        if self.coalesce && !self.batcher.idle() {
            // The breaker is asked where the batch is sent (flush), so a probe is never lost.
            self.batcher.enqueue(pending);
            self.track(ctx, Phase::Queued);
            if self.batcher.batches_in_flight() == 0 {
                // Only requests' own callouts are in flight: nothing would send the queue
                // before the next tick.
                self.kick();
            }
            return Action::Pause;
        }
        if !self.breaker.allows_call(since_ms) {
            let verdict = self.failure_verdict(&Failure::CircuitOpen, &pending.checks, since_ms);
            return self.decide_now(ctx, &pending.checks, verdict, Source::FailureMode);
        }
        // Sent on the root's behalf, so the host never cancels it with the stream (the reply
        // still reaches this context while it lives). On ngx_wasm_module the switch is a no-op:
        // the call belongs to the request, whose own callback gets the reply.
        let body = wire::encode(&[&pending.checks]);
        let timeout_ms = self.timeout_ms();
        let _ = self.host.set_effective_context(self.root_context_id);
        let sent = self
            .host
            .dispatch(&self.config.shim, &self.config.shim.path, &body, timeout_ms);
        let _ = self.host.set_effective_context(ctx);
        match sent {
            Ok(token) => {
                self.track(ctx, Phase::InFlight);
                self.batcher
                    .sent(token, vec![pending], since_ms, timeout_ms, true);
                Action::Pause
            }
            Err(e) => {
                self.breaker.failed(since_ms);
                let verdict = self.failure_verdict(
                    &Failure::Dispatch(e.to_string()),
                    &pending.checks,
                    since_ms,
                );
                self.decide_now(ctx, &pending.checks, verdict, Source::FailureMode)
            }
        }
    }

    /// A callout's reply (or failure) arrived for `token`, on the root (`from_root`) or on the
    /// request context that sent it. One path for both.
    pub fn on_callout_reply(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        from_root: bool,
    ) {
        if let Some(callout) = self.batcher.complete(token) {
            self.on_callout_done(callout, num_headers, body_size);
        } else if let Some(i) = self.lease_callouts.iter().position(|c| c.token == token) {
            let callout = self.lease_callouts.swap_remove(i);
            self.on_refill_done(callout, num_headers, body_size);
        } else if let Some(i) = self.charge_callouts.iter().position(|c| c.token == token) {
            let charge = self.charge_callouts.swap_remove(i);
            let status = (num_headers > 0)
                .then(|| self.host.callout_status())
                .flatten();
            if status != Some(200) {
                self.charge_failed(charge.charges, &format!("shim answered {status:?}"));
            }
        } else {
            // A release, or a callout the watchdog already failed.
            debug!("ignoring reply to callout {token}: not a pending check");
        }
        if from_root {
            self.flush();
        } else if self.batcher.queued() > 0 && self.batcher.batches_in_flight() == 0 {
            self.kick();
        }
    }

    /// The request's response headers: add the rate-limit headers of an allowed request, and
    /// read what usage rules take from headers.
    pub fn on_response_headers(&mut self, ctx: u32) {
        let Some(Req {
            phase: Phase::Allowed(headers),
            usage,
            ..
        }) = self.requests.get_mut(&ctx)
        else {
            return;
        };
        if let Some(m) = usage {
            for (_, meter) in &mut m.meters {
                meter.on_headers(|name| self.host.response_header(name));
            }
        }
        for (name, value) in std::mem::take(headers) {
            if let Err(e) = self.host.add_response_header(&name, &value) {
                debug!("adding response header {name} failed: {e}");
            }
        }
    }

    /// A response body chunk of `size` bytes passes: usage rules count it.
    pub fn on_response_body(&mut self, ctx: u32, size: usize) {
        if !self.config.has_usage_rules {
            return;
        }
        let Some(Req { usage: Some(m), .. }) = self.requests.get_mut(&ctx) else {
            return;
        };
        let chunk = m
            .meters
            .iter()
            .any(|(_, meter)| meter.source().reads_body())
            .then(|| self.host.response_body(size));
        for (_, meter) in &mut m.meters {
            meter.on_body(size, chunk.as_deref());
        }
    }

    /// The request's stream ended (completed or aborted): give back what it holds.
    pub fn on_done(&mut self, ctx: u32) {
        let Some(mut req) = self.requests.remove(&ctx) else {
            return;
        };
        match req.phase {
            Phase::Queued => {
                self.batcher.cancel(ctx);
            }
            Phase::InFlight => {
                // Its callout may still take a slot: settle when it ends.
                req.phase = Phase::Abandoned;
                self.requests.insert(ctx, req);
            }
            Phase::Allowed(_) => {
                self.release(&req.slots);
                if let Some(m) = req.usage {
                    self.charge_usage(*m);
                }
            }
            Phase::Answered | Phase::Abandoned => {}
        }
    }

    /// The root's tick: the shared clock, the watchdog, late releases, then the queue.
    pub fn on_tick(&mut self) {
        self.refresh_clock();
        let now = self.gateway_ms();
        let (queued, overdue) = self
            .batcher
            .expired(now, self.timeout_ms(), WATCHDOG_GRACE_MS);
        for callout in overdue {
            let live = callout.requests.iter().any(|p| self.waiting(p.context_id));
            if live && !self.caps.deliver_from_root {
                // Only the request's own callback can answer it on this host: leave it to the
                // host's callout timeout, which calls back there.
                self.batcher.restore(callout);
                continue;
            }
            // A request's own callout outlives its context, but the SDK hands the reply to that
            // context only: when every request it carried has left, a missing reply says
            // nothing about the shim (and clients hanging up must not open the breaker).
            if live {
                self.breaker.failed(now);
            }
            self.fail_callout(callout, &Failure::Status(504), now);
        }
        for pending in queued {
            let verdict = self.failure_verdict(&Failure::Status(504), &pending.checks, now);
            self.settle(pending, verdict, Source::FailureMode, false);
        }
        if !self.charge_callouts.is_empty() {
            let (late, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.charge_callouts)
                .into_iter()
                .partition(|c| now > c.deadline_ms.saturating_add(WATCHDOG_GRACE_MS));
            self.charge_callouts = kept;
            for c in late {
                self.charge_failed(c.charges, "no answer");
            }
        }
        if !self.lease_callouts.is_empty() {
            let (late, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.lease_callouts)
                .into_iter()
                .partition(|c| now > c.deadline_ms.saturating_add(WATCHDOG_GRACE_MS));
            self.lease_callouts = kept;
            for c in late {
                self.refill_failed(c.checks.len(), "no answer");
            }
        }
        self.send_charges();
        for slots in std::mem::take(&mut self.deferred_releases) {
            self.send_release(&slots);
        }
        if !self.late_releases.is_empty() {
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.late_releases)
                .into_iter()
                .partition(|(at, _)| *at <= now);
            self.late_releases = later;
            for (_, slots) in due {
                self.send_release(&slots);
            }
        }
        self.flush();
    }

    /// The root's kick queue has items: send the queue now.
    pub fn on_queue_ready(&mut self) {
        if let Some(queue) = self.kick_queue {
            self.host.drain_queue(queue);
        }
        self.kick_pending = false;
        self.flush();
    }

    // --- Sending -------------------------------------------------------------------------------

    /// Sends every batch the batcher has ready. Only from root callbacks: a reply goes to the
    /// context that was running when its call was sent.
    fn flush(&mut self) {
        while let Some(batch) = self.batcher.next_batch() {
            let now = self.gateway_ms();
            if !self.breaker.allows_call(now) {
                for pending in batch {
                    let verdict = self.failure_verdict(&Failure::CircuitOpen, &pending.checks, now);
                    self.settle(pending, verdict, Source::FailureMode, false);
                }
                continue;
            }
            let timeout_ms = self.timeout_ms();
            // What is left of the oldest request's budget: queueing counts against it.
            let budget = batch::deadline(&batch, timeout_ms)
                .saturating_sub(now)
                .max(1);
            let requests: Vec<&[Check]> = batch.iter().map(|p| p.checks.as_slice()).collect();
            let body = wire::encode(&requests);
            let _ = self.host.set_effective_context(self.root_context_id);
            match self
                .host
                .dispatch(&self.config.shim, &self.config.shim.path, &body, budget)
            {
                Ok(token) => {
                    for p in &batch {
                        if let Some(req) = self.requests.get_mut(&p.context_id) {
                            if req.phase == Phase::Queued {
                                req.phase = Phase::InFlight;
                            }
                        }
                    }
                    self.batcher.sent(token, batch, now, timeout_ms, false);
                }
                Err(e) => {
                    self.breaker.failed(now);
                    let failure = Failure::Dispatch(e.to_string());
                    for pending in batch {
                        let verdict = self.failure_verdict(&failure, &pending.checks, now);
                        self.settle(pending, verdict, Source::FailureMode, false);
                    }
                }
            }
        }
        self.send_refills();
    }

    /// Sends the lease refills waiting (root callbacks only, so their replies reach the root).
    fn send_refills(&mut self) {
        while !self.refills.is_empty() {
            let n = self.refills.len().min(bounds::MAX_REQUESTS);
            let checks: Vec<Check> = self.refills.drain(..n).collect();
            let now = self.gateway_ms();
            if !self.breaker.allows_call(now) {
                // The shim is down: requests find no units and take the failure mode.
                self.refill_failed(n, "circuit open");
                continue;
            }
            let requests: Vec<&[Check]> = checks.iter().map(std::slice::from_ref).collect();
            let body = wire::encode(&requests);
            let timeout_ms = self.timeout_ms();
            let _ = self.host.set_effective_context(self.root_context_id);
            match self
                .host
                .dispatch(&self.config.shim, &self.config.shim.path, &body, timeout_ms)
            {
                Ok(token) => self.lease_callouts.push(LeaseCallout {
                    token,
                    sent_ms: now,
                    deadline_ms: now + timeout_ms,
                    checks,
                }),
                Err(e) => self.refill_failed(n, &e.to_string()),
            }
        }
    }

    /// Asks the root to send queued requests now (at most one kick outstanding).
    fn kick(&mut self) {
        if let (Some(queue), false) = (self.kick_queue, self.kick_pending) {
            if self.host.enqueue(queue, b"k").is_ok() {
                self.kick_pending = true;
            }
        }
    }

    /// Releases concurrency slots: now, or at the root's next tick on a host that only lets
    /// the root send it (see [`HostCaps::dispatch_anywhere`]).
    fn release(&mut self, slots: &[(String, String)]) {
        if slots.is_empty() {
            return;
        }
        if self.caps.dispatch_anywhere {
            self.send_release(slots);
        } else {
            self.deferred_releases.push(slots.to_vec());
        }
    }

    /// Sends the release of concurrency slots on the root's behalf (so it outlives the
    /// request); nobody waits for the answer.
    fn send_release(&mut self, slots: &[(String, String)]) {
        let timeout_ms = self.timeout_ms();
        // At most a body's worth each (a failed batch can carry more).
        for chunk in slots.chunks(bounds::MAX_RELEASES) {
            let pairs: Vec<(&str, &str)> = chunk
                .iter()
                .map(|(k, id)| (k.as_str(), id.as_str()))
                .collect();
            let body = wire::encode_release(&pairs);
            let _ = self.host.set_effective_context(self.root_context_id);
            if let Err(e) = self.host.dispatch(
                &self.config.shim,
                &self.config.shim.release_path,
                &body,
                timeout_ms,
            ) {
                // The slots free themselves when their timeout passes.
                debug!("releasing {} concurrency slots failed: {e}", pairs.len());
            }
        }
    }

    /// Releases slots whose fate is unknown now, and again once the callout that may take them
    /// can no longer commit (a late commit after the first release would hold them).
    fn release_unknown(&mut self, slots: Slots) {
        if slots.is_empty() {
            return;
        }
        self.release(&slots);
        let due = self.gateway_ms() + self.timeout_ms() + WATCHDOG_GRACE_MS;
        self.late_releases.push((due, slots));
    }

    // --- Usage ---------------------------------------------------------------------------------

    /// Starts metering an admitted request's usage rules. `reserved`: the shim charged their
    /// reserve (it decided); after a failure-mode admission nothing is known to be charged.
    fn meter_usage(&mut self, ctx: u32, checks: &[Check], reserved: bool) {
        let mut m = Metering {
            meters: Vec::new(),
            targets: Vec::new(),
        };
        for c in checks {
            let Some(u) = self.config.rules.get(c.rule).and_then(|r| r.usage.as_ref()) else {
                continue;
            };
            let ttl_ms = match c.kind {
                // As the check script: the counter outlives its window by the grace.
                CheckKind::FixedWindow { ttl_ms, .. } => ttl_ms + bounds::COUNTER_GRACE_MS,
                CheckKind::SlidingWindow {
                    weight_ms,
                    window_ms,
                    ..
                } => weight_ms + window_ms,
                _ => continue,
            };
            if !m.meters.iter().any(|(r, _)| *r == c.rule) {
                m.meters.push((c.rule, usage::Meter::new(u.source.clone())));
            }
            let reserve = if reserved { c.cost } else { 0 };
            m.targets.push((c.rule, c.key.clone(), ttl_ms, reserve));
        }
        if m.targets.is_empty() {
            return;
        }
        if let Some(req) = self.requests.get_mut(&ctx) {
            req.usage = Some(Box::new(m));
        }
    }

    /// The stream ended: queue the charge of what it used beyond its reserve.
    fn charge_usage(&mut self, m: Metering) {
        for (rule, key, ttl_ms, reserve) in m.targets {
            let used = m
                .meters
                .iter()
                .find(|(r, _)| *r == rule)
                .and_then(|(_, meter)| meter.amount());
            // Unknown: the reserve stands.
            let Some(used) = used else { continue };
            let delta = usage::delta(used, reserve);
            if delta != 0 {
                self.charges.push(Charge { key, delta, ttl_ms });
            }
        }
    }

    /// Sends queued charges from the root (its tick), at most a body's worth per callout.
    fn send_charges(&mut self) {
        while !self.charges.is_empty() {
            let n = self.charges.len().min(bounds::MAX_RELEASES);
            let batch: Vec<Charge> = self.charges.drain(..n).collect();
            let wire: Vec<wire::WireCharge<'_>> = batch
                .iter()
                .map(|c| wire::WireCharge {
                    key: &c.key,
                    delta: c.delta,
                    ttl_ms: c.ttl_ms,
                })
                .collect();
            let body = wire::encode_charges(&wire);
            let timeout_ms = self.timeout_ms();
            let _ = self.host.set_effective_context(self.root_context_id);
            match self.host.dispatch(
                &self.config.shim,
                &self.config.shim.charge_path,
                &body,
                timeout_ms,
            ) {
                Ok(token) => {
                    self.bump_by(Counter::UsageCharges, n as i64);
                    self.charge_callouts.push(ChargeCallout {
                        token,
                        deadline_ms: self.gateway_ms() + timeout_ms,
                        charges: n,
                    });
                }
                Err(e) => {
                    self.bump_by(Counter::UsageCharges, n as i64);
                    self.charge_failed(n, &e.to_string());
                }
            }
        }
    }

    /// Charges that did not land: the usage went uncounted (the response was already sent).
    fn charge_failed(&mut self, charges: usize, why: &str) {
        self.bump_by(Counter::UsageChargeFailures, charges as i64);
        let now = self.host.now_ms();
        if let Some(held_back) = self.failures.admit(now, LOG_INTERVAL_MS) {
            warn!("usage charge of {charges} counters failed: {why} ({held_back} similar failures not logged)");
        }
    }

    // --- Deciding ------------------------------------------------------------------------------

    fn on_callout_done(&mut self, callout: InFlight, num_headers: usize, body_size: usize) {
        let received_ms = self.gateway_ms();
        self.host.record_metric(
            self.metrics.callout_ms,
            received_ms.saturating_sub(callout.sent_ms),
        );
        let data = CalloutData::read(&self.host, num_headers, body_size);
        let asked: Vec<(&[Check], cache::Clocks)> = callout
            .requests
            .iter()
            .map(|p| {
                let built = cache::Clocks {
                    gateway_ms: p.since_ms,
                    corrected_ms: p.now_ms,
                };
                (p.checks.as_slice(), built)
            })
            .collect();
        let decided = decision::from_batch_callout(&self.config, &asked, data.reply());
        match decided {
            Ok(decided) => {
                self.breaker.succeeded();
                self.observe_clock(callout.sent_ms, received_ms, decided.server_now_ms);
                for (i, j, granted) in &decided.grants {
                    if let Some(p) = callout.requests.get(*i) {
                        if let Some(check) = p.checks.get(*j) {
                            self.store_grant(check, granted, p.since_ms);
                        }
                    }
                }
                for (pending, verdict) in callout.requests.into_iter().zip(decided.verdicts) {
                    match verdict {
                        Ok((verdict, exhausted)) => {
                            self.remember_exhausted(&exhausted, pending.since_ms);
                            let held = match verdict {
                                Verdict::Deny(_) if self.lease_eligible(&pending.checks) => {
                                    self.spend_held(&pending.checks, received_ms)
                                }
                                _ => None,
                            };
                            match held {
                                Some(results) => {
                                    // Redis charged nothing for it: the units it spends were.
                                    let verdict = decision::decide(
                                        &self.config,
                                        &pending.checks,
                                        &RequestResult::local(true, results),
                                    );
                                    self.settle(pending, verdict, Source::Lease, true);
                                }
                                None => self.settle(pending, verdict, Source::Shim, true),
                            }
                        }
                        Err(refused) => {
                            // Nothing was charged for it: its slots were never taken.
                            let verdict =
                                self.failure_verdict(&refused, &pending.checks, received_ms);
                            self.settle(pending, verdict, Source::FailureMode, false);
                        }
                    }
                }
            }
            Err(failure) => {
                self.breaker.failed(received_ms);
                self.fail_callout(callout, &failure, received_ms);
            }
        }
    }

    /// Applies the failure mode to every request of a failed callout (and only to those). The
    /// slots the callout may have taken are given back together, in one release.
    fn fail_callout(&mut self, callout: InFlight, failure: &Failure, gateway_ms: u64) {
        let slots: Slots = callout
            .requests
            .iter()
            .flat_map(|p| slots_of(&p.checks))
            .collect();
        for pending in callout.requests {
            let verdict = self.failure_verdict(failure, &pending.checks, gateway_ms);
            self.settle(pending, verdict, Source::FailureMode, false);
        }
        self.release_unknown(slots);
    }

    /// Carries out the verdict of a request that was paused (queued or in flight): the one
    /// place a paused request is resumed or answered, and its slots handed to their owner.
    /// `sent`: its checks went to the shim (so it may hold slots).
    fn settle(&mut self, pending: Pending, verdict: Verdict, source: Source, sent: bool) {
        let ctx = pending.context_id;
        let slots = if sent {
            slots_of(&pending.checks)
        } else {
            Vec::new()
        };
        let present = matches!(
            self.requests.get(&ctx),
            Some(Req {
                phase: Phase::Queued | Phase::InFlight,
                ..
            })
        );
        if !present {
            // Its client left: nobody to answer; give back whatever it may hold (what the shim
            // answered is known; anything else may still commit late).
            self.requests.remove(&ctx);
            if source == Source::Shim {
                self.release(&slots);
            } else {
                self.release_unknown(slots);
            }
            return;
        }
        self.count(&verdict, source);
        match verdict {
            Verdict::Allow {
                response_headers, ..
            } => {
                let slots = if source == Source::Shim {
                    slots
                } else {
                    // Failed open: the shim may or may not have taken them.
                    self.release_unknown(slots);
                    Vec::new()
                };
                self.track(ctx, Phase::Allowed(response_headers));
                if let Some(req) = self.requests.get_mut(&ctx) {
                    req.slots = slots;
                }
                if self.config.has_usage_rules {
                    self.meter_usage(ctx, &pending.checks, source == Source::Shim);
                }
                match self.host.set_effective_context(ctx) {
                    Ok(()) => {
                        if let Err(e) = self.host.resume_request() {
                            warn!("resuming request {ctx} failed: {e}");
                        }
                    }
                    Err(_) => self.gone(ctx),
                }
            }
            Verdict::Deny(reply) => {
                // A denied request took nothing, unless its keys span several hash tags: Redis
                // Cluster may then have charged one slot group while another denied.
                if source == Source::Shim {
                    if spans_slot_groups(&pending.checks) {
                        self.release(&slots);
                    }
                } else {
                    self.release_unknown(slots);
                }
                self.track(ctx, Phase::Answered);
                match self.host.set_effective_context(ctx) {
                    Ok(()) => {
                        if let Err(e) = self.host.send_local_reply(&reply) {
                            warn!("sending the local reply to {ctx} failed: {e}");
                        }
                    }
                    Err(_) => self.gone(ctx),
                }
            }
        }
    }

    /// Whether `ctx` is a live request still waiting for its verdict.
    fn waiting(&self, ctx: u32) -> bool {
        matches!(
            self.requests.get(&ctx),
            Some(Req {
                phase: Phase::Queued | Phase::InFlight,
                ..
            })
        )
    }

    /// A context the host no longer knows: forget it, giving back its slots.
    fn gone(&mut self, ctx: u32) {
        if let Some(req) = self.requests.remove(&ctx) {
            self.release(&req.slots);
        }
    }

    /// Carries out a verdict reached before the request was paused.
    fn decide_now(
        &mut self,
        ctx: u32,
        checks: &[Check],
        verdict: Verdict,
        source: Source,
    ) -> Action {
        self.count(&verdict, source);
        match verdict {
            Verdict::Allow {
                response_headers, ..
            } => {
                let metered = self.metered(checks);
                if !response_headers.is_empty() || metered {
                    self.track(ctx, Phase::Allowed(response_headers));
                }
                if metered {
                    // A lease's units were charged in Redis when granted.
                    self.meter_usage(ctx, checks, matches!(source, Source::Shim | Source::Lease));
                }
                Action::Continue
            }
            Verdict::Deny(reply) => {
                self.track(ctx, Phase::Answered);
                if let Err(e) = self.host.send_local_reply(&reply) {
                    warn!("sending the local reply failed: {e}");
                }
                Action::Pause
            }
        }
    }

    fn track(&mut self, ctx: u32, phase: Phase) {
        match self.requests.get_mut(&ctx) {
            Some(req) => req.phase = phase,
            None => {
                self.requests.insert(
                    ctx,
                    Req {
                        phase,
                        slots: Vec::new(),
                        usage: None,
                    },
                );
            }
        }
    }

    /// Logs a failure (throttled) and returns the failure mode's verdict for these checks, at
    /// `gateway_ms` (the caller's clock reading: one per callback, not one per request).
    fn failure_verdict(&mut self, failure: &Failure, checks: &[Check], gateway_ms: u64) -> Verdict {
        let now_ms = self.corrected(gateway_ms);
        let mode = self.config.failure_mode;
        if let Some(held_back) = self.failures.admit(gateway_ms, LOG_INTERVAL_MS) {
            warn!("{failure}; applying failure mode {mode:?} ({held_back} similar failures not logged)");
        } else {
            debug!("{failure}; applying failure mode {mode:?}");
        }
        decision::on_failure(&self.config, checks, &mut self.local, now_ms)
    }

    /// Counts a verdict: every request that gets one, exactly once.
    fn count(&mut self, verdict: &Verdict, source: Source) {
        let outcome = match (source, verdict) {
            (Source::FailureMode, _) => match self.config.failure_mode {
                FailureMode::Allow => Outcome::FailedOpen,
                FailureMode::Deny => Outcome::FailedClosed,
                FailureMode::Local => Outcome::FailedLocal,
            },
            (_, Verdict::Allow { shadow_denials, .. }) => Outcome::Allowed {
                shadow_denied: shadow_denials,
            },
            (_, Verdict::Deny(reply)) => Outcome::Denied {
                rules: &reply.denied_by,
            },
        };
        if source == Source::Cache {
            self.bump(Counter::CacheHits);
        }
        if source == Source::Lease {
            self.bump(Counter::LeaseAdmitted);
        }
        for c in metrics::counters(&outcome) {
            self.bump(c);
        }
        let (rules, shadow) = match outcome {
            Outcome::Denied { rules } => (rules, false),
            Outcome::Allowed { shadow_denied } => (shadow_denied, true),
            Outcome::FailedOpen | Outcome::FailedClosed | Outcome::FailedLocal => return,
        };
        for &i in rules {
            if let Some(&(denied, shadow_denied)) = self.metrics.rules.get(i) {
                self.host
                    .increment_metric(if shadow { shadow_denied } else { denied }, 1);
            }
            if shadow {
                let name = self.config.rules.get(i).map_or("?", |r| r.name.as_str());
                let now = self.host.now_ms();
                if let Some(held_back) = self.shadow_denials.admit(now, LOG_INTERVAL_MS) {
                    log::info!("rule {name} (shadow mode) would have denied a request ({held_back} more shadow denials not logged)");
                }
            }
        }
    }

    fn bump(&self, counter: Counter) {
        self.bump_by(counter, 1);
    }

    fn bump_by(&self, counter: Counter, by: i64) {
        if let Some(&(_, id)) = self.metrics.counters.iter().find(|(k, _)| *k == counter) {
            self.host.increment_metric(id, by);
        }
    }

    // --- The over-limit cache ----------------------------------------------------------------

    fn remember_exhausted(&mut self, entries: &[cache::Entry], now_ms: u64) {
        for entry in entries {
            self.host
                .shared_set(&cache::slot(&entry.key), &cache::encode(entry));
            self.near.put(entry.clone(), now_ms);
        }
    }

    /// The checks the over-limit cache denies right now, with their entries: this worker's
    /// copy first, then shared data (what other workers learned).
    fn cached_denials(
        &mut self,
        checks: &[Check],
        now: cache::Clocks,
    ) -> Vec<(usize, cache::Entry)> {
        let mut hits = Vec::new();
        for (i, c) in checks.iter().enumerate() {
            if c.cost == 0 || c.shadow {
                continue;
            }
            let now_ms = now.for_check(c);
            let id = cache::identity(c);
            if let Some(entry) = self.near.get(&id, now_ms) {
                if cache::denies(entry, c, &id, now_ms) {
                    hits.push((i, entry.clone()));
                }
                continue;
            }
            let Some(entry) = self
                .host
                .shared_get(&cache::slot(&id))
                .as_deref()
                .and_then(cache::decode)
            else {
                continue;
            };
            if cache::denies(&entry, c, &id, now_ms) {
                self.near.put(entry.clone(), now_ms);
                hits.push((i, entry));
            }
        }
        hits
    }

    // --- Leases ----------------------------------------------------------------------------------

    /// Whether leases may decide a request of these checks: on, every check leasable
    /// ([`lease::leasable`]) and no usage rule (units reserved ahead would count as consumed).
    fn lease_eligible(&self, checks: &[Check]) -> bool {
        self.config.leases.enabled && lease::leasable(checks) && !self.metered(checks)
    }

    /// Decides a request of keys hot on this worker from leases when every check has units:
    /// takes them and returns the answers to report. Otherwise marks the checks of hot keys to
    /// ask a lease (unless a refill is already in flight): the request goes to Redis.
    fn spend_leases(&mut self, checks: &mut [Check], now: u64) -> Leased {
        let cfg = self.config.leases;
        let ids: Vec<String> = checks.iter().map(cache::identity).collect();
        let wants: Vec<Option<u64>> = ids
            .iter()
            .map(|id| self.heat.hit(id, now, cfg.horizon_ms, cfg.max_units))
            .collect();
        if wants.iter().all(Option::is_none) {
            // No key is hot on this worker: none has units worth a shared-data read.
            return Leased::Cold;
        }
        match self.take_units(checks, &ids, now) {
            Ok(results) => Leased::Spent(results),
            Err(refilling) => {
                for (i, c) in checks.iter_mut().enumerate() {
                    if let (Some(want), false) = (wants[i], refilling[i]) {
                        c.lease = want;
                    }
                }
                Leased::Missed
            }
        }
    }

    /// Before a denial: the units this gateway holds for every check, if it holds them, are
    /// spent instead (another worker asked them, or this one saw the key as hot a while ago),
    /// so no request is denied while units Redis granted for it sit unspent.
    fn spend_held(&mut self, checks: &[Check], now: u64) -> Option<Vec<CheckResult>> {
        let ids: Vec<String> = checks.iter().map(cache::identity).collect();
        self.take_units(checks, &ids, now).ok()
    }

    /// Takes `cost` units of every check's lease (each record by compare-and-swap), or none:
    /// what was taken is given back when one check lacks them. `Err`: per check, whether a
    /// refill of it is in flight (for the checks tried).
    fn take_units(
        &mut self,
        checks: &[Check],
        ids: &[String],
        now: u64,
    ) -> Result<Vec<CheckResult>, Vec<bool>> {
        let stale_ms = self.timeout_ms() + WATCHDOG_GRACE_MS;
        let mut results = Vec::with_capacity(checks.len());
        let mut refilling = vec![false; checks.len()];
        for (i, c) in checks.iter().enumerate() {
            match self.take_lease(&ids[i], c.cost, now, stale_ms) {
                Ok((taken, refill)) => {
                    if refill > 0 {
                        self.refills.push(Check {
                            cost: 0,
                            lease: refill,
                            ..c.clone()
                        });
                        self.kick();
                    }
                    results.push(CheckResult {
                        allowed: true,
                        limit: c.limit(),
                        remaining: taken.remaining,
                        reset_ms: taken.reset_ms,
                        retry_after_ms: 0,
                        lease: 0,
                        lease_ms: 0,
                    });
                }
                Err(in_flight) => {
                    refilling[i] = in_flight;
                    break;
                }
            }
        }
        if results.len() == checks.len() {
            return Ok(results);
        }
        for (i, c) in checks.iter().enumerate().take(results.len()) {
            self.give_back_lease(&ids[i], c.cost);
        }
        Err(refilling)
    }

    /// Whether a usage rule applies: its counter charges what the response consumed, so its
    /// checks take no leases (units reserved ahead would count as consumed).
    fn metered(&self, checks: &[Check]) -> bool {
        self.config.has_usage_rules
            && checks.iter().any(|c| {
                self.config
                    .rules
                    .get(c.rule)
                    .is_some_and(|r| r.usage.is_some())
            })
    }

    /// One compare-and-swap of a lease record, tried again when another worker wrote first:
    /// `f` gets the record's bytes (`None`: no record) and returns what to write and a result,
    /// or `Err` to write nothing. `Err(lost)` when every try lost its race.
    fn update_lease<T, E>(
        &self,
        slot: &str,
        lost: E,
        mut f: impl FnMut(Option<Vec<u8>>) -> Result<(Vec<u8>, T), E>,
    ) -> Result<T, E> {
        for _ in 0..lease::CAS_TRIES {
            let (bytes, cas) = self.host.shared_get_cas(slot);
            let (write, out) = f(bytes)?;
            if self.host.shared_set_cas(slot, &write, cas).is_ok() {
                return Ok(out);
            }
        }
        Err(lost)
    }

    /// Takes `cost` units of `id`'s lease: what to report, and the refill to ask (0: none).
    /// `Err(true)`: no units, but a refill is in flight.
    fn take_lease(
        &self,
        id: &str,
        cost: u64,
        now: u64,
        stale_ms: u64,
    ) -> Result<(lease::Taken, u64), bool> {
        let cfg = self.config.leases;
        self.update_lease(&lease::slot(id), false, |bytes| {
            let mut bytes = bytes.ok_or(false)?;
            let (taken, spent, granted_ms) =
                lease::take_encoded(&mut bytes, id, cost, now, stale_ms)?;
            let refill = if taken.refill {
                lease::refill_size(spent, granted_ms, now, cfg.horizon_ms, cfg.max_units)
            } else {
                0
            };
            Ok((bytes, (taken, refill)))
        })
    }

    /// Returns units taken for a request that went to Redis after all. Lost to contention,
    /// they go unspent (charged in Redis, never admitted): counted as dropped.
    fn give_back_lease(&self, id: &str, cost: u64) {
        let given = self.update_lease(&lease::slot(id), true, |bytes| {
            let mut rec = bytes.as_deref().and_then(lease::decode).ok_or(false)?;
            if !lease::give_back(&mut rec, id, cost) {
                return Err(false);
            }
            Ok((lease::encode(&rec), ()))
        });
        if given.is_err() {
            self.bump_by(Counter::LeaseUnitsDropped, cost as i64);
        }
    }

    /// Adds what Redis granted for `check` (built, or sent, at gateway ms `since_ms`) to its
    /// record; a grant of 0 ends the refill that asked it.
    fn store_grant(&mut self, check: &Check, answer: &CheckResult, since_ms: u64) {
        let id = cache::identity(check);
        let now = self.gateway_ms();
        let grant = lease::Grant {
            units: answer.lease,
            since_ms,
            lease_ms: answer.lease_ms,
            remaining: answer.remaining,
            reset_ms: answer.reset_ms,
        };
        let slot = lease::slot(&id);
        if grant.units > 0 {
            lease::create_slot(&self.host, &slot);
        }
        // Err(true): lost to contention, so the units are dropped; Err(false): nothing to write.
        let written = self.update_lease(&slot, true, |bytes| {
            let Some(bytes) = bytes else {
                // No slot: only when it could not be made.
                return Err(grant.units > 0);
            };
            let old = lease::decode(&bytes);
            if grant.units == 0 && old.as_ref().is_none_or(|r| r.id != id) {
                // Nothing granted, and no record of this key's to end the refill of.
                return Err(false);
            }
            let (rec, dropped) = lease::merge(old, &id, grant, now);
            Ok((lease::encode(&rec), dropped))
        });
        let dropped = match written {
            Ok(dropped) => dropped,
            Err(true) => grant.units,
            Err(false) => return,
        };
        self.bump_by(Counter::LeaseUnitsGranted, grant.units as i64);
        self.bump_by(Counter::LeaseUnitsDropped, dropped as i64);
    }

    /// A refill's answer: each check's grant (or none) goes to its record.
    fn on_refill_done(&mut self, callout: LeaseCallout, num_headers: usize, body_size: usize) {
        let data = CalloutData::read(&self.host, num_headers, body_size);
        let shape = vec![1; callout.checks.len()];
        let decoded = match data.status {
            Some(200) => wire::decode(&data.body, &shape),
            other => Err(format!("shim answered {other:?}")),
        };
        match decoded {
            Ok(reply) => {
                self.breaker.succeeded();
                for (check, result) in callout.checks.iter().zip(&reply.results) {
                    if let Some(answer) = result.checks.first() {
                        self.store_grant(check, answer, callout.sent_ms);
                    }
                }
            }
            Err(why) => self.refill_failed(callout.checks.len(), &why),
        }
    }

    /// Refills that got no answer: their records keep what they hold, and requests find the
    /// next refill asked once this one is stale (or go to Redis when the units run out).
    fn refill_failed(&mut self, refills: usize, why: &str) {
        self.bump_by(Counter::LeaseRefillFailures, refills as i64);
        let now = self.host.now_ms();
        if let Some(held_back) = self.failures.admit(now, LOG_INTERVAL_MS) {
            warn!("lease refill of {refills} keys failed: {why} ({held_back} similar failures not logged)");
        } else {
            debug!("lease refill of {refills} keys failed: {why}");
        }
    }

    // --- Clocks ----------------------------------------------------------------------------------

    /// This gateway's own clock (moved by `clock.simulated_skew_ms` in drills): for timing
    /// callouts, the breaker and the watchdog.
    fn gateway_ms(&self) -> u64 {
        self.host
            .now_ms()
            .saturating_add_signed(self.config.simulated_skew_ms)
    }

    /// The clock decisions run on: the gateway clock moved onto Redis's time when skew
    /// correction is on, so every gateway computes the same window keys.
    fn corrected(&self, gateway_ms: u64) -> u64 {
        let offset = if self.config.correct_clock_skew {
            self.skew.offset_ms()
        } else {
            0
        };
        clock::corrected(gateway_ms, offset)
    }

    fn timeout_ms(&self) -> u64 {
        self.config.shim.timeout.as_millis() as u64
    }

    /// Learns from a reply's Redis time, and shares the estimate with the other workers.
    fn observe_clock(&mut self, sent_ms: u64, received_ms: u64, server_ms: Option<u64>) {
        let (Some(server_ms), true) = (server_ms, self.config.correct_clock_skew) else {
            return;
        };
        self.skew.observe(sent_ms, received_ms, server_ms);
        self.host
            .shared_set(CLOCK_OFFSET_KEY, &clock::encode(self.skew.offset_ms()));
    }

    /// Picks up what other workers learned about the clock.
    fn refresh_clock(&mut self) {
        if !self.config.correct_clock_skew {
            return;
        }
        if let Some(offset) = self
            .host
            .shared_get(CLOCK_OFFSET_KEY)
            .as_deref()
            .and_then(clock::decode)
        {
            self.skew = SkewEstimator::with_offset(offset);
        }
    }

    fn request_id(&mut self) -> String {
        let n = self.next_id;
        self.next_id = n.wrapping_add(1);
        format!("{:016x}-{n:x}", self.id_prefix)
    }
}

/// Whether the checks' keys carry more than one `{hash tag}`, so that Redis Cluster runs them
/// in separate slot groups.
fn spans_slot_groups(checks: &[Check]) -> bool {
    fn tag(key: &str) -> Option<&str> {
        let (_, rest) = key.split_once('{')?;
        Some(rest.split_once('}')?.0)
    }
    checks.windows(2).any(|w| tag(&w[0].key) != tag(&w[1].key))
}

fn slots_of(checks: &[Check]) -> Slots {
    checks
        .iter()
        .filter_map(|c| c.slot())
        .map(|(k, id)| (k.to_string(), id.to_string()))
        .collect()
}

/// What a completed callout brought back, read once.
struct CalloutData {
    status: Option<u32>,
    dispatch_status: Option<String>,
    body: Vec<u8>,
}

impl CalloutData {
    /// A failed call has no response headers, and reading them then is an error the SDK turns
    /// into a panic: only read what the host says is there.
    fn read(host: &impl Host, num_headers: usize, body_size: usize) -> CalloutData {
        let has_headers = num_headers > 0;
        CalloutData {
            status: has_headers.then(|| host.callout_status()).flatten(),
            dispatch_status: has_headers
                .then(|| host.callout_dispatch_status())
                .flatten(),
            body: if body_size > 0 {
                host.callout_body(body_size)
            } else {
                Vec::new()
            },
        }
    }

    fn reply(&self) -> CalloutReply<'_> {
        CalloutReply {
            status: self.status,
            dispatch_status: self.dispatch_status.as_deref(),
            body: &self.body,
        }
    }
}

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;
