"""The shim's seven algorithms, shadow checks, mixing, /v1/release and /v1/charge, over HTTP
against a real nginx and a real Redis (docs/wire-format.md).

Each algorithm's arithmetic is pinned exactly by the shared vectors (test_vectors.py, which
src/algorithms.rs runs against the models too). The tests here are about the rest: Redis's own
clock (TIME, no test clock), state and TTLs in Redis, one read and one write per key per call,
all-or-nothing requests, shadow checks, validation. Waits are short (refills of 100 ms, sleeps
of at most ~0.5 s, except the 1 s minimum lifetime of a concurrency slot).
"""

import json
import time

import pytest

from client import Backend, call, compact, redis_now_us
from shim_harness import free_port, redis_cli, run_redis, shim_process

# The read timeout is 2 s, not 100 ms: these tests are about answers, and a starved CI machine
# can take longer than 100 ms over the largest script runs (timeouts are tested in test_shim.py).
SHIM_ENV = dict(REDIS_READ_TIMEOUT_MS=2000)


def ok(b, *requests):
    """Sends one body with one entry per list of checks; returns its results (a 200)."""
    r = call(b.shim.port, {"requests": [{"checks": list(c)} for c in requests]})
    status, raw = r.status, r.raw
    assert status == 200, f"{status} {raw[:500]!r}\n{b.shim.log_tails()}"
    return json.loads(raw)["results"]


def one(b, *checks):
    """One request; returns its result."""
    return ok(b, list(checks))[0]


def now_us(b):
    return redis_now_us(b.redis)


def K(name, suffix):
    return f"tollgate:{{{name}}}:{suffix}"


def fw(name, limit, ttl_ms=10_000, **kw):
    return dict(alg="fixed_window", key=K(name, "10000:1"), limit=limit, ttl_ms=ttl_ms, **kw)


def sw(name, limit, weight_ms, window_ms=10_000, **kw):
    return dict(alg="sliding_window", key=K(name, f"{window_ms}:5"), prev_key=K(name, f"{window_ms}:4"),
                limit=limit, window_ms=window_ms, weight_ms=weight_ms, **kw)


def sl(name, limit, window_ms=10_000, id="req-1", **kw):
    return dict(alg="sliding_log", key=K(name, f"log:{window_ms}"), limit=limit, window_ms=window_ms,
                id=id, **kw)


def tb(name, burst, rate, period_ms, **kw):
    return dict(alg="token_bucket", key=K(name, f"tb:{burst}:{rate}:{period_ms}"), burst=burst, rate=rate,
                period_ms=period_ms, **kw)


def gc(name, burst, rate, period_ms, **kw):
    return dict(alg="gcra", key=K(name, f"gcra:{burst}:{rate}:{period_ms}"), burst=burst, rate=rate,
                period_ms=period_ms, **kw)


def sb(name, limit, window_ms=10_000, subwindows=10, **kw):
    return dict(alg="sliding_window_bounded", key=K(name, f"swb:{window_ms}:{subwindows}"), limit=limit,
                window_ms=window_ms, subwindows=subwindows, **kw)


def cc(name, limit, id, ttl_ms=10_000, **kw):
    return dict(alg="concurrency", key=K(name, "conc"), limit=limit, ttl_ms=ttl_ms, id=id, **kw)


def release(b, *slots):
    r = call(b.shim.port, {"releases": [{"key": k, "id": i} for k, i in slots]}, path="/v1/release")
    status, raw = r.status, r.raw
    assert status == 200, f"{status} {raw!r}"
    return json.loads(raw)["released"]


def fields(c):
    return {k: c[k] for k in ("allowed", "remaining", "reset_ms", "retry_after_ms")}


def assert_all_keys_expire(b):
    keys = redis_cli(b.redis, "KEYS", "*")
    assert keys, "nothing was written"
    for k in keys:
        assert redis_cli(b.redis, "PTTL", k) > 0, f"{k!r} has no TTL"


# --- Reply shape ---------------------------------------------------------------------------------

@pytest.mark.parametrize("check,limit_field,has_count", [
    (fw("a", 5), "limit", True), (sw("a", 5, 5000), "limit", True), (sb("a", 5), "limit", True),
    (sl("a", 5), "limit", False),
    (tb("a", 5, 1, 1000), "burst", False), (gc("a", 5, 1, 1000), "burst", False),
    (cc("a", 5, "r1"), "limit", False),
], ids=lambda v: v["alg"] if isinstance(v, dict) else None)
def test_reply_fields_per_alg(clean, check, limit_field, has_count):
    c = one(clean, check)["checks"][0]
    expected = {"allowed", "limit", "remaining", "reset_ms", "retry_after_ms"} | ({"count"} if has_count else set())
    assert set(c) == expected
    assert c["limit"] == check[limit_field] and c["allowed"] is True and c["retry_after_ms"] == 0


# --- Fixed window --------------------------------------------------------------------------------

def test_fixed_window_burst_then_denied(clean):
    seen = [one(clean, fw("a", 3))["checks"][0] for _ in range(4)]
    assert [c["allowed"] for c in seen] == [True, True, True, False]
    assert [c["retry_after_ms"] for c in seen[:3]] == [0, 0, 0]
    denied = seen[3]
    assert denied["remaining"] == 0 and denied["count"] == 3
    assert 9000 < denied["reset_ms"] <= 10_000 and denied["retry_after_ms"] == denied["reset_ms"]


def test_a_fixed_window_check_that_reaches_redis_after_its_window_ended_counts_in_it(clean):
    """A request built just before its window ended (ttl_ms: what was left then) may reach
    Redis after: its key must still hold the window's count, not start afresh (the bench's
    accuracy phase saw windows admit more than their limit that way, with Redis 20 ms away)."""
    first = one(clean, fw("late", 2, ttl_ms=200))["checks"][0]
    assert first["allowed"] and first["reset_ms"] == 200
    assert one(clean, fw("late", 2, ttl_ms=150))["checks"][0]["allowed"]
    time.sleep(0.35)
    late = one(clean, fw("late", 2, ttl_ms=1))["checks"][0]
    assert not late["allowed"], "the window this key names is full"
    assert late["count"] == 2 and late["reset_ms"] == 0 and late["retry_after_ms"] == 0


