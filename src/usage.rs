//! Usage rules: a cost known only once the response has gone — tokens an LLM reports, bytes a
//! download sent — charged after the response, in a callout nobody waits for.
//!
//! At request time a usage rule is checked like any window rule, with `reserve` as its cost
//! (so a spent budget denies before anything goes upstream). When the stream ends, the real
//! amount minus the reserve is charged to the same counter (a refund when it is less).
//! [`Meter`] reads the amount as the response passes: a response header, a number in the JSON
//! body, the last server-sent event carrying it, or the body's bytes.
//!
//! Pure: the engine hands in headers and body chunks.

use serde_json::Value;

/// Most body bytes kept to read a JSON usage object (larger bodies are not parsed; the
/// amount is then unknown and only the reserve stays charged). Kept per response in flight,
/// in the worker's VM: it bounds what a usage rule can make a worker hold.
pub const MAX_JSON_BODY: usize = 256 * 1024;
/// Longest server-sent-event line kept while looking for the usage chunk.
pub const MAX_SSE_LINE: usize = 64 * 1024;

/// Where a usage rule's amount comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A response header holding a whole number.
    Header(String),
    /// The sum of these paths (`usage.total_tokens`) in a JSON response body.
    Json(Vec<Vec<String>>),
    /// The sum of these paths in the last `data:` event of a `text/event-stream` body that
    /// has them (the final usage chunk).
    Sse(Vec<Vec<String>>),
    /// The response body's bytes, as sent (a client that leaves mid-stream is charged what
    /// it got).
    Bytes,
}

/// A usage rule's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub source: Source,
    /// Charged when the request is checked; it must fit for the request to be admitted.
    pub reserve: u64,
    /// What is counted, for `RateLimit-Policy`'s `qu` and the deny body.
    pub unit: String,
}

impl Source {
    /// Parses `header:NAME`, `json:PATH[+PATH…]`, `sse:PATH[+PATH…]` or `bytes`.
    pub fn parse(s: &str) -> Result<Source, String> {
        let paths = |p: &str| -> Result<Vec<Vec<String>>, String> {
            p.split('+')
                .map(|path| {
                    let parts: Vec<String> = path.split('.').map(str::to_string).collect();
                    if parts.iter().any(String::is_empty) {
                        return Err(format!("empty segment in path {path:?}"));
                    }
                    Ok(parts)
                })
                .collect()
        };
        match s.split_once(':') {
            Some(("header", name)) if !name.is_empty() => {
                Ok(Source::Header(name.to_ascii_lowercase()))
            }
            Some(("json", p)) => Ok(Source::Json(paths(p)?)),
            Some(("sse", p)) => Ok(Source::Sse(paths(p)?)),
            None if s == "bytes" => Ok(Source::Bytes),
            _ => {
                Err("must be header:NAME, json:PATH[+PATH…], sse:PATH[+PATH…] or bytes".to_string())
            }
        }
    }

    /// The unit counted when the config names none.
    pub fn default_unit(&self) -> &'static str {
        match self {
            Source::Bytes => "content-bytes",
            _ => "tokens",
        }
    }

    /// Whether the body must be read (not only its size).
    pub fn reads_body(&self) -> bool {
        matches!(self, Source::Json(_) | Source::Sse(_))
    }
}

/// Reads one response's usage as it passes.
#[derive(Debug, Clone)]
pub struct Meter {
    source: Source,
    bytes: u64,
    /// JSON: the body so far; SSE: the current partial line.
    buf: Vec<u8>,
    /// The body outgrew what is kept (JSON), so its amount is unknown.
    overflow: bool,
    header: Option<u64>,
    last_event: Option<u64>,
}

