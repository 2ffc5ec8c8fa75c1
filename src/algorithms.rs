//! Pure models of the rate-limit algorithms the Redis scripts run.
//!
//! Each model is the same arithmetic as its script under `lua-redis-shim/scripts/`, with time
//! passed in. Their behaviour is pinned by the shared vectors, `tests/vectors/<wire alg>.json`,
//! which the tests below run against the models and `tests/shim/test_vectors.py` runs against
//! the scripts in a real Redis: one table per algorithm, two implementations held equal.
//!
//! At runtime the filter uses only [`sliding_weight_ms`] (`request`, to build the two-window
//! estimate's checks); the local fallback (`local`) counts its own fixed windows and uses no
//! model. Every other item is the documented spec, run by tests only: the vectors here, and
//! the engine's model of Redis (`FakeRedis` in `engine/tests.rs`: all but [`concurrency`],
//! which it models inline). Models are named by their wire `alg`: [`sliding_window`] is the
//! config's `sliding_window_estimate`, and [`sliding_window_bounded`] the config's
//! `sliding_window` (docs/wire-format.md says why).

/// What one check answers, whatever the algorithm: enough for exact headers.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub allowed: bool,
    pub remaining: u64,
    /// Milliseconds until the limit is fully available again.
    pub reset_ms: u64,
    /// Milliseconds until this request (same cost) would be admitted; 0 when allowed.
    pub retry_after_ms: u64,
}

// --- Fixed window -----------------------------------------------------------------------------

/// Fixed window: `count` requests already in the window that ends in `window_left_ms`.
#[cfg_attr(not(test), allow(dead_code))]
pub fn fixed_window(count: u64, cost: u64, limit: u64, window_left_ms: u64) -> (Answer, u64) {
    let allowed = count + cost <= limit;
    let after = if allowed { count + cost } else { count };
    let answer = Answer {
        allowed,
        remaining: limit.saturating_sub(after),
        reset_ms: window_left_ms,
        retry_after_ms: if allowed { 0 } else { window_left_ms },
    };
    (answer, after)
}

// --- Sliding window (two weighted fixed windows) ---------------------------------------------

/// The previous window's weight, as milliseconds of it still inside the sliding window:
/// `window_ms - elapsed`, where `elapsed` is how far `now_ms` is into the current window.
pub fn sliding_weight_ms(now_ms: u64, window_ms: u64) -> u64 {
    window_ms - now_ms % window_ms
}

/// Sliding window: estimate = `prev × weight_ms / window_ms + cur`; admitted while
/// `estimate + cost <= limit`. Retry-after is the moment the estimate will have decayed enough
/// (or, if the current window alone is too full, a point in the next window).
#[cfg_attr(not(test), allow(dead_code))]
pub fn sliding_window(
    prev: u64,
    cur: u64,
    cost: u64,
    limit: u64,
    weight_ms: u64,
    window_ms: u64,
) -> (Answer, u64) {
    let estimate =
        |cur: u64| (prev as u128 * weight_ms as u128).div_ceil(window_ms as u128) as u64 + cur;
    let allowed = estimate(cur) + cost <= limit;
    let cur_after = if allowed { cur + cost } else { cur };
    let left_in_window = weight_ms; // the current window ends when the previous one's weight hits 0
    let retry_after_ms = if allowed {
        0
    } else {
        sliding_retry_after(prev, cur_after, cost, limit, weight_ms, window_ms)
    };
    let answer = Answer {
        allowed,
        remaining: limit.saturating_sub(estimate(cur_after)),
        // Fully available once both windows have slid out: the rest of this one, and the next.
        reset_ms: if cur_after == 0 {
            left_in_window
        } else {
            left_in_window + window_ms
        },
        retry_after_ms,
    };
    (answer, cur_after)
}

/// When `estimate + cost <= limit` first holds again, in ms from now.
#[cfg_attr(not(test), allow(dead_code))]
fn sliding_retry_after(
    prev: u64,
    cur: u64,
    cost: u64,
    limit: u64,
    weight_ms: u64,
    window_ms: u64,
) -> u64 {
    if cost > limit {
        return u64::MAX;
    }
    let room = limit - cost; // the estimate must fall to this
    let (prev, cur, w) = (prev as u128, cur as u128, window_ms as u128);
    if cur <= room as u128 {
        // Still in this window: need ceil(prev × weight' / W) <= room − cur, i.e.
        // weight' <= (room − cur) × W / prev.
        let max_weight = ((room as u128 - cur) * w).checked_div(prev).unwrap_or(w);
        return (weight_ms as u128).saturating_sub(max_weight) as u64;
    }
    // In the next window, `cur` becomes the previous window: ceil(cur × weight'' / W) <= room.
    let max_weight = (room as u128 * w) / cur;
    (weight_ms as u128 + w - max_weight) as u64
}

