//! The proxy-wasm contexts: the thin glue between the host and the pure logic.
//!
//! Per request: match rules → over-limit cache → one callout to the shim with every check →
//! pause → on the reply, `decision::from_callout` → resume (allow) or send a local reply
//! (deny). Any failure goes through `decision::on_failure`, the one place the failure mode is
//! applied. With `coalesce`, requests that arrive while a callout is in flight wait in the
//! worker's [`Batcher`] and go out together from the root context (see `batch`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;

use log::{debug, error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

use crate::batch::{Batcher, Limits, Pending};
use crate::cache;
use crate::clock::{self, SkewEstimator};
use crate::config::{Config, FailureMode};
use crate::decision::{self, CalloutReply, Failure, Verdict};
use crate::host::{Host, HostError, WasmHost};
use crate::local::{Breaker, LocalLimiter};
use crate::metrics::{self, Counter, Outcome};
use crate::request::{checks_for, Check};
use crate::throttle::LogThrottle;
use crate::wire;

/// A recurring failure or shadow denial is logged at most this often per worker; the rest at
/// debug.
const LOG_INTERVAL_MS: u64 = 10_000;
/// How often the root flushes queued requests and runs the watchdog, when coalescing.
const TICK_MS: u64 = 1;
/// How often workers pick up the shared clock offset when they have no other reason to tick.
const CLOCK_TICK_MS: u64 = 1_000;
/// Grace beyond the callout timeout before the watchdog fails a request itself.
const WATCHDOG_GRACE_MS: u64 = 50;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        // A panic aborts the VM: say why at the highest level before it goes.
        let _ = proxy_wasm::hostcalls::log(LogLevel::Critical, &format!("tollgate panicked: {info}"));
    }));
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(TollgateRoot { context_id, plugin: None })
    });
}}

/// Response headers to add, and concurrency slots `(key, id)` to release.
type Headers = Vec<(String, String)>;
type Slots = Vec<(String, String)>;

/// Everything the contexts of one configured plugin share (one per worker).
struct Plugin {
    config: Config,
    root_context_id: u32,
    metrics: Metrics,
    failures: RefCell<LogThrottle>,
    shadow_denials: RefCell<LogThrottle>,
    /// Request ids: a random per-VM prefix and a counter, unique across gateways and workers.
    id_prefix: u64,
    next_id: Cell<u64>,
    batcher: RefCell<Batcher>,
    /// `failure_mode: "local"` counters, and the breaker that stops calling a failing shim.
    local: RefCell<LocalLimiter>,
    breaker: RefCell<Breaker>,
    /// Gateway clock → Redis clock, learned from replies and shared by the workers.
    skew: Cell<SkewEstimator>,
    /// A shared queue only this worker's root listens to: an HTTP context "kicks" it to have
    /// the root send queued requests now instead of at the next tick.
    kick_queue: Option<u32>,
    kick_pending: Cell<bool>,
    /// Verdicts the root reached for queued requests that it allowed: the response headers to
    /// add and the slots to release, picked up by the request's own context.
    allowed: RefCell<HashMap<u32, (Headers, Slots)>>,
    /// This worker's copy of over-limit cache entries (the shared ones are the truth).
    near: RefCell<cache::Near>,
}

/// Shared-data key of the clock offset every worker of a gateway uses.
const CLOCK_OFFSET_KEY: &str = "tollgate.clock_offset";

impl Plugin {
    /// This gateway's own clock (moved by `clock.simulated_skew_ms` in drills): for timing
    /// callouts.
    fn gateway_ms(&self) -> u64 {
        WasmHost
            .now_ms()
            .saturating_add_signed(self.config.simulated_skew_ms)
    }

    /// The clock decisions run on: the gateway clock moved onto Redis's time when skew
    /// correction is on, so every gateway computes the same window keys.
    fn now(&self) -> u64 {
        self.corrected(self.gateway_ms())
    }

