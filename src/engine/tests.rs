//! The engine against a fake host and a model of Redis: scenario tests for each defect of the
//! request lifecycle, and a seeded property test over random interleavings of events.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::fake::{Callout, FakeHost};
use super::*;
use crate::algorithms::{self, Answer, Bucket, SubWindows};
use crate::metrics::Counter;
use crate::request::checks_for;

const ROOT: u32 = 1;

// --- A model of the shim and Redis ------------------------------------------------------------

/// Redis as the scripts keep it, run by the pure models of `algorithms` on Redis's clock.
#[derive(Debug, Default, Clone)]
struct FakeRedis {
    /// Window counters: count and expiry.
    counters: HashMap<String, (u64, u64)>,
    buckets: HashMap<String, Bucket>,
    tats: HashMap<String, u128>,
    logs: HashMap<String, Vec<u64>>,
    /// Bounded sliding windows: the hash of sub-window counts (stale ones only ever dropped;
    /// they no longer count, as when the key expires).
    subwindows: HashMap<String, SubWindows>,
    /// Concurrency: key → slot id → expiry.
    slots: HashMap<String, HashMap<String, u64>>,
}

/// What a check would change if its request is admitted.
enum Commit {
    Counter(String, u64, u64),
    Bucket(String, Bucket),
    Tat(String, u128),
    Log(String, Vec<u64>),
    SubWindows(String, SubWindows),
    Slot(String, String, u64),
}

fn u(c: &Value, field: &str) -> u64 {
    c[field].as_u64().unwrap_or(0)
}

fn s(c: &Value, field: &str) -> String {
    c[field].as_str().unwrap_or_default().to_string()
}

impl FakeRedis {
    fn counter(&self, key: &str, now: u64) -> Option<(u64, u64)> {
        self.counters
            .get(key)
            .copied()
            .filter(|&(_, exp)| exp > now)
    }

    /// One check's answer against the current state, and what admitting it would write.
    fn answer(&self, c: &Value, now: u64) -> (Answer, u64, Commit) {
        let key = s(c, "key");
        let cost = c["cost"].as_u64().unwrap_or(1);
        match c["alg"].as_str().unwrap_or("fixed_window") {
            "fixed_window" => {
                // As the script: a new counter lives its window and COUNTER_GRACE_MS more, which
                // the times it reports leave out.
                let grace = crate::bounds::COUNTER_GRACE_MS;
                let (count, exp) = self
                    .counter(&key, now)
                    .unwrap_or((0, now + u(c, "ttl_ms") + grace));
                let left = (exp - now).saturating_sub(grace);
                let (a, after) = algorithms::fixed_window(count, cost, u(c, "limit"), left);
                (a, u(c, "limit"), Commit::Counter(key, after, exp))
            }
            "sliding_window" => {
                let prev = self.counter(&s(c, "prev_key"), now).map_or(0, |x| x.0);
                let window = u(c, "window_ms");
                // As the script: a new key lives weight_ms + window_ms.
                let (cur, exp) = self
                    .counter(&key, now)
                    .unwrap_or((0, now + u(c, "weight_ms") + window));
                let (a, after) = algorithms::sliding_window(
                    prev,
                    cur,
                    cost,
                    u(c, "limit"),
                    u(c, "weight_ms"),
                    window,
                );
                (a, u(c, "limit"), Commit::Counter(key, after, exp))
            }
            "sliding_window_bounded" => {
                let state = self.subwindows.get(&key).cloned().unwrap_or_default();
                let (a, after) = algorithms::sliding_window_bounded(
                    &state,
                    now,
                    cost,
                    u(c, "limit"),
                    u(c, "window_ms"),
                    u(c, "subwindows"),
                );
                (a, u(c, "limit"), Commit::SubWindows(key, after))
            }
            "sliding_log" => {
                let log = self.logs.get(&key).cloned().unwrap_or_default();
                let (a, after) =
                    algorithms::sliding_log(&log, now, cost, u(c, "limit"), u(c, "window_ms"));
                (a, u(c, "limit"), Commit::Log(key, after))
            }
            "token_bucket" => {
                let (a, b) = algorithms::token_bucket(
                    self.buckets.get(&key).copied(),
                    now,
                    cost,
                    u(c, "burst"),
                    u(c, "rate"),
                    u(c, "period_ms"),
                );
                (a, u(c, "burst"), Commit::Bucket(key, b))
            }
            "gcra" => {
                let (a, tat) = algorithms::gcra(
                    self.tats.get(&key).copied(),
                    now,
                    cost,
                    u(c, "burst"),
                    u(c, "rate"),
                    u(c, "period_ms"),
                );
                (a, u(c, "burst"), Commit::Tat(key, tat))
            }
            "concurrency" => {
                let limit = u(c, "limit");
                let live: Vec<u64> = self
                    .slots
                    .get(&key)
                    .map(|m| m.values().copied().filter(|&e| e > now).collect())
                    .unwrap_or_default();
                let allowed = (live.len() as u64) < limit;
                let earliest = live.iter().min().map_or(0, |e| e - now);
                let a = Answer {
                    allowed,
                    remaining: limit - live.len() as u64 - u64::from(allowed),
                    reset_ms: earliest,
                    retry_after_ms: if allowed { 0 } else { earliest.min(1000) },
                };
                let commit = Commit::Slot(key, s(c, "id"), now + u(c, "ttl_ms"));
                (a, limit, commit)
            }
            other => panic!("unknown alg {other}"),
        }
    }

    fn commit(&mut self, commit: Commit) {
        match commit {
            Commit::Counter(k, n, exp) => {
                self.counters.insert(k, (n, exp));
            }
            Commit::Bucket(k, b) => {
                self.buckets.insert(k, b);
            }
            Commit::Tat(k, t) => {
                self.tats.insert(k, t);
            }
            Commit::Log(k, l) => {
                self.logs.insert(k, l);
            }
            Commit::SubWindows(k, w) => {
                self.subwindows.insert(k, w);
            }
            Commit::Slot(k, id, exp) => {
                self.slots.entry(k).or_default().insert(id, exp);
            }
        }
    }

    /// Runs one request's checks all-or-nothing; returns its result object.
    fn run_request(&mut self, checks: &[Value], now: u64) -> Value {
        let answers: Vec<(Answer, u64, Commit, bool)> = checks
            .iter()
            .map(|c| {
                let (a, limit, commit) = self.answer(c, now);
                (a, limit, commit, c["shadow"].as_bool().unwrap_or(false))
            })
            .collect();
        let allowed = answers.iter().all(|(a, _, _, shadow)| a.allowed || *shadow);
        let mut results = Vec::new();
        for (a, limit, commit, _) in answers {
            if allowed && a.allowed {
                self.commit(commit);
            }
            results.push(
                json!({"allowed": a.allowed, "limit": limit, "remaining": a.remaining,
                "reset_ms": a.reset_ms, "retry_after_ms": a.retry_after_ms}),
            );
        }
        json!({"allowed": allowed, "checks": results})
    }

    /// Would a request with these checks be denied right now? (Nothing is written.)
    fn would_deny(&self, checks: &[Check], now: u64) -> bool {
        let body: Value = serde_json::from_slice(&wire::encode(&[checks])).unwrap();
        let mut copy = self.clone();
        let r = copy.run_request(body["requests"][0]["checks"].as_array().unwrap(), now);
        !r["allowed"].as_bool().unwrap()
    }

    /// A lease for check `c`, as the scripts grant it once the call's requests are decided:
    /// up to its `lease`, at most 1/LEASE_SHARE of what is left; charged. (units, lease_ms)
    fn grant(&mut self, c: &Value, now: u64) -> (u64, u64) {
        let want = u(c, "lease");
        let mut probe = c.clone();
        probe["cost"] = json!(0);
        let (left, _, _) = self.answer(&probe, now);
        let units = want.min(left.remaining / crate::bounds::LEASE_SHARE);
        if units > 0 {
            probe["cost"] = json!(units);
            let (a, _, commit) = self.answer(&probe, now);
            assert!(a.allowed, "a grant always fits");
            self.commit(commit);
        }
        let lease_ms = match c["alg"].as_str().unwrap() {
            "fixed_window" => self.counter(&s(c, "key"), now).map_or(u(c, "ttl_ms"), |x| {
                (x.1 - now).saturating_sub(crate::bounds::COUNTER_GRACE_MS)
            }),
            "sliding_window" => u(c, "weight_ms"),
            _ => {
                let sub = u(c, "window_ms") / u(c, "subwindows");
                (now / sub + 1) * sub - now
            }
        };
        (units, lease_ms)
    }

    /// The shim's `/v1/check`: every request run, except `refuse` which is refused alone.
    fn check(&mut self, body: &[u8], now: u64, refuse: Option<usize>, stamp: u64) -> Vec<u8> {
        let body: Value = serde_json::from_slice(body).unwrap();
        let mut results: Vec<Value> = body["requests"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, r)| {
                if refuse == Some(i) {
                    json!({"refused": format!("requests[{i}].checks[0].key: must be a string")})
                } else {
                    self.run_request(r["checks"].as_array().unwrap(), now)
                }
            })
            .collect();
        // Leases, after every request: per key the last check of an admitted request asking.
        let mut asks: Vec<(usize, usize, Value)> = Vec::new();
        for (i, r) in body["requests"].as_array().unwrap().iter().enumerate() {
            if results[i]["allowed"] != json!(true) {
                continue;
            }
            for (j, c) in r["checks"].as_array().unwrap().iter().enumerate() {
                if u(c, "lease") > 0 {
                    asks.retain(|(_, _, a)| a["key"] != c["key"]);
                    asks.push((i, j, c.clone()));
                }
            }
        }
        for (i, j, c) in asks {
            let (units, lease_ms) = self.grant(&c, now);
            if units > 0 {
                results[i]["checks"][j]["lease"] = json!(units);
                results[i]["checks"][j]["lease_ms"] = json!(lease_ms);
            }
        }
        serde_json::to_vec(&json!({"results": results, "now_ms": stamp})).unwrap()
    }

    fn release(&mut self, body: &[u8]) {
        let body: Value = serde_json::from_slice(body).unwrap();
        for r in body["releases"].as_array().unwrap() {
            if let Some(m) = self.slots.get_mut(r["key"].as_str().unwrap()) {
                m.remove(r["id"].as_str().unwrap());
            }
        }
    }

    fn held_slots(&self, now: u64) -> usize {
        self.slots
            .values()
            .map(|m| m.values().filter(|&&e| e > now).count())
            .sum()
    }
}

