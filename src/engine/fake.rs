//! A fake [`Host`] for the engine's tests: it records every call, models the proxy-wasm SDK's
//! routing of callout replies, and holds the request headers of each live context.
//!
//! Like Kuadrant wasm-shim's `MockWasmHost`: no network, no clock of its own — the test moves
//! time and decides what each callout answers.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use crate::config::ShimTarget;
use crate::decision::LocalReply;
use crate::host::{Host, HostCaps, HostError, MetricKind};
use crate::request::RequestView;

/// A callout the engine sent and nobody answered yet.
#[derive(Debug, Clone)]
pub struct Callout {
    pub token: u32,
    /// The context whose callback was running: where the SDK routes the reply.
    pub callback_ctx: u32,
    pub path: String,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
    pub sent_ms: u64,
}

/// Everything the fake host knows; shared by the test and the engine's host handle.
#[derive(Debug, Default)]
pub struct World {
    pub now_ms: u64,
    pub root: u32,
    /// The context whose callback is running (the SDK's "active" context).
    pub callback_ctx: u32,
    pub effective: u32,
    pub live: HashSet<u32>,
    pub request_headers: HashMap<u32, Vec<(String, String)>>,
    pub callouts: Vec<Callout>,
    next_token: u32,
    /// The reply being delivered: status and body.
    pub reply: Option<(Option<u32>, Vec<u8>)>,
    pub resumed: HashMap<u32, u32>,
    pub answered: HashMap<u32, Vec<LocalReply>>,
    pub response_headers: HashMap<u32, Vec<(String, String)>>,
    /// The upstream's response headers per context, and the body chunk being delivered.
    pub upstream_headers: HashMap<u32, Vec<(String, String)>>,
    pub body_chunk: Vec<u8>,
    pub metric_names: Vec<String>,
    pub metric_values: HashMap<u32, i64>,
    pub shared: HashMap<String, Vec<u8>>,
    /// Each shared-data key's version (bumped by every write).
    pub shared_versions: HashMap<String, u32>,
    /// Make the next this-many compare-and-swaps lose a race.
    pub cas_conflicts: usize,
    /// Another worker stores the units of this lease record (its grant) in this slot just
    /// after our next read of it: added to the record there when it is the same key's, written
    /// over an empty or missing slot (when the slot did not exist it had no version to compare,
    /// as on Envoy), not at all when another key's units are there.
    pub racing_grant: Option<(String, Vec<u8>)>,
    /// Units the racing grants stored.
    pub racing_landed: u64,
    pub queue_items: usize,
    /// Names of the shared queues registered, in order.
    pub queues: Vec<String>,
    pub tick_ms: u64,
    /// Calls made on a context that was not live (must never happen).
    pub misuse: Vec<String>,
    /// Fail every dispatch with this error.
    pub dispatch_fails: bool,
    /// Behave like ngx_wasm_module: `set_effective_context` is a no-op, resuming or answering
    /// from the root crashes the worker, `on_log` cannot dispatch, shared queues trap, and
    /// the host's own callout timeout calls back (see `Harness::tick`).
    pub ngx: bool,
    /// `on_log` is running.
    pub in_log: bool,
}

/// The engine's handle on the world.
#[derive(Clone, Default)]
pub struct FakeHost(pub Rc<RefCell<World>>);

impl FakeHost {
    pub fn new(root: u32) -> FakeHost {
        let host = FakeHost::default();
        {
            let mut w = host.0.borrow_mut();
            w.root = root;
            w.callback_ctx = root;
            w.effective = root;
            w.live.insert(root);
            w.next_token = 1;
        }
        host
    }

    pub fn w(&self) -> std::cell::RefMut<'_, World> {
        self.0.borrow_mut()
    }

    /// A metric's value by name (0 if never bumped).
    pub fn metric(&self, name: &str) -> i64 {
        let w = self.0.borrow();
        w.metric_names
            .iter()
            .position(|n| n == name)
            .and_then(|id| w.metric_values.get(&(id as u32)).copied())
            .unwrap_or(0)
    }

    /// The capabilities the engine is given for this fake.
    pub fn caps(&self) -> HostCaps {
        if self.0.borrow().ngx {
            HostCaps::NGX_WASM
        } else {
            HostCaps::ENVOY
        }
    }

    fn on_live<T>(&self, what: &str, f: impl FnOnce(&mut World, u32) -> T) -> Result<T, HostError> {
        let mut w = self.0.borrow_mut();
        let ctx = w.effective;
        if w.ngx && ctx == w.root {
            w.misuse
                .push(format!("{what} from the root: ngx_wasm_module crashes"));
            return Err(HostError("crash".into()));
        }
        if !w.live.contains(&ctx) {
            w.misuse.push(format!("{what} on dead context {ctx}"));
            return Err(HostError("NotFound".into()));
        }
        Ok(f(&mut w, ctx))
    }

    fn header_of(&self, name: &str) -> Option<Vec<u8>> {
        let w = self.0.borrow();
        w.request_headers
            .get(&w.effective)?
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_bytes().to_vec())
    }
}

impl RequestView for FakeHost {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        self.header_of(name)
    }
    fn source_address(&self) -> Option<Vec<u8>> {
        self.header_of("x-test-source")
            .or_else(|| Some(b"10.0.0.1:5000".to_vec()))
    }
    fn route_name(&self) -> Option<Vec<u8>> {
        self.header_of("x-test-route")
    }
    fn route_policy(&self) -> Option<Vec<u8>> {
        self.header_of("x-test-policy")
    }
    fn service_name(&self) -> Option<Vec<u8>> {
        None
    }
}

impl Host for FakeHost {
    fn now_ms(&self) -> u64 {
        self.0.borrow().now_ms
    }

