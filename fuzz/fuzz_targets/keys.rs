//! Key building: every key is printable ASCII with exactly one hash tag and a bounded length,
//! and two different descriptor tuples never give the same key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::keys::{counter_key, Value};

/// Splits the input into a tuple of values at 0xFF bytes; `0xFE` alone means "anonymous".
fn tuple(data: &[u8]) -> Vec<Value<'_>> {
    data.split(|&b| b == 0xFF)
        .map(|v| if v == [0xFE] { Value::Anonymous } else { Value::Present(v) })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let (a, b) = data.split_at(data.len() / 2);
    let (ta, tb) = (tuple(a), tuple(b));
    let (ka, kb) = (counter_key("tg", "r", &ta, "1000:1"), counter_key("tg", "r", &tb, "1000:1"));
    for k in [&ka, &kb] {
        assert!(k.bytes().all(|c| (0x21..=0x7e).contains(&c)), "{k}");
        assert_eq!(k.matches('{').count(), 1, "{k}");
        assert_eq!(k.matches('}').count(), 1, "{k}");
    }
    assert!(ka.len() <= 16 + ta.len() * 66, "{} for {} values", ka.len(), ta.len());
    if ta != tb {
        assert_ne!(ka, kb, "{ta:?} and {tb:?} collide");
    }
});
