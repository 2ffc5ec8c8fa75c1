//! The shim-reply decoder and the decisions built on it: any body, for any request shape, gives
//! verdicts or a failure, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::config::Config;
use tollgate::cache::Clocks;
use tollgate::decision::{from_batch_callout, CalloutReply};
use tollgate::request::{checks_for, RequestView};

const CONFIG: &str = r#"{"shim": {"upstream": "s"}, "rules": [
    {"name": "fw", "descriptors": ["header:k"], "limit": 5, "window": "1s"},
    {"name": "tb", "descriptors": ["header:k"], "algorithm": "token_bucket", "burst": 3, "rate": 1, "period": "1s"},
    {"name": "conc", "descriptors": ["header:k"], "algorithm": "concurrency", "limit": 2, "shadow": true}]}"#;

struct Request;

impl RequestView for Request {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        match name {
            ":path" => Some(b"/x".to_vec()),
            ":method" => Some(b"GET".to_vec()),
            "k" => Some(b"v".to_vec()),
            _ => None,
        }
    }
    fn source_address(&self) -> Option<Vec<u8>> {
        Some(b"10.0.0.1:1".to_vec())
    }
    fn route_name(&self) -> Option<Vec<u8>> {
        None
    }
    fn route_policy(&self) -> Option<Vec<u8>> {
        None
    }
    fn service_name(&self) -> Option<Vec<u8>> {
        None
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(config) = Config::from_json(CONFIG.as_bytes()) else { return };
    let checks = checks_for(&config, &Request, 1_000, "id");
    let at = Clocks { gateway_ms: 1_000, corrected_ms: 1_000 };
    let requests = [(checks.as_slice(), at), (&checks[..1], at)];
    let reply = CalloutReply { status: Some(200), dispatch_status: None, body: data };
    let _ = from_batch_callout(&config, &requests, reply);
});