    fn dispatch(
        &self,
        _shim: &ShimTarget,
        path: &str,
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, HostError> {
        let mut w = self.0.borrow_mut();
        if w.dispatch_fails {
            return Err(HostError("BadArgument".into()));
        }
        let token = w.next_token;
        w.next_token += 1;
        if w.ngx && w.in_log {
            w.misuse.push(format!(
                "dispatch of {path} in on_log: ngx_wasm_module traps"
            ));
            return Err(HostError("trap".into()));
        }
        if w.effective != w.root && !w.ngx {
            // The host would cancel it with the request, and the SDK keep its token forever.
            let owner = w.effective;
            w.misuse.push(format!(
                "callout {token} attributed to request context {owner}"
            ));
        }
        let c = Callout {
            token,
            callback_ctx: w.callback_ctx,
            path: path.to_string(),
            body: body.to_vec(),
            timeout_ms,
            sent_ms: w.now_ms,
        };
        w.callouts.push(c);
        Ok(token)
    }

    fn callout_status(&self) -> Option<u32> {
        self.0.borrow().reply.as_ref().and_then(|r| r.0)
    }

    fn callout_dispatch_status(&self) -> Option<String> {
        None
    }

    fn callout_body(&self, size: usize) -> Vec<u8> {
        let w = self.0.borrow();
        let body = w.reply.as_ref().map(|r| r.1.clone()).unwrap_or_default();
        body[..size.min(body.len())].to_vec()
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError> {
        let mut w = self.0.borrow_mut();
        if w.ngx {
            return Ok(());
        }
        if !w.live.contains(&context_id) {
            return Err(HostError("BadArgument".into()));
        }
        w.effective = context_id;
        Ok(())
    }

    fn resume_request(&self) -> Result<(), HostError> {
        self.on_live("resume", |w, ctx| {
            *w.resumed.entry(ctx).or_default() += 1;
        })
    }

    fn send_local_reply(&self, reply: &LocalReply) -> Result<(), HostError> {
        self.on_live("local reply", |w, ctx| {
            w.answered.entry(ctx).or_default().push(reply.clone());
        })
    }

    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        self.on_live("add header", |w, ctx| {
            w.response_headers
                .entry(ctx)
                .or_default()
                .push((name.to_string(), value.to_string()));
        })
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        let w = self.0.borrow();
        w.upstream_headers
            .get(&w.effective)?
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_bytes().to_vec())
    }

    fn response_body(&self, size: usize) -> Vec<u8> {
        let w = self.0.borrow();
        let chunk = w.body_chunk.clone();
        chunk[..size.min(chunk.len())].to_vec()
    }

    fn define_metric(&self, _kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let mut w = self.0.borrow_mut();
        if let Some(i) = w.metric_names.iter().position(|n| n == name) {
            return Ok(i as u32);
        }
        w.metric_names.push(name.to_string());
        Ok(w.metric_names.len() as u32 - 1)
    }

    fn increment_metric(&self, id: u32, by: i64) {
        *self.0.borrow_mut().metric_values.entry(id).or_default() += by;
    }

    fn record_metric(&self, _id: u32, _value: u64) {}

    fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
        self.0.borrow().shared.get(key).cloned()
    }

    fn shared_set(&self, key: &str, value: &[u8]) {
        let mut w = self.0.borrow_mut();
        w.shared.insert(key.to_string(), value.to_vec());
        *w.shared_versions.entry(key.to_string()).or_default() += 1;
    }

    fn shared_get_cas(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        let read = {
            let w = self.0.borrow();
            match w.shared.get(key) {
                Some(v) => (Some(v.clone()), w.shared_versions.get(key).copied()),
                None => (None, None),
            }
        };
        let racing = {
            let mut w = self.0.borrow_mut();
            match &w.racing_grant {
                Some((k, _)) if k == key => w.racing_grant.take(),
                _ => None,
            }
        };
        if let Some((k, theirs)) = racing {
            let grant = crate::lease::decode(&theirs).expect("a lease record");
            let there = read.0.as_deref().and_then(crate::lease::decode);
            let write = match there {
                Some(mut r) if r.units > 0 && r.id == grant.id => {
                    r.units += grant.units;
                    Some(crate::lease::encode(&r))
                }
                Some(r) if r.units > 0 => None,
                _ => Some(theirs),
            };
            if let Some(bytes) = write {
                self.shared_set(&k, &bytes);
                self.0.borrow_mut().racing_landed += grant.units;
            }
        }
        read
    }

    fn shared_set_cas(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        {
            let mut w = self.0.borrow_mut();
            let current = w.shared_versions.get(key).copied();
            if w.cas_conflicts > 0 || (cas.is_some() && cas != current) {
                w.cas_conflicts = w.cas_conflicts.saturating_sub(1);
                return Err(HostError("CasMismatch".into()));
            }
        }
        self.shared_set(key, value);
        Ok(())
    }

    fn set_tick_period_ms(&self, period_ms: u64) {
        self.0.borrow_mut().tick_ms = period_ms;
    }

    fn register_queue(&self, name: &str) -> Result<u32, HostError> {
        let mut w = self.0.borrow_mut();
        if w.ngx {
            w.misuse
                .push("register_queue: ngx_wasm_module traps".into());
            return Err(HostError("trap".into()));
        }
        w.queues.push(name.to_string());
        Ok(1)
    }

    fn enqueue(&self, _queue_id: u32, _value: &[u8]) -> Result<(), HostError> {
        self.0.borrow_mut().queue_items += 1;
        Ok(())
    }

    fn drain_queue(&self, _queue_id: u32) -> usize {
        std::mem::take(&mut self.0.borrow_mut().queue_items)
    }
}
