//! The one seam between the filter's logic and its host (Envoy, Kong, or a test's fake).
//!
//! Pure: the trait names what the engine needs; `wasm_host` implements it with proxy-wasm
//! hostcalls (mapping the SDK's `Status` to [`HostError`] in one place), and the engine's tests
//! implement it with a fake that records every call.

use crate::config::ShimTarget;
use crate::decision::LocalReply;
use crate::request::RequestView;

/// A hostcall that did not succeed; the text is the host's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostError(pub String);

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host returned {}", self.0)
    }
}

/// The kinds of metric the filter defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Histogram,
}

/// Which proxy-wasm host the filter runs in, learned once at configure (see [`HostCaps::probe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    Envoy,
    /// Kong Gateway's Wasm engine (ngx_wasm_module), or a bare nginx built with it.
    NgxWasm,
}

/// What the host can do beyond the calls both hosts implement alike. Every difference between
/// Envoy and ngx_wasm_module that changes what the engine may do is a field here, so the
/// engine asks this value instead of asking which host it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCaps {
    pub kind: HostKind,
    /// `set_effective_context` really switches contexts, so a root callback (tick, batch
    /// reply) can resume or answer a request. ngx_wasm_module accepts the call and does
    /// nothing: resuming from the root there acts on no request and crashes the worker
    /// (signal 11). Without it, a verdict is only delivered in the request's own callback, so
    /// coalescing (root-sent batches) is off and the watchdog leaves live requests to the
    /// host's own callout timeout.
    pub deliver_from_root: bool,
    /// A shared queue can be registered at runtime and its `on_queue_ready` is delivered
    /// (ngx_wasm_module traps without an `shm_queue` in nginx.conf, and never delivers it).
    pub shared_queues: bool,
    /// A callout may be dispatched from any callback. ngx_wasm_module allows it only in
    /// request headers/body, tick, callout replies and foreign calls (never in `on_log`, nor
    /// from a request that is about to end), so concurrency releases are sent from the
    /// root's tick there.
    pub dispatch_anywhere: bool,
}

impl HostCaps {
    pub const ENVOY: HostCaps = HostCaps {
        kind: HostKind::Envoy,
        deliver_from_root: true,
        shared_queues: true,
        dispatch_anywhere: true,
    };
    pub const NGX_WASM: HostCaps = HostCaps {
        kind: HostKind::NgxWasm,
        deliver_from_root: false,
        shared_queues: false,
        dispatch_anywhere: false,
    };

    /// The host, from one probe both hosts answer: `set_effective_context` to a context that
    /// does not exist. Envoy refuses it (`BadArgument`); ngx_wasm_module implements the call
    /// as a no-op that always succeeds. So the probe measures the very capability that
    /// decides how verdicts are delivered, and imports nothing the other host lacks.
    pub fn probe(switch_to_missing_context: Result<(), HostError>) -> HostCaps {
        match switch_to_missing_context {
            Err(_) => HostCaps::ENVOY,
            Ok(()) => HostCaps::NGX_WASM,
        }
    }

    pub fn name(&self) -> &'static str {
        match self.kind {
            HostKind::Envoy => "envoy",
            HostKind::NgxWasm => "ngx_wasm_module",
        }
    }
}

/// What the filter needs from its host. Calls about "the request" (reading it, resuming it,
/// answering it, adding response headers) act on the *effective* context: the one whose
/// callback is running, or the one [`set_effective_context`](Host::set_effective_context)
/// named last.
pub trait Host: RequestView {
    /// Milliseconds since the Unix epoch, by the gateway clock.
    fn now_ms(&self) -> u64;
    /// A `POST` of `body` to the shim at `path`; the reply arrives in `on_http_call_response`
    /// of the context that was running when it was sent, with this token.
    fn dispatch(
        &self,
        shim: &ShimTarget,
        path: &str,
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, HostError>;
    /// The `:status` of the callout reply being delivered.
    fn callout_status(&self) -> Option<u32>;
    /// Kong's `:dispatch_status` of a failed callout (Envoy reports failures as `:status`).
    fn callout_dispatch_status(&self) -> Option<String>;
    fn callout_body(&self, size: usize) -> Vec<u8>;
    /// Makes later calls act on another context; an error means that context is gone.
    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError>;
    fn resume_request(&self) -> Result<(), HostError>;
    fn send_local_reply(&self, reply: &LocalReply) -> Result<(), HostError>;
    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostError>;
    /// A response header by lower-case name.
    fn response_header(&self, name: &str) -> Option<Vec<u8>>;
    /// The response body chunk being delivered (`size` bytes).
    fn response_body(&self, size: usize) -> Vec<u8>;
    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError>;
    /// Adds to a counter; a failure only loses a sample.
    fn increment_metric(&self, id: u32, by: i64);
    /// Records a histogram value; a failure only loses a sample.
    fn record_metric(&self, id: u32, value: u64);
    /// Shared data, visible to every worker of this VM (over-limit cache, clock offset).
    fn shared_get(&self, key: &str) -> Option<Vec<u8>>;
    fn shared_set(&self, key: &str, value: &[u8]);
    /// Shared data with its version (`None`: no such key), for a compare-and-swap.
    fn shared_get_cas(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes `value` only if the key is still at version `cas` (`None`: whatever it holds);
    /// an error means another worker wrote first.
    fn shared_set_cas(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError>;
    fn set_tick_period_ms(&self, period_ms: u64);
    /// A shared queue whose `on_queue_ready` runs on this (root) context's worker (only asked
    /// where [`HostCaps::shared_queues`]).
    fn register_queue(&self, name: &str) -> Result<u32, HostError>;
    fn enqueue(&self, queue_id: u32, value: &[u8]) -> Result<(), HostError>;
    /// Empties a queue; returns how many items it held.
    fn drain_queue(&self, queue_id: u32) -> usize;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_tells_the_hosts_apart() {
        let envoy = HostCaps::probe(Err(HostError("BadArgument".into())));
        assert_eq!(envoy, HostCaps::ENVOY);
        let ngx = HostCaps::probe(Ok(()));
        assert_eq!(ngx.kind, HostKind::NgxWasm);
        assert!(!ngx.deliver_from_root && !ngx.shared_queues && !ngx.dispatch_anywhere);
    }
}