// --- The harness: the engine, the fake host, the model, and the request's view ---------------

/// How the test answers a callout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shim {
    /// The shim runs it and answers.
    Ok,
    /// The shim runs it but refuses request `i` alone.
    Refuse(usize),
    /// The shim runs it, then the answer is lost: the host reports a timeout (504).
    TimeoutAfterCommit,
    /// Not run; the host reports this status.
    Status(u32),
    /// A 200 with a body that is not an answer.
    Garbage,
    /// The host never calls back (only the watchdog can end it).
    Never,
}

struct Harness {
    host: FakeHost,
    engine: Engine<FakeHost>,
    redis: FakeRedis,
    next_ctx: u32,
    /// Redis's clock minus the gateway's.
    redis_offset: i64,
    /// Per request context: what on_request_headers returned.
    actions: HashMap<u32, Action>,
    /// Contexts whose client left before their verdict.
    left_early: Vec<u32>,
    /// Cache denials that the model of Redis would have allowed.
    unsound_denials: Vec<String>,
    /// Release callouts the shim got.
    releases_sent: usize,
}

fn config(json: &str) -> Config {
    Config::from_json(json.as_bytes()).unwrap()
}

impl Harness {
    fn new(json: &str) -> Harness {
        Harness::with_host(FakeHost::new(ROOT), config(json), FakeRedis::default())
    }

    fn with_host(host: FakeHost, config: Config, redis: FakeRedis) -> Harness {
        let now = host.w().now_ms.max(1_000_000);
        host.w().now_ms = now;
        let caps = host.caps();
        let engine = Engine::new(host.clone(), config, caps, ROOT, 0xabc).unwrap();
        Harness {
            host,
            engine,
            redis,
            next_ctx: 100,
            redis_offset: 0,
            actions: HashMap::new(),
            left_early: Vec::new(),
            unsound_denials: Vec::new(),
            releases_sent: 0,
        }
    }

    fn now(&self) -> u64 {
        self.host.w().now_ms
    }

    fn redis_now(&self) -> u64 {
        self.now().saturating_add_signed(self.redis_offset)
    }

    fn advance(&mut self, ms: u64) {
        self.host.w().now_ms += ms;
    }

    fn in_callback<T>(&mut self, ctx: u32, f: impl FnOnce(&mut Engine<FakeHost>) -> T) -> T {
        {
            let mut w = self.host.w();
            w.callback_ctx = ctx;
            w.effective = ctx;
        }
        let out = f(&mut self.engine);
        let mut w = self.host.w();
        w.callback_ctx = ROOT;
        w.effective = ROOT;
        out
    }

    /// A new request with these headers (`:path` defaults to `/`).
    fn request(&mut self, headers: &[(&str, &str)]) -> (u32, Action) {
        let ctx = self.next_ctx;
        self.next_ctx += 1;
        {
            let mut w = self.host.w();
            w.live.insert(ctx);
            let mut h: Vec<(String, String)> = headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect();
            if !h.iter().any(|(n, _)| n == ":path") {
                h.push((":path".into(), "/".into()));
            }
            w.request_headers.insert(ctx, h);
        }
        let hits_before = self.host.metric(Counter::CacheHits.name());
        let action = self.in_callback(ctx, |e| e.on_request_headers(ctx));
        if self.host.metric(Counter::CacheHits.name()) > hits_before {
            self.check_cache_denial(ctx);
        }
        self.actions.insert(ctx, action);
        self.pump_releases();
        (ctx, action)
    }

    /// The checks request `ctx` makes, built at corrected ms `now_ms`.
    fn checks_at(&self, ctx: u32, now_ms: u64) -> Vec<Check> {
        self.host.w().effective = ctx;
        let checks = checks_for(self.engine.config(), &self.host, now_ms, "probe");
        self.host.w().effective = ROOT;
        checks
    }

    /// The checks request `ctx` makes now.
    fn checks_of(&self, ctx: u32) -> Vec<Check> {
        self.checks_at(ctx, self.engine.corrected(self.engine.gateway_ms()))
    }

    /// `n` requests with these headers, each checked in Redis (answered) and finished: the
    /// third of a key makes it hot on this worker and asks a lease.
    fn checked_in_redis(&mut self, headers: &[(&str, &str)], n: usize) {
        for _ in 0..n {
            let (ctx, _) = self.request(headers);
            self.answer_first(Shim::Ok);
            self.finish(ctx);
        }
    }

    /// The over-limit cache just denied `ctx`: the model of Redis must deny it too.
    fn check_cache_denial(&mut self, ctx: u32) {
        let gateway = self.engine.gateway_ms();
        let checks = self.checks_of(ctx);
        if std::env::var("TOLLGATE_DEBUG").is_ok() {
            for c in &checks {
                let id = cache::identity(c);
                let e = self
                    .host
                    .shared_get(&cache::slot(&id))
                    .and_then(|b| cache::decode(&b));
                eprintln!(
                    "check {:?} cost {} entry {:?} gateway {gateway} redis {}",
                    c.kind,
                    c.cost,
                    e.filter(|e| e.key == id),
                    self.redis_now()
                );
            }
            let mut copy = self.redis.clone();
            let body: Value = serde_json::from_slice(&wire::encode(&[&checks])).unwrap();
            eprintln!(
                "model: {}",
                copy.run_request(
                    body["requests"][0]["checks"].as_array().unwrap(),
                    self.redis_now()
                )
            );
        }
        if !self.redis.would_deny(&checks, self.redis_now()) {
            self.unsound_denials.push(format!(
                "ctx {ctx} at {}: {:?}",
                self.redis_now(),
                checks.iter().map(|c| &c.key).collect::<Vec<_>>()
            ));
        }
    }

    /// `on_log`: the stream ended.
    fn on_log(&mut self, ctx: u32) {
        self.host.w().in_log = true;
        self.in_callback(ctx, |e| e.on_done(ctx));
        self.host.w().in_log = false;
    }

    /// The response comes back and the stream ends.
    fn finish(&mut self, ctx: u32) {
        self.in_callback(ctx, |e| e.on_response_headers(ctx));
        self.on_log(ctx);
        self.host.w().live.remove(&ctx);
        self.pump_releases();
    }

    /// The client goes away.
    fn abort(&mut self, ctx: u32) {
        if self.deliveries(ctx) == 0 && self.actions.get(&ctx) == Some(&Action::Pause) {
            self.left_early.push(ctx);
        }
        self.on_log(ctx);
        self.host.w().live.remove(&ctx);
        self.pump_releases();
    }

    fn deliveries(&self, ctx: u32) -> usize {
        let w = self.host.0.borrow();
        w.resumed.get(&ctx).copied().unwrap_or(0) as usize
            + w.answered.get(&ctx).map_or(0, Vec::len)
    }

    fn check_callouts(&self) -> Vec<Callout> {
        let w = self.host.0.borrow();
        w.callouts
            .iter()
            .filter(|c| c.path.ends_with("/check"))
            .cloned()
            .collect()
    }

    fn take_callout(&mut self, token: u32) -> Callout {
        let mut w = self.host.w();
        let i = w.callouts.iter().position(|c| c.token == token).unwrap();
        w.callouts.remove(i)
    }

    /// Delivers a reply as the SDK would: to the context that was running when the call was
    /// sent, or nowhere if that context is gone.
    fn deliver(&mut self, callout: &Callout, status: Option<u32>, body: Vec<u8>) {
        let to = callout.callback_ctx;
        if !self.host.w().live.contains(&to) {
            return;
        }
        let (nh, nb) = (usize::from(status.is_some()), body.len());
        self.host.w().reply = Some((status, body));
        self.in_callback(to, |e| {
            e.on_callout_reply(callout.token, nh, nb, to == ROOT)
        });
        self.host.w().reply = None;
        self.pump_releases();
    }

    /// Answers check callout `token`.
    fn answer(&mut self, token: u32, how: Shim) {
        let c = self.take_callout(token);
        let now = self.redis_now();
        if std::env::var("TOLLGATE_DEBUG").is_ok() {
            eprintln!(
                "answer {token} {how:?} at {now}: {}",
                String::from_utf8_lossy(&c.body)
            );
        }
        // Redis's stamp is the midpoint of the round trip, as the skew estimator assumes.
        let stamp =
            (c.sent_ms + (self.now() - c.sent_ms) / 2).saturating_add_signed(self.redis_offset);
        match how {
            Shim::Ok => {
                let body = self.redis.check(&c.body, now, None, stamp);
                self.deliver(&c, Some(200), body);
            }
            Shim::Refuse(i) => {
                let body = self.redis.check(&c.body, now, Some(i), stamp);
                self.deliver(&c, Some(200), body);
            }
            Shim::TimeoutAfterCommit => {
                self.redis.check(&c.body, now, None, stamp);
                self.deliver(&c, Some(504), Vec::new());
            }
            Shim::Status(status) => self.deliver(&c, Some(status), b"{}".to_vec()),
            Shim::Garbage => self.deliver(&c, Some(200), b"<html>".to_vec()),
            // On ngx_wasm_module the host's own timeout answers it (see `tick`).
            Shim::Never if self.host.w().ngx => self.host.w().callouts.push(c),
            Shim::Never => {}
        }
    }