def commandstats(b):
    """Calls per command since the last CONFIG RESETSTAT, e.g. {"get": 1, "incrby": 1}."""
    stats = {}
    for line in redis_cli(b.redis, "INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_"):
            name, rest = line[len("cmdstat_"):].split(":", 1)
            stats[name] = int(rest.split("calls=")[1].split(",")[0])
    return stats


@pytest.mark.parametrize("make", [lambda: fw("hot", 40), lambda: sw("hot", 40, 5000)], ids=["fixed", "sliding"])
def test_a_hot_key_is_read_and_written_once_per_call(clean, make):
    """60 requests of one call on one counter: decided one after the other exactly as 60 calls
    would be (40 admitted, the count after each), with one GET per key and one INCRBY, not
    three commands per check."""
    redis_cli(clean.redis, "CONFIG", "RESETSTAT")
    results = ok(clean, *[[make()] for _ in range(60)])
    stats = commandstats(clean)
    counts = [r["checks"][0]["count"] for r in results]
    assert [r["allowed"] for r in results] == [True] * 40 + [False] * 20
    assert counts == list(range(1, 41)) + [40] * 20
    assert [r["checks"][0]["remaining"] for r in results[:3]] == [39, 38, 37]
    check = make()
    assert redis_cli(clean.redis, "GET", check["key"]) == b"40"
    assert 0 < redis_cli(clean.redis, "PTTL", check["key"]) <= 15_000
    keys = 2 if "prev_key" in check else 1
    print(f"\n{check['alg']}: 60 checks of one key in one call: Redis commands {stats}")
    assert stats.get("get") == keys and stats.get("incrby") == 1 and stats.get("pexpire") == 1
    # Another call continues from the written count.
    again = one(clean, make())["checks"][0]
    assert again["allowed"] is False and again["count"] == 40


def test_a_hot_bounded_key_is_read_and_written_once_per_call(clean):
    """The same for a bounded sliding window's hash: one HGETALL, one HINCRBY, one PEXPIRE."""
    redis_cli(clean.redis, "CONFIG", "RESETSTAT")
    results = ok(clean, *[[sb("hot", 40)] for _ in range(60)])
    stats = commandstats(clean)
    assert [r["allowed"] for r in results] == [True] * 40 + [False] * 20
    assert [r["checks"][0]["count"] for r in results] == list(range(1, 41)) + [40] * 20
    print(f"\nsliding_window_bounded: 60 checks of one key in one call: Redis commands {stats}")
    assert stats.get("hgetall") == 1 and stats.get("hincrby") == 1 and stats.get("pexpire") == 1
    assert sum(hash_state(clean, sb("hot", 40)["key"]).values()) == 40


# --- Sliding window: no clock in the script, so exact ---------------------------------------

def test_sliding_window_with_a_previous_counter(clean):
    c = sw("a", 10, weight_ms=5000)  # half of the previous window still counts
    redis_cli(clean.redis, "SET", c["prev_key"], 8, "PX", 60_000)
    seen = [one(clean, c)["checks"][0] for _ in range(7)]
    # estimate = ceil(8 × 5000 / 10000) + cur = 4 + cur: six fit.
    assert [s["allowed"] for s in seen] == [True] * 6 + [False]
    assert [s["count"] for s in seen] == [1, 2, 3, 4, 5, 6, 6]
    assert [s["remaining"] for s in seen] == [5, 4, 3, 2, 1, 0, 0]
    # Denied: ceil(8w/10000) <= 3 needs w <= 3750, so 1250 ms from now; reset: both windows.
    assert seen[6]["retry_after_ms"] == 1250 and seen[6]["reset_ms"] == 15_000
    assert int(redis_cli(clean.redis, "GET", c["prev_key"])) == 8, "the previous window is only read"
    assert 14_000 < redis_cli(clean.redis, "PTTL", c["key"]) <= 15_000, "weight_ms + window_ms"


# --- Token bucket ------------------------------------------------------------------------------

def test_token_bucket_burst_then_denied(clean):
    seen = [one(clean, tb("a", 5, 1, 10_000)) for _ in range(6)]
    assert [r["allowed"] for r in seen] == [True] * 5 + [False]
    assert [r["checks"][0]["remaining"] for r in seen] == [4, 3, 2, 1, 0, 0]
    denied = seen[5]["checks"][0]
    # Only ms passed since the first: about a whole period for the next token, five to full.
    assert 9_000 < denied["retry_after_ms"] <= 10_000
    assert 49_000 < denied["reset_ms"] <= 50_000
    pttl = redis_cli(clean.redis, "PTTL", K("a", "tb:5:1:10000"))
    assert 50_000 < pttl <= 51_000, "time to full + 1000 ms"


def test_token_bucket_refills(clean):
    c = tb("a", 2, 10, 1000)  # a token per 100 ms
    # Three requests in one body share one instant (one TIME per script run).
    assert [r["allowed"] for r in ok(clean, [c], [c], [c])] == [True, True, False]
    time.sleep(0.25)
    assert [r["allowed"] for r in ok(clean, [c], [c], [c])] == [True, True, False], "two tokens back"


def test_token_bucket_cost_above_burst_never_fits(clean):
    r = call(clean.shim.port, {"requests": [{"checks": [tb("a", 5, 1, 1000, cost=6)]}]})
    status, raw = r.status, r.raw
    assert status == 200 and b'"retry_after_ms":18446744073709551615' in raw, raw
    assert redis_cli(clean.redis, "EXISTS", K("a", "tb:5:1:1000")) == 0


# --- GCRA --------------------------------------------------------------------------------------