impl Meter {
    pub fn new(source: Source) -> Meter {
        Meter {
            source,
            bytes: 0,
            buf: Vec::new(),
            overflow: false,
            header: None,
            last_event: None,
        }
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The response headers arrived; `header` reads one by lower-case name.
    pub fn on_headers(&mut self, header: impl Fn(&str) -> Option<Vec<u8>>) {
        if let Source::Header(name) = &self.source {
            self.header = header(name).and_then(|v| whole_number(&v));
        }
    }

    /// A body chunk passed (its bytes, if the source reads them; else only its size).
    pub fn on_body(&mut self, size: usize, chunk: Option<&[u8]>) {
        self.bytes = self.bytes.saturating_add(size as u64);
        let Some(chunk) = chunk else { return };
        match &self.source {
            Source::Json(_) => {
                if self.buf.len() + chunk.len() > MAX_JSON_BODY {
                    self.overflow = true;
                    self.buf = Vec::new();
                } else if !self.overflow {
                    self.buf.extend_from_slice(chunk);
                }
            }
            Source::Sse(paths) => {
                for &b in chunk {
                    if b == b'\n' {
                        if let Some(n) = sse_amount(&self.buf, paths) {
                            self.last_event = Some(n);
                        }
                        self.buf.clear();
                    } else if self.buf.len() < MAX_SSE_LINE {
                        self.buf.push(b);
                    }
                }
            }
            Source::Header(_) | Source::Bytes => {}
        }
    }

    /// What the response consumed, once it has ended (or its client left); `None` when the
    /// response never said (the reserve then stands).
    pub fn amount(&self) -> Option<u64> {
        match &self.source {
            Source::Header(_) => self.header,
            Source::Bytes => Some(self.bytes),
            Source::Json(paths) => {
                if self.overflow {
                    return None;
                }
                let v: Value = serde_json::from_slice(&self.buf).ok()?;
                sum_paths(&v, paths)
            }
            Source::Sse(paths) => {
                // A last event without a trailing newline still counts.
                sse_amount(&self.buf, paths).or(self.last_event)
            }
        }
    }
}

/// The signed amount to charge at the end: what was used minus what was reserved.
pub fn delta(used: u64, reserve: u64) -> i64 {
    (used as i128 - reserve as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

fn whole_number(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

fn sum_paths(v: &Value, paths: &[Vec<String>]) -> Option<u64> {
    let mut total: u64 = 0;
    for path in paths {
        let mut at = v;
        for part in path {
            at = at.get(part)?;
        }
        total = total.checked_add(at.as_u64()?)?;
    }
    Some(total)
}

/// The amount in one SSE line, if it is a `data:` event whose JSON has every path.
fn sse_amount(line: &[u8], paths: &[Vec<String>]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let data = line.strip_prefix(b"data:")?;
    let v: Value = serde_json::from_slice(data.trim_ascii()).ok()?;
    sum_paths(&v, paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(source: &str) -> Meter {
        Meter::new(Source::parse(source).unwrap())
    }

    #[test]
    fn sources_parse_and_name_their_unit() {
        assert_eq!(
            Source::parse("header:X-Usage").unwrap(),
            Source::Header("x-usage".into())
        );
        assert_eq!(
            Source::parse("json:usage.prompt_tokens+usage.completion_tokens").unwrap(),
            Source::Json(vec![
                vec!["usage".into(), "prompt_tokens".into()],
                vec!["usage".into(), "completion_tokens".into()]
            ])
        );
        assert_eq!(
            Source::parse("bytes").unwrap().default_unit(),
            "content-bytes"
        );
        assert_eq!(
            Source::parse("sse:usage.total_tokens")
                .unwrap()
                .default_unit(),
            "tokens"
        );
        for bad in ["", "header:", "json:a..b", "bits", "xml:a"] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_header_json_body_sse_stream_or_byte_count_gives_the_amount() {
        let mut h = meter("header:x-usage");
        h.on_headers(|n| (n == "x-usage").then(|| b" 42 ".to_vec()));
        assert_eq!(h.amount(), Some(42));

        let mut j = meter("json:usage.prompt_tokens+usage.completion_tokens");
        let body =
            br#"{"id":"x","usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        for chunk in body.chunks(7) {
            j.on_body(chunk.len(), Some(chunk));
        }
        assert_eq!(j.amount(), Some(42));

        let mut s = meter("sse:usage.total_tokens");
        let stream = b"data: {\"choices\":[{\"delta\":\"hi\"}]}\n\ndata: {\"usage\":{\"total_tokens\":7}}\r\n\ndata: [DONE]\n\n";
        for chunk in stream.chunks(5) {
            s.on_body(chunk.len(), Some(chunk));
        }
        assert_eq!(s.amount(), Some(7));

        let mut b = meter("bytes");
        b.on_body(1000, None);
        b.on_body(24, None);
        assert_eq!(b.amount(), Some(1024));
    }

    #[test]
    fn an_amount_the_response_never_states_is_unknown() {
        let mut j = meter("json:usage.total_tokens");
        j.on_body(5, Some(b"<html"));
        assert_eq!(j.amount(), None);
        let mut big = meter("json:usage.total_tokens");
        let chunk = vec![b' '; MAX_JSON_BODY];
        big.on_body(chunk.len(), Some(&chunk));
        big.on_body(20, Some(br#"{"usage":{"total_tokens":1}}"#));
        assert_eq!(big.amount(), None, "too big to keep");
        let mut h = meter("header:x-usage");
        h.on_headers(|_| Some(b"1.5".to_vec()));
        assert_eq!(h.amount(), None);
        let mut s = meter("sse:usage.total_tokens");
        s.on_body(14, Some(b"data: {\"a\":1}\n"));
        assert_eq!(s.amount(), None);
    }

    #[test]
    fn the_end_charges_what_was_used_beyond_the_reserve() {
        assert_eq!(delta(150, 100), 50);
        assert_eq!(delta(10, 100), -90);
        assert_eq!(delta(u64::MAX, 0), i64::MAX);
    }
}
