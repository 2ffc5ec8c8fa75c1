//! The real [`Host`]: Envoy (or Kong) through proxy-wasm hostcalls. Every hostcall the filter
//! makes goes through [`WasmHost`], which maps the SDK's `Status` to [`HostError`] here.
//!
//! Only host functions that both Envoy and ngx_wasm_module implement, with the same types, may
//! be called here: the list is `tests/portable_imports.txt`, and `tests/e2e/test_portability.py`
//! fails when the built `.wasm` imports anything else. Where the hosts behave differently, the
//! difference is a field of [`HostCaps`], probed once at configure.

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};

use crate::config::ShimTarget;
use crate::decision::LocalReply;
use crate::host::{Host, HostCaps, HostError, MetricKind};
use crate::properties;
use crate::request::RequestView;

/// The real host, acting on the current (effective) context.
pub struct WasmHost;

fn err(status: Status) -> HostError {
    HostError(format!("{status:?}"))
}

fn property(paths: &[&[&str]]) -> Option<Vec<u8>> {
    properties::first(paths, |path| {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    })
}

impl WasmHost {
    /// Which host this is, probed once at configure from the root context (see
    /// [`HostCaps::probe`]): `set_effective_context` to a context id nothing uses. On Envoy the
    /// refused call changes nothing; on ngx_wasm_module it is a no-op anyway.
    pub fn capabilities(&self, root_context_id: u32) -> HostCaps {
        let probe = hostcalls::set_effective_context(u32::MAX).map_err(err);
        if probe.is_ok() {
            // Harmless where it was a no-op; puts the root back if a host ever did switch.
            let _ = hostcalls::set_effective_context(root_context_id);
        }
        HostCaps::probe(probe)
    }

    /// The plugin's configuration, read once at configure.
    pub fn plugin_configuration(&self) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default()
    }
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

    /// A JSON `POST` to the shim (with its shared secret, if any) as an HTTP callout.
    fn dispatch(
        &self,
        shim: &ShimTarget,
        path: &str,
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, HostError> {
        let mut headers = vec![
            (":method", "POST"),
            (":path", path),
            (":authority", shim.authority.as_str()),
            ("content-type", "application/json"),
        ];
        if let Some(secret) = &shim.secret {
            headers.push(("x-tollgate-secret", secret.0.as_str()));
        }
        let timeout = Duration::from_millis(timeout_ms);
        hostcalls::dispatch_http_call(&shim.upstream, headers, Some(body), vec![], timeout)
            .map_err(err)
    }

    fn callout_status(&self) -> Option<u32> {
        hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
    }

    fn callout_dispatch_status(&self) -> Option<String> {
        hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":dispatch_status")
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    fn callout_body(&self, size: usize) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError> {
        hostcalls::set_effective_context(context_id).map_err(err)
    }

    fn resume_request(&self) -> Result<(), HostError> {
        hostcalls::resume_http_request().map_err(err)
    }

    fn send_local_reply(&self, reply: &LocalReply) -> Result<(), HostError> {
        let headers = reply
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        hostcalls::send_http_response(reply.status, headers, Some(&reply.body)).map_err(err)
    }

    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value).map_err(err)
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
            .ok()
            .flatten()
    }

    fn response_body(&self, size: usize) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Histogram => MetricType::Histogram,
        };
        hostcalls::define_metric(kind, name).map_err(err)
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

    fn shared_get_cas(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn shared_set_cas(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(err)
    }

    fn set_tick_period_ms(&self, period_ms: u64) {
        let _ = hostcalls::set_tick_period(Duration::from_millis(period_ms));
    }

    fn register_queue(&self, name: &str) -> Result<u32, HostError> {
        hostcalls::register_shared_queue(name).map_err(err)
    }

    fn enqueue(&self, queue_id: u32, value: &[u8]) -> Result<(), HostError> {
        hostcalls::enqueue_shared_queue(queue_id, Some(value)).map_err(err)
    }

    fn drain_queue(&self, queue_id: u32) -> usize {
        let mut n = 0;
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {
            n += 1;
        }
        n
    }
}