    /// [`now`](Self::now) from a gateway time already read (host calls cost: one per request).
    fn corrected(&self, gateway_ms: u64) -> u64 {
        let offset = if self.config.correct_clock_skew {
            self.skew.get().offset_ms()
        } else {
            0
        };
        clock::corrected(gateway_ms, offset)
    }

    /// Learns from a reply's Redis time, and shares the estimate with the other workers.
    fn observe_clock(&self, sent_ms: u64, received_ms: u64, server_ms: Option<u64>) {
        let (Some(server_ms), true) = (server_ms, self.config.correct_clock_skew) else {
            return;
        };
        let mut skew = self.skew.get();
        skew.observe(sent_ms, received_ms, server_ms);
        self.skew.set(skew);
        WasmHost.shared_set(CLOCK_OFFSET_KEY, &clock::encode(skew.offset_ms()));
    }

    /// Asks the root to send queued requests now (at most one kick outstanding).
    fn kick(&self) {
        if let (Some(queue), false) = (self.kick_queue, self.kick_pending.get()) {
            if WasmHost.enqueue(queue, b"k").is_ok() {
                self.kick_pending.set(true);
            }
        }
    }

    /// The root's side of a kick.
    fn on_kick(&self) {
        if let Some(queue) = self.kick_queue {
            WasmHost.drain_queue(queue);
        }
        self.kick_pending.set(false);
        self.flush();
    }

    /// Picks up what other workers learned about the clock.
    fn refresh_clock(&self) {
        if let Some(offset) = WasmHost
            .shared_get(CLOCK_OFFSET_KEY)
            .as_deref()
            .and_then(clock::decode)
        {
            self.skew.set(SkewEstimator::with_offset(offset));
        }
    }

    fn request_id(&self) -> String {
        let n = self.next_id.get();
        self.next_id.set(n.wrapping_add(1));
        format!("{:016x}-{n:x}", self.id_prefix)
    }

    /// Counts a decision and logs what shadow rules would have done.
    fn count(&self, verdict: &Verdict) {
        let outcome = match verdict {
            Verdict::Allow { shadow_denials, .. } => {
                self.log_shadow_denials(shadow_denials);
                Outcome::Allowed {
                    shadow_denied: shadow_denials,
                }
            }
            Verdict::Deny(reply) => Outcome::Denied {
                rules: &reply.denied_by,
            },
        };
        self.metrics.count(&WasmHost, &outcome);
    }

    fn log_shadow_denials(&self, rules: &[usize]) {
        for &i in rules {
            let name = self.config.rules.get(i).map_or("?", |r| r.name.as_str());
            log_throttled(&self.shadow_denials, log::Level::Info, |held_back| {
                format!("rule {name} (shadow mode) would have denied a request ({held_back} more shadow denials not logged)")
            });
        }
    }

    /// Logs a failure (throttled), counts it, and returns the failure mode's verdict for a
    /// request with these checks.
    fn failure_verdict(&self, failure: &Failure, checks: &[Check]) -> Verdict {
        let gateway_ms = self.gateway_ms();
        let now_ms = self.corrected(gateway_ms);
        if *failure != Failure::CircuitOpen {
            // The breaker runs on the gateway clock, like `may_call`.
            self.breaker.borrow_mut().failed(gateway_ms);
        }
        let mode = self.config.failure_mode;
        log_throttled(&self.failures, log::Level::Warn, |held_back| {
            format!("{failure}; applying failure mode {mode:?} ({held_back} similar failures not logged)")
        });
        let outcome = match self.config.failure_mode {
            FailureMode::Allow => Outcome::FailedOpen,
            FailureMode::Deny => Outcome::FailedClosed,
            FailureMode::Local => Outcome::FailedLocal,
        };
        self.metrics.count(&WasmHost, &outcome);
        decision::on_failure(&self.config, checks, &mut self.local.borrow_mut(), now_ms)
    }

