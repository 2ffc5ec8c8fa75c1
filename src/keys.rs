//! Counter keys and window math, computed in the gateway.
//!
//! A key is `<prefix>:{<rule>|<v1>|<v2>…}:<suffix>`; a window counter's suffix is
//! `<window_ms>:<window_index>`, other algorithms name their state (`tb:…`, `gcra:…`, …).
//! The braces are the Redis Cluster hash tag: every window of one counter lands in the same slot.
//! Each descriptor value is encoded so that distinct tuples can never produce the same key:
//! - `=` + the value with every byte outside `[A-Za-z0-9._~-]` percent-encoded (`%7C` for `|`,
//!   `%7B`/`%7D` for braces), so a value never contains a separator or a brace;
//! - `#` + 32 hex digits of SHA-256 of the raw bytes when the encoded value would exceed
//!   [`MAX_ENCODED_VALUE`] bytes (long or binary values), which keeps keys bounded;
//! - `-` for "no value" in the shared anonymous bucket (distinct from an empty value, `=`).
//!
//! Rule names are `[A-Za-z0-9_.-]` (checked at load), so the `|`-separated tuple parses back
//! unambiguously: `("a:b","c")` and `("a","b:c")` become `=a%3Ab|=c` and `=a|=b%3Ac`.

use sha2::{Digest, Sha256};

/// Longest encoded descriptor value kept verbatim; longer ones are hashed.
pub const MAX_ENCODED_VALUE: usize = 64;

/// One descriptor's value on a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Present(&'a [u8]),
    /// The request has no value; the rule counts it in the anonymous bucket.
    Anonymous,
}

/// The fixed window that contains `now_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// `now_ms / window_ms`: the same on every gateway whose clock agrees.
    pub index: u64,
    /// Milliseconds from `now_ms` until the window ends (1..=window_ms).
    pub remaining_ms: u64,
}

/// The fixed window of length `window_ms` (> 0) containing `now_ms`.
pub fn fixed_window(now_ms: u64, window_ms: u64) -> Window {
    let index = now_ms / window_ms;
    Window {
        index,
        remaining_ms: (index + 1) * window_ms - now_ms,
    }
}

/// Appends the collision-free encoding of one descriptor value to `out`.
pub fn encode_value(value: Value<'_>, out: &mut String) {
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
/// (`<window_ms>:<index>` for a window counter, `tb:…`, `gcra:…`, `log:…`, `conc`).
pub fn counter_key(prefix: &str, rule: &str, values: &[Value<'_>], suffix: &str) -> String {
    let mut key =
        String::with_capacity(prefix.len() + rule.len() + suffix.len() + 4 + values.len() * 24);
    key.push_str(prefix);
    key.push_str(":{");
    key.push_str(rule);
    for &value in values {
        key.push('|');
        encode_value(value, &mut key);
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