// --- Bounded sliding window (sub-windows) -----------------------------------------------------

/// The state of a bounded sliding window: what each sub-window admitted, by index
/// `⌊t / sub⌋` (`sub = window_ms / subwindows`), in a Redis hash.
#[cfg_attr(not(test), allow(dead_code))]
pub type SubWindows = std::collections::BTreeMap<u64, u64>;

/// Bounded sliding window: the window split into `n = subwindows` sub-windows of
/// `sub = window_ms / n` ms (Redis's clock). A check counts the `n + 1` sub-windows the last
/// `window_ms` touches, `j − n ..= j` (`j = ⌊now / sub⌋`), the partly expired oldest one in full,
/// and admits while `count + cost <= limit`; so no span of `window_ms` ever holds more than
/// `limit` (the proof: docs/algorithms.md). Sub-windows before `j − n` are dropped on a
/// charge, as the script deletes them. `window_ms` must be a multiple of `subwindows`.
#[cfg_attr(not(test), allow(dead_code))]
pub fn sliding_window_bounded(
    state: &SubWindows,
    now_ms: u64,
    cost: u64,
    limit: u64,
    window_ms: u64,
    subwindows: u64,
) -> (Answer, SubWindows) {
    let n = subwindows.max(1);
    let sub = (window_ms / n).max(1);
    let j = now_ms / sub;
    let first = j.saturating_sub(n);
    // Sub-window i leaves the window at (i + n + 1) × sub.
    let leaves = |i: u64| (i + n + 1) * sub - now_ms;
    // Later indices (Redis's clock stepped back) count too: counting more only denies more.
    let counted = |s: &SubWindows| s.range(first..).map(|(_, &c)| c).sum::<u64>();
    let count = counted(state);
    let allowed = count + cost <= limit;
    let mut after = state.clone();
    if allowed && cost > 0 {
        *after.entry(j).or_insert(0) += cost;
        after.retain(|&i, _| i >= first);
    }
    let retry_after_ms = if allowed {
        0
    } else if cost > limit {
        u64::MAX
    } else {
        // The oldest sub-windows must take `count + cost − limit` with them.
        let need = count + cost - limit;
        let mut freed = 0;
        let mut at = j;
        for i in first..=j {
            freed += state.get(&i).copied().unwrap_or(0);
            if freed >= need {
                at = i;
                break;
            }
        }
        leaves(at)
    };
    let count_after = counted(&after);
    let newest = after.range(first..).rev().find(|(_, &c)| c > 0);
    let answer = Answer {
        allowed,
        remaining: limit.saturating_sub(count_after),
        reset_ms: newest.map_or(0, |(&i, _)| leaves(i)),
        retry_after_ms,
    };
    (answer, after)
}

// --- Token bucket -----------------------------------------------------------------------------

/// A token bucket's stored state: tokens (fractional, in thousandths) at `ts_ms`.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub milli_tokens: u64,
    pub ts_ms: u64,
}

/// Token bucket with `capacity` tokens refilled at `rate` per `period_ms`; time from Redis.
/// A missing bucket (`None`) is full.
#[cfg_attr(not(test), allow(dead_code))]
pub fn token_bucket(
    state: Option<Bucket>,
    now_ms: u64,
    cost: u64,
    capacity: u64,
    rate: u64,
    period_ms: u64,
) -> (Answer, Bucket) {
    let full = capacity * 1000;
    let tokens = match state {
        None => full,
        Some(b) => {
            let elapsed = now_ms.saturating_sub(b.ts_ms) as u128;
            let refill = elapsed * rate as u128 * 1000 / period_ms as u128;
            (b.milli_tokens as u128 + refill).min(full as u128) as u64
        }
    };
    let need = cost * 1000;
    let allowed = tokens >= need;
    let after = if allowed { tokens - need } else { tokens };
    // ms until `missing` milli-tokens have been refilled (capped as the script reports it).
    let time_for = |missing: u64| {
        capped_ms((missing as u128 * period_ms as u128).div_ceil(rate as u128 * 1000))
    };
    let answer = Answer {
        allowed,
        remaining: after / 1000,
        reset_ms: time_for(full - after),
        retry_after_ms: if allowed {
            0
        } else if need > full {
            u64::MAX
        } else {
            time_for(need - after)
        },
    };
    (
        answer,
        Bucket {
            milli_tokens: after,
            ts_ms: now_ms,
        },
    )
}

