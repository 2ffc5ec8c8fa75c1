//! Counter keys and window math, computed in the gateway.
//!
//! A key is `<prefix>:{<rule>|<v1>|<v2>…}:<suffix>`; a window counter's suffix is
//! `<window_ms>:<window_index>`, other algorithms name their state (`tb:…`, `gcra:…`, …).
//! The braces are the Redis Cluster hash tag: every window of one counter lands in the same slot.
//! Each descriptor value is encoded so that distinct tuples can never produce the same key:
//! - `=` + the value with every byte outside `[A-Za-z0-9._~-]` percent-encoded (`%7C` for `|`,
//!   `%7B`/`%7D` for braces), so a value never contains a separator or a brace;
//! - `#` + 32 hex digits of SHA-256 of the raw bytes when the encoded value would exceed
//!   [`MAX_ENCODED_VALUE`] bytes (long or binary values);
//! - `-` for "no value" in the shared anonymous bucket (distinct from an empty value, `=`).
//!
//! Rule names are `[A-Za-z0-9_.-]` (checked at load), so the `|`-separated tuple parses back
//! unambiguously: `("a:b","c")` and `("a","b:c")` become `=a%3Ab|=c` and `=a|=b%3Ac`.
//!
//! **Keys are bounded by construction.** Eight values of up to 65 encoded bytes each would
//! still pass the shim's [`bounds::MAX_KEY_BYTES`], so when the encoded tuple `|<v1>|<v2>…` would make
//! the key longer than that — counting the real prefix and rule name and the longest suffix any
//! algorithm builds ([`MAX_SUFFIX_BYTES`]) — the whole tuple is replaced by `#` + 32 hex digits
//! of SHA-256 of its encoding: `<prefix>:{<rule>#<hex>}:<suffix>`. That `#` follows the rule
//! name directly, where an unhashed key has `|` or `}`, so a hashed tuple never equals an
//! unhashed one (nor a per-value `|#…`). The choice does not depend on the suffix, so every key
//! of one counter (a sliding window's `key` and `prev_key`) keeps the same hash tag. With a
//! prefix and rule name of at most 64 bytes (checked at load) every key is at most
//! [`bounds::MAX_KEY_BYTES`], whatever the client sends.

use sha2::{Digest, Sha256};

use crate::bounds;

/// Longest encoded descriptor value kept verbatim; longer ones are hashed.
pub(crate) const MAX_ENCODED_VALUE: usize = 64;

/// Decimal digits of `n`.
const fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// The longest suffix any algorithm builds from values within the wire bounds:
/// `gcra:<burst>:<rate>:<period_ms>` (38 bytes); `tb:…` is one shorter, a window counter's
/// `<window_ms>:<index>` at most 29 (an index of 20 digits), `swb:<window_ms>:<subwindows>`,
/// `log:<window_ms>` and `conc` less.
pub(crate) const MAX_SUFFIX_BYTES: usize = max(
    "gcra:".len()
        + digits(bounds::MAX_LIMIT)
        + 1
        + digits(bounds::MAX_RATE)
        + 1
        + digits(bounds::MAX_MS),
    digits(bounds::MAX_MS) + 1 + digits(u64::MAX),
);

/// The suffix that names each algorithm's state, built here and nowhere else (the shim's
/// scripts say the same shapes atop their files; [`MAX_SUFFIX_BYTES`] bounds them all).
pub(crate) mod suffix {
    /// A window counter (fixed window, the sliding estimate's two windows).
    pub(crate) fn window(window_ms: u64, index: u64) -> String {
        format!("{window_ms}:{index}")
    }

    /// The bounded sliding window's hash of sub-window counters.
    pub(crate) fn sub_windows(window_ms: u64, subwindows: u64) -> String {
        format!("swb:{window_ms}:{subwindows}")
    }

    /// The sliding log's sorted set.
    pub(crate) fn log(window_ms: u64) -> String {
        format!("log:{window_ms}")
    }

    /// A token bucket's state, named by its parameters so a changed limit starts afresh.
    pub(crate) fn token_bucket(burst: u64, rate: u64, period_ms: u64) -> String {
        format!("tb:{burst}:{rate}:{period_ms}")
    }

    /// GCRA's theoretical arrival time, named by its parameters.
    pub(crate) fn gcra(burst: u64, rate: u64, period_ms: u64) -> String {
        format!("gcra:{burst}:{rate}:{period_ms}")
    }

    /// The concurrency slots' sorted set (the shim's release endpoint requires `}:conc`).
    pub(crate) const CONCURRENCY: &str = "conc";
}

/// Bytes of a hashed tuple: `#` + 32 hex digits.
const HASHED_TUPLE_BYTES: usize = 1 + 32;