def test_gcra_burst_then_spacing(clean):
    c = gc("a", 3, 10, 1000)  # T = 100 ms
    seen = [one(clean, c)["checks"][0] for _ in range(4)]
    assert [s["allowed"] for s in seen] == [True, True, True, False]
    assert [s["remaining"] for s in seen[:3]] == [2, 1, 0]
    wait = seen[3]["retry_after_ms"]
    assert 0 < wait <= 100
    time.sleep(wait / 1000 + 0.005)
    assert one(clean, c)["checks"][0]["allowed"] is True, "one more after exactly the emission interval"
    denied = one(clean, c)["checks"][0]
    assert denied["allowed"] is False and 0 < denied["retry_after_ms"] <= 100
    pttl = redis_cli(clean.redis, "PTTL", c["key"])
    assert 900 < pttl <= 1300, "ceil((TAT − now) / 1000) + 1000 ms, TAT ≈ now + 300 ms"


def test_gcra_idle_gives_the_full_burst_again(clean):
    c = gc("a", 2, 20, 1000)  # T = 50 ms
    # Three requests in one body share one instant (one TIME per script run).
    assert [r["allowed"] for r in ok(clean, [c], [c], [c])] == [True, True, False]
    time.sleep(0.15)
    assert [r["allowed"] for r in ok(clean, [c], [c], [c])] == [True, True, False]


def test_gcra_tat_is_in_microseconds(clean):
    c = gc("a", 1, 3, 1000)  # T = 333333 µs: ms would lose a third of a ms per request
    before = now_us(clean)
    assert one(clean, c)["allowed"] is True
    tat = int(redis_cli(clean.redis, "GET", c["key"]))
    assert before + 333_333 <= tat <= now_us(clean) + 333_333


# --- Sliding log -------------------------------------------------------------------------------

# --- Bounded sliding window ----------------------------------------------------------------------