// --- GCRA -------------------------------------------------------------------------------------

/// GCRA (as in redis-cell): one stored value, the theoretical arrival time (TAT, in µs so the
/// emission interval keeps precision for rates like 3 per second). With emission interval
/// `T = period / rate` (whole µs), a request of `cost` is admitted when
/// `max(TAT, now) + cost × T − now <= burst × T`, i.e. up to `burst` back to back from idle,
/// then one per `T`. Returns the answer and the TAT to store (unchanged when denied); a TAT
/// may pass u64::MAX µs for absurd but valid limits (10^9 per day), as the script's may.
#[cfg_attr(not(test), allow(dead_code))]
pub fn gcra(
    tat_us: Option<u128>,
    now_ms: u64,
    cost: u64,
    burst: u64,
    rate: u64,
    period_ms: u64,
) -> (Answer, u128) {
    let t_us = period_ms as u128 * 1000 / rate as u128;
    let now_us = now_ms as u128 * 1000;
    let tat_us = tat_us.unwrap_or(0).max(now_us);
    let tolerance = t_us * burst as u128;
    let new_tat = tat_us + t_us * cost as u128;
    let allowed = new_tat - now_us <= tolerance;
    let kept = if allowed { new_tat } else { tat_us };
    let ms = |us: u128| capped_ms(us.div_ceil(1000));
    let answer = Answer {
        allowed,
        remaining: ((tolerance - (kept - now_us).min(tolerance)) / t_us.max(1)) as u64,
        reset_ms: ms(kept - now_us),
        retry_after_ms: if allowed {
            0
        } else {
            ms(new_tat - now_us - tolerance)
        },
    };
    (answer, kept)
}

/// The longest time the scripts report: 2^52 ms (~142,000 years; prelude.lua's `clamp_ms`).
pub const MAX_REPORTED_MS: u64 = 1 << 52;

fn capped_ms(ms: u128) -> u64 {
    ms.min(MAX_REPORTED_MS as u128) as u64
}

// --- Sliding log ------------------------------------------------------------------------------

/// Sliding log: the timestamps of admitted requests within the last `window_ms` (a sorted
/// set in Redis). Exact; memory grows with the limit. `log` must be sorted ascending.
#[cfg_attr(not(test), allow(dead_code))]
pub fn sliding_log(
    log: &[u64],
    now_ms: u64,
    cost: u64,
    limit: u64,
    window_ms: u64,
) -> (Answer, Vec<u64>) {
    let live: Vec<u64> = log
        .iter()
        .copied()
        .filter(|&t| t + window_ms > now_ms)
        .collect();
    let count = live.len() as u64;
    let allowed = count + cost <= limit;
    let mut after = live;
    if allowed {
        after.extend(std::iter::repeat_n(now_ms, cost as usize));
    }
    let expires = |t: u64| t + window_ms - now_ms;
    let retry_after_ms = if allowed {
        0
    } else if cost > limit {
        u64::MAX
    } else {
        // The (count + cost − limit)-th oldest entry has to slide out first.
        let k = (count + cost - limit) as usize;
        after.get(k - 1).map_or(0, |&t| expires(t))
    };
    let answer = Answer {
        allowed,
        remaining: limit.saturating_sub(after.len() as u64),
        reset_ms: after.last().map_or(0, |&t| expires(t)),
        retry_after_ms,
    };
    (answer, after)
}

// --- Concurrency --------------------------------------------------------------------------------

/// The slots of a concurrency limit: slot id → its expiry (Redis time in ms), a sorted set.
#[cfg_attr(not(test), allow(dead_code))]
pub type Slots = std::collections::BTreeMap<String, u64>;