    /// Whether the shim may be called at `gateway_ms` (the circuit breaker is closed or
    /// probing).
    fn may_call(&self, gateway_ms: u64) -> bool {
        self.breaker.borrow_mut().allows_call(gateway_ms)
    }

    fn remember_exhausted(&self, entries: &[cache::Entry], now_ms: u64) {
        for entry in entries {
            WasmHost.shared_set(&cache::slot(&entry.key), &cache::encode(entry));
            self.near.borrow_mut().put(entry.clone(), now_ms);
        }
    }

    /// The checks the over-limit cache denies right now, with their entries: this worker's
    /// copy first, then shared data (what other workers learned).
    fn cached_denials(&self, checks: &[Check], now_ms: u64) -> Vec<(usize, cache::Entry)> {
        let mut near = self.near.borrow_mut();
        checks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.cost > 0 && !c.shadow)
            .filter_map(|(i, c)| {
                if let Some(entry) = near.get(&c.key, now_ms) {
                    return cache::denies(entry, c, now_ms).then(|| (i, entry.clone()));
                }
                let entry = cache::decode(&WasmHost.shared_get(&cache::slot(&c.key))?)?;
                if !cache::denies(&entry, c, now_ms) {
                    return None;
                }
                near.put(entry.clone(), now_ms);
                Some((i, entry))
            })
            .collect()
    }

    /// Sends the release of concurrency slots; nobody waits for the answer.
    fn release(&self, slots: &[(String, String)]) {
        if slots.is_empty() {
            return;
        }
        let pairs: Vec<(&str, &str)> = slots
            .iter()
            .map(|(k, id)| (k.as_str(), id.as_str()))
            .collect();
        let body = wire::encode_release(&pairs);
        if let Err(e) = WasmHost.dispatch_release(self.root_context_id, &self.config.shim, &body) {
            // The slots free themselves when their timeout passes.
            debug!("releasing {} concurrency slots failed: {e}", pairs.len());
        }
    }

    // --- The root's side of coalescing --------------------------------------------------

    /// Sends every batch the batcher has ready, from the root context.
    fn flush(&self) {
        loop {
            let Some(batch) = self.batcher.borrow_mut().next_batch() else {
                return;
            };
            let now_ms = self.gateway_ms();
            if !self.may_call(now_ms) {
                self.fail_all(batch, &Failure::CircuitOpen);
                continue;
            }
            // Attribute the callout to the root, so no single request's end can cancel it.
            let _ = WasmHost.set_effective_context(self.root_context_id);
            let requests: Vec<&[Check]> = batch.iter().map(|p| p.checks.as_slice()).collect();
            let body = wire::encode(&requests);
            match WasmHost.dispatch(&self.config.shim, &body) {
                Ok(token) => self.batcher.borrow_mut().sent(token, batch, now_ms),
                Err(e) => self.fail_all(batch, &Failure::Dispatch(e.to_string())),
            }
        }
    }

    /// The reply to a root batch: each request gets its own verdict.
    fn on_batch_reply(&self, token: u32, num_headers: usize, body_size: usize) {
        let Some((sent_ms, batch)) = self.batcher.borrow_mut().complete(token) else {
            debug!("ignoring reply to callout {token}: not a pending batch");
            return;
        };
        let received_ms = self.gateway_ms();
        WasmHost.record_metric(self.metrics.callout_ms, received_ms.saturating_sub(sent_ms));
        let data = CalloutData::read(num_headers, body_size);
        let reply = data.reply();
        let requests: Vec<&[Check]> = batch.iter().map(|p| p.checks.as_slice()).collect();
        let now_ms = self.now();
        match decision::from_batch_callout(&self.config, &requests, reply, now_ms) {
            Ok(decided) => {
                self.breaker.borrow_mut().succeeded();
                self.observe_clock(sent_ms, received_ms, decided.server_now_ms);
                for (pending, (verdict, exhausted)) in batch.iter().zip(decided.verdicts) {
                    self.remember_exhausted(&exhausted, now_ms);
                    self.deliver(pending, verdict, slots_of(&pending.checks));
                }
            }
            Err(failure) => self.fail_all(batch, &failure),
        }
        self.flush();
    }

    fn fail_all(&self, batch: Vec<Pending>, failure: &Failure) {
        for pending in &batch {
            let verdict = self.failure_verdict(failure, &pending.checks);
            self.deliver(pending, verdict, Vec::new());
        }
    }

    /// Carries a verdict out on a queued request's context, if it still exists.
    fn deliver(&self, pending: &Pending, verdict: Verdict, slots: Slots) {
        let allowed = matches!(verdict, Verdict::Allow { .. });
        if WasmHost.set_effective_context(pending.context_id).is_err() {
            // The client went away while we asked; give back what was taken for it.
            if allowed {
                let _ = WasmHost.set_effective_context(self.root_context_id);
                self.release(&slots);
            }
            return;
        }
        self.count(&verdict);
        match verdict {
            Verdict::Allow {
                response_headers, ..
            } => {
                self.allowed
                    .borrow_mut()
                    .insert(pending.context_id, (response_headers, slots));
                if let Err(e) = WasmHost.resume_request() {
                    warn!("resuming request {} failed: {e}", pending.context_id);
                }
            }
            Verdict::Deny(reply) => {
                if let Err(e) = WasmHost.send_local_reply(&reply) {
                    warn!(
                        "sending the local reply to {} failed: {e}",
                        pending.context_id
                    );
                }
            }
        }
    }

    /// The watchdog: fails whatever waited past the callout timeout, then sends what is queued.
    fn on_tick(&self) {
        self.refresh_clock();
        let deadline = self.config.shim.timeout.as_millis() as u64 + WATCHDOG_GRACE_MS;
        let expired = self
            .batcher
            .borrow_mut()
            .expired(self.gateway_ms(), deadline);
        if !expired.is_empty() {
            self.fail_all(expired, &Failure::Status(504));
        }
        self.flush();
    }
}

