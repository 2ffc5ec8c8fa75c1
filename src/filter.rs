//! The proxy-wasm contexts: the thin glue between the host and the pure logic.
//!
//! Per request: match rules → one callout to the shim with every check → pause → on the
//! reply, `decision::from_callout` → resume (allow) or send a local reply (deny). Any failure
//! goes through `decision::on_failure`, the one place the failure mode is applied.

use std::cell::{Cell, RefCell};
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;

use log::{debug, error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

use crate::cache;
use crate::config::{Config, FailureMode};
use crate::decision::{self, CalloutReply, Failure, Verdict};
use crate::host::{Host, HostError, WasmHost};
use crate::metrics::{self, Counter, Outcome};
use crate::request::{checks_for, Check};
use crate::throttle::LogThrottle;
use crate::wire;

/// A recurring failure or shadow denial is logged at most this often per worker; the rest at
/// debug.
const LOG_INTERVAL_MS: u64 = 10_000;

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

/// The root context: builds the [`Plugin`] on configure and hands it to every HTTP context.
struct TollgateRoot {
    context_id: u32,
    plugin: Option<Rc<Plugin>>,
}

/// Everything the HTTP contexts of one configured plugin share.
struct Plugin {
    config: Config,
    root_context_id: u32,
    metrics: Metrics,
    failures: RefCell<LogThrottle>,
    shadow_denials: RefCell<LogThrottle>,
    /// Request ids: a random per-VM prefix and a counter, unique across gateways and workers.
    id_prefix: u64,
    next_id: Cell<u64>,
}

impl Plugin {
    fn request_id(&self) -> String {
        let n = self.next_id.get();
        self.next_id.set(n.wrapping_add(1));
        format!("{:016x}-{n:x}", self.id_prefix)
    }
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
            Outcome::FailedOpen | Outcome::FailedClosed => return,
        };
        for &i in rules {
            if let Some(&(denied, shadow_denied)) = self.rules.get(i) {
                host.increment_metric(if shadow { shadow_denied } else { denied }, 1);
            }
        }
    }
}