/// One descriptor's value on a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Present(&'a [u8]),
    /// The request has no value; the rule counts it in the anonymous bucket.
    Anonymous,
}

/// The fixed window that contains `now_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    /// `now_ms / window_ms`: the same on every gateway whose clock agrees.
    pub(crate) index: u64,
    /// Milliseconds from `now_ms` until the window ends (1..=window_ms).
    pub(crate) remaining_ms: u64,
}

/// The fixed window of length `window_ms` (> 0) containing `now_ms`.
pub(crate) fn fixed_window(now_ms: u64, window_ms: u64) -> Window {
    let index = now_ms / window_ms;
    Window {
        index,
        remaining_ms: (index + 1) * window_ms - now_ms,
    }
}

/// Appends the collision-free encoding of one descriptor value to `out`.
pub(crate) fn encode_value(value: Value<'_>, out: &mut String) {
    let bytes = match value {
        Value::Anonymous => {
            out.push('-');
            return;
        }
        Value::Present(bytes) => bytes,
    };
    let encoded_len: usize = bytes
        .iter()
        .map(|&b| if is_unreserved(b) { 1 } else { 3 })
        .sum();
    if encoded_len > MAX_ENCODED_VALUE {
        out.push('#');
        let digest = Sha256::digest(bytes);
        // 128 bits: collisions need ~2^64 work, out of reach for a client crafting values.
        push_hex(&digest[..16], out);
        return;
    }
    out.push('=');
    for &b in bytes {
        if is_unreserved(b) {
            out.push(b as char);
        } else {
            out.push('%');
            push_hex(&[b], out);
        }
    }
}

