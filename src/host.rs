//! The one seam to the proxy-wasm host. Every hostcall the filter makes goes through
//! [`WasmHost`], which maps the SDK's `Status` to [`HostError`] in one place.

use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};

use crate::config::ShimTarget;
use crate::decision::LocalReply;
use crate::properties;
use crate::request::RequestView;

/// A hostcall that did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError(pub Status);

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host returned {:?}", self.0)
    }
}

/// What the filter needs from its host, beyond reading the request.
pub trait Host: RequestView {
    /// Milliseconds since the Unix epoch, by the gateway clock.
    fn now_ms(&self) -> u64;
    fn plugin_configuration(&self) -> Vec<u8>;
    /// Sends the checks to the shim; the reply arrives in `on_http_call_response(token, …)`.
    fn dispatch(&self, shim: &ShimTarget, body: &[u8]) -> Result<u32, HostError>;
    /// The `:status` of the callout reply being delivered.
    fn callout_status(&self) -> Option<u32>;
    fn callout_body(&self, size: usize) -> Vec<u8>;
    /// Kong's `:dispatch_status` of a failed callout (Envoy reports failures as `:status`).
    fn callout_dispatch_status(&self) -> Option<String>;
    /// Sends the release of concurrency slots, owned by the root context so that it outlives
    /// the finished request; nobody waits for the answer.
    fn dispatch_release(
        &self,
        root_context_id: u32,
        shim: &ShimTarget,
        body: &[u8],
    ) -> Result<u32, HostError>;
    fn send_local_reply(&self, reply: &LocalReply) -> Result<(), HostError>;
    fn resume_request(&self) -> Result<(), HostError>;
    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostError>;
    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, HostError>;
    /// Makes later hostcalls act on another context (a paused request the root decides);
    /// an error means that context is gone.
    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError>;
    fn set_tick_period_ms(&self, period_ms: u64);
    /// A shared queue whose `on_queue_ready` runs on this (root) context's worker.
    fn register_queue(&self, name: &str) -> Result<u32, HostError>;
    fn enqueue(&self, queue_id: u32, value: &[u8]) -> Result<(), HostError>;
    /// Empties a queue; returns how many items it held.
    fn drain_queue(&self, queue_id: u32) -> usize;
    /// Shared data, visible to every worker of this VM (the over-limit cache).
    fn shared_get(&self, key: &str) -> Option<Vec<u8>>;
    fn shared_set(&self, key: &str, value: &[u8]);
    /// Adds to a counter, or records a histogram value; a failure only loses a sample.
    fn increment_metric(&self, id: u32, by: i64);
    fn record_metric(&self, id: u32, value: u64);
}

/// The real host: Envoy (or Kong) through proxy-wasm hostcalls, for the current context.
pub struct WasmHost;

fn property(paths: &[&[&str]]) -> Option<Vec<u8>> {
    properties::first(paths, |path| {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    })
}

/// A JSON `POST` to the shim (with its shared secret, if any) as an HTTP callout.
fn post(shim: &ShimTarget, path: &str, body: &[u8]) -> Result<u32, HostError> {
    let mut headers = vec![
        (":method", "POST"),
        (":path", path),
        (":authority", shim.authority.as_str()),
        ("content-type", "application/json"),
    ];
    if let Some(secret) = &shim.secret {
        headers.push(("x-tollgate-secret", secret.0.as_str()));
    }
    hostcalls::dispatch_http_call(&shim.upstream, headers, Some(body), vec![], shim.timeout)
        .map_err(HostError)
}

impl RequestView for WasmHost {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }

    fn source_address(&self) -> Option<Vec<u8>> {
        property(properties::SOURCE_ADDRESS)
    }

    fn route_name(&self) -> Option<Vec<u8>> {
        property(properties::ROUTE_NAME)
    }

    fn service_name(&self) -> Option<Vec<u8>> {
        property(properties::SERVICE_NAME)
    }

    fn route_policy(&self) -> Option<Vec<u8>> {
        property(properties::ROUTE_POLICY)
    }
}

impl Host for WasmHost {
    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn plugin_configuration(&self) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn dispatch(&self, shim: &ShimTarget, body: &[u8]) -> Result<u32, HostError> {
        post(shim, &shim.path, body)
    }

    fn callout_status(&self) -> Option<u32> {
        hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
    }

    fn callout_body(&self, size: usize) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn callout_dispatch_status(&self) -> Option<String> {
        hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":dispatch_status")
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    fn dispatch_release(
        &self,
        root_context_id: u32,
        shim: &ShimTarget,
        body: &[u8],
    ) -> Result<u32, HostError> {
        hostcalls::set_effective_context(root_context_id).map_err(HostError)?;
        post(shim, &shim.release_path, body)
    }

    fn send_local_reply(&self, reply: &LocalReply) -> Result<(), HostError> {
        let headers = reply
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        hostcalls::send_http_response(reply.status, headers, Some(&reply.body)).map_err(HostError)
    }

    fn resume_request(&self) -> Result<(), HostError> {
        hostcalls::resume_http_request().map_err(HostError)
    }

    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value).map_err(HostError)
    }

    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, HostError> {
        hostcalls::define_metric(kind, name).map_err(HostError)
    }

    fn increment_metric(&self, id: u32, by: i64) {
        let _ = hostcalls::increment_metric(id, by);
    }

    fn record_metric(&self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }

    fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
        hostcalls::get_shared_data(key)
            .ok()
            .and_then(|(value, _cas)| value)
    }

    fn shared_set(&self, key: &str, value: &[u8]) {
        // Last writer wins; a lost update only costs a callout.
        let _ = hostcalls::set_shared_data(key, Some(value), None);
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError> {
        hostcalls::set_effective_context(context_id).map_err(HostError)
    }

    fn set_tick_period_ms(&self, period_ms: u64) {
        let _ = hostcalls::set_tick_period(std::time::Duration::from_millis(period_ms));
    }

    fn register_queue(&self, name: &str) -> Result<u32, HostError> {
        hostcalls::register_shared_queue(name).map_err(HostError)
    }

    fn enqueue(&self, queue_id: u32, value: &[u8]) -> Result<(), HostError> {
        hostcalls::enqueue_shared_queue(queue_id, Some(value)).map_err(HostError)
    }

    fn drain_queue(&self, queue_id: u32) -> usize {
        let mut n = 0;
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {
            n += 1;
        }
        n
    }
}