    /// Answers the oldest check callout.
    /// The shim answers whatever is out (checks, refills), and what the root sends at its next
    /// tick.
    fn answer_everything(&mut self) {
        let answer_all = |h: &mut Harness| {
            while !h.check_callouts().is_empty() {
                h.answer_first(Shim::Ok);
            }
        };
        answer_all(self);
        self.tick(1);
        answer_all(self);
    }

    fn answer_first(&mut self, how: Shim) {
        let token = self.check_callouts()[0].token;
        self.answer(token, how);
    }

    /// The shim applies every release as it arrives.
    fn pump_releases(&mut self) {
        loop {
            let next = {
                let w = self.host.0.borrow();
                w.callouts
                    .iter()
                    .find(|c| c.path.ends_with("/release"))
                    .cloned()
            };
            let Some(c) = next else { return };
            self.take_callout(c.token);
            self.releases_sent += 1;
            self.redis.release(&c.body);
            self.deliver(&c, Some(200), b"{}".to_vec());
        }
    }

    fn tick(&mut self, advance_ms: u64) {
        self.advance(advance_ms);
        if self.host.w().ngx {
            // ngx_wasm_module's own callout timeout: a failed reply to the calling context.
            let now = self.now();
            let due: Vec<Callout> = self
                .host
                .0
                .borrow()
                .callouts
                .iter()
                .filter(|c| now >= c.sent_ms + c.timeout_ms)
                .cloned()
                .collect();
            for c in due {
                self.take_callout(c.token);
                self.deliver(&c, None, Vec::new());
            }
        }
        self.in_callback(ROOT, Engine::on_tick);
        if std::mem::take(&mut self.host.w().queue_items) > 0 {
            self.host.w().queue_items = 1;
            self.in_callback(ROOT, Engine::on_queue_ready);
        }
        self.pump_releases();
    }

    fn metric(&self, c: Counter) -> i64 {
        self.host.metric(c.name())
    }

    fn status_of(&self, ctx: u32) -> Option<u32> {
        let w = self.host.0.borrow();
        if let Some(r) = w.answered.get(&ctx).and_then(|v| v.first()) {
            return Some(r.status);
        }
        if w.resumed.contains_key(&ctx) || self.actions.get(&ctx) == Some(&Action::Continue) {
            return Some(200);
        }
        None
    }
}

const SHIM: &str = r#""shim": {"upstream": "shim", "timeout": "100ms"}"#;

fn cfg(rest: &str) -> String {
    format!("{{{SHIM}, {rest}}}")
}

// --- Scenario tests: one per defect ------------------------------------------------------------

#[test]
fn a_request_the_shim_refuses_fails_alone_and_does_not_open_the_breaker() {
    let mut h = Harness::new(&cfg(
        r#""rules": [{"name": "r", "descriptors": ["header:k"], "limit": 3, "window": "1m"}]"#,
    ));
    // One request in flight alone; the next eight queue behind it and go as one batch.
    let (first, _) = h.request(&[("k", "a")]);
    let queued: Vec<u32> = (0..8).map(|_| h.request(&[("k", "b")]).0).collect();
    h.answer_first(Shim::Ok);
    assert_eq!(h.status_of(first), Some(200));
    h.tick(1);
    // Every batch refuses one of its requests (a client-crafted problem): only that one fails.
    for _ in 0..8 {
        let Some(c) = h.check_callouts().first().cloned() else {
            break;
        };
        h.answer(c.token, Shim::Refuse(0));
        h.tick(1);
    }
    let refused = h.metric(Counter::FailedOpen);
    assert!(refused >= 1);
    let statuses: Vec<_> = queued.iter().map(|&c| h.status_of(c)).collect();
    assert!(statuses.iter().all(Option::is_some), "{statuses:?}");
    // The breaker did not open: a normal key is still limited by Redis.
    let mut normal = Vec::new();
    for _ in 0..5 {
        let (ctx, _) = h.request(&[("k", "n")]);
        h.tick(1);
        if let Some(c) = h.check_callouts().first().cloned() {
            h.answer(c.token, Shim::Ok);
        }
        normal.push(h.status_of(ctx));
        h.finish(ctx);
    }
    assert_eq!(
        normal,
        [Some(200), Some(200), Some(200), Some(429), Some(429)]
    );
}

#[test]
fn the_breaker_counts_callouts_and_lets_one_probe_through() {
    // Every request asks Redis here (no leases), so each one shows whether the breaker calls.
    let mut h = Harness::new(&cfg(
        r#""leases": {"enabled": false}, "rules": [{"name": "r", "descriptors": ["header:k"], "limit": 100, "window": "1m"}]"#,
    ));
    // A batch of 20 requests failing is one failure, not twenty.
    let (a, _) = h.request(&[("k", "a")]);
    for _ in 0..20 {
        h.request(&[("k", "a")]);
    }
    h.answer_first(Shim::Status(503));
    h.tick(1);
    h.answer_first(Shim::Status(503));
    assert_eq!(h.status_of(a), Some(200), "failed open");
    assert_eq!(h.engine.breaker, {
        let mut b = Breaker::default();
        b.failed(0);
        b.failed(0);
        b
    });
    // Three more failed callouts open it (five in a row).
    for _ in 0..3 {
        let (ctx, _) = h.request(&[("k", "a")]);
        h.answer_first(Shim::Status(503));
        h.finish(ctx);
    }
    let sent_before = h.check_callouts().len();
    let (open, _) = h.request(&[("k", "a")]);
    assert_eq!(h.check_callouts().len(), sent_before, "open: no call");
    assert_eq!(h.status_of(open), Some(200));
    // After the pause: one probe, and nobody else calls while it is out.
    h.tick(crate::local::BREAKER_OPEN_MS);
    let (probe, action) = h.request(&[("k", "a")]);
    assert_eq!(action, Action::Pause);
    let others: Vec<u32> = (0..5).map(|_| h.request(&[("k", "a")]).0).collect();
    h.tick(1);
    assert_eq!(h.check_callouts().len(), 1, "only the probe is out");
    assert!(others.iter().all(|&c| h.status_of(c) == Some(200)));
    h.answer_first(Shim::Ok);
    assert_eq!(h.status_of(probe), Some(200));
    let (after, _) = h.request(&[("k", "a")]);
    assert_eq!(h.check_callouts().len(), 1, "closed again: calls resume");
    h.answer_first(Shim::Ok);
    assert_eq!(h.status_of(after), Some(200));
}

#[test]
fn the_cache_never_denies_a_tier_with_a_higher_limit_on_the_same_key() {
    let mut h = Harness::new(&cfg(
        r#""rules": [{"name": "plan", "descriptors": ["header:k"],
            "tiers": {"descriptor": "header:x-plan", "values": {"free": [{"limit": 2, "window": "1h"}],
                      "pro": [{"limit": 10, "window": "1h"}]}, "default": [{"limit": 2, "window": "1h"}]}}]"#,
    ));
    let run = |h: &mut Harness, plan: &str| {
        let (ctx, _) = h.request(&[("k", "K"), ("x-plan", plan)]);
        if h.status_of(ctx).is_none() {
            h.answer_first(Shim::Ok);
        }
        let s = h.status_of(ctx);
        h.finish(ctx);
        s
    };
    let free: Vec<_> = (0..3).map(|_| run(&mut h, "free")).collect();
    assert_eq!(free, [Some(200), Some(200), Some(429)]);
    assert_eq!(run(&mut h, "free"), Some(429), "the cache answers free");
    assert_eq!(h.metric(Counter::CacheHits), 1);
    let pro: Vec<_> = (0..8).map(|_| run(&mut h, "pro")).collect();
    assert!(pro.iter().all(|s| *s == Some(200)), "{pro:?}");
    assert!(h.unsound_denials.is_empty(), "{:?}", h.unsound_denials);
}

#[test]
fn the_cache_forgets_entries_of_a_limit_a_reload_raised() {
    let rules = |limit: u32| {
        cfg(&format!(
            r#""rules": [{{"name": "r", "descriptors": ["header:k"], "algorithm": "token_bucket",
                "burst": {limit}, "rate": 1, "period": "1h"}}]"#
        ))
    };
    let mut h = Harness::new(&rules(2));
    for _ in 0..3 {
        let (ctx, _) = h.request(&[("k", "K")]);
        if h.status_of(ctx).is_none() {
            h.answer_first(Shim::Ok);
        }
        h.finish(ctx);
    }
    assert!(
        !h.host.0.borrow().shared.is_empty(),
        "the denial was shared"
    );
    // A reload: a new engine on the same host (shared data outlives the VM) and Redis.
    let (host, redis) = (h.host.clone(), h.redis.clone());
    let mut h = Harness::with_host(host, config(&rules(5)), redis);
    let (ctx, action) = h.request(&[("k", "K")]);
    assert_eq!(action, Action::Pause, "asks Redis instead of the old entry");
    h.answer_first(Shim::Ok);
    assert_eq!(h.status_of(ctx), Some(200));
}

