//! The plugin configuration parser: any bytes give a config or an error naming a field, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = tollgate::config::Config::from_json(data) {
        assert!(e.to_string().starts_with("invalid plugin configuration: "));
    }
});
