//! The proxy-wasm contexts: the thin glue between the host and the pure logic.
//!
//! Per request: match rules → one callout to the shim with every check → pause → on the
//! reply, `decision::from_callout` → resume (allow) or send a local reply (deny). Any failure
//! goes through `decision::on_failure`, the one place the failure mode is applied.

use std::cell::RefCell;
use std::rc::Rc;

use log::{debug, error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use crate::config::Config;
use crate::decision::{self, Failure, Verdict};
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
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(TollgateRoot::default()) });
}}

/// Per-plugin state: the compiled configuration, shared by every HTTP context.
#[derive(Default)]
struct TollgateRoot {
    config: Option<Rc<Config>>,
    failures: Rc<RefCell<LogThrottle>>,
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
            failures: self.failures.clone(),
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
    /// Decided and allowed: headers to add to the response.
    Allowed { response_headers: Vec<(String, String)> },
    /// Decided and answered locally.
    Denied,
}

struct TollgateHttp {
    config: Rc<Config>,
    failures: Rc<RefCell<LogThrottle>>,
    state: State,
}

impl TollgateHttp {
    /// Carries out a verdict. `paused`: the request is waiting on us and must be resumed.
    fn apply(&mut self, verdict: Verdict, paused: bool) -> Action {
        match verdict {
            Verdict::Allow { response_headers } => {
                self.state = State::Allowed { response_headers };
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

    /// Logs a failure (throttled) and applies the failure mode.
    fn fail(&mut self, failure: Failure, paused: bool) -> Action {
        let admitted = self
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
        self.apply(decision::on_failure(&self.config), paused)
    }
}

impl Context for TollgateHttp {
    fn on_http_call_response(&mut self, token_id: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let checks = match std::mem::replace(&mut self.state, State::Idle) {
            State::Awaiting { token, checks } if token == token_id => checks,
            other => {
                debug!("ignoring reply to unknown callout {token_id}");
                self.state = other;
                return;
            }
        };
        let status = WasmHost.callout_status();
        let body = WasmHost.callout_body(body_size);
        match decision::from_callout(&self.config, &checks, status, &body) {
            Ok(verdict) => {
                debug!("{} checks, verdict {verdict:?}", checks.len());
                self.apply(verdict, true);
            }
            Err(failure) => {
                self.fail(failure, true);
            }
        }
    }
}

impl HttpContext for TollgateHttp {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let checks = checks_for(&self.config, &WasmHost, WasmHost.now_ms());
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
        if let State::Allowed { response_headers } = &self.state {
            for (name, value) in response_headers {
                if let Err(e) = WasmHost.add_response_header(name, value) {
                    debug!("adding response header {name} failed: {e}");
                }
            }
        }
        Action::Continue
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
