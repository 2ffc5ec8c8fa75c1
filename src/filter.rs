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
use proxy_wasm::types::{Action, ContextType, LogLevel};

use crate::config::Config;
use crate::decision::{self, CalloutReply, Failure, Verdict};
use crate::host::{Host, WasmHost};
use crate::request::{checks_for, Check};
use crate::throttle::LogThrottle;
use crate::wire;

/// A failure is logged at warn at most this often per worker; the rest at debug.
const FAILURE_LOG_INTERVAL_MS: u64 = 10_000;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        // A panic aborts the VM: say why at the highest level before it goes.
        let _ = proxy_wasm::hostcalls::log(LogLevel::Critical, &format!("tollgate panicked: {info}"));
    }));
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> { Box::new(TollgateRoot::new(context_id)) });
}}

/// Per-plugin state: the compiled configuration, shared by every HTTP context.
struct TollgateRoot {
    config: Option<Rc<Config>>,
    shared: Rc<Shared>,
}

/// What the HTTP contexts of one plugin share.
struct Shared {
    root_context_id: u32,
    failures: RefCell<LogThrottle>,
    shadow_denials: RefCell<LogThrottle>,
    /// Request ids: a random per-VM prefix and a counter, unique across gateways and workers.
    id_prefix: u64,
    next_id: Cell<u64>,
}

impl Shared {
    fn request_id(&self) -> String {
        let n = self.next_id.get();
        self.next_id.set(n.wrapping_add(1));
        format!("{:016x}-{n:x}", self.id_prefix)
    }
}

impl TollgateRoot {
    fn new(context_id: u32) -> Self {
        // Seeded by the host's random source (WASI random_get).
        let id_prefix = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        TollgateRoot {
            config: None,
            shared: Rc::new(Shared {
                root_context_id: context_id,
                failures: RefCell::new(LogThrottle::default()),
                shadow_denials: RefCell::new(LogThrottle::default()),
                id_prefix,
                next_id: Cell::new(0),
            }),
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
        match Config::from_json(&WasmHost.plugin_configuration()) {
            Ok(config) => {
                info!(
                    "loaded {} rules, shim {} {}, failure mode {:?}",
                    config.rules.len(),
                    config.shim.upstream,
                    config.shim.path,
                    config.failure_mode
                );
                self.config = Some(Rc::new(config));
                true
            }
            Err(e) => {
                error!("{e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(TollgateHttp {
            config,
            shared: self.shared.clone(),
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
    /// Paused, waiting for the reply to callout `token`.
    Awaiting { token: u32, checks: Vec<Check> },
    /// Decided and allowed: headers to add to the response, concurrency slots to release.
    Allowed {
        response_headers: Vec<(String, String)>,
        slots: Vec<(String, String)>,
    },
    /// Decided and answered locally.
    Denied,
}

struct TollgateHttp {
    config: Rc<Config>,
    shared: Rc<Shared>,
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

    fn log_shadow_denials(&self, rules: &[usize]) {
        for &i in rules {
            let name = self.config.rules.get(i).map_or("?", |r| r.name.as_str());
            let admitted = self
                .shared
                .shadow_denials
                .borrow_mut()
                .admit(WasmHost.now_ms(), FAILURE_LOG_INTERVAL_MS);
            match admitted {
                Some(suppressed) => info!(
                    "rule {name} (shadow mode) would have denied a request ({suppressed} more shadow denials not logged)"
                ),
                None => debug!("rule {name} (shadow mode) would have denied this request"),
            }
        }
    }

    /// Logs a failure (throttled) and applies the failure mode.
    fn fail(&mut self, failure: Failure, paused: bool) -> Action {
        let admitted = self
            .shared
            .failures
            .borrow_mut()
            .admit(WasmHost.now_ms(), FAILURE_LOG_INTERVAL_MS);
        match admitted {
            Some(suppressed) => warn!(
                "{failure}; applying failure mode {:?} ({suppressed} similar failures not logged)",
                self.config.failure_mode
            ),
            None => debug!("{failure}"),
        }
        // Nothing was acquired in Redis: no slots to release.
        self.apply(decision::on_failure(&self.config), paused, Vec::new())
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
        let checks = match std::mem::replace(&mut self.state, State::Idle) {
            State::Awaiting { token, checks } if token == token_id => checks,
            other => {
                debug!("ignoring reply to unknown callout {token_id}");
                self.state = other;
                return;
            }
        };
        let body = WasmHost.callout_body(body_size);
        let dispatch_status = WasmHost.callout_dispatch_status();
        let reply = CalloutReply {
            status: WasmHost.callout_status(),
            dispatch_status: dispatch_status.as_deref(),
            body: &body,
        };
        match decision::from_callout(&self.config, &checks, reply) {
            Ok(verdict) => {
                debug!("{} checks, verdict {verdict:?}", checks.len());
                let slots = checks
                    .iter()
                    .filter_map(|c| c.slot())
                    .map(|(k, id)| (k.to_string(), id.to_string()))
                    .collect();
                self.apply(verdict, true, slots);
            }
            Err(failure) => {
                self.fail(failure, true);
            }
        }
    }
}

impl HttpContext for TollgateHttp {
    fn on_log(&mut self) {
        self.release_slots();
    }

    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let request_id = self.shared.request_id();
        let checks = checks_for(&self.config, &WasmHost, WasmHost.now_ms(), &request_id);
        if checks.is_empty() {
            return Action::Continue;
        }
        let body = wire::encode(&[&checks]);
        match WasmHost.dispatch(&self.config.shim, &body) {
            Ok(token) => {
                self.state = State::Awaiting { token, checks };
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
}

impl TollgateHttp {
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
        if let Err(e) =
            WasmHost.dispatch_release(self.shared.root_context_id, &self.config.shim, &body)
        {
            // The slot frees itself when its timeout passes.
            debug!("releasing {} concurrency slots failed: {e}", pairs.len());
        }
        slots.clear();
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