#[test]
fn cache_entries_count_from_when_the_checks_were_built_not_from_the_reply() {
    let mut h = Harness::new(&cfg(
        r#""rules": [{"name": "g", "descriptors": ["header:k"], "algorithm": "gcra",
            "burst": 1, "rate": 1, "period": "1s"}]"#,
    ));
    let (a, _) = h.request(&[("k", "K")]);
    h.answer_first(Shim::Ok);
    h.finish(a);
    // Built at t, answered 400 ms later: Redis says retry in ~600 ms from when it ran.
    let (b, _) = h.request(&[("k", "K")]);
    let built = h.now();
    h.advance(400);
    h.answer_first(Shim::Ok);
    assert_eq!(h.status_of(b), Some(429));
    let checks = h.checks_at(b, built);
    let now = h.now();
    let until = h
        .engine
        .near
        .get(&cache::identity(&checks[0]), now)
        .map(|e| e.until_ms)
        .unwrap();
    assert!(
        until <= built + 1000,
        "until {until} overshoots {}",
        built + 1000
    );
}

#[test]
fn an_aborted_request_gives_back_its_concurrency_slot_whatever_happens_to_its_callout() {
    let json = cfg(
        r#""rules": [{"name": "c", "descriptors": ["header:k"], "algorithm": "concurrency", "limit": 2}]"#,
    );
    for how in [
        Shim::Ok,
        Shim::TimeoutAfterCommit,
        Shim::Never,
        Shim::Garbage,
        Shim::Status(503),
    ] {
        let mut h = Harness::new(&json);
        for _ in 0..20 {
            let (ctx, _) = h.request(&[("k", "K")]);
            h.tick(1);
            h.abort(ctx);
            // The shim ran the check anyway (a slot may now be held), or not.
            for c in h.check_callouts() {
                h.answer(c.token, how);
            }
            h.tick(300);
        }
        h.tick(1_000);
        assert_eq!(h.redis.held_slots(h.redis_now()), 0, "{how:?}");
        let statuses: Vec<_> = (0..3)
            .map(|_| {
                let (ctx, _) = h.request(&[("k", "K")]);
                h.answer_first(Shim::Ok);
                let s = h.status_of(ctx);
                h.finish(ctx);
                s
            })
            .collect();
        assert_eq!(statuses, [Some(200); 3], "{how:?}");
    }
}

#[test]
fn clients_hanging_up_mid_check_never_open_the_breaker() {
    let mut h = Harness::new(&cfg(
        r#""coalesce": false, "rules": [{"name": "r", "descriptors": ["header:k"], "limit": 100, "window": "1m"}]"#,
    ));
    // Each client leaves while its own callout is out: the SDK drops the reply with the
    // context, so only the watchdog ends the callout.
    for _ in 0..10 {
        let (ctx, _) = h.request(&[("k", "a")]);
        h.abort(ctx);
        h.answer_first(Shim::Ok);
        h.tick(200);
    }
    assert_eq!(h.engine.breaker, Breaker::default(), "still closed");
    let (ctx, action) = h.request(&[("k", "a")]);
    assert_eq!(action, Action::Pause, "asks the shim");
    h.answer_first(Shim::Ok);
    assert_eq!(h.status_of(ctx), Some(200));
}

#[test]
fn a_reload_reuses_the_workers_kick_queue() {
    let host = FakeHost::new(ROOT);
    let json = cfg(r#""rules": [{"name": "r", "descriptors": [], "limit": 1, "window": "1s"}]"#);
    for limit in [1, 2] {
        let json = json.replace("\"limit\": 1", &format!("\"limit\": {limit}"));
        Engine::new(host.clone(), config(&json), HostCaps::ENVOY, ROOT, 0xabc).unwrap();
    }
    let queues = host.0.borrow().queues.clone();
    assert_eq!(queues.len(), 2);
    assert_eq!(
        host.0.borrow().tick_ms,
        KICKED_TICK_MS,
        "with a kick queue the tick is only the fallback"
    );
    assert_eq!(
        queues[0], queues[1],
        "one name per VM, not per configuration"
    );
}

#[test]
fn a_denial_releases_slots_only_when_its_keys_span_slot_groups() {
    let one = cfg(
        r#""rules": [{"name": "c", "descriptors": ["header:k"], "algorithm": "concurrency", "limit": 1}]"#,
    );
    let two = cfg(
        r#""rules": [{"name": "c", "descriptors": ["header:k"], "algorithm": "concurrency", "limit": 1},
                     {"name": "w", "descriptors": ["header:k"], "limit": 100, "window": "1m"}]"#,
    );
    for (json, releases) in [(one, 0), (two, 1)] {
        let mut h = Harness::new(&json);
        let (holder, _) = h.request(&[("k", "a")]);
        h.answer_first(Shim::Ok);
        let (denied, _) = h.request(&[("k", "a")]);
        h.answer_first(Shim::Ok);
        assert_eq!(h.status_of(denied), Some(429));
        // One script call decided a single-tag request all or nothing: nothing to give back.
        assert_eq!(h.releases_sent, releases, "{json}");
        h.finish(holder);
        assert_eq!(h.releases_sent, releases + 1);
    }
}

#[test]
fn a_failed_batch_is_counted_once_per_request() {
    let mut h = Harness::new(&cfg(
        r#""rules": [{"name": "r", "descriptors": ["header:k"], "limit": 100, "window": "1m"}]"#,
    ));
    let (_, _) = h.request(&[("k", "a")]);
    for _ in 0..4 {
        h.request(&[("k", "a")]);
    }
    h.answer_first(Shim::Ok);
    h.tick(1);
    h.answer_first(Shim::Status(503));
    assert_eq!(h.metric(Counter::Checked), 5);
    assert_eq!(h.metric(Counter::Allowed), 1);
    assert_eq!(h.metric(Counter::FailedOpen), 4);
}

#[test]
fn a_queued_request_waits_at_most_its_timeout_in_all() {
    let mut h = Harness::new(&cfg(
        r#""rules": [{"name": "r", "descriptors": ["header:k"], "limit": 100, "window": "1m"}]"#,
    ));
    let (first, _) = h.request(&[("k", "a")]);
    let (queued, _) = h.request(&[("k", "a")]);
    // The first callout takes 80 of the 100 ms; the queued one then gets what is left.
    h.advance(80);
    h.answer_first(Shim::Ok);
    assert_eq!(h.status_of(first), Some(200));
    h.tick(0);
    let batch = h.check_callouts()[0].clone();
    assert!(batch.timeout_ms <= 20, "{}", batch.timeout_ms);
    h.answer(batch.token, Shim::Never);
    h.tick(20 + WATCHDOG_GRACE_MS);
    assert_eq!(h.status_of(queued), None);
    h.tick(1);
    assert_eq!(
        h.status_of(queued),
        Some(200),
        "failed open by the watchdog"
    );
}

#[test]
fn callouts_are_never_attributed_to_a_request_context() {
    let mut h = Harness::new(&cfg(
        r#""rules": [{"name": "c", "descriptors": ["header:k"], "algorithm": "concurrency", "limit": 5}]"#,
    ));
    let (a, _) = h.request(&[("k", "a")]);
    let (b, _) = h.request(&[("k", "a")]);
    h.answer_first(Shim::Ok);
    h.tick(1);
    h.answer_first(Shim::Ok);
    h.finish(a);
    h.finish(b);
    // The host cancels a call with its context; the SDK would then keep its token forever.
    let w = h.host.0.borrow();
    assert!(w.misuse.is_empty(), "{:?}", w.misuse);
    assert!(w.callouts.is_empty());
    drop(w);
    assert_eq!(h.redis.held_slots(h.redis_now()), 0);
}

/// A harness on a model of ngx_wasm_module (Kong).
fn on_ngx(json: &str) -> Harness {
    let host = FakeHost::new(ROOT);
    host.w().ngx = true;
    Harness::with_host(host, config(json), FakeRedis::default())
}

#[test]
fn on_ngx_wasm_each_request_is_answered_in_its_own_callback() {
    // coalesce defaults to true: the engine must not queue requests for a root-sent batch there.
    let mut h = on_ngx(&cfg(
        r#""rules": [{"name": "r", "descriptors": ["header:k"], "limit": 2, "window": "1m"}]"#,
    ));
    assert!(!h.engine.coalescing());
    assert_eq!(h.host.w().tick_ms, RELEASE_TICK_MS);
    let ctxs: Vec<u32> = (0..4).map(|_| h.request(&[("k", "a")]).0).collect();
    assert_eq!(h.check_callouts().len(), 4, "one callout each, none queued");
    assert!(h.check_callouts().iter().all(|c| c.callback_ctx != ROOT));
    for _ in 0..4 {
        h.tick(1);
        h.answer_first(Shim::Ok);
    }
    let statuses: Vec<_> = ctxs.iter().map(|&c| h.status_of(c)).collect();
    assert_eq!(statuses, [Some(200), Some(200), Some(429), Some(429)]);
    assert!(h.host.w().misuse.is_empty(), "{:?}", h.host.w().misuse);
}

#[test]
fn on_ngx_wasm_the_watchdog_leaves_a_live_request_to_the_hosts_timeout() {
    let mut h = on_ngx(&cfg(
        r#""rules": [{"name": "r", "descriptors": ["header:k"], "limit": 2, "window": "1m"}]"#,
    ));
    let (ctx, _) = h.request(&[("k", "a")]);
    let token = h.check_callouts()[0].token;
    h.answer(token, Shim::Never);
    // Past the deadline and the grace: the root cannot answer it, so it waits...
    h.advance(100 + WATCHDOG_GRACE_MS + 10);
    h.in_callback(ROOT, Engine::on_tick);
    assert_eq!(h.status_of(ctx), None);
    assert!(h.host.w().misuse.is_empty(), "{:?}", h.host.w().misuse);
    // ...for the host's own timeout, which calls back in the request's context.
    h.tick(0);
    assert_eq!(h.status_of(ctx), Some(200), "failure mode allow");
    assert!(h.host.w().misuse.is_empty(), "{:?}", h.host.w().misuse);
}

