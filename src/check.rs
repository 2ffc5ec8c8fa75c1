//! A check: one limit of one rule on one request — the unit the filter sends to the shim, the
//! over-limit cache remembers and the decision reads. `request` builds them; `wire` encodes
//! them (`lua-redis-shim/lib/tollgate/contract.lua` says each algorithm's wire fields).

/// One limit of one rule on one request: what the shim needs plus what the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Index into `Config::rules`.
    pub rule: usize,
    pub key: String,
    pub cost: u64,
    /// Counted and reported, never denies.
    pub shadow: bool,
    /// Units asked beyond `cost` as a lease for this gateway (0: none; see `lease`).
    pub lease: u64,
    pub kind: CheckKind,
}

/// The algorithm-specific part of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// `ttl_ms`: until this window ends by the gateway clock, the earliest `Retry-After`.
    FixedWindow {
        limit: u64,
        window_ms: u64,
        ttl_ms: u64,
    },
    /// `prev_key` counts the previous window; `weight_ms` of it still lies inside the slide.
    SlidingWindow {
        prev_key: String,
        limit: u64,
        window_ms: u64,
        weight_ms: u64,
    },
    /// One hash of `subwindows` counters per key, on Redis's clock (the shim reads `TIME`).
    SlidingWindowBounded {
        limit: u64,
        window_ms: u64,
        subwindows: u64,
    },
    /// `id` makes this request's entries unique in the log.
    SlidingLog {
        limit: u64,
        window_ms: u64,
        id: String,
    },
    TokenBucket {
        burst: u64,
        rate: u64,
        period_ms: u64,
    },
    Gcra {
        burst: u64,
        rate: u64,
        period_ms: u64,
    },
    /// `id` names this request's slot so it can be released when the stream ends.
    Concurrency {
        limit: u64,
        timeout_ms: u64,
        id: String,
    },
}

impl Check {
    /// The number of requests the limit allows (the burst for rate algorithms).
    pub fn limit(&self) -> u64 {
        match self.kind {
            CheckKind::FixedWindow { limit, .. }
            | CheckKind::SlidingWindow { limit, .. }
            | CheckKind::SlidingWindowBounded { limit, .. }
            | CheckKind::SlidingLog { limit, .. }
            | CheckKind::Concurrency { limit, .. } => limit,
            CheckKind::TokenBucket { burst, .. } | CheckKind::Gcra { burst, .. } => burst,
        }
    }

    /// The policy's time span in seconds for `RateLimit-Policy` (`w=`); `None` for concurrency.
    pub fn window_s(&self) -> Option<u64> {
        match self.kind {
            CheckKind::FixedWindow { window_ms, .. }
            | CheckKind::SlidingWindow { window_ms, .. }
            | CheckKind::SlidingWindowBounded { window_ms, .. }
            | CheckKind::SlidingLog { window_ms, .. } => Some(window_ms / 1000),
            CheckKind::TokenBucket {
                period_ms,
                burst,
                rate,
            }
            | CheckKind::Gcra {
                period_ms,
                burst,
                rate,
            } => {
                // The time a full burst takes to come back.
                Some((burst as u128 * period_ms as u128).div_ceil(rate as u128 * 1000) as u64)
            }
            CheckKind::Concurrency { .. } => None,
        }
    }

    /// The earliest moment (ms from now) a denial by this check may point `Retry-After` to.
    pub fn min_retry_ms(&self) -> u64 {
        match self.kind {
            CheckKind::FixedWindow { ttl_ms, .. } => ttl_ms,
            _ => 0,
        }
    }

    /// Whether its algorithm takes leases (`lease = true` in contract.lua; a test holds them
    /// equal): the windows, whose units can be spent later in the same window or sub-window.
    pub fn leasable(&self) -> bool {
        matches!(
            self.kind,
            CheckKind::FixedWindow { .. }
                | CheckKind::SlidingWindow { .. }
                | CheckKind::SlidingWindowBounded { .. }
        )
    }

    /// The slot to release when the request ends, for a concurrency check.
    pub fn slot(&self) -> Option<(&str, &str)> {
        match &self.kind {
            CheckKind::Concurrency { id, .. } => Some((self.key.as_str(), id.as_str())),
            _ => None,
        }
    }
}