/// Concurrency: at most `limit` slots held; a request holds slot `id` until it is released or
/// `ttl_ms` passes. Slots expiring at or before `now_ms` are dropped first. An id already held
/// counts once and has its expiry refreshed. The reply is read after the charge: `reset_ms`
/// until the earliest slot expires (0 when none), and a denial's retry-after is that, capped at
/// 1000 ms (a slot frees when its request ends, usually well before it expires).
#[cfg_attr(not(test), allow(dead_code))]
pub fn concurrency(
    slots: &Slots,
    now_ms: u64,
    id: &str,
    limit: u64,
    ttl_ms: u64,
) -> (Answer, Slots) {
    let mut after: Slots = slots
        .iter()
        .filter(|&(_, &e)| e > now_ms)
        .map(|(i, &e)| (i.clone(), e))
        .collect();
    let held = after.len() as u64 + u64::from(!after.contains_key(id));
    let allowed = held <= limit;
    if allowed {
        after.insert(id.to_string(), now_ms + ttl_ms);
    }
    let reset_ms = after.values().min().map_or(0, |&e| e - now_ms);
    let answer = Answer {
        allowed,
        remaining: limit.saturating_sub(after.len() as u64),
        reset_ms,
        retry_after_ms: match (allowed, reset_ms) {
            (true, _) => 0,
            (false, r) if r > 0 && r < 1000 => r,
            (false, _) => 1000,
        },
    };
    (answer, after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn sliding_weight_at_window_edges() {
        assert_eq!(
            sliding_weight_ms(60_000, 60_000),
            60_000,
            "start: the previous window counts fully"
        );
        assert_eq!(sliding_weight_ms(90_000, 60_000), 30_000);
        assert_eq!(sliding_weight_ms(119_999, 60_000), 1);
    }

    #[test]
    fn sliding_window_retry_after_is_exact() {
        // Whatever the state, at now + retry_after the same request is admitted, and 1 ms
        // earlier it is not.
        let w = 1000;
        for prev in [0u64, 3, 10, 17] {
            for cur in [0u64, 5, 10, 12] {
                for weight in [1u64, 250, 999, 1000] {
                    let (a, _) = sliding_window(prev, cur, 1, 10, weight, w);
                    if a.allowed {
                        continue;
                    }
                    let at = |dt: u64| {
                        if dt < weight {
                            sliding_window(prev, cur, 1, 10, weight - dt, w).0.allowed
                        } else {
                            sliding_window(cur, 0, 1, 10, w - (dt - weight), w)
                                .0
                                .allowed
                        }
                    };
                    assert!(
                        at(a.retry_after_ms),
                        "prev={prev} cur={cur} w={weight} retry={}",
                        a.retry_after_ms
                    );
                    assert!(
                        !at(a.retry_after_ms - 1),
                        "prev={prev} cur={cur} w={weight} retry={}",
                        a.retry_after_ms
                    );
                }
            }
        }
    }

    // --- The shared vectors: tests/vectors/<wire alg>.json ---------------------------------
    //
    // Every file is a list of cases: the algorithm's parameters (named as on the wire), an
    // optional starting `state`, and steps, each one check (its `cost`, and `now_ms`, `ttl_ms`
    // or `weight_ms` as the algorithm takes time) with the answer it must get, `count` for the
    // window algorithms, and, where the step charged, the `state` Redis holds after it.
    // tests/shim/test_vectors.py runs the same files against the scripts in a real Redis.

    fn u(v: &Value, field: &str) -> u64 {
        v[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} in {v}"))
    }

    /// Runs each case of a vector file through `step(case, state, step)`, which answers one
    /// step from the state before it and returns the answer, the count it reports (window
    /// algorithms) and the state after, in the file's notation. A case whose `known_defect`
    /// names `rust` must fail: once the model is fixed, the marker goes.
    fn run_vectors(file: &str, text: &str, step: impl Fn(&Value, &Value, &Value) -> Step) {
        let doc: Value = serde_json::from_str(text).unwrap();
        let cases = doc["cases"].as_array().unwrap();
        assert!(!cases.is_empty(), "{file}: no cases");
        for case in cases {
            let outcome = run_case(file, case, &step);
            match case["known_defect"]["rust"].as_str() {
                None => outcome.unwrap_or_else(|e| panic!("{e}")),
                Some(why) => assert!(
                    outcome.is_err(),
                    "{file}: {}: passes now; remove its known defect ({why})",
                    case["name"]
                ),
            }
        }
    }

    fn run_case(
        file: &str,
        case: &Value,
        step: &impl Fn(&Value, &Value, &Value) -> Step,
    ) -> Result<(), String> {
        let mut state = case["state"].clone();
        for s in case["steps"].as_array().unwrap() {
            let (a, count, after) = step(case, &state, s);
            let at = format!("{file}: {}: {s}", case["name"]);
            let want = (
                s["allowed"].as_bool().unwrap(),
                u(s, "remaining"),
                u(s, "reset_ms"),
                u(s, "retry_after_ms"),
            );
            let got = (a.allowed, a.remaining, a.reset_ms, a.retry_after_ms);
            if got != want {
                return Err(format!("{at}: answered {got:?}"));
            }
            if count != s["count"].as_u64() {
                return Err(format!("{at}: count {count:?}"));
            }
            if !s["state"].is_null() && after != s["state"] {
                return Err(format!("{at}: state after {after}"));
            }
            state = after;
        }
        Ok(())
    }

    type Step = (Answer, Option<u64>, Value);

    fn cost(step: &Value) -> u64 {
        step["cost"].as_u64().unwrap_or(1)
    }

    #[test]
    fn fixed_window_vectors() {
        // State: the counter. The window's time left is the step's ttl_ms (the key's PTTL).
        run_vectors(
            "fixed_window.json",
            include_str!("../tests/vectors/fixed_window.json"),
            |case, state, step| {
                let count = state.as_u64().unwrap_or(0);
                let (a, after) =
                    fixed_window(count, cost(step), u(case, "limit"), u(step, "ttl_ms"));
                (a, Some(after), json!(after))
            },
        );
    }

    #[test]
    fn sliding_window_vectors() {
        // State: the previous and the current window's counters; the weight is the step's.
        run_vectors(
            "sliding_window.json",
            include_str!("../tests/vectors/sliding_window.json"),
            |case, state, step| {
                let (prev, cur) = (
                    state["prev"].as_u64().unwrap_or(0),
                    state["cur"].as_u64().unwrap_or(0),
                );
                let (a, after) = sliding_window(
                    prev,
                    cur,
                    cost(step),
                    u(case, "limit"),
                    u(step, "weight_ms"),
                    u(case, "window_ms"),
                );
                (a, Some(after), json!({"prev": prev, "cur": after}))
            },
        );
    }

    #[test]
    fn sliding_window_bounded_vectors() {
        // State: sub-window index (a string) → count.
        run_vectors(
            "sliding_window_bounded.json",
            include_str!("../tests/vectors/sliding_window_bounded.json"),
            |case, state, step| {
                let mut sub = SubWindows::new();
                for (i, c) in state.as_object().into_iter().flatten() {
                    sub.insert(i.parse().unwrap(), c.as_u64().unwrap());
                }
                let (now, n) = (u(step, "now_ms"), u(case, "subwindows"));
                let (a, after) = sliding_window_bounded(
                    &sub,
                    now,
                    cost(step),
                    u(case, "limit"),
                    u(case, "window_ms"),
                    n,
                );
                let first = (now / (u(case, "window_ms") / n)).saturating_sub(n);
                let count = after.range(first..).map(|(_, c)| c).sum();
                let map: serde_json::Map<String, Value> = after
                    .iter()
                    .map(|(i, c)| (i.to_string(), json!(c)))
                    .collect();
                (a, Some(count), Value::Object(map))
            },
        );
    }

    #[test]
    fn token_bucket_vectors() {
        // State: {milli_tokens, ts_ms}; none is a full bucket.
        run_vectors(
            "token_bucket.json",
            include_str!("../tests/vectors/token_bucket.json"),
            |case, state, step| {
                let bucket = (!state.is_null()).then(|| Bucket {
                    milli_tokens: u(state, "milli_tokens"),
                    ts_ms: u(state, "ts_ms"),
                });
                let (a, b) = token_bucket(
                    bucket,
                    u(step, "now_ms"),
                    cost(step),
                    u(case, "burst"),
                    u(case, "rate"),
                    u(case, "period_ms"),
                );
                (
                    a,
                    None,
                    json!({"milli_tokens": b.milli_tokens, "ts_ms": b.ts_ms}),
                )
            },
        );
    }

    #[test]
    fn gcra_vectors() {
        // State: {tat_us}; none is idle.
        run_vectors(
            "gcra.json",
            include_str!("../tests/vectors/gcra.json"),
            |case, state, step| {
                // A TAT past u64::MAX µs is written as a string.
                let tat_us = state["tat_us"]
                    .as_u64()
                    .map(u128::from)
                    .or_else(|| state["tat_us"].as_str().and_then(|s| s.parse().ok()));
                let (a, tat) = gcra(
                    tat_us,
                    u(step, "now_ms"),
                    cost(step),
                    u(case, "burst"),
                    u(case, "rate"),
                    u(case, "period_ms"),
                );
                let tat = u64::try_from(tat).map_or_else(|_| json!(tat.to_string()), |t| json!(t));
                (a, None, json!({ "tat_us": tat }))
            },
        );
    }

    #[test]
    fn sliding_log_vectors() {
        // State: the admitted times, oldest first.
        run_vectors(
            "sliding_log.json",
            include_str!("../tests/vectors/sliding_log.json"),
            |case, state, step| {
                let log: Vec<u64> = state
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| t.as_u64().unwrap())
                    .collect();
                let (a, after) = sliding_log(
                    &log,
                    u(step, "now_ms"),
                    cost(step),
                    u(case, "limit"),
                    u(case, "window_ms"),
                );
                (a, None, json!(after))
            },
        );
    }

    #[test]
    fn concurrency_vectors() {
        // State: slot id → expiry (ms); each step is one request holding slot `id`.
        run_vectors(
            "concurrency.json",
            include_str!("../tests/vectors/concurrency.json"),
            |case, state, step| {
                let slots: Slots = state
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(i, e)| (i.clone(), e.as_u64().unwrap()))
                    .collect();
                let id = step["id"].as_str().unwrap();
                let (a, after) = concurrency(
                    &slots,
                    u(step, "now_ms"),
                    id,
                    u(case, "limit"),
                    u(case, "ttl_ms"),
                );
                (a, None, json!(after))
            },
        );
    }

    /// The bound of docs/algorithms.md, checked on random traffic: no span of `window_ms` ever
    /// holds more than `limit` admitted, and a denial's retry-after is exact (the same request
    /// fits then, not 1 ms earlier, if nothing else is admitted meanwhile).
    #[test]
    fn sliding_window_bounded_never_passes_its_limit() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for (limit, window, n) in [(5, 1000, 1), (10, 1000, 4), (20, 2000, 10), (7, 3000, 3)] {
            let mut state = SubWindows::new();
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            let mut now = 100_000;
            for _ in 0..3000 {
                now += rand(4) * rand(60);
                let cost = [0, 1, 1, 1, 2, 3][rand(6) as usize];
                let (a, after) = sliding_window_bounded(&state, now, cost, limit, window, n);
                if a.allowed {
                    admitted.push((now, cost));
                } else if a.retry_after_ms != u64::MAX {
                    let at = |dt| sliding_window_bounded(&state, now + dt, cost, limit, window, n);
                    assert!(at(a.retry_after_ms).0.allowed, "{now} {state:?}");
                    assert!(!at(a.retry_after_ms - 1).0.allowed, "{now} {state:?}");
                }
                state = after;
                let inside: u64 = admitted
                    .iter()
                    .filter(|&&(t, _)| t + window > now)
                    .map(|&(_, c)| c)
                    .sum();
                assert!(inside <= limit, "{inside} in ({}, {now}]", now - window);
            }
        }
    }

    /// Why the oldest sub-window counts in full: weighted by the part of it still inside (as
    /// the two-window estimate, [`sliding_window`], weights its previous window), a burst packed at its end is discounted
    /// while it is still inside, and a window length holds up to ~2 × limit, whatever `n`.
    #[test]
    fn weighting_the_oldest_sub_window_would_not_be_bounded() {
        let (limit, window, n) = (20u64, 2000u64, 10u64);
        let sub = window / n;
        // `limit` admitted at sub − 1, the last ms of sub-window 0. At n × sub + e, sub-window 0
        // is the oldest, weighted (sub − e) / sub: the estimate leaves room for `room` more.
        let (burst_at, e) = (sub - 1, sub - 2);
        let room = limit - (limit * (sub - e)).div_ceil(sub);
        assert!(
            n * sub + e - burst_at < window,
            "both inside one window length"
        );
        assert_eq!(limit + room, 2 * limit - 1);
        // The bounded window admits none of them: the burst still counts in full.
        let mut state = SubWindows::new();
        state.insert(0, limit);
        let (a, _) = sliding_window_bounded(&state, n * sub + e, 1, limit, window, n);
        assert!(!a.allowed);
    }
}