#[test]
fn on_ngx_wasm_releases_go_out_on_the_next_tick_not_from_on_log() {
    let mut h = on_ngx(&cfg(
        r#""rules": [{"name": "c", "descriptors": ["header:k"], "algorithm": "concurrency", "limit": 1}]"#,
    ));
    let (a, _) = h.request(&[("k", "a")]);
    h.answer_first(Shim::Ok);
    h.finish(a);
    assert_eq!(
        h.redis.held_slots(h.redis_now()),
        1,
        "not released from on_log"
    );
    h.tick(RELEASE_TICK_MS);
    assert_eq!(
        h.redis.held_slots(h.redis_now()),
        0,
        "released from the tick"
    );
    let (b, _) = h.request(&[("k", "a")]);
    h.answer_first(Shim::Ok);
    assert_eq!(h.status_of(b), Some(200));
    assert!(h.host.w().misuse.is_empty(), "{:?}", h.host.w().misuse);
}

#[test]
fn dispatch_failures_take_the_failure_mode_once() {
    let mut h = Harness::new(&cfg(
        r#""failure_mode": "deny", "rules": [{"name": "r", "descriptors": [], "limit": 5, "window": "1m"}]"#,
    ));
    h.host.w().dispatch_fails = true;
    let (ctx, action) = h.request(&[]);
    assert_eq!(action, Action::Pause);
    assert_eq!(h.status_of(ctx), Some(503));
    assert_eq!(h.metric(Counter::FailedClosed), 1);
    assert_eq!(h.metric(Counter::Checked), 1);
}

// --- Usage rules -------------------------------------------------------------------------------

impl Harness {
    /// The upstream answers `ctx` with these headers and body chunks, then the stream ends.
    fn respond(&mut self, ctx: u32, headers: &[(&str, &str)], chunks: &[&[u8]]) {
        self.host.w().upstream_headers.insert(
            ctx,
            headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        );
        self.in_callback(ctx, |e| e.on_response_headers(ctx));
        for chunk in chunks {
            self.host.w().body_chunk = chunk.to_vec();
            self.in_callback(ctx, |e| e.on_response_body(ctx, chunk.len()));
        }
    }

    fn charge_bodies(&self) -> Vec<Value> {
        let w = self.host.0.borrow();
        w.callouts
            .iter()
            .filter(|c| c.path.ends_with("/charge"))
            .map(|c| serde_json::from_slice(&c.body).unwrap())
            .collect()
    }
}

const USAGE_RULES: &str = r#""rules": [
    {"name": "tokens", "descriptors": ["header:k"], "limits": [{"limit": 1000, "window": "1h"}, {"limit": 5000, "window": "1d"}],
     "usage": {"from": "json:usage.total_tokens", "reserve": 10}},
    {"name": "bytes", "descriptors": ["header:k"], "algorithm": "sliding_window_estimate", "limit": 1000000, "window": "1m",
     "usage": {"from": "bytes", "reserve": 0}}]"#;

#[test]
fn usage_is_charged_after_the_response_beyond_the_reserve() {
    let mut h = Harness::new(&cfg(USAGE_RULES));
    let (ctx, _) = h.request(&[("k", "a")]);
    h.answer_first(Shim::Ok);
    assert_eq!(h.status_of(ctx), Some(200));
    let body = br#"{"usage":{"total_tokens":42}}"#;
    h.respond(ctx, &[(":status", "200")], &[&body[..10], &body[10..]]);
    assert!(
        h.charge_bodies().is_empty(),
        "nothing before the stream ends"
    );
    h.finish(ctx);
    h.tick(1);
    let charges = h.charge_bodies();
    assert_eq!(charges.len(), 1, "one callout for every counter");
    let c = &charges[0]["charges"];
    // Both limits of the token rule get 42 − 10; the bytes rule gets the body's size.
    assert_eq!(c.as_array().unwrap().len(), 3, "{c}");
    assert_eq!(c[0]["delta"], 32);
    assert_eq!(c[1]["delta"], 32);
    assert_eq!(c[2]["delta"], body.len());
    assert!(c[0]["key"].as_str().unwrap().contains(":3600000:"));
    assert_eq!(h.metric(Counter::UsageCharges), 3);
    // The shim does not confirm: counted as failed, nothing else happens.
    let token = h
        .host
        .0
        .borrow()
        .callouts
        .iter()
        .find(|c| c.path.ends_with("/charge"))
        .unwrap()
        .token;
    let callout = h.take_callout(token);
    h.deliver(&callout, Some(503), b"{}".to_vec());
    assert_eq!(h.metric(Counter::UsageChargeFailures), 3);
}

