//! The proxy-wasm contexts: glue that forwards each host callback to the worker's [`Engine`].
//!
//! Everything about a request's lifecycle (queueing, batching, verdicts, slots, the breaker,
//! the over-limit cache) is in `engine`, tested natively; this file only parses the
//! configuration, builds the engine, and forwards.

use std::cell::RefCell;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;

use log::{error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use crate::config::Config;
use crate::engine::{self, Engine};
use crate::wasm_host::WasmHost;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        // A panic aborts the VM: say why at the highest level before it goes.
        let _ = proxy_wasm::hostcalls::log(LogLevel::Critical, &format!("tollgate panicked: {info}"));
    }));
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(TollgateRoot { context_id, engine: None })
    });
}}

/// The worker's engine, shared by its root and HTTP contexts.
type Shared = Rc<RefCell<Engine<WasmHost>>>;

thread_local! {
    /// Random per VM (so per worker), drawn once: request ids and the kick queue's name. It
    /// outlives reloads, so a new configuration reuses the worker's queue.
    static VM_ID: u64 = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
}

/// Runs `f` on the engine. Hosts defer resuming and local replies until the callback
/// returns, so the engine is never entered twice; if one did, the event is logged, not lost
/// silently (and the watchdog still answers the request).
fn with(engine: &Shared, f: impl FnOnce(&mut Engine<WasmHost>)) {
    match engine.try_borrow_mut() {
        Ok(mut e) => f(&mut e),
        Err(_) => error!("tollgate: host callback re-entered the engine; event dropped"),
    }
}

/// The root context: builds the engine on configure; ticks, kicks and batch replies.
struct TollgateRoot {
    context_id: u32,
    engine: Option<Shared>,
}

impl Context for TollgateRoot {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _: usize) {
        if let Some(e) = &self.engine {
            with(e, |e| e.on_callout_reply(token, headers, body, true));
        }
    }
}

impl RootContext for TollgateRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let config = match Config::from_json(&WasmHost.plugin_configuration()) {
            Ok(config) => config,
            Err(e) => {
                error!("{e}");
                return false;
            }
        };
        // The level comes from the configuration, never from the host (see `config::parse::LogLevel`).
        log::set_max_level(config.log_level);
        let caps = WasmHost.capabilities(self.context_id);
        info!(
            "loaded {} rules, shim {} {}, failure mode {:?}, host {}",
            config.rules.len(),
            config.shim.upstream,
            config.shim.path,
            config.failure_mode,
            caps.name()
        );
        let vm_id = VM_ID.with(|id| *id);
        match Engine::new(WasmHost, config, caps, self.context_id, vm_id) {
            Ok(e) => {
                if e.config().coalesce && !e.coalescing() {
                    warn!(
                        "coalescing is off on {}: it cannot resume a request from the root \
                         context (set_effective_context does nothing there), so each request \
                         sends its own callout",
                        caps.name()
                    );
                } else {
                    info!("coalescing {}", e.coalescing());
                }
                self.engine = Some(Rc::new(RefCell::new(e)));
                true
            }
            Err(e) => {
                error!("defining metrics failed: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(e) = &self.engine {
            with(e, Engine::on_tick);
        }
    }

    fn on_queue_ready(&mut self, _queue_id: u32) {
        if let Some(e) = &self.engine {
            with(e, Engine::on_queue_ready);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let engine = self.engine.clone()?;
        Some(Box::new(TollgateHttp { context_id, engine }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request's context: forwards its callbacks.
struct TollgateHttp {
    context_id: u32,
    engine: Shared,
}

impl Context for TollgateHttp {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _: usize) {
        with(&self.engine, |e| {
            e.on_callout_reply(token, headers, body, false)
        });
    }
}

impl HttpContext for TollgateHttp {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let mut action = engine::Action::Continue;
        with(&self.engine, |e| {
            action = e.on_request_headers(self.context_id)
        });
        match action {
            engine::Action::Continue => Action::Continue,
            engine::Action::Pause => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        with(&self.engine, |e| e.on_response_headers(self.context_id));
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        with(&self.engine, |e| {
            e.on_response_body(self.context_id, body_size)
        });
        Action::Continue
    }

    fn on_log(&mut self) {
        with(&self.engine, |e| e.on_done(self.context_id));
    }
}