/// Logs at `level` at most once per [`LOG_INTERVAL_MS`] per worker, saying how many lines it
/// held back since; the held-back ones go to debug.
fn log_throttled(
    throttle: &RefCell<LogThrottle>,
    level: log::Level,
    message: impl FnOnce(u64) -> String,
) {
    match throttle
        .borrow_mut()
        .admit(WasmHost.now_ms(), LOG_INTERVAL_MS)
    {
        Some(held_back) => log::log!(level, "{}", message(held_back)),
        None if log::log_enabled!(log::Level::Debug) => debug!("{}", message(0)),
        None => {}
    }
}

fn slots_of(checks: &[Check]) -> Slots {
    checks
        .iter()
        .filter_map(|c| c.slot())
        .map(|(k, id)| (k.to_string(), id.to_string()))
        .collect()
}

/// Metric ids from the host, defined once per VM.
struct Metrics {
    counters: Vec<(Counter, u32)>,
    callout_ms: u32,
    /// Per rule: (denied, shadow-denied).
    rules: Vec<(u32, u32)>,
}

impl Metrics {
    fn define(host: &impl Host, config: &Config) -> Result<Metrics, HostError> {
        let counters = Counter::ALL
            .iter()
            .map(|&c| Ok((c, host.define_metric(MetricType::Counter, c.name())?)))
            .collect::<Result<_, HostError>>()?;
        let rules = config
            .rules
            .iter()
            .map(|r| {
                Ok((
                    host.define_metric(MetricType::Counter, &metrics::rule_denied(&r.name))?,
                    host.define_metric(MetricType::Counter, &metrics::rule_shadow_denied(&r.name))?,
                ))
            })
            .collect::<Result<_, HostError>>()?;
        Ok(Metrics {
            counters,
            callout_ms: host.define_metric(MetricType::Histogram, metrics::CALLOUT_DURATION)?,
            rules,
        })
    }

