"""The shared algorithm vectors (tests/vectors/<wire alg>.json) against the real scripts, in a
real Redis, through the real shim. src/algorithms.rs runs the same files against the Rust
models, so the scripts and the models answer alike, exactly, field by field.

Time: the shim of this module runs with its test clock (TOLLGATE_TEST_CLOCK=1, off by default,
lua-redis-shim/README.md): each step's call names its instant in x-tollgate-test-now-ms, which
the scripts use instead of Redis's TIME. Fixed windows and the two-window estimate read no clock
(their time is the step's ttl_ms or weight_ms): a case's steps are the requests of one call,
decided in order, so a fixed window's reset is the ttl_ms the call sets (the key's PTTL).
"""

import json
from pathlib import Path

import pytest

from client import call
from shim_harness import redis_cli

SHIM_ENV = dict(TOLLGATE_TEST_CLOCK=1, REDIS_READ_TIMEOUT_MS=2000)
VECTORS = Path(__file__).resolve().parent.parent / "vectors"
ALGS = ["fixed_window", "sliding_window", "sliding_window_bounded", "token_bucket", "gcra", "sliding_log",
        "concurrency"]
ANSWER = ("allowed", "remaining", "reset_ms", "retry_after_ms")
KEY = "tollgate:{v}:k"
PREV_KEY = "tollgate:{v}:prev"
CONC_KEY = "tollgate:{v}:conc"


def all_cases():
    for alg in ALGS:
        doc = json.loads((VECTORS / f"{alg}.json").read_text())
        assert doc["alg"] == alg and doc["cases"], alg
        for case in doc["cases"]:
            # A known defect of the script: expected to fail until it is fixed (strict).
            defect = case.get("known_defect", {}).get("lua")
            marks = [pytest.mark.xfail(reason=defect, strict=True)] if defect else []
            yield pytest.param(alg, case, id=f"{alg}: {case['name']}", marks=marks)


def key_of(alg):
    return CONC_KEY if alg == "concurrency" else KEY


def check_of(alg, case, step, i):
    """The wire check of one step (docs/wire-format.md)."""
    c = {"alg": alg, "key": key_of(alg)}
    params = {
        "fixed_window": ("limit",), "sliding_window": ("limit", "window_ms"),
        "sliding_window_bounded": ("limit", "window_ms", "subwindows"),
        "token_bucket": ("burst", "rate", "period_ms"), "gcra": ("burst", "rate", "period_ms"),
        "sliding_log": ("limit", "window_ms"), "concurrency": ("limit", "ttl_ms"),
    }[alg]
    c.update({p: case[p] for p in params})
    if alg == "fixed_window":
        c["ttl_ms"] = step["ttl_ms"]
    elif alg == "sliding_window":
        c.update(prev_key=PREV_KEY, weight_ms=step["weight_ms"])
    elif alg == "sliding_log":
        c["id"] = f"r{i}"
    elif alg == "concurrency":
        c["id"] = step["id"]
    if alg != "concurrency":
        c["cost"] = step["cost"]
    return c


def write_state(b, alg, state):
    """Puts a case's starting state in Redis, as the script keeps it."""
    if state is None:
        return
    if alg == "fixed_window":
        redis_cli(b.redis, "SET", KEY, state)  # no TTL: the call gives it the step's ttl_ms
    elif alg == "sliding_window":
        redis_cli(b.redis, "SET", PREV_KEY, state["prev"])
        if state["cur"]:
            redis_cli(b.redis, "SET", KEY, state["cur"])
    elif alg == "sliding_window_bounded":
        redis_cli(b.redis, "HSET", KEY, *[x for i, n in state.items() for x in (i, n)])
    elif alg == "token_bucket":
        redis_cli(b.redis, "HSET", KEY, "t", state["milli_tokens"], "ts", state["ts_ms"])
    elif alg == "gcra":
        redis_cli(b.redis, "SET", KEY, state["tat_us"])
    elif alg == "sliding_log":
        redis_cli(b.redis, "ZADD", KEY, *[x for i, t in enumerate(state) for x in (t, f"s{i}:1")])
    elif alg == "concurrency":
        redis_cli(b.redis, "ZADD", CONC_KEY, *[x for i, e in state.items() for x in (e, i)])
    if alg not in ("fixed_window", "sliding_window"):
        redis_cli(b.redis, "PEXPIRE", key_of(alg), 600_000)