#[test]
fn unused_reserve_is_handed_back_and_an_unknown_amount_keeps_it() {
    let mut h = Harness::new(&cfg(USAGE_RULES));
    let (a, _) = h.request(&[("k", "a")]);
    h.answer_first(Shim::Ok);
    h.respond(a, &[], &[br#"{"usage":{"total_tokens":4}}"#]);
    h.finish(a);
    let (b, _) = h.request(&[("k", "a")]);
    h.answer_first(Shim::Ok);
    h.respond(b, &[], &[b"<html>not json</html>"]);
    h.finish(b);
    h.tick(1);
    let deltas: Vec<i64> = h
        .charge_bodies()
        .iter()
        .flat_map(|b| b["charges"].as_array().unwrap().clone())
        .map(|c| c["delta"].as_i64().unwrap())
        .collect();
    // a: 4 − 10 twice (refunds), and its 28 bytes; b: only its 21 bytes (tokens unknown).
    assert_eq!(deltas, [-6, -6, 28, 21]);
}

#[test]
fn usage_after_a_fail_open_admission_is_charged_whole_and_lost_charges_are_counted() {
    let mut h = Harness::new(&cfg(USAGE_RULES));
    let (ctx, _) = h.request(&[("k", "a")]);
    h.answer_first(Shim::Status(503));
    assert_eq!(h.status_of(ctx), Some(200), "failed open");
    h.respond(ctx, &[], &[br#"{"usage":{"total_tokens":42}}"#]);
    h.finish(ctx);
    h.tick(1);
    let c = h.charge_bodies()[0]["charges"].clone();
    assert_eq!(c[0]["delta"], 42, "no reserve is known to be charged");
    // Never answered: the watchdog counts the loss.
    h.tick(200);
    assert_eq!(h.metric(Counter::UsageChargeFailures), 3);
    assert!(h.engine.charge_callouts.is_empty());
}

// --- The property test: random interleavings ---------------------------------------------------

/// A small deterministic generator (xorshift64*), so every failure names a seed that replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Every algorithm, tiers whose descriptor is not in the key, costs from a header, shadow
/// rules, concurrency, several limits per rule.
fn property_config(coalesce: bool, skew: bool, failure_mode: &str, scale: u64) -> String {
    let l = |n: u64| n * scale;
    let fallback = if failure_mode == "local" {
        r#""local_fallback": {"replicas": 1},"#
    } else {
        ""
    };
    cfg(&format!(
        r#""coalesce": {coalesce}, "clock": {{"correct_skew": {skew}}}, "failure_mode": "{failure_mode}",
        {fallback}
        "rules": [
          {{"name": "fw", "descriptors": ["header:k"], "limits": [{{"limit": {}, "window": "1s"}}, {{"limit": {}, "window": "1m"}}],
            "cost": {{"header": "x-cost", "default": 1, "max": 3}}}},
          {{"name": "tier", "descriptors": ["header:k"], "tiers": {{"descriptor": "header:x-plan",
            "values": {{"pro": [{{"limit": {}, "window": "2s"}}]}}, "default": [{{"limit": {}, "window": "2s"}}]}},
            "algorithm": "sliding_window"}},
          {{"name": "log", "descriptors": ["header:k"], "algorithm": "sliding_log", "limit": {}, "window": "1s",
            "match": {{"path_prefix": "/log"}}}},
          {{"name": "swe", "descriptors": ["header:k"], "algorithm": "sliding_window_estimate", "limit": {}, "window": "2s",
            "match": {{"path_prefix": "/log"}}}},
          {{"name": "tb", "descriptors": ["header:k"], "algorithm": "token_bucket", "burst": {}, "rate": 2, "period": "1s",
            "match": {{"path_prefix": "/tb"}}}},
          {{"name": "gcra", "descriptors": ["header:k"], "algorithm": "gcra", "burst": {}, "rate": 3, "period": "1s",
            "match": {{"path_prefix": "/gcra"}}}},
          {{"name": "conc", "descriptors": ["header:k"], "algorithm": "concurrency", "limit": {}, "timeout": "5s",
            "match": {{"path_prefix": "/conc"}}}},
          {{"name": "shadow", "descriptors": [], "limit": 1, "window": "1s", "shadow": true}}
        ]"#,
        l(4),
        l(20),
        l(6),
        l(2),
        l(3),
        l(3),
        l(3),
        l(2),
        l(2)
    ))
}

/// One random run; returns a description of the first broken invariant.
fn run_once(seed: u64) -> Result<(), String> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let coalesce = rng.below(4) != 0;
    let skew = rng.below(2) == 0;
    let mode = *rng.pick(&["allow", "deny", "local"]);
    // Every third seed runs on a model of ngx_wasm_module (Kong).
    let host = FakeHost::new(ROOT);
    host.w().ngx = seed.is_multiple_of(3);
    let mut h = Harness::with_host(
        host,
        config(&property_config(coalesce, skew, mode, 1)),
        FakeRedis::default(),
    );
    if skew {
        // A gateway whose clock is off by up to ±2 s, running for a while: its workers share
        // the learned offset. (The first seconds after a start, before any reply, keys and
        // entries are made on the uncorrected clock; see `cache`.)
        h.redis_offset = rng.below(4000) as i64 - 2000;
        h.host
            .shared_set(CLOCK_OFFSET_KEY, &clock::encode(h.redis_offset));
        h.tick(0);
    }
    let paths = ["/", "/log", "/tb", "/gcra", "/conc", "/conc"];
    let keys = ["a", "b"];
    let plans = ["pro", "free"];
    let costs = ["1", "2", "0", "9"];
    let answers = [
        Shim::Ok,
        Shim::Ok,
        Shim::Ok,
        Shim::Ok,
        Shim::Refuse(0),
        Shim::TimeoutAfterCommit,
        Shim::Status(503),
        Shim::Status(400),
        Shim::Garbage,
        Shim::Never,
    ];
    let mut live: Vec<u32> = Vec::new();
    let mut reloaded = false;
    for step in 0..300 {
        match rng.below(100) {
            0..=34 => {
                let headers = [
                    (":path", *rng.pick(&paths)),
                    ("k", *rng.pick(&keys)),
                    ("x-plan", *rng.pick(&plans)),
                    ("x-cost", *rng.pick(&costs)),
                ];
                let (ctx, _) = h.request(&headers);
                live.push(ctx);
            }
            35..=59 => {
                let callouts = h.check_callouts();
                if !callouts.is_empty() {
                    let c = rng.pick(&callouts).token;
                    let how = *rng.pick(&answers);
                    let how = match how {
                        Shim::Refuse(_) => {
                            let n =
                                h.check_callouts()
                                    .iter()
                                    .find(|x| x.token == c)
                                    .map_or(1, |x| {
                                        serde_json::from_slice::<Value>(&x.body).unwrap()
                                            ["requests"]
                                            .as_array()
                                            .unwrap()
                                            .len() as u64
                                    });
                            Shim::Refuse(rng.below(n) as usize)
                        }
                        other => other,
                    };
                    h.answer(c, how);
                }
            }
            60..=69 if !live.is_empty() => {
                let i = rng.below(live.len() as u64) as usize;
                let ctx = live.swap_remove(i);
                h.abort(ctx);
            }
            70..=79 if !live.is_empty() => {
                // Streams end only once they have their verdict (or were let through).
                if let Some(i) = live.iter().position(|&c| h.status_of(c).is_some()) {
                    let ctx = live.swap_remove(i);
                    h.finish(ctx);
                }
            }
            80..=97 => {
                let ms = *rng.pick(&[0, 1, 1, 5, 30, 120, 400]);
                h.tick(ms);
            }
            _ if !reloaded && step > 150 && live.is_empty() && h.check_callouts().is_empty() => {
                // A reload raising every limit: shared data and Redis outlive the VM.
                reloaded = true;
                let (host, redis, offset) = (h.host.clone(), h.redis.clone(), h.redis_offset);
                let (actions, left, unsound) = (
                    std::mem::take(&mut h.actions),
                    std::mem::take(&mut h.left_early),
                    std::mem::take(&mut h.unsound_denials),
                );
                let next = h.next_ctx;
                h = Harness::with_host(
                    host,
                    config(&property_config(coalesce, skew, mode, 3)),
                    redis,
                );
                (
                    h.actions,
                    h.left_early,
                    h.unsound_denials,
                    h.redis_offset,
                    h.next_ctx,
                ) = (actions, left, unsound, offset, next);
            }
            _ => h.tick(1),
        }
        if let Some(bad) = h.unsound_denials.first() {
            return Err(format!(
                "step {step}: the cache denied what Redis allows: {bad}"
            ));
        }
    }
    // Drain: answer what is out, let every deadline pass, end every stream.
    for c in h.check_callouts() {
        h.answer(c.token, Shim::Ok);
    }
    for _ in 0..10 {
        h.tick(200);
        for c in h.check_callouts() {
            h.answer(c.token, Shim::Ok);
        }
    }
    for ctx in live.clone() {
        if h.status_of(ctx).is_none() {
            return Err(format!(
                "ctx {ctx} is still paused after every deadline ({:?}; misuse {:?})",
                h.engine.requests.get(&ctx),
                h.host.0.borrow().misuse
            ));
        }
        h.finish(ctx);
    }
    h.tick(10_000);

    // Invariants.
    let misuse = h.host.0.borrow().misuse.clone();
    if !misuse.is_empty() {
        return Err(format!("host calls on dead contexts: {misuse:?}"));
    }
    let mut verdicts = 0;
    for (&ctx, &action) in &h.actions {
        let n = h.deliveries(ctx);
        let left = h.left_early.contains(&ctx);
        match action {
            Action::Continue if n != 0 => {
                return Err(format!(
                    "ctx {ctx} continued and was also resumed/answered {n}×"
                ))
            }
            Action::Pause if n > 1 => return Err(format!("ctx {ctx} was delivered {n} verdicts")),
            Action::Pause if n == 0 && !left => {
                return Err(format!("ctx {ctx} never got a verdict"))
            }
            _ => {}
        }
        let synchronous_allow = action == Action::Continue && !checks_for_ctx(&h, ctx).is_empty();
        if n == 1 || synchronous_allow {
            verdicts += 1;
        }
    }
    let checked = h.metric(Counter::Checked);
    let parts = h.metric(Counter::Allowed)
        + h.metric(Counter::Denied)
        + h.metric(Counter::FailedOpen)
        + h.metric(Counter::FailedClosed)
        + h.metric(Counter::FailedLocal);
    if checked != parts {
        return Err(format!("checked {checked} ≠ sum of outcomes {parts}"));
    }
    if checked != verdicts {
        return Err(format!(
            "checked {checked} ≠ requests given a verdict {verdicts}"
        ));
    }
    let held = h.redis.held_slots(h.redis_now());
    if held != 0 {
        return Err(format!(
            "{held} concurrency slots still held after every stream ended"
        ));
    }
    if !h.engine.requests.is_empty() {
        return Err(format!(
            "{} requests still tracked",
            h.engine.requests.len()
        ));
    }
    if h.engine.batcher.callouts_in_flight() != 0 || h.engine.batcher.queued() != 0 {
        return Err("callouts or queue left over".into());
    }
    Ok(())
}

/// Whether a request (by its recorded headers) had any check: a `Continue` without checks is
/// not a verdict.
fn checks_for_ctx(h: &Harness, ctx: u32) -> Vec<Check> {
    h.host.0.borrow_mut().effective = ctx;
    let checks = checks_for(h.engine.config(), &h.host, 1_000_000, "x");
    h.host.0.borrow_mut().effective = ROOT;
    checks
}

#[test]
fn invariants_hold_under_random_interleavings() {
    // TOLLGATE_SEEDS=N runs more; a failure names its seed, replayed by TOLLGATE_SEED=S.
    let seeds: Vec<u64> = match std::env::var("TOLLGATE_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => {
            let n = std::env::var("TOLLGATE_SEEDS").map_or(300, |s| s.parse().unwrap());
            (1..=n).collect()
        }
    };
    for seed in seeds {
        if let Err(e) = run_once(seed) {
            panic!("seed {seed}: {e}");
        }
    }
}

// --- Leases ------------------------------------------------------------------------------------

/// The `RateLimit` header the engine added to `ctx`'s response.
fn remaining_header(h: &Harness, ctx: u32) -> Option<String> {
    let w = h.host.0.borrow();
    w.response_headers
        .get(&ctx)?
        .iter()
        .find(|(n, _)| n == "ratelimit")
        .map(|(_, v)| v.clone())
}

#[test]
fn a_hot_key_is_spent_from_its_lease_and_admits_exactly_its_limit() {
    let mut h = Harness::new(&cfg(
        r#""rules": [{"name": "r", "descriptors": ["header:k"], "limit": 100, "window": "1m"}]"#,
    ));
    let mut admitted = 0;
    let mut local = 0;
    for _ in 0..300 {
        let (ctx, action) = h.request(&[("k", "a")]);
        if action == Action::Continue {
            local += 1;
        }
        h.answer_everything();
        if h.status_of(ctx) == Some(200) {
            admitted += 1;
        }
        h.finish(ctx);
    }
    assert_eq!(
        admitted, 100,
        "never more than the limit, and leases near it shrink to none"
    );
    assert!(
        local > 50,
        "most of a hot key's requests need no callout ({local})"
    );
    assert_eq!(h.metric(Counter::LeaseAdmitted), local);
    assert_eq!(h.metric(Counter::Allowed), 100);
    let counted = h.redis.counters.values().map(|c| c.0).sum::<u64>();
    assert_eq!(counted, 100, "every unit granted was spent");
}

#[test]
fn a_lease_reports_what_redis_said_minus_what_was_spent() {
    let mut h = Harness::new(&cfg(
        r#""rules": [{"name": "r", "descriptors": ["header:k"], "limit": 1000, "window": "1m"}]"#,
    ));
    h.checked_in_redis(&[("k", "a")], 3);
    // The third asked a lease: 997 left, so at most 249 granted.
    let granted = h.metric(Counter::LeaseUnitsGranted);
    assert!(granted > 0);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (ctx, action) = h.request(&[("k", "a")]);
        assert_eq!(action, Action::Continue);
        h.in_callback(ctx, |e| e.on_response_headers(ctx));
        seen.push(remaining_header(&h, ctx).unwrap());
        h.finish(ctx);
    }
    assert!(seen[0].starts_with(r#""r";r=996;"#), "{seen:?}");
    assert!(
        seen[1].contains("r=995") && seen[2].contains("r=994"),
        "{seen:?}"
    );
}

#[test]
fn a_refill_is_asked_from_the_root_before_the_units_run_out_and_a_failed_one_falls_back_to_redis() {
    let mut h = Harness::new(&cfg(
        r#""leases": {"max_units": 8}, "rules": [{"name": "r", "descriptors": ["header:k"], "limit": 1000, "window": "1m"}]"#,
    ));
    h.checked_in_redis(&[("k", "a")], 3);
    assert_eq!(h.metric(Counter::LeaseUnitsGranted), 8);
    // Spending down to half the grant asks a refill, once, from the root.
    for _ in 0..4 {
        let (ctx, action) = h.request(&[("k", "a")]);
        assert_eq!(action, Action::Continue);
        h.finish(ctx);
    }
    h.tick(1);
    let refills = h.check_callouts();
    assert_eq!(refills.len(), 1, "one refill");
    assert_eq!(
        refills[0].callback_ctx, ROOT,
        "sent by the root, whose reply outlives requests"
    );
    let body: Value = serde_json::from_slice(&refills[0].body).unwrap();
    assert_eq!(body["requests"][0]["checks"][0]["cost"], 0);
    assert!(body["requests"][0]["checks"][0]["lease"].as_u64().unwrap() >= 1);
    // It fails: the units left are still spent, then requests go to Redis again.
    h.answer_first(Shim::Status(503));
    assert_eq!(h.metric(Counter::LeaseRefillFailures), 1);
    for _ in 0..4 {
        let (ctx, action) = h.request(&[("k", "a")]);
        assert_eq!(action, Action::Continue);
        h.finish(ctx);
    }
    let (ctx, action) = h.request(&[("k", "a")]);
    assert_eq!(action, Action::Pause, "no units left: checked in Redis");
    h.answer_first(Shim::Ok);
    assert_eq!(h.status_of(ctx), Some(200));
    h.finish(ctx);
}

#[test]
fn a_lease_lost_to_contention_is_given_back_or_left_unspent_never_spent_twice() {
    let mut h = Harness::new(&cfg(
        r#""rules": [{"name": "r", "descriptors": ["header:k"], "limit": 40, "window": "1m"}]"#,
    ));
    let mut admitted = 0;
    let mut rng = Rng(7);
    for _ in 0..200 {
        // Other workers win some compare-and-swaps.
        h.host.w().cas_conflicts = rng.below(6) as usize;
        let (ctx, _) = h.request(&[("k", "a")]);
        h.host.w().cas_conflicts = 0;
        h.answer_everything();
        if h.status_of(ctx) == Some(200) {
            admitted += 1;
        }
        h.finish(ctx);
    }
    assert!(admitted <= 40, "{admitted}");
    assert!(admitted >= 30, "contention wastes little ({admitted})");
}

/// A limit of 40 a minute whose key `a` this worker made hot: its third request asked a lease
/// of 8 (so Redis has charged 11). Returns the harness and the check's identity.
fn hot_key_holding_a_lease() -> (Harness, String) {
    let mut h = Harness::new(&cfg(
        r#""leases": {"max_units": 8}, "rules": [{"name": "r", "descriptors": ["header:k"], "limit": 40, "window": "1m"}]"#,
    ));
    // Well inside a window: the test's few seconds never reach its end.
    let into = h.redis_now() % 60_000;
    h.tick((65_000 - into) % 60_000);
    h.checked_in_redis(&[("k", "a")], 3);
    assert_eq!(h.metric(Counter::LeaseUnitsGranted), 8);
    let id = key_identity(&mut h, &[("k", "a")]);
    (h, id)
}

/// The identity (key and limit) of the one check a request with these headers makes.
fn key_identity(h: &mut Harness, headers: &[(&str, &str)]) -> String {
    let ctx = h.next_ctx;
    h.next_ctx += 1;
    h.host.w().request_headers.insert(
        ctx,
        headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .chain([(":path".to_string(), "/".to_string())])
            .collect(),
    );
    cache::identity(&h.checks_of(ctx)[0])
}

/// Another gateway spends the rest of the key in Redis.
fn exhaust_in_redis(h: &mut Harness) {
    for c in h.redis.counters.values_mut() {
        c.0 = 40;
    }
}

fn units_held(h: &Harness, id: &str) -> u64 {
    let w = h.host.w();
    w.shared
        .get(&lease::slot(id))
        .and_then(|b| lease::decode(b))
        .filter(|r| r.id == id)
        .map_or(0, |r| r.units)
}

#[test]
fn two_workers_storing_their_first_grants_of_a_key_at_once_keep_both() {
    let mut h = Harness::new(&cfg(
        r#""leases": {"max_units": 8}, "rules": [{"name": "r", "descriptors": ["header:k"], "limit": 1000, "window": "1m"}]"#,
    ));
    let id = key_identity(&mut h, &[("k", "a")]);
    h.checked_in_redis(&[("k", "a")], 2);
    // The third asks a lease. While its answer is stored, another worker of this gateway
    // stores the 50 units Redis granted it: it too found no record of the key.
    let (ctx, _) = h.request(&[("k", "a")]);
    let now = h.now();
    let (theirs, _) = lease::merge(
        None,
        &id,
        lease::Grant {
            units: 50,
            since_ms: now,
            lease_ms: 1_000,
            remaining: 900,
            reset_ms: 1_000,
        },
        now,
    );
    h.host.w().racing_grant = Some((lease::slot(&id), lease::encode(&theirs)));
    h.answer_first(Shim::Ok);
    h.finish(ctx);
    assert_eq!(h.host.w().racing_landed, 50, "the race was run");
    assert_eq!(h.metric(Counter::LeaseUnitsGranted), 8);
    assert_eq!(
        units_held(&h, &id),
        58,
        "both grants were charged in Redis: neither may be written over"
    );
}

#[test]
fn a_key_kept_hot_stays_hot_from_one_second_to_the_next() {
    let (mut h, id) = hot_key_holding_a_lease();
    exhaust_in_redis(&mut h);
    // 2.5 requests a second: hot in every second, but never 3 times within one of them.
    for i in 0..8 {
        h.tick(400);
        let (ctx, action) = h.request(&[("k", "a")]);
        assert_eq!(
            action,
            Action::Continue,
            "request {i}: spent from the lease"
        );
        h.finish(ctx);
    }
    assert_eq!(units_held(&h, &id), 0);
}

#[test]
fn units_held_are_spent_before_a_denial_even_by_a_worker_that_has_not_seen_the_key_lately() {
    let (mut h, id) = hot_key_holding_a_lease();
    exhaust_in_redis(&mut h);
    // This worker has not seen the key for seconds; the gateway still holds its 8 units.
    h.tick(2_500);
    let (ctx, action) = h.request(&[("k", "a")]);
    assert_eq!(action, Action::Pause, "not hot here: checked in Redis");
    h.answer_first(Shim::Ok);
    assert_eq!(
        h.status_of(ctx),
        Some(200),
        "Redis denies, but the gateway holds units Redis granted"
    );
    h.finish(ctx);
    // The next is still cold here, and the over-limit cache knows the key is exhausted.
    let (ctx, action) = h.request(&[("k", "a")]);
    assert_eq!(action, Action::Continue, "spent from the lease, not denied");
    h.finish(ctx);
    for _ in 0..6 {
        let (ctx, action) = h.request(&[("k", "a")]);
        assert_eq!(action, Action::Continue);
        h.finish(ctx);
    }
    assert_eq!(units_held(&h, &id), 0);
    let (ctx, _) = h.request(&[("k", "a")]);
    assert_eq!(h.status_of(ctx), Some(429), "then denied");
}

#[test]
fn leases_can_be_switched_off() {
    let mut h = Harness::new(&cfg(
        r#""leases": {"enabled": false}, "rules": [{"name": "r", "descriptors": ["header:k"], "limit": 1000, "window": "1m"}]"#,
    ));
    for _ in 0..20 {
        let (ctx, action) = h.request(&[("k", "a")]);
        assert_eq!(action, Action::Pause);
        let body: Value = serde_json::from_slice(&h.check_callouts()[0].body).unwrap();
        assert!(body["requests"][0]["checks"][0].get("lease").is_none());
        h.answer_first(Shim::Ok);
        h.finish(ctx);
    }
    assert_eq!(h.metric(Counter::LeaseUnitsGranted), 0);
}

/// Leases under random traffic, answers, failures, ticks and contention: the admitted requests
/// of a fixed window never pass its limit, and those of a bounded sliding window never pass
/// its limit in any span of its length (failure mode deny, so every admission came from Redis
/// or a lease it granted).
fn run_leases_once(seed: u64) -> Result<i64, String> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let coalesce = rng.below(3) != 0;
    let mut h = Harness::new(&cfg(&format!(
        r#""coalesce": {coalesce}, "failure_mode": "deny", "leases": {{"max_units": {}}},
        "rules": [
          {{"name": "fw", "descriptors": ["header:k"], "limit": 30, "window": "1s", "match": {{"path_prefix": "/fw"}}}},
          {{"name": "sw", "descriptors": ["header:k"], "algorithm": "sliding_window", "subwindows": 4, "limit": 40, "window": "2s",
            "match": {{"path_prefix": "/sw"}}}},
          {{"name": "both", "descriptors": ["header:k"], "limit": 25, "window": "1s", "match": {{"path_prefix": "/sw/both"}}}}
        ]"#,
        1 + rng.below(50)
    )));
    let answers = [
        Shim::Ok,
        Shim::Ok,
        Shim::Ok,
        Shim::Ok,
        Shim::Ok,
        Shim::TimeoutAfterCommit,
        Shim::Status(503),
        Shim::Never,
    ];
    // (ctx, gateway ms of the request, its checks)
    let mut sent: Vec<(u32, u64, Vec<Check>)> = Vec::new();
    let mut admitted_at: HashMap<u32, u64> = HashMap::new();
    let mut live: Vec<u32> = Vec::new();
    for _ in 0..600 {
        match rng.below(100) {
            0..=49 => {
                let path = *rng.pick(&["/fw", "/sw", "/sw/both"]);
                let key = *rng.pick(&["a", "a", "a", "b"]);
                h.host.w().cas_conflicts = rng.below(3) as usize;
                let now = h.now();
                let (ctx, _) = h.request(&[(":path", path), ("k", key)]);
                h.host.w().cas_conflicts = 0;
                let checks = h.checks_of(ctx);
                sent.push((ctx, now, checks));
                live.push(ctx);
            }
            50..=79 => {
                let callouts = h.check_callouts();
                if !callouts.is_empty() {
                    let c = rng.pick(&callouts).token;
                    h.answer(c, *rng.pick(&answers));
                }
            }
            80..=89 if !live.is_empty() => {
                if let Some(i) = live.iter().position(|&c| h.status_of(c).is_some()) {
                    let ctx = live.swap_remove(i);
                    h.finish(ctx);
                }
            }
            _ => h.tick(*rng.pick(&[0, 1, 1, 3, 20, 90, 300])),
        }
        let now = h.now();
        for (ctx, _, _) in &sent {
            if !admitted_at.contains_key(ctx) && h.status_of(*ctx) == Some(200) {
                admitted_at.insert(*ctx, now);
            }
        }
    }
    // Fixed windows: per window key, admitted ≤ limit.
    let mut per_key: HashMap<String, u64> = HashMap::new();
    for (ctx, _, checks) in &sent {
        if !admitted_at.contains_key(ctx) {
            continue;
        }
        for c in checks {
            if let CheckKind::FixedWindow { limit, .. } = c.kind {
                let n = per_key.entry(cache::identity(c)).or_default();
                *n += c.cost;
                if *n > limit {
                    return Err(format!("{} admitted {n} > {limit}", c.key));
                }
            }
        }
    }
    // Bounded sliding windows: in any span of window_ms, admitted ≤ limit (by admission time).
    let mut times: HashMap<String, Vec<u64>> = HashMap::new();
    for (ctx, _, checks) in &sent {
        let Some(&at) = admitted_at.get(ctx) else {
            continue;
        };
        for c in checks {
            if let CheckKind::SlidingWindowBounded { .. } = c.kind {
                times.entry(c.key.clone()).or_default().push(at);
            }
        }
    }
    for (key, mut t) in times {
        t.sort_unstable();
        for (i, &start) in t.iter().enumerate() {
            let n = t[i..].iter().take_while(|&&x| x < start + 2000).count();
            if n > 40 {
                return Err(format!("{key}: {n} admitted within 2 s from {start}"));
            }
        }
    }
    Ok(h.metric(Counter::LeaseAdmitted))
}

#[test]
fn leases_never_admit_past_the_limit_under_random_interleavings() {
    let seeds: Vec<u64> = match std::env::var("TOLLGATE_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => {
            let n = std::env::var("TOLLGATE_SEEDS").map_or(200, |s| s.parse().unwrap());
            (1..=n).collect()
        }
    };
    let mut spent = 0;
    for seed in seeds {
        match run_leases_once(seed) {
            Ok(n) => spent += n,
            Err(e) => panic!("seed {seed}: {e}"),
        }
    }
    assert!(spent > 0, "the runs spend leases");
}

/// Every unit charged in Redis is admitted, held in a lease record, or counted as dropped:
/// leases lose nothing silently, under random traffic, answers (all within the timeout),
/// ticks and contention between workers.
fn run_lease_accounting_once(seed: u64) -> Result<(), String> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let coalesce = rng.below(3) != 0;
    let mut h = Harness::new(&cfg(&format!(
        r#""coalesce": {coalesce}, "failure_mode": "deny", "leases": {{"max_units": {}}},
        "rules": [{{"name": "fw", "descriptors": ["header:k"], "limit": 30, "window": "1s"}}]"#,
        1 + rng.below(20)
    )));
    let mut sent = Vec::new();
    for _ in 0..600 {
        match rng.below(100) {
            // Another worker of this gateway stores units Redis granted it as this one reads.
            0..=4 if h.host.w().racing_grant.is_none() => {
                let key = *rng.pick(&["a", "b"]);
                let id = key_identity(&mut h, &[("k", key)]);
                let now = h.now();
                let (theirs, _) = lease::merge(
                    None,
                    &id,
                    lease::Grant {
                        units: 1 + rng.below(5),
                        since_ms: now,
                        lease_ms: 200,
                        remaining: 10,
                        reset_ms: 200,
                    },
                    now,
                );
                h.host.w().racing_grant = Some((lease::slot(&id), lease::encode(&theirs)));
            }
            5..=54 => {
                let key = *rng.pick(&["a", "a", "a", "b"]);
                h.host.w().cas_conflicts = rng.below(3) as usize;
                let (ctx, _) = h.request(&[("k", key)]);
                h.host.w().cas_conflicts = 0;
                sent.push(ctx);
            }
            55..=84 => {
                let callouts = h.check_callouts();
                if !callouts.is_empty() {
                    let c = rng.pick(&callouts).token;
                    h.answer(c, Shim::Ok);
                }
            }
            _ => {
                // Nothing outlives the timeout: a late answer is a loss the test does not count.
                while h.check_callouts().iter().any(|c| h.now() - c.sent_ms > 50) {
                    h.answer_first(Shim::Ok);
                }
                h.tick(*rng.pick(&[0, 1, 3, 10, 20]));
            }
        }
    }
    h.answer_everything();
    h.answer_everything();
    // What the other worker stored was charged in Redis too.
    let charged = h.redis.counters.values().map(|c| c.0).sum::<u64>() + h.host.w().racing_landed;
    let admitted = sent
        .iter()
        .filter(|&&c| h.status_of(c) == Some(200))
        .count() as u64;
    let held: u64 = (0..lease::SLOTS)
        .filter_map(|n| h.host.w().shared.get(&lease::slot_name(n)).cloned())
        .filter_map(|b| lease::decode(&b))
        .map(|r| r.units)
        .sum();
    let dropped = h.metric(Counter::LeaseUnitsDropped) as u64;
    if charged != admitted + held + dropped {
        return Err(format!(
            "charged {charged} != admitted {admitted} + held {held} + dropped {dropped}"
        ));
    }
    if h.metric(Counter::LeaseUnitsGranted) == 0 {
        return Err("no lease was granted".into());
    }
    Ok(())
}