    fn bump(&self, host: &impl Host, counter: Counter) {
        if let Some(&(_, id)) = self.counters.iter().find(|(k, _)| *k == counter) {
            host.increment_metric(id, 1);
        }
    }

    fn count(&self, host: &impl Host, outcome: &Outcome<'_>) {
        for c in metrics::counters(outcome) {
            self.bump(host, c);
        }
        let (rules, shadow) = match outcome {
            Outcome::Denied { rules } => (*rules, false),
            Outcome::Allowed { shadow_denied } => (*shadow_denied, true),
            Outcome::FailedOpen | Outcome::FailedClosed | Outcome::FailedLocal => return,
        };
        for &i in rules {
            if let Some(&(denied, shadow_denied)) = self.rules.get(i) {
                host.increment_metric(if shadow { shadow_denied } else { denied }, 1);
            }
        }
    }
}

/// The root context: builds the [`Plugin`] on configure and hands it to every HTTP context;
/// with coalescing, it also sends batches and hands out their verdicts.
struct TollgateRoot {
    context_id: u32,
    plugin: Option<Rc<Plugin>>,
}

impl Context for TollgateRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        if let Some(plugin) = &self.plugin {
            plugin.on_batch_reply(token_id, num_headers, body_size);
        }
    }
}

impl RootContext for TollgateRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        // Follow the host's log level so disabled debug lines cost nothing.
        if let Ok(level) = proxy_wasm::hostcalls::get_log_level() {
            log::set_max_level(to_filter(level));
        }
        let config = match Config::from_json(&WasmHost.plugin_configuration()) {
            Ok(config) => config,
            Err(e) => {
                error!("{e}");
                return false;
            }
        };
        let metrics = match Metrics::define(&WasmHost, &config) {
            Ok(m) => m,
            Err(e) => {
                error!("defining metrics failed: {e}");
                return false;
            }
        };
        info!(
            "loaded {} rules, shim {} {}, failure mode {:?}, coalescing {}",
            config.rules.len(),
            config.shim.upstream,
            config.shim.path,
            config.failure_mode,
            config.coalesce
        );
        if config.coalesce {
            WasmHost.set_tick_period_ms(TICK_MS);
        } else if config.correct_clock_skew {
            // Only to pick up the clock offset other workers learned.
            WasmHost.set_tick_period_ms(CLOCK_TICK_MS);
        }
        // Seeded by the host's random source (WASI random_get).
        let id_prefix = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        // Named per VM (so per worker): each worker's root gets its own kicks.
        let kick_queue = if config.coalesce {
            WasmHost
                .register_queue(&format!("tollgate.kick.{id_prefix:016x}"))
                .ok()
        } else {
            None
        };
        self.plugin = Some(Rc::new(Plugin {
            config,
            root_context_id: self.context_id,
            metrics,
            failures: RefCell::new(LogThrottle::default()),
            shadow_denials: RefCell::new(LogThrottle::default()),
            id_prefix,
            next_id: Cell::new(0),
            batcher: RefCell::new(Batcher::new(Limits::default())),
            local: RefCell::new(LocalLimiter::default()),
            breaker: RefCell::new(Breaker::default()),
            skew: Cell::new(SkewEstimator::default()),
            kick_queue,
            kick_pending: Cell::new(false),
            allowed: RefCell::new(HashMap::new()),
            near: RefCell::new(cache::Near::default()),
        }));
        true
    }

    fn on_tick(&mut self) {
        if let Some(plugin) = &self.plugin {
            plugin.on_tick();
        }
    }

    fn on_queue_ready(&mut self, _queue_id: u32) {
        if let Some(plugin) = &self.plugin {
            plugin.on_kick();
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let plugin = self.plugin.clone()?;
        Some(Box::new(TollgateHttp {
            context_id,
            plugin,
            state: State::Idle,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Where one request is in its check.
enum State {
    /// Nothing sent yet (or no rule applied).
    Idle,
    /// Paused, waiting for the reply to its own callout `token`, sent at `sent_ms`.
    Awaiting {
        token: u32,
        sent_ms: u64,
        checks: Vec<Check>,
    },
    /// Paused in the worker's batch queue; the root will decide it.
    Queued,
    /// Decided and allowed: headers to add to the response, concurrency slots to release.
    Allowed {
        response_headers: Vec<(String, String)>,
        slots: Slots,
    },
    /// Decided and answered locally.
    Denied,
}

struct TollgateHttp {
    context_id: u32,
    plugin: Rc<Plugin>,
    state: State,
}

impl TollgateHttp {
    /// Counts a verdict and carries it out.
    fn apply(&mut self, verdict: Verdict, paused: bool, slots: Slots) -> Action {
        self.plugin.count(&verdict);
        self.carry_out(verdict, paused, slots)
    }

    /// Applies the failure mode (logged and counted as a failure).
    fn fail(&mut self, failure: Failure, checks: &[Check], paused: bool) -> Action {
        let verdict = self.plugin.failure_verdict(&failure, checks);
        self.carry_out(verdict, paused, Vec::new())
    }

    /// Resumes (allow) or answers locally (deny). `paused`: the request is waiting on us and
    /// must be resumed. `slots`: the concurrency slots the verdict acquired, if it allows.
    fn carry_out(&mut self, verdict: Verdict, paused: bool, slots: Slots) -> Action {
        match verdict {
            Verdict::Allow {
                response_headers, ..
            } => {
                self.state = State::Allowed {
                    response_headers,
                    slots,
                };
                if paused {
                    if let Err(e) = WasmHost.resume_request() {
                        warn!("resuming the request failed: {e}");
                    }
                }
                Action::Continue
            }
            Verdict::Deny(reply) => {
                self.state = State::Denied;
                if let Err(e) = WasmHost.send_local_reply(&reply) {
                    warn!("sending the local reply failed: {e}");
                }
                Action::Pause
            }
        }
    }

    /// Sends this request's checks in a callout of its own.
    fn dispatch_alone(&mut self, checks: Vec<Check>, now_ms: u64) -> Action {
        let plugin = self.plugin.clone();
        let body = wire::encode(&[&checks]);
        match WasmHost.dispatch(&plugin.config.shim, &body) {
            Ok(token) => {
                self.state = State::Awaiting {
                    token,
                    sent_ms: now_ms,
                    checks,
                };
                Action::Pause
            }
            Err(e) => {
                if plugin.config.coalesce {
                    plugin.batcher.borrow_mut().alone_done();
                }
                self.fail(Failure::Dispatch(e.to_string()), &checks, false)
            }
        }
    }
}

impl Context for TollgateHttp {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let (sent_ms, checks) = match std::mem::replace(&mut self.state, State::Idle) {
            State::Awaiting {
                token,
                sent_ms,
                checks,
            } if token == token_id => (sent_ms, checks),
            other => {
                debug!("ignoring reply to unknown callout {token_id}");
                self.state = other;
                return;
            }
        };
        let plugin = self.plugin.clone();
        if plugin.config.coalesce {
            let waiting = {
                let mut batcher = plugin.batcher.borrow_mut();
                batcher.alone_done();
                batcher.queued() > 0 && batcher.batches_in_flight() == 0
            };
            if waiting {
                plugin.kick();
            }
        }
        let received_ms = plugin.gateway_ms();
        WasmHost.record_metric(
            plugin.metrics.callout_ms,
            received_ms.saturating_sub(sent_ms),
        );
        let data = CalloutData::read(num_headers, body_size);
        let now_ms = plugin.now();
        match decision::from_batch_callout(&plugin.config, &[&checks], data.reply(), now_ms) {
            Ok(decided) => {
                plugin.breaker.borrow_mut().succeeded();
                plugin.observe_clock(sent_ms, received_ms, decided.server_now_ms);
                let Some((verdict, exhausted)) = decided.verdicts.into_iter().next() else {
                    self.fail(Failure::NoStatus, &checks, true);
                    return;
                };
                debug!("{} checks, verdict {verdict:?}", checks.len());
                plugin.remember_exhausted(&exhausted, now_ms);
                self.apply(verdict, true, slots_of(&checks));
            }
            Err(failure) => {
                self.fail(failure, &checks, true);
            }
        }
    }
}

impl HttpContext for TollgateHttp {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let plugin = self.plugin.clone();
        let request_id = if plugin.config.needs_request_id {
            plugin.request_id()
        } else {
            String::new()
        };
        let gateway_ms = plugin.gateway_ms();
        let now_ms = plugin.corrected(gateway_ms);
        let checks = checks_for(&plugin.config, &WasmHost, now_ms, &request_id);
        if checks.is_empty() {
            return Action::Continue;
        }
        if plugin.config.over_limit_cache {
            let hits = plugin.cached_denials(&checks, now_ms);
            if !hits.is_empty() {
                plugin.metrics.bump(&WasmHost, Counter::CacheHits);
                let verdict = decision::from_cache(&plugin.config, &checks, &hits, now_ms);
                return self.apply(verdict, false, Vec::new());
            }
        }
        if !plugin.may_call(gateway_ms) {
            return self.fail(Failure::CircuitOpen, &checks, false);
        }
        let sent_ms = gateway_ms;
        if !plugin.config.coalesce {
            return self.dispatch_alone(checks, sent_ms);
        }
        let alone = plugin.batcher.borrow_mut().try_alone();
        if alone {
            return self.dispatch_alone(checks, sent_ms);
        }
        let idle_root = {
            let mut batcher = plugin.batcher.borrow_mut();
            batcher.enqueue(self.context_id, checks, sent_ms);
            batcher.batches_in_flight() == 0
        };
        if idle_root {
            // Only a request's own callout is in flight: nothing would send the queue before
            // the next tick.
            plugin.kick();
        }
        self.state = State::Queued;
        Action::Pause
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if let State::Queued = self.state {
            // The root allowed this request: take its verdict.
            if let Some((response_headers, slots)) =
                self.plugin.allowed.borrow_mut().remove(&self.context_id)
            {
                self.state = State::Allowed {
                    response_headers,
                    slots,
                };
            }
        }
        if let State::Allowed {
            response_headers, ..
        } = &self.state
        {
            for (name, value) in response_headers {
                if let Err(e) = WasmHost.add_response_header(name, value) {
                    debug!("adding response header {name} failed: {e}");
                }
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let plugin = self.plugin.clone();
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Allowed { slots, .. } => plugin.release(&slots),
            State::Queued => {
                // Ended before or without passing through response headers.
                plugin.batcher.borrow_mut().cancel(self.context_id);
                if let Some((_, slots)) = plugin.allowed.borrow_mut().remove(&self.context_id) {
                    plugin.release(&slots);
                }
            }
            // Our own callout is cancelled with the stream: the worker is free again.
            State::Awaiting { .. } if plugin.config.coalesce => {
                plugin.batcher.borrow_mut().alone_done()
            }
            _ => {}
        }
    }
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
    fn read(num_headers: usize, body_size: usize) -> CalloutData {
        let has_headers = num_headers > 0;
        CalloutData {
            status: has_headers.then(|| WasmHost.callout_status()).flatten(),
            dispatch_status: has_headers
                .then(|| WasmHost.callout_dispatch_status())
                .flatten(),
            body: if body_size > 0 {
                WasmHost.callout_body(body_size)
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

fn to_filter(level: LogLevel) -> log::LevelFilter {
    match level {
        LogLevel::Trace => log::LevelFilter::Trace,
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Warn => log::LevelFilter::Warn,
        LogLevel::Error | LogLevel::Critical => log::LevelFilter::Error,
    }
}