def read_state(b, alg):
    """What Redis holds under the case's key, in the vectors' notation (None: no key)."""
    k = key_of(alg)
    if not redis_cli(b.redis, "EXISTS", k):
        return None
    if alg in ("fixed_window", "sliding_window"):
        return int(redis_cli(b.redis, "GET", k))
    if alg == "sliding_window_bounded":
        flat = redis_cli(b.redis, "HGETALL", k)
        return {f.decode(): int(v) for f, v in zip(flat[::2], flat[1::2])}
    if alg == "token_bucket":
        t, ts = redis_cli(b.redis, "HMGET", k, "t", "ts")
        return {"milli_tokens": int(t), "ts_ms": int(ts)}
    if alg == "gcra":
        return {"tat_us": int(redis_cli(b.redis, "GET", k))}
    flat = redis_cli(b.redis, "ZRANGE", k, 0, -1, "WITHSCORES")
    if alg == "sliding_log":
        return sorted(int(s) for s in flat[1::2])
    return {m.decode(): int(s) for m, s in zip(flat[::2], flat[1::2])}


def results_of(b, requests, now_ms=None):
    headers = {"Content-Type": "application/json"}
    if now_ms is not None:
        headers["x-tollgate-test-now-ms"] = str(now_ms)
    r = call(b.shim.port, {"requests": [{"checks": checks} for checks in requests]}, headers=headers)
    assert r.status == 200, f"{r}\n{b.shim.log_tails()}"
    assert b"e+" not in r.raw, r.raw
    if now_ms is not None:
        assert r.json["now_ms"] == now_ms, "the call used the instant it named"
    return r.json["results"]


def assert_answer(alg, case, i, step, got):
    where = f"{alg}: {case['name']}: step {i}: {step}"
    c = got["checks"][0]
    want = {f: step[f] for f in ANSWER}
    assert {f: c[f] for f in ANSWER} == want, where
    assert all(type(c[f]) is int for f in ANSWER[1:]), (where, c)
    assert got["allowed"] == step["allowed"], where
    if "count" in step:
        assert c["count"] == step["count"], where
    else:
        assert "count" not in c, where


@pytest.mark.parametrize("alg,case", list(all_cases()))
def test_the_script_answers_every_vector(clean, alg, case):
    write_state(clean, alg, case.get("state"))
    steps = case["steps"]
    if alg in ("fixed_window", "sliding_window"):
        # No clock: the case is one call, a request per step.
        results = results_of(clean, [[check_of(alg, case, s, i)] for i, s in enumerate(steps)])
        for i, (step, got) in enumerate(zip(steps, results)):
            assert_answer(alg, case, i, step, got)
        assert (read_state(clean, alg) or 0) == steps[-1]["count"], "the counter holds the last count"
        if alg == "sliding_window" and case.get("state"):
            assert int(redis_cli(clean.redis, "GET", PREV_KEY)) == case["state"]["prev"], "prev is only read"
        return
    for i, step in enumerate(steps):
        before = read_state(clean, alg)
        got = results_of(clean, [[check_of(alg, case, step, i)]], now_ms=step["now_ms"])[0]
        assert_answer(alg, case, i, step, got)
        after = read_state(clean, alg)
        where = f"{alg}: {case['name']}: state after step {i}"
        if "state" in step:
            assert after == step["state"], where
        elif not (step["allowed"] and step.get("cost", 1) > 0) and alg not in ("sliding_log", "concurrency"):
            # Nothing charged: nothing written (these two drop expired entries on any check).
            assert after == before, where