#[test]
fn leases_lose_no_unit_silently_under_random_interleavings() {
    for seed in 1..=100 {
        if let Err(e) = run_lease_accounting_once(seed) {
            panic!("seed {seed}: {e}");
        }
    }
}

#[test]
fn a_bounded_sliding_window_lease_ends_with_its_sub_window() {
    let mut h = Harness::new(&cfg(
        r#""rules": [{"name": "r", "descriptors": ["header:k"], "algorithm": "sliding_window",
            "subwindows": 4, "limit": 400, "window": "2s"}]"#,
    ));
    // Start 100 ms into a sub-window of 500 ms.
    let into = h.redis_now() % 500;
    h.tick((600 - into) % 500);
    h.checked_in_redis(&[("k", "a")], 3);
    assert!(h.metric(Counter::LeaseUnitsGranted) > 0);
    let (ctx, action) = h.request(&[("k", "a")]);
    assert_eq!(action, Action::Continue, "spent within its sub-window");
    h.finish(ctx);
    h.tick(399);
    let (ctx, action) = h.request(&[("k", "a")]);
    assert_eq!(action, Action::Continue, "the sub-window's last ms");
    h.finish(ctx);
    h.tick(1);
    let (ctx, action) = h.request(&[("k", "a")]);
    assert_eq!(
        action,
        Action::Pause,
        "past its sub-window a unit would count too early: checked in Redis"
    );
    h.answer_first(Shim::Ok);
    h.finish(ctx);
}