impl Context for TollgateRoot {}

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
            "loaded {} rules, shim {} {}, failure mode {:?}",
            config.rules.len(),
            config.shim.upstream,
            config.shim.path,
            config.failure_mode
        );
        // Seeded by the host's random source (WASI random_get).
        let id_prefix = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        self.plugin = Some(Rc::new(Plugin {
            config,
            root_context_id: self.context_id,
            metrics,
            failures: RefCell::new(LogThrottle::default()),
            shadow_denials: RefCell::new(LogThrottle::default()),
            id_prefix,
            next_id: Cell::new(0),
        }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let plugin = self.plugin.clone()?;
        Some(Box::new(TollgateHttp {
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
    /// Paused, waiting for the reply to callout `token`, sent at `sent_ms`.
    Awaiting {
        token: u32,
        sent_ms: u64,
        checks: Vec<Check>,
    },
    /// Decided and allowed: headers to add to the response, concurrency slots to release.
    Allowed {
        response_headers: Vec<(String, String)>,
        slots: Vec<(String, String)>,
    },
    /// Decided and answered locally.
    Denied,
}

struct TollgateHttp {
    plugin: Rc<Plugin>,
    state: State,
}

impl TollgateHttp {
    /// Carries out a verdict. `paused`: the request is waiting on us and must be resumed.
    /// `slots`: the concurrency slots the verdict acquired, if it allows.
    fn apply(&mut self, verdict: Verdict, paused: bool, slots: Vec<(String, String)>) -> Action {
        match verdict {
            Verdict::Allow {
                response_headers,
                shadow_denials,
            } => {
                self.log_shadow_denials(&shadow_denials);
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

    /// Counts a decided request and carries the verdict out.
    fn decided(&mut self, verdict: Verdict, slots: Vec<(String, String)>, paused: bool) -> Action {
        let outcome = match &verdict {
            Verdict::Allow { shadow_denials, .. } => Outcome::Allowed {
                shadow_denied: shadow_denials,
            },
            Verdict::Deny(reply) => Outcome::Denied {
                rules: &reply.denied_by,
            },
        };
        self.plugin.metrics.count(&WasmHost, &outcome);
        self.apply(verdict, paused, slots)
    }

    fn log_shadow_denials(&self, rules: &[usize]) {
        for &i in rules {
            let name = self
                .plugin
                .config
                .rules
                .get(i)
                .map_or("?", |r| r.name.as_str());
            let admitted = self
                .plugin
                .shadow_denials
                .borrow_mut()
                .admit(WasmHost.now_ms(), LOG_INTERVAL_MS);
            match admitted {
                Some(suppressed) => info!(
                    "rule {name} (shadow mode) would have denied a request ({suppressed} more shadow denials not logged)"
                ),
                None => debug!("rule {name} (shadow mode) would have denied this request"),
            }
        }
    }

    /// Logs a failure (throttled), counts it and applies the failure mode.
    fn fail(&mut self, failure: Failure, paused: bool) -> Action {
        let config = &self.plugin.config;
        let admitted = self
            .plugin
            .failures
            .borrow_mut()
            .admit(WasmHost.now_ms(), LOG_INTERVAL_MS);
        match admitted {
            Some(suppressed) => warn!(
                "{failure}; applying failure mode {:?} ({suppressed} similar failures not logged)",
                config.failure_mode
            ),
            None => debug!("{failure}"),
        }
        let outcome = match config.failure_mode {
            FailureMode::Allow => Outcome::FailedOpen,
            FailureMode::Deny => Outcome::FailedClosed,
        };
        self.plugin.metrics.count(&WasmHost, &outcome);
        // Nothing was acquired in Redis: no slots to release.
        let verdict = decision::on_failure(config);
        self.apply(verdict, paused, Vec::new())
    }

    /// Gives back the concurrency slots this request held, once it has ended.
    fn release_slots(&mut self) {
        let State::Allowed { slots, .. } = &mut self.state else {
            return;
        };
        if slots.is_empty() {
            return;
        }
        let pairs: Vec<(&str, &str)> = slots
            .iter()
            .map(|(k, id)| (k.as_str(), id.as_str()))
            .collect();
        let body = wire::encode_release(&pairs);
        let plugin = &self.plugin;
        if let Err(e) =
            WasmHost.dispatch_release(plugin.root_context_id, &plugin.config.shim, &body)
        {
            // The slot frees itself when its timeout passes.
            debug!("releasing {} concurrency slots failed: {e}", pairs.len());
        }
        slots.clear();
    }
}

impl Context for TollgateHttp {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _headers: usize,
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
        WasmHost.record_metric(
            plugin.metrics.callout_ms,
            WasmHost.now_ms().saturating_sub(sent_ms),
        );
        let body = WasmHost.callout_body(body_size);
        let dispatch_status = WasmHost.callout_dispatch_status();
        let reply = CalloutReply {
            status: WasmHost.callout_status(),
            dispatch_status: dispatch_status.as_deref(),
            body: &body,
        };
        let now_ms = WasmHost.now_ms();
        match decision::from_callout(&plugin.config, &checks, reply, now_ms) {
            Ok((verdict, exhausted)) => {
                debug!("{} checks, verdict {verdict:?}", checks.len());
                for entry in &exhausted {
                    WasmHost.shared_set(&cache::slot(&entry.key), &cache::encode(entry));
                }
                let slots = checks
                    .iter()
                    .filter_map(|c| c.slot())
                    .map(|(k, id)| (k.to_string(), id.to_string()))
                    .collect();
                self.decided(verdict, slots, true);
            }
            Err(failure) => {
                self.fail(failure, true);
            }
        }
    }
}

impl HttpContext for TollgateHttp {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let plugin = self.plugin.clone();
        let request_id = plugin.request_id();
        let now_ms = WasmHost.now_ms();
        let checks = checks_for(&plugin.config, &WasmHost, now_ms, &request_id);
        if checks.is_empty() {
            return Action::Continue;
        }
        if plugin.config.over_limit_cache {
            let hits = cached_denials(&checks, now_ms);
            if !hits.is_empty() {
                plugin.metrics.bump(&WasmHost, Counter::CacheHits);
                let verdict = decision::from_cache(&plugin.config, &checks, &hits, now_ms);
                return self.decided(verdict, Vec::new(), false);
            }
        }
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
            Err(e) => self.fail(Failure::Dispatch(e.to_string()), false),
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
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
        self.release_slots();
    }
}

/// The checks the over-limit cache denies right now, with their entries.
fn cached_denials(checks: &[Check], now_ms: u64) -> Vec<(usize, cache::Entry)> {
    checks
        .iter()
        .enumerate()
        .filter(|(_, c)| c.cost > 0 && !c.shadow)
        .filter_map(|(i, c)| {
            let entry = cache::decode(&WasmHost.shared_get(&cache::slot(&c.key))?)?;
            cache::denies(&entry, c, now_ms).then_some((i, entry))
        })
        .collect()
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
