//! A proxy-wasm filter for measuring the host (see Cargo.toml). Plugin configuration:
//! empty, a filter that does nothing; `"<call> <n>"`, that host call `n` times per request;
//! `"reply 1"`, a local 429 like Tollgate's denial.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MapType, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Probe::default()) });
}}

/// What every request does: `times` × `call`.
#[derive(Clone, Default)]
struct Probe {
    call: String,
    times: u32,
    metric: u32,
}

const SHARED_KEY: &str = "probe.key";

impl Context for Probe {}

impl RootContext for Probe {
    fn on_configure(&mut self, _: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let config = String::from_utf8_lossy(&config);
        if let Some((call, times)) = config.trim().split_once(' ') {
            self.call = call.to_string();
            self.times = times.parse().unwrap_or(0);
        }
        self.metric = hostcalls::define_metric(MetricType::Counter, "probe_total").unwrap_or(0);
        // What `shared_get` reads: the size of an over-limit cache entry.
        let _ = hostcalls::set_shared_data(SHARED_KEY, Some(&[7u8; 48]), None);
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(self.clone()))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        if self.call == "reply" && self.times > 0 {
            let headers = vec![
                ("retry-after", "51"),
                ("x-ratelimit-limit", "1"),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "51"),
                ("ratelimit-policy", "\"bench\";q=1;w=60"),
                ("ratelimit", "\"bench\";r=0;t=51"),
                ("content-type", "application/problem+json"),
            ];
            let _ = hostcalls::send_http_response(429, headers, Some(&[b'x'; 195]));
            return Action::Pause;
        }
        let mut bytes = 0;
        for _ in 0..self.times {
            bytes += match self.call.as_str() {
                "source_address" => property(&["source", "address"]),
                "route_metadata" => property(&["xds", "route_metadata", "filter_metadata", "tollgate", "policy"]),
                "route_name" => property(&["xds", "route_name"]),
                "header" => hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":path")
                    .ok()
                    .flatten()
                    .map_or(0, |v| v.len()),
                "shared_get" => hostcalls::get_shared_data(SHARED_KEY)
                    .ok()
                    .and_then(|(v, _)| v)
                    .map_or(0, |v| v.len()),
                "time" => hostcalls::get_current_time().map_or(0, |_| 1),
                "metric" => hostcalls::increment_metric(self.metric, 1).map_or(0, |_| 1),
                "add_header" => hostcalls::add_map_value(MapType::HttpRequestHeaders, "x-probe", "1")
                    .map_or(0, |_| 1),
                _ => 0,
            };
        }
        // Keeps the calls' results alive.
        if bytes == usize::MAX {
            return Action::Pause;
        }
        Action::Continue
    }
}

fn property(path: &[&str]) -> usize {
    hostcalls::get_property(path.to_vec())
        .ok()
        .flatten()
        .map_or(0, |v| v.len())
}