/// What the engine's own code costs per request on each path, natively with the fake host
/// (`cargo test --release -- --ignored --nocapture engine_paths`): a guide to what the Wasm
/// spends beyond its host calls, not a measurement of Envoy.
#[test]
#[ignore]
fn engine_paths_cost() {
    let n = 50_000u32;
    let time = |name: &str, json: &str, warm: &dyn Fn(&mut Harness), headers: &[(&str, &str)]| {
        let mut h = Harness::new(&cfg(json));
        warm(&mut h);
        let start = std::time::Instant::now();
        for _ in 0..n {
            let (ctx, _) = h.request(headers);
            h.finish(ctx);
        }
        let per = start.elapsed().as_nanos() / u128::from(n);
        eprintln!("{name}: {per} ns per request");
    };
    let rule = r#""rules": [{"name": "r", "descriptors": ["header:k"], "limit": 1000000000, "window": "1m"}]"#;
    time(
        "no rule applies",
        r#""rules": [{"name": "r", "descriptors": ["header:k"], "limit": 10, "window": "1m", "match": {"path_prefix": "/never"}}]"#,
        &|_| {},
        &[("k", "a")],
    );
    time(
        "leased",
        rule,
        &|h| {
            h.checked_in_redis(&[("k", "a")], 3);
            h.host.w().callouts.clear();
        },
        &[("k", "a")],
    );
    time(
        "failure mode (breaker open)",
        &format!(r#""leases": {{"enabled": false}}, {rule}"#),
        &|h| {
            for _ in 0..5 {
                let (ctx, _) = h.request(&[("k", "b")]);
                h.answer_first(Shim::Status(503));
                h.finish(ctx);
            }
        },
        &[("k", "b")],
    );
}