/// Builds a key: `<prefix>:{<rule>|<values>…}:<suffix>`, where the suffix names the state
/// (`<window_ms>:<index>` for a window counter, `tb:…`, `gcra:…`, `log:…`, `conc`); or
/// `<prefix>:{<rule>#<hex>}:<suffix>` when the values would make it too long (see the module
/// doc). With `prefix` and `rule` of at most 64 bytes and `suffix` of at most
/// [`MAX_SUFFIX_BYTES`], the key is at most [`bounds::MAX_KEY_BYTES`].
pub fn counter_key(prefix: &str, rule: &str, values: &[Value<'_>], suffix: &str) -> String {
    let mut tuple = String::with_capacity(values.len() * 24);
    for &value in values {
        tuple.push('|');
        encode_value(value, &mut tuple);
    }
    // The longest suffix, not this one: the choice must be the same for every key of the
    // counter (`key` and `prev_key`, a window index gaining a digit).
    let around = prefix.len() + ":{".len() + rule.len() + "}:".len();
    let hashed = around + tuple.len() + suffix.len().max(MAX_SUFFIX_BYTES) > bounds::MAX_KEY_BYTES;
    let tag_len = if hashed {
        HASHED_TUPLE_BYTES
    } else {
        tuple.len()
    };
    let mut key = String::with_capacity(around + tag_len + suffix.len());
    key.push_str(prefix);
    key.push_str(":{");
    key.push_str(rule);
    if hashed {
        // 128 bits of the tuple's (collision-free) encoding, as for one long value.
        key.push('#');
        push_hex(&Sha256::digest(tuple.as_bytes())[..16], &mut key);
    } else {
        key.push_str(&tuple);
    }
    key.push_str("}:");
    key.push_str(suffix);
    key
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-')
}

fn push_hex(bytes: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0xF) as usize] as char);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn key(values: &[Value<'_>]) -> String {
        counter_key("tg", "r", values, "60000:7")
    }

    #[test]
    fn key_layout() {
        assert_eq!(
            key(&[Value::Present(b"abc"), Value::Anonymous]),
            "tg:{r|=abc|-}:60000:7"
        );
        assert_eq!(key(&[]), "tg:{r}:60000:7");
    }

    #[test]
    fn distinct_tuples_never_collide() {
        let tuples: Vec<Vec<Value<'_>>> = vec![
            vec![Value::Present(b"a:b"), Value::Present(b"c")],
            vec![Value::Present(b"a"), Value::Present(b"b:c")],
            vec![Value::Present(b"a|b"), Value::Present(b"c")],
            vec![Value::Present(b"a"), Value::Present(b"b|c")],
            vec![Value::Present(b"a|=b"), Value::Present(b"c")],
            vec![Value::Present(b""), Value::Present(b"")],
            vec![Value::Present(b""), Value::Anonymous],
            vec![Value::Anonymous, Value::Present(b"")],
            vec![Value::Anonymous, Value::Anonymous],
            vec![Value::Present(b"-"), Value::Present(b"-")],
            vec![Value::Present(b"%7C"), Value::Present(b"c")],
            vec![Value::Present(b"}"), Value::Present(b"{")],
            vec![Value::Present(b"#"), Value::Present(b"x")],
        ];
        let keys: HashSet<String> = tuples.iter().map(|t| key(t)).collect();
        assert_eq!(keys.len(), tuples.len(), "{keys:#?}");
    }

    #[test]
    fn values_never_contain_separators_or_braces() {
        let nasty: Vec<u8> = (0u8..=255).collect();
        for chunk in nasty.chunks(16) {
            let k = key(&[Value::Present(chunk)]);
            let inner = &k["tg:{r|".len()..k.find("}:").unwrap()];
            assert!(!inner.contains(['|', '{', '}', ':', ' ']), "{inner}");
            assert!(k.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{k}");
        }
    }

    #[test]
    fn long_and_binary_values_are_hashed_to_a_bounded_length() {
        let long = vec![b'a'; 65];
        let k = key(&[Value::Present(&long)]);
        assert_eq!(k.len(), "tg:{r|#".len() + 32 + "}:60000:7".len());
        // 64 bytes after encoding is still verbatim; one more is hashed.
        assert!(key(&[Value::Present(&[b'a'; 64])]).contains("|=aaaa"));
        // 22 bytes that each need escaping (66 encoded) are hashed.
        assert!(key(&[Value::Present(&[0xff; 22])]).contains("|#"));
        // Hashing is deterministic and distinguishes near-identical inputs.
        let mut other = long.clone();
        other[64] = b'b';
        assert_eq!(k, key(&[Value::Present(&long)]));
        assert_ne!(k, key(&[Value::Present(&other)]));
        // A 64 KiB value is still a short key.
        assert!(key(&[Value::Present(&vec![7u8; 65536])]).len() < 64);
    }

    #[test]
    fn a_hashed_value_cannot_equal_a_verbatim_one() {
        let long = vec![b'z'; 100];
        let hashed = key(&[Value::Present(&long)]);
        let digest = &hashed["tg:{r|#".len()..hashed.find('}').unwrap()];
        assert_ne!(hashed, key(&[Value::Present(digest.as_bytes())]));
    }

    /// The longest prefix and rule name the config accepts, and every suffix shape at its
    /// longest within the wire bounds.
    const LONG_PREFIX: &str = "pppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppp";
    const LONG_RULE: &str = "rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr";
    const SUFFIXES: [&str; 7] = [
        "86400000:18446744073709551615",
        "1000:0",
        "tb:1000000000000:1000000000:86400000",
        "gcra:1000000000000:1000000000:86400000",
        "log:86400000",
        "swb:86400000:100",
        "conc",
    ];

    /// The hash tag: what Redis Cluster hashes.
    fn tag(key: &str) -> &str {
        let open = key.find('{').unwrap();
        &key[open + 1..open + key[open..].find('}').unwrap()]
    }

    #[test]
    fn the_longest_suffix_is_counted_right() {
        assert_eq!(LONG_PREFIX.len(), crate::config::MAX_NAME_LEN);
        assert_eq!(LONG_RULE.len(), crate::config::MAX_NAME_LEN);
        assert_eq!(MAX_SUFFIX_BYTES, 38);
        assert_eq!(
            SUFFIXES.iter().map(|s| s.len()).max(),
            Some(MAX_SUFFIX_BYTES)
        );
    }

    #[test]
    fn worst_case_keys_stay_within_the_wire_bound() {
        let verbatim = [b'a'; MAX_ENCODED_VALUE]; // `=` + 64 bytes: the longest kept as is
        let escaped = [0xffu8; MAX_ENCODED_VALUE / 3]; // 21 bytes, 63 encoded
        let huge = vec![b'{'; 4096]; // hashed alone, then with the tuple
        let kinds: [&[u8]; 3] = [&verbatim, &escaped, &huge];
        for n in 0..=crate::config::MAX_DESCRIPTORS {
            for kind in kinds {
                let values = vec![Value::Present(kind); n];
                for suffix in SUFFIXES {
                    for (prefix, rule) in [(LONG_PREFIX, LONG_RULE), ("tollgate", "r")] {
                        let k = counter_key(prefix, rule, &values, suffix);
                        assert!(k.len() <= bounds::MAX_KEY_BYTES, "{} bytes: {k}", k.len());
                        assert!(k.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{k}");
                    }
                }
            }
        }
        // The issue's case: 8 values of 64 bytes made a key of 566 bytes.
        let k = counter_key(
            "tollgate",
            "per_client",
            &[Value::Present(&verbatim); 8],
            "60000:1",
        );
        assert_eq!(
            k.len(),
            "tollgate:{per_client#".len() + 32 + "}:60000:1".len()
        );
    }

    #[test]
    fn short_tuples_are_unchanged_and_the_budget_is_exact() {
        // "tg:{r" + tuple + "}:" + the longest suffix leaves 467 bytes for the tuple: seven
        // `|=` + 64 bytes (462), then `|=` + 3 bytes fills it exactly; 4 bytes is one too many.
        assert_eq!(
            bounds::MAX_KEY_BYTES - "tg:{r}:".len() - MAX_SUFFIX_BYTES,
            467
        );
        let long = [b'a'; MAX_ENCODED_VALUE];
        for (last, hashed) in [(&b"aaa"[..], false), (&b"aaaa"[..], true)] {
            let mut values = vec![Value::Present(&long); 7];
            values.push(Value::Present(last));
            let k = counter_key("tg", "r", &values, "60000:7");
            assert_eq!(k.starts_with("tg:{r#"), hashed, "{k}");
            if !hashed {
                assert_eq!(k.len(), "tg:{r}:60000:7".len() + 467);
            }
        }
        // Short tuples are exactly as before.
        assert_eq!(
            key(&[
                Value::Present(b"k1"),
                Value::Anonymous,
                Value::Present(&long)
            ]),
            format!("tg:{{r|=k1|-|={}}}:60000:7", "a".repeat(64))
        );
    }

    #[test]
    fn every_key_of_one_counter_shares_its_hash_tag() {
        let long = [b'x'; MAX_ENCODED_VALUE];
        for n in [1, 5, 8] {
            let values = vec![Value::Present(&long); n];
            // A sliding window's key and prev_key, across an index gaining a digit.
            let key = counter_key(LONG_PREFIX, LONG_RULE, &values, "1000:10");
            let prev_key = counter_key(LONG_PREFIX, LONG_RULE, &values, "1000:9");
            assert_eq!(tag(&key), tag(&prev_key), "{key} / {prev_key}");
            // And every algorithm's state of one rule and tuple.
            let tags: HashSet<String> = SUFFIXES
                .iter()
                .map(|s| tag(&counter_key(LONG_PREFIX, LONG_RULE, &values, s)).to_string())
                .collect();
            assert_eq!(tags.len(), 1, "{tags:?}");
        }
    }

    #[test]
    fn hashed_tuples_stay_distinct_and_never_equal_an_unhashed_key() {
        let a = [b'a'; MAX_ENCODED_VALUE];
        let b = [b'b'; MAX_ENCODED_VALUE];
        let tuples: Vec<Vec<Value<'_>>> = vec![
            vec![Value::Present(&a); 8],
            vec![Value::Present(&b); 8],
            [vec![Value::Present(&a); 7], vec![Value::Present(&b)]].concat(),
            [vec![Value::Present(&b)], vec![Value::Present(&a); 7]].concat(),
            [vec![Value::Present(&a); 7], vec![Value::Anonymous]].concat(),
            [vec![Value::Present(&a); 7], vec![Value::Present(b"")]].concat(),
            vec![Value::Present(&a); 7],
        ];
        let keys: HashSet<String> = tuples
            .iter()
            .map(|t| counter_key(LONG_PREFIX, LONG_RULE, t, "60000:7"))
            .collect();
        assert_eq!(keys.len(), tuples.len(), "{keys:#?}");
        // The hex of a hashed tuple, sent as a value or as a rule name, lands elsewhere.
        let hashed = counter_key("tg", "r", &[Value::Present(&a); 8], "60000:7");
        assert!(hashed.starts_with("tg:{r#"), "{hashed}");
        let hex = &tag(&hashed)["r#".len()..];
        assert_ne!(hashed, key(&[Value::Present(hex.as_bytes())]));
        assert_ne!(hashed, key(&[Value::Present(format!("#{hex}").as_bytes())]));
        // A single long value is hashed on its own (`|#`), not as a tuple (`#`).
        assert!(key(&[Value::Present(&[b'z'; 100])]).starts_with("tg:{r|#"));
        // Same rule and tuple, another rule: another key.
        assert_ne!(
            hashed,
            counter_key("tg", "s", &[Value::Present(&a); 8], "60000:7")
        );
    }

    #[test]
    fn window_index_at_the_edges() {
        // (now, window) → (index, remaining)
        let table = [
            (0, 1_000, 0, 1_000),
            (999, 1_000, 0, 1),
            (1_000, 1_000, 1, 1_000),
            (1_001, 1_000, 1, 999),
            (59_999, 60_000, 0, 1),
            (60_000, 60_000, 1, 60_000),
            (1_700_000_000_123, 60_000, 28_333_333, 39_877),
            (86_399_999, 86_400_000, 0, 1),
        ];
        for (now, w, index, remaining_ms) in table {
            assert_eq!(
                fixed_window(now, w),
                Window {
                    index,
                    remaining_ms
                },
                "now={now} w={w}"
            );
        }
    }
}
