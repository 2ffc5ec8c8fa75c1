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
    fn set_tick_period_ms(&self, period_ms: u64);
    /// A shared queue whose `on_queue_ready` runs on this (root) context's worker.
    fn register_queue(&self, name: &str) -> Result<u32, HostError>;
    fn enqueue(&self, queue_id: u32, value: &[u8]) -> Result<(), HostError>;
    /// Empties a queue; returns how many items it held.
    fn drain_queue(&self, queue_id: u32) -> usize;
}