def hash_state(b, key):
    flat = redis_cli(b.redis, "HGETALL", key)
    return {int(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def test_sliding_window_bounded_on_redis_time(clean):
    """On Redis's own clock: a burst to the limit, denials, then readmission when the burst's
    sub-window leaves; the sub-windows that left are deleted, the TTL follows the newest."""
    c = sb("b", 5, window_ms=1000, subwindows=4)
    seen = [one(clean, dict(c, cost=cost))["checks"][0] for cost in (2, 3, 1, 2)]
    assert [s["allowed"] for s in seen] == [True, True, False, False]
    assert [s["count"] for s in seen] == [2, 5, 5, 5]
    got = seen[-1]
    assert 0 < got["retry_after_ms"] <= 1250 and 0 < redis_cli(clean.redis, "PTTL", c["key"]) <= 1250
    time.sleep(got["retry_after_ms"] / 1000 + 0.02)
    got = one(clean, dict(c, cost=2))["checks"][0]
    assert got["allowed"] is True and len(hash_state(clean, c["key"])) == 1, hash_state(clean, c["key"])


def test_sliding_window_bounded_shared_key_deletes_what_left(clean):
    """Stale sub-windows (set by hand here) are deleted by the next charge, not counted."""
    c = sb("d", 5, window_ms=1000, subwindows=4)
    j = now_us(clean) // 1000 // 250
    redis_cli(clean.redis, "HSET", c["key"], j - 9, 5, j - 5, 5)
    got = one(clean, c)["checks"][0]
    assert got["allowed"] is True and got["count"] == 1
    assert set(hash_state(clean, c["key"])) <= {j, j + 1}
    assert 0 < redis_cli(clean.redis, "PTTL", c["key"]) <= 1250


def test_sliding_window_bounded_corrupt_state_is_a_503(clean):
    c = sb("x", 5)
    redis_cli(clean.redis, "HSET", c["key"], "a", 1)
    r = call(clean.shim.port, _c(**c))
    status, raw = r.status, r.raw
    assert status == 503 and b"does not hold sub-window counters" in raw, raw


def test_sliding_log_burst_then_denied(clean):
    seen = [one(clean, sl("a", 3, id=f"r{i}"))["checks"][0] for i in range(4)]
    assert [s["allowed"] for s in seen] == [True, True, True, False]
    assert [s["remaining"] for s in seen] == [2, 1, 0, 0]
    assert 9_000 < seen[3]["retry_after_ms"] <= 10_000 and 9_000 < seen[3]["reset_ms"] <= 10_000
    members = redis_cli(clean.redis, "ZRANGE", K("a", "log:10000"), 0, -1)
    assert sorted(members) == [b"r0:1", b"r1:1", b"r2:1"]


def test_sliding_log_evicts_on_redis_time(clean):
    """Entries stamped by hand on Redis's clock: denied until the oldest slides out, then it is
    evicted and the new entry takes its place."""
    c = sl("a", 3, window_ms=1000, id="new")
    t0 = now_us(clean) // 1000
    for i, t in enumerate([t0 - 700, t0 - 300, t0 - 100]):  # the oldest leaves in ~300 ms
        redis_cli(clean.redis, "ZADD", c["key"], t, f"old{i}:1")
    got = one(clean, c)["checks"][0]
    assert got["allowed"] is False and got["remaining"] == 0
    assert 0 < got["retry_after_ms"] <= 300 and 0 < got["reset_ms"] <= 900, got
    two = one(clean, dict(c, cost=2))["checks"][0]
    assert got["retry_after_ms"] < two["retry_after_ms"] <= 700, "the second oldest must leave too"
    time.sleep(got["retry_after_ms"] / 1000 + 0.02)
    ok_ = one(clean, dict(c, cost=1))["checks"][0]
    assert ok_["allowed"] is True and ok_["remaining"] == 0 and ok_["reset_ms"] == 1000
    members = redis_cli(clean.redis, "ZRANGE", c["key"], 0, -1)
    assert b"old0:1" not in members and b"new:1" in members and len(members) == 3
    assert 0 < redis_cli(clean.redis, "PTTL", c["key"]) <= 1000


def test_sliding_log_cost_adds_distinct_members(clean):
    r = one(clean, sl("a", 10, id="req-7", cost=4))["checks"][0]
    assert r["remaining"] == 6
    members = redis_cli(clean.redis, "ZRANGE", K("a", "log:10000"), 0, -1)
    assert sorted(members) == [b"req-7:1", b"req-7:2", b"req-7:3", b"req-7:4"]
    raw = call(clean.shim.port, {"requests": [{"checks": [sl("a", 10, id="x", cost=11)]}]}).raw
    assert b'"retry_after_ms":18446744073709551615' in raw, raw


def test_sliding_log_large_cost_is_added_in_batches(clean):
    r = one(clean, sl("a", 10_000, id="big", cost=10_000))["checks"][0]
    assert r["allowed"] is True and r["remaining"] == 0
    assert redis_cli(clean.redis, "ZCARD", K("a", "log:10000")) == 10_000


# --- Concurrency and /v1/release ----------------------------------------------------------------

def test_concurrency_limit_release_and_readmission(clean):
    key = K("a", "conc")
    assert one(clean, cc("a", 2, "r1"))["allowed"] is True
    second = one(clean, cc("a", 2, "r2"))["checks"][0]
    assert second["remaining"] == 0 and 9_000 < second["reset_ms"] <= 10_000
    third = one(clean, cc("a", 2, "r3"))["checks"][0]
    assert third["allowed"] is False and third["remaining"] == 0 and third["retry_after_ms"] == 1000
    assert one(clean, cc("a", 2, "r2"))["allowed"] is True, "a slot already held is refreshed, not added"
    assert redis_cli(clean.redis, "ZCARD", key) == 2
    assert release(clean, (key, "r1")) == 1
    assert release(clean, (key, "r1"), (key, "nope")) == 0, "releasing twice or an unknown id is no error"
    assert one(clean, cc("a", 2, "r3"))["allowed"] is True
    assert sorted(redis_cli(clean.redis, "ZRANGE", key, 0, -1)) == [b"r2", b"r3"]
    assert release(clean, (key, "r2"), (key, "r3")) == 2
    assert redis_cli(clean.redis, "EXISTS", key) == 0, "an empty set is deleted"


def test_concurrency_slots_expire(clean):
    c = lambda i: cc("a", 2, i, ttl_ms=1000)  # noqa: E731
    assert [one(clean, c(i))["allowed"] for i in ("r1", "r2", "r3")] == [True, True, False]
    denied = one(clean, c("r3"))["checks"][0]
    assert 0 < denied["retry_after_ms"] <= 1000
    time.sleep(1.05)
    assert one(clean, c("r3"))["allowed"] is True, "r1 and r2 expired"
    assert redis_cli(clean.redis, "ZRANGE", K("a", "conc"), 0, -1) == [b"r3"]


def test_concurrency_key_ttl_keeps_the_longest_slot(clean):
    key = K("a", "conc")
    one(clean, cc("a", 5, "long", ttl_ms=60_000))
    one(clean, cc("a", 5, "short", ttl_ms=2_000))
    assert redis_cli(clean.redis, "PTTL", key) > 50_000


# --- Shadow checks, mixing, ordering -------------------------------------------------------------

def test_shadow_check_over_its_limit_does_not_deny_and_is_not_charged(clean):
    one(clean, fw("s", 1))  # the shadow limit's counter is full
    r = one(clean, fw("s", 1, shadow=True), fw("e", 5))
    assert r["allowed"] is True
    assert [c["allowed"] for c in r["checks"]] == [False, True]
    assert r["checks"][0]["count"] == 1 and r["checks"][0]["retry_after_ms"] > 0
    assert int(redis_cli(clean.redis, "GET", K("s", "10000:1"))) == 1, "not charged"
    assert int(redis_cli(clean.redis, "GET", K("e", "10000:1"))) == 1


def test_shadow_check_that_fits_is_charged(clean):
    r = one(clean, tb("s", 3, 1, 10_000, shadow=True), fw("e", 5))
    assert r["allowed"] is True and r["checks"][0]["remaining"] == 2
    assert int(redis_cli(clean.redis, "HGET", K("s", "tb:3:1:10000"), "t")) == 2000


def test_shadow_checks_alone_never_deny(clean):
    for alg_check in (fw("a", 1, shadow=True), gc("a", 1, 1, 10_000, shadow=True),
                      cc("a", 1, "r1", shadow=True)):
        one(clean, alg_check)
    r = one(clean, fw("a", 1, shadow=True), gc("a", 1, 1, 10_000, shadow=True), cc("a", 1, "r2", shadow=True))
    assert r["allowed"] is True and [c["allowed"] for c in r["checks"]] == [False, False, False]


def test_shadow_must_not_hide_a_real_denial(clean):
    one(clean, fw("a", 1))
    r = one(clean, fw("a", 1), fw("b", 5, shadow=True))
    assert r["allowed"] is False and [c["allowed"] for c in r["checks"]] == [False, True]
    assert redis_cli(clean.redis, "EXISTS", K("b", "10000:1")) == 0, "a denied request charges nothing"


def test_mixed_algorithms_are_all_or_nothing(clean):
    empty = tb("x", 1, 1, 10_000)
    one(clean, empty)  # the bucket is now empty
    bucket = redis_cli(clean.redis, "HGETALL", empty["key"])
    mix = [fw("m", 5), sw("m", 5, 5000), sl("m", 5, id="q1"), gc("m", 5, 1, 10_000), cc("m", 5, "q1"), empty]
    r = one(clean, *mix)
    assert r["allowed"] is False
    assert [c["allowed"] for c in r["checks"]] == [True] * 5 + [False]
    assert redis_cli(clean.redis, "KEYS", "tollgate:{m}*") == [], "nothing charged on any check"
    assert redis_cli(clean.redis, "HGETALL", empty["key"]) == bucket
    # Without the empty bucket: admitted, and every algorithm charged.
    r = one(clean, *mix[:5])
    assert r["allowed"] is True
    assert [c["remaining"] for c in r["checks"]] == [4, 4, 4, 4, 4]
    assert len(redis_cli(clean.redis, "KEYS", "tollgate:{m}*")) == 5
    assert_all_keys_expire(clean)


def test_mixed_denial_leaves_a_fixed_window_and_a_concurrency_set_untouched(clean):
    one(clean, fw("m", 5), cc("m", 5, "q1"))
    one(clean, tb("m", 1, 1, 10_000))
    r = one(clean, fw("m", 5), cc("m", 5, "q2"), tb("m", 1, 1, 10_000))
    assert r["allowed"] is False
    assert int(redis_cli(clean.redis, "GET", K("m", "10000:1"))) == 1
    assert redis_cli(clean.redis, "ZRANGE", K("m", "conc"), 0, -1) == [b"q1"]


@pytest.mark.parametrize("make", [
    lambda i: fw("o", 2), lambda i: sw("o", 2, 5000), lambda i: sl("o", 2, id=f"r{i}"),
    lambda i: tb("o", 2, 1, 10_000), lambda i: gc("o", 2, 1, 10_000), lambda i: cc("o", 2, f"r{i}"),
    lambda i: sb("o", 2),
], ids=["fixed_window", "sliding_window", "sliding_log", "token_bucket", "gcra", "concurrency",
        "sliding_window_bounded"])
def test_requests_in_one_body_see_earlier_charges(clean, make):
    results = ok(clean, *[[make(i)] for i in range(3)])
    assert [r["allowed"] for r in results] == [True, True, False]
    assert [r["checks"][0]["remaining"] for r in results] == [1, 0, 0]


@pytest.mark.parametrize("make", [
    lambda: fw("d", 1), lambda: sw("d", 1, 5000), lambda: sl("d", 1),
    lambda: tb("d", 1, 1, 10_000), lambda: gc("d", 1, 1, 10_000), lambda: sb("d", 1),
], ids=["fixed_window", "sliding_window", "sliding_log", "token_bucket", "gcra", "sliding_window_bounded"])
def test_same_key_twice_in_one_request_cannot_pass_its_limit(clean, make):
    r = one(clean, make(), make())
    assert r["allowed"] is False and [c["allowed"] for c in r["checks"]] == [True, False]
    assert redis_cli(clean.redis, "KEYS", "*") == []
    assert one(clean, make())["allowed"] is True


def test_every_key_written_has_a_ttl(clean):
    redis_cli(clean.redis, "SET", K("t", "10000:4"), 3)  # a previous window, set by hand
    for i in range(3):
        ok(clean, [fw("t", 2), sw("t", 2, 3000), sl("t", 2, id=f"r{i}"), tb("t", 2, 1, 1000),
                   gc("t", 2, 1, 1000), cc("t", 2, f"r{i}"), sb("t", 2)],
           [fw("u", 9, cost=0), tb("u", 9, 1, 1000, cost=0), gc("u", 9, 1, 1000, cost=0), sb("u", 9, cost=0)])
    redis_cli(clean.redis, "DEL", K("t", "10000:4"))
    keys = redis_cli(clean.redis, "KEYS", "*")
    assert len(keys) == 7, keys  # cost 0 only reads
    assert_all_keys_expire(clean)


def test_cost_zero_only_reads_for_every_algorithm(clean):
    r = one(clean, fw("z", 1, cost=0), sw("z", 1, 5000, cost=0), sl("z", 1, cost=0),
            tb("z", 1, 1, 1000, cost=0), gc("z", 1, 1, 1000, cost=0), sb("z", 1, cost=0))
    assert r["allowed"] is True and [c["remaining"] for c in r["checks"]] == [1] * 6
    assert redis_cli(clean.redis, "KEYS", "*") == []


def test_survives_script_flush_with_every_algorithm(clean):
    mix = lambda i: [fw("f", 9), sw("f", 9, 5000), sl("f", 9, id=f"r{i}"), tb("f", 9, 1, 10_000),  # noqa: E731
                     gc("f", 9, 1, 10_000), cc("f", 9, f"r{i}"), sb("f", 9)]
    one(clean, *mix(0))
    redis_cli(clean.redis, "SCRIPT", "FLUSH")
    redis_cli(clean.redis, "FUNCTION", "FLUSH")
    r = one(clean, *mix(1))
    assert r["allowed"] is True and [c["remaining"] for c in r["checks"]] == [7] * 7
    redis_cli(clean.redis, "SCRIPT", "FLUSH")
    assert release(clean, (K("f", "conc"), "r0")) == 1


def test_a_key_of_the_wrong_type_is_a_503(clean):
    one(clean, tb("w", 5, 1, 1000))
    r = call(clean.shim.port, {"requests": [{"checks": [
        dict(fw("w", 5), key=K("w", "tb:5:1:1000"))]}]})
    status, raw = r.status, r.raw
    assert status == 503 and json.loads(raw)["error"] == "backend_unavailable", raw
    assert b"WRONGTYPE" in raw


def test_largest_sliding_window_body(clean):
    """As many two-key checks as 64 KiB holds (KEYS and ARGV stay far below LuaJIT's 8000
    arguments to unpack)."""
    c = lambda i, j: {"alg": "sliding_window", "key": f"tollgate:{{{i}.{j}}}1",  # noqa: E731
                      "prev_key": f"tollgate:{{{i}.{j}}}0", "limit": 9, "window_ms": 1000, "weight_ms": 9}
    n = 1
    while len(compact({"requests": [{"checks": [c(i, j) for j in range(32)]} for i in range(n + 1)]})) <= 64 * 1024:
        n += 1
    assert n * 32 > 500
    results = ok(clean, *[[c(i, j) for j in range(32)] for i in range(n)])
    assert all(r["allowed"] for r in results) and redis_cli(clean.redis, "DBSIZE") == n * 32


def test_the_log_names_where_each_file_starts(backend):
    log = (backend.shim.dir / "logs" / "error.log").read_text()
    assert "check script" in log and "sliding_log.lua at line" in log and "release.lua" in log


# --- Validation of the v2 fields ------------------------------------------------------------------

def _c(**fields):
    return {"requests": [{"checks": [{k: v for k, v in fields.items() if v is not None}]}]}


P = "requests[0].checks[0]"
SW = dict(alg="sliding_window", key="tollgate:{a}:10000:5", prev_key="tollgate:{a}:10000:4", limit=5,
          window_ms=10_000, weight_ms=5000)
SL = dict(alg="sliding_log", key="tollgate:{a}:log", limit=5, window_ms=10_000, id="r1")
TB = dict(alg="token_bucket", key="tollgate:{a}:tb", burst=5, rate=1, period_ms=1000)
CC = dict(alg="concurrency", key="tollgate:{a}:conc", limit=5, ttl_ms=10_000, id="r1")
SB = dict(alg="sliding_window_bounded", key="tollgate:{a}:swb", limit=5, window_ms=10_000, subwindows=10)
ID_MSG = "must be a string of 1..128 printable ASCII characters (0x21..0x7e)"

BAD_CHECKS = [
    ("alg unknown", _c(**dict(TB, alg="leaky_bucket")), f'{P}.alg: must be "fixed_window", "sliding_window"'),
    ("alg not a string", _c(**dict(TB, alg=1)), f"{P}.alg: must be"),
    ("alg null", b'{"requests":[{"checks":[{"alg":null,"key":"tollgate:{a}","limit":1,"ttl_ms":1}]}]}', f"{P}.alg: must be"),
    ("field of another alg", _c(**dict(TB, limit=5)), f'{P}.limit: unknown field for alg "token_bucket"'),
    ("ttl_ms on a sliding window", _c(**dict(SW, ttl_ms=5)), f'{P}.ttl_ms: unknown field for alg "sliding_window"'),
    ("id on a fixed window", _c(key="tollgate:{a}", limit=1, ttl_ms=1, id="x"), f'{P}.id: unknown field for alg "fixed_window"'),
    ("unknown field", _c(**dict(SL, colour="red")), f"{P}.colour: unknown field"),
    ("shadow a string", _c(**dict(TB, shadow="true")), f"{P}.shadow: must be a boolean"),
    ("shadow a number", _c(**dict(TB, shadow=1)), f"{P}.shadow: must be a boolean"),
    ("shadow null", b'{"requests":[{"checks":[{"key":"tollgate:{a}","limit":1,"ttl_ms":1,"shadow":null}]}]}', f"{P}.shadow: must be a boolean"),
    ("prev_key missing", _c(**dict(SW, prev_key=None)), f"{P}.prev_key: is required"),
    ("prev_key other tag", _c(**dict(SW, prev_key="tollgate:{b}:10000:4")), f"{P}.prev_key: must carry the same non-empty {{hash tag}} as key"),
    ("prev_key no tag", _c(**dict(SW, key="tollgate:{a", prev_key="tollgate:{a")), f"{P}.prev_key: must carry the same"),
    ("prev_key empty tag", _c(**dict(SW, key="tollgate:{}:1", prev_key="tollgate:{}:0")), f"{P}.prev_key: must carry the same"),
    ("prev_key bad prefix", _c(**dict(SW, prev_key="other:{a}:4")), f'{P}.prev_key: must start with "tollgate:{{"'),
    ("prev_key not a string", _c(**dict(SW, prev_key=4)), f"{P}.prev_key: must be a string of 1..512"),
    ("window_ms below 1000", _c(**dict(SW, window_ms=999, weight_ms=1)), f"{P}.window_ms: must be an integer in 1000..86400000"),
    ("window_ms above a day", _c(**dict(SL, window_ms=86_400_001)), f"{P}.window_ms: must be an integer in 1000..86400000"),
    ("weight_ms 0", _c(**dict(SW, weight_ms=0)), f"{P}.weight_ms: must be an integer in 1..10000 (window_ms)"),
    ("weight_ms above window_ms", _c(**dict(SW, weight_ms=10_001)), f"{P}.weight_ms: must be an integer in 1..10000 (window_ms)"),
    ("weight_ms missing", _c(**dict(SW, weight_ms=None)), f"{P}.weight_ms: is required"),
    ("sliding_log limit above 10000", _c(**dict(SL, limit=10_001)), f"{P}.limit: must be an integer in 1..10000"),
    ("id missing", _c(**dict(SL, id=None)), f"{P}.id: is required"),
    ("id empty", _c(**dict(SL, id="")), f"{P}.id: {ID_MSG}"),
    ("id too long", _c(**dict(CC, id="x" * 129)), f"{P}.id: {ID_MSG}"),
    ("id with a space", _c(**dict(CC, id="a b")), f"{P}.id: {ID_MSG}"),
    ("id non-ASCII", _c(**dict(CC, id="\u00e9")), f"{P}.id: {ID_MSG}"),
    ("id a number", _c(**dict(SL, id=7)), f"{P}.id: {ID_MSG}"),
    ("burst 0", _c(**dict(TB, burst=0)), f"{P}.burst: must be an integer in 1..1000000000000"),
    ("burst too big", _c(**dict(TB, alg="gcra", burst=10**12 + 1)), f"{P}.burst: must be an integer in 1..1000000000000"),
    ("rate 0", _c(**dict(TB, rate=0)), f"{P}.rate: must be an integer in 1..1000000000"),
    ("rate too big", _c(**dict(TB, alg="gcra", rate=10**9 + 1)), f"{P}.rate: must be an integer in 1..1000000000"),
    ("period_ms 0", _c(**dict(TB, period_ms=0)), f"{P}.period_ms: must be an integer in 1..86400000"),
    ("period_ms fractional", _c(**dict(TB, alg="gcra", period_ms=1.5)), f"{P}.period_ms: must be an integer in 1..86400000"),
    # An emission interval under 1 µs would be 0: no tolerance, every request admitted.
    ("gcra rate above period_ms x 1000", _c(**dict(TB, alg="gcra", rate=1001, period_ms=1)),
     f"{P}.rate: must be an integer in 1..1000 (period_ms * 1000: at most one per microsecond)"),
    ("gcra rate far above period_ms x 1000", _c(**dict(TB, alg="gcra", rate=10**9, period_ms=999)),
     f"{P}.rate: must be an integer in 1..999000 (period_ms * 1000"),
    ("rate missing", _c(**dict(TB, rate=None)), f"{P}.rate: is required"),
    ("concurrency ttl_ms below 1000", _c(**dict(CC, ttl_ms=999)), f"{P}.ttl_ms: must be an integer in 1000..86400000"),
    ("concurrency cost 2", _c(**dict(CC, cost=2)), f'{P}.cost: must be 1 for alg "concurrency"'),
    ("concurrency cost 0", _c(**dict(CC, cost=0)), f'{P}.cost: must be 1 for alg "concurrency"'),
    ("concurrency limit 0", _c(**dict(CC, limit=0)), f"{P}.limit: must be an integer in 1..1000000000000"),
    ("cost of a bucket", _c(**dict(TB, cost=-1)), f"{P}.cost: must be an integer in 0..1000000000"),
    ("subwindows 0", _c(**dict(SB, subwindows=0)), f"{P}.subwindows: must be an integer in 1..100"),
    ("subwindows 101", _c(**dict(SB, subwindows=101)), f"{P}.subwindows: must be an integer in 1..100"),
    ("subwindows missing", _c(**dict(SB, subwindows=None)), f"{P}.subwindows: is required"),
    ("subwindows not dividing window_ms", _c(**dict(SB, subwindows=3)), f"{P}.subwindows: must divide window_ms"),
    ("prev_key on a bounded window", _c(**dict(SB, prev_key="tollgate:{a}:x")),
     f'{P}.prev_key: unknown field for alg "sliding_window_bounded"'),
]


@pytest.mark.parametrize("payload,message", [(p, m) for _, p, m in BAD_CHECKS], ids=[i for i, _, _ in BAD_CHECKS])
def test_bad_v2_fields_refuse_the_request_naming_the_field(clean, payload, message):
    """A bad check refuses its request alone (a 200); with no other request, Redis is not called."""
    r = call(clean.shim.port, payload)
    status, raw = r.status, r.raw
    assert status == 200, raw
    results = json.loads(raw)["results"]
    assert len(results) == 1 and set(results[0]) == {"refused"}, results
    assert message in results[0]["refused"], results[0]["refused"]
    assert redis_cli(clean.redis, "DBSIZE") == 0


@pytest.mark.parametrize("check", [SW, SB, SL, TB, dict(TB, alg="gcra"), CC, dict(CC, cost=1, shadow=False),
                                   dict(SW, weight_ms=10_000, shadow=True), dict(SL, id="!" * 128),
                                   dict(TB, alg="gcra", rate=1000, period_ms=1),
                                   dict(TB, rate=10**9, period_ms=1)],
                         ids=["sw", "sb", "sl", "tb", "gcra", "conc", "conc-cost-1", "sw-full-weight", "id-128",
                              "gcra-one-per-us", "tb-faster-than-one-per-us"])
def test_valid_v2_checks_are_accepted(clean, check):
    r = call(clean.shim.port, _c(**check))
    status, raw = r.status, r.raw
    assert status == 200, raw
    assert "refused" not in json.loads(raw)["results"][0], raw


# --- /v1/release: validation and errors -----------------------------------------------------------

CONC = "tollgate:{a}:conc"
BAD_RELEASES = [
    ("not JSON", b"{", "body: not valid JSON"),
    ("an array", b"[]", "body: must be a JSON object"),
    ("releases missing", {}, "releases: is required"),
    ("releases empty", {"releases": []}, "releases: must be an array of 1..256 releases"),
    ("releases an object", {"releases": {"key": CONC, "id": "r"}}, "releases: must be an array"),
    ("257 releases", {"releases": [{"key": CONC, "id": "r"}] * 257}, "releases: must be an array of 1..256 releases"),
    ("unknown top-level field", {"releases": [{"key": CONC, "id": "r"}], "v": 1}, "v: unknown field"),
    ("release not an object", {"releases": ["x"]}, "releases[0]: must be an object"),
    ("unknown release field", {"releases": [{"key": CONC, "id": "r", "limit": 1}]}, "releases[0].limit: unknown field"),
    ("key missing", {"releases": [{"id": "r"}]}, "releases[0].key: is required"),
    ("key not a conc key", {"releases": [{"key": "tollgate:{a}:60000:1", "id": "r"}]}, 'releases[0].key: must end with "}:conc"'),
    ("key bare suffix", {"releases": [{"key": "tollgate:{a}:xconc", "id": "r"}]}, 'releases[0].key: must end with "}:conc"'),
    ("key other prefix", {"releases": [{"key": "other:{a}:conc", "id": "r"}]}, 'releases[0].key: must start with "tollgate:{"'),
    ("key with a space", {"releases": [{"key": "tollgate:{a b}:conc", "id": "r"}]}, "releases[0].key: must be a string"),
    ("id missing", {"releases": [{"key": CONC}]}, "releases[0].id: is required"),
    ("id too long", {"releases": [{"key": CONC, "id": "x" * 129}]}, f"releases[0].id: {ID_MSG}"),
    ("second one bad", {"releases": [{"key": CONC, "id": "r"}, {"key": CONC, "id": ""}]}, f"releases[1].id: {ID_MSG}"),
]


@pytest.mark.parametrize("payload,message", [(p, m) for _, p, m in BAD_RELEASES], ids=[i for i, _, _ in BAD_RELEASES])
def test_bad_release_is_a_400_naming_the_field(clean, payload, message):
    one(clean, cc("a", 5, "r"))
    r = call(clean.shim.port, payload, path="/v1/release")
    status, raw = r.status, r.raw
    assert status == 400, raw
    body = json.loads(raw)
    assert body["error"] == "bad_request" and message in body["message"], body["message"]
    assert redis_cli(clean.redis, "ZCARD", CONC) == 1


def test_release_http_errors(clean):
    r = call(clean.shim.port, None, path="/v1/release", method="GET", headers={})
    status, raw, headers = r.status, r.raw, r.headers
    assert status == 405 and headers["allow"] == "POST" and json.loads(raw)["error"] == "method_not_allowed"
    r = call(clean.shim.port, {"releases": [{"key": CONC, "id": "r"}]}, path="/v1/release",
             headers={"Content-Type": "text/plain"})
    status, raw = r.status, r.raw
    assert status == 415 and json.loads(raw)["error"] == "unsupported_media_type"
    big = json.dumps({"releases": [{"key": CONC, "id": "r"}]})[:-1] + " " * (64 * 1024) + "}"
    r = call(clean.shim.port, big.encode(), path="/v1/release")
    status, raw = r.status, r.raw
    assert status == 413 and json.loads(raw)["error"] == "payload_too_large"
    r = call(clean.shim.port, None, path="/v1/release/x", method="POST")
    status, raw = r.status, r.raw
    assert status == 404


def test_release_of_256_slots(clean):
    key = K("many", "conc")
    ok(clean, *[[cc("many", 300, f"r{i}")] for i in range(256)])
    assert release(clean, *[(key, f"r{i}") for i in range(256)]) == 256
    assert redis_cli(clean.redis, "EXISTS", key) == 0


def test_release_with_redis_down_is_a_503(tmp_path):
    with shim_process(tmp_path / "shim", free_port()) as shim:
        r = call(shim.port, {"releases": [{"key": CONC, "id": "r"}]}, path="/v1/release")
        status, raw = r.status, r.raw
        assert status == 503 and json.loads(raw)["error"] == "backend_unavailable", raw


def test_acl_user_with_the_documented_commands_runs_every_algorithm(tmp_path):
    """lua-redis-shim/README.md lists the commands an ACL user needs; exactly those suffice."""
    commands = ("evalsha script|load ping get incrby pexpire pttl time hmget hset hgetall hincrby hdel set zadd "
                "zcard zscore zrange zrem zremrangebyscore").split()
    acl = ["tollgate", "on", ">pw", "~tollgate:*"] + [f"+{c}" for c in commands]
    with run_redis(tmp_path / "redis", extra_args=("--user", *acl)) as port, \
            shim_process(tmp_path / "shim", port, REDIS_USER="tollgate", REDIS_PASSWORD="pw") as shim:
        b = Backend(port, shim)
        mix = [fw("acl", 5), sw("acl", 5, 5000), sl("acl", 5), tb("acl", 5, 1, 1000), gc("acl", 5, 1, 1000),
               sb("acl", 5), cc("acl", 5, "r1")]
        assert one(b, *mix)["allowed"] is True
        assert one(b, *mix[:6], cc("acl", 1, "r2"))["allowed"] is False
        assert release(b, (K("acl", "conc"), "r1")) == 1


# --- POST /v1/charge: usage charged after a response -----------------------------------------

def charge(b, *charges):
    r = call(b.shim.port, {"charges": [{"key": k, "delta": d, "ttl_ms": t} for k, d, t in charges]},
             path="/v1/charge")
    status, raw = r.status, r.raw
    assert status == 200, f"{status} {raw[:500]!r}\n{b.shim.log_tails()}"
    return json.loads(raw)["charged"]


def test_charges_add_usage_and_hand_back_unused_reserve_exactly(clean):
    key = K("usage", "10000:1")
    # The request was checked with a reserve of 100 tokens…
    assert one(clean, fw("usage", 1_000_000_000_000, ttl_ms=60_000, cost=100))["allowed"] is True
    # …and used 123 456 789 012: the rest is charged, exactly (past 2^32, below 10^12).
    assert charge(clean, (key, 123_456_789_012 - 100, 60_000)) == 1
    assert int(redis_cli(clean.redis, "GET", key)) == 123_456_789_012
    # Another used 10 of its 100: 90 go back, never below zero.
    assert charge(clean, (key, -90, 60_000)) == 1
    assert int(redis_cli(clean.redis, "GET", key)) == 123_456_788_922
    other = K("usage2", "60000:1")
    redis_cli(clean.redis, "SET", other, "5", "PX", "60000")
    assert charge(clean, (other, -50, 60_000)) == 1
    assert int(redis_cli(clean.redis, "GET", other)) == 0
    assert 0 < int(redis_cli(clean.redis, "PTTL", other)) <= 60_000, "the TTL is kept"
    # A refund never creates a counter; a charge on an expired one gives it a TTL.
    gone = K("usage3", "60000:1")
    assert charge(clean, (gone, -5, 60_000)) == 0
    assert redis_cli(clean.redis, "EXISTS", gone) == 0
    assert charge(clean, (gone, 7, 30_000)) == 1
    assert 0 < int(redis_cli(clean.redis, "PTTL", gone)) <= 30_000


@pytest.mark.parametrize("body, field", [
    ({"charges": []}, "charges"),
    ({"charges": [{"key": "other:{x}:1", "delta": 1, "ttl_ms": 1}]}, "charges[0].key"),
    ({"charges": [{"key": "tollgate:{x}:1", "delta": 0, "ttl_ms": 1}]}, "charges[0].delta"),
    ({"charges": [{"key": "tollgate:{x}:1", "delta": 1.5, "ttl_ms": 1}]}, "charges[0].delta"),
    ({"charges": [{"key": "tollgate:{x}:1", "delta": 1, "ttl_ms": 0}]}, "charges[0].ttl_ms"),
    ({"charges": [{"key": "tollgate:{x}:1", "delta": 1, "ttl_ms": 1, "x": 1}]}, "charges[0].x"),
    ({"charges": [{"key": "tollgate:{x}:1", "delta": 1, "ttl_ms": 1}] * 257}, "charges"),
])
def test_bad_charges_are_a_400_naming_the_field(clean, body, field):
    r = call(clean.shim.port, body, path="/v1/charge")
    status, raw = r.status, r.raw
    assert status == 400, raw
    assert json.loads(raw)["message"].startswith(field + ":"), raw
