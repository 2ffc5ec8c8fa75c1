"""The lua-redis-shim over HTTP, against a real nginx and a real Redis (docs/wire-format.md).

Each process runs on random loopback ports (tests/shim_harness.py); logs are under pytest's
tmp_path and quoted in failure messages.
"""

import http.client
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from client import Backend, call
from shim_harness import (
    SHIM_DIR, free_port, redis_cli, redis_info, run_redis, shim_process, start_redis, stop, tail,
)

TTL = 60000


# --- Helpers (fixtures: conftest.py; Backend, call: client.py) -----------------------------

def key(name, window="60000:1"):
    return f"tollgate:{{{name}}}:{window}"


def chk(name, limit, ttl_ms=TTL, cost=None):
    c = {"key": key(name), "limit": limit, "ttl_ms": ttl_ms}
    if cost is not None:
        c["cost"] = cost
    return c


def body(*requests):
    """body([check, ...], [check, ...]): one entry of `requests` per list of checks."""
    return {"requests": [{"checks": list(checks)} for checks in requests]}


def ok(b: Backend, payload, **kw):
    """POSTs and returns the results of a 200, failing with the shim's logs otherwise."""
    r = call(b.shim.port, payload, **kw)
    assert r.status == 200, f"{r}\n{b.shim.log_tails()}"
    assert r.headers["content-type"] == "application/json"
    return r.json["results"]


def lua_bound(name):
    """A bound of lua-redis-shim/lib/tollgate/bounds.lua: `_M.NAME = 64 * 1024`, `1e12`, …"""
    text = (SHIM_DIR / "lib" / "tollgate" / "bounds.lua").read_text()
    value = re.search(rf"^_M\.{name} = ([^\n-]+)", text, re.M).group(1)
    product = 1
    for factor in value.split("*"):
        product *= int(float(factor))
    return product


MAX_BODY_BYTES = lua_bound("MAX_BODY_BYTES")
# A fixed window's counter outlives its window by this much (fixed_window.lua).
GRACE_MS = lua_bound("COUNTER_GRACE_MS")


def get(b: Backend, name):
    v = redis_cli(b.redis, "GET", key(name))
    return None if v is None else int(v)


# --- Counting -------------------------------------------------------------------------------

def test_counts_and_remaining_until_the_limit(clean):
    seen = [ok(clean, body([chk("a", 3)]))[0] for _ in range(4)]
    assert [r["allowed"] for r in seen] == [True, True, True, False]
    assert [r["checks"][0]["count"] for r in seen] == [1, 2, 3, 3]
    assert [r["checks"][0]["remaining"] for r in seen] == [2, 1, 0, 0]
    reset_ms = seen[3]["checks"][0]["reset_ms"]
    assert seen[3]["checks"][0] == {"allowed": False, "limit": 3, "count": 3, "remaining": 0,
                                    "reset_ms": reset_ms, "retry_after_ms": reset_ms}
    assert all(r["checks"][0]["retry_after_ms"] == 0 for r in seen[:3])
    assert get(clean, "a") == 3, "a denied request must not consume"


def test_reply_shape(clean):
    r = call(clean.shim.port, body([chk("a", 5)]))
    assert r.status == 200
    assert r.raw.startswith(b'{"results":[{"allowed":true,"checks":[{'), r.raw
    result = r.json["results"][0]
    assert set(result) == {"allowed", "checks"}
    assert set(result["checks"][0]) == {"allowed", "limit", "count", "remaining", "reset_ms", "retry_after_ms"}


def test_denied_request_consumes_nothing_on_any_check(clean):
    ok(clean, body([chk("a", 1)]))
    result = ok(clean, body([chk("a", 1), chk("b", 10)]))[0]
    assert result["allowed"] is False
    assert [c["allowed"] for c in result["checks"]] == [False, True]
    assert [c["count"] for c in result["checks"]] == [1, 0]
    assert result["checks"][1]["remaining"] == 10
    assert get(clean, "a") == 1
    assert get(clean, "b") is None


def test_later_request_in_a_body_sees_earlier_increments(clean):
    results = ok(clean, body([chk("a", 1)], [chk("a", 1)]))
    assert [r["allowed"] for r in results] == [True, False]
    assert [r["checks"][0]["count"] for r in results] == [1, 1]
    assert get(clean, "a") == 1


def test_each_request_is_decided_on_its_own(clean):
    ok(clean, body([chk("full", 1)]))
    results = ok(clean, body([chk("full", 1), chk("b", 5)], [chk("b", 5)]))
    assert [r["allowed"] for r in results] == [False, True]
    assert get(clean, "b") == 1


def test_same_key_twice_in_one_request_cannot_pass_its_limit(clean):
    result = ok(clean, body([chk("a", 1), chk("a", 1)]))[0]
    assert result["allowed"] is False
    assert get(clean, "a") is None


def test_cost(clean):
    assert ok(clean, body([chk("a", 10, cost=4)]))[0]["checks"][0]["count"] == 4
    assert ok(clean, body([chk("a", 10, cost=6)]))[0]["checks"][0]["count"] == 10
    denied = ok(clean, body([chk("a", 10, cost=1)]))[0]
    assert denied["allowed"] is False and denied["checks"][0]["count"] == 10
    assert get(clean, "a") == 10


def test_cost_zero_only_reads(clean):
    fresh = ok(clean, body([chk("a", 2, ttl_ms=5000, cost=0)]))[0]
    assert fresh == {"allowed": True, "checks": [
        {"allowed": True, "limit": 2, "count": 0, "remaining": 2, "reset_ms": 5000, "retry_after_ms": 0}]}
    assert redis_cli(clean.redis, "EXISTS", key("a")) == 0
    ok(clean, body([chk("a", 2)]))
    ok(clean, body([chk("a", 2)]))
    full = ok(clean, body([chk("a", 2, cost=0)]))[0]
    assert full["allowed"] is True and full["checks"][0]["count"] == 2
    assert full["checks"][0]["remaining"] == 0
    assert get(clean, "a") == 2


def test_new_keys_get_the_ttl_and_it_is_not_extended(clean):
    first = ok(clean, body([chk("a", 10, ttl_ms=5000)]))[0]["checks"][0]
    pttl = redis_cli(clean.redis, "PTTL", key("a"))
    assert 5000 < pttl <= 5000 + GRACE_MS
    assert 0 < first["reset_ms"] <= 5000
    time.sleep(0.05)
    second = ok(clean, body([chk("a", 10, ttl_ms=5000)]))[0]["checks"][0]
    assert second["reset_ms"] < first["reset_ms"], "the TTL is set once, when the key is created"
    assert 0 < redis_cli(clean.redis, "PTTL", key("a")) < pttl


def test_counter_without_expiry_gets_one(clean):
    redis_cli(clean.redis, "SET", key("a"), 3)
    result = ok(clean, body([chk("a", 10, ttl_ms=7000)]))[0]["checks"][0]
    assert result["count"] == 4
    assert 7000 < redis_cli(clean.redis, "PTTL", key("a")) <= 7000 + GRACE_MS


def test_large_numbers_are_plain_integers(clean):
    redis_cli(clean.redis, "SET", key("big"), 10**12 - 1)
    r = call(clean.shim.port, body([chk("big", 10**12, cost=1)], [chk("c", 10**12, cost=10**9)]))
    assert r.status == 200, r
    assert b'"count":1000000000000' in r.raw and b'"limit":1000000000000' in r.raw, r.raw
    assert b'"count":1000000000' in r.raw and b"e+" not in r.raw, r.raw
    assert get(clean, "big") == 10**12


def test_survives_script_flush(clean):
    ok(clean, body([chk("a", 5)]))
    redis_cli(clean.redis, "SCRIPT", "FLUSH")
    redis_cli(clean.redis, "FUNCTION", "FLUSH")
    assert ok(clean, body([chk("a", 5)]))[0]["checks"][0]["count"] == 2


def test_the_check_runs_as_a_function_library_or_evalsha(tmp_path, backend):
    """With Redis 7 the check script is loaded once as a function library and FCALLed; with
    REDIS_FUNCTIONS=0 it is EVALSHA; both answer the same, and neither keeps state (a clock
    reading, counters) from one call to the next."""
    answers = {}
    for functions in ("1", "0"):
        redis_cli(backend.redis, "FLUSHALL")
        redis_cli(backend.redis, "FUNCTION", "FLUSH")
        redis_cli(backend.redis, "CONFIG", "RESETSTAT")
        with shim_process(tmp_path / f"shim{functions}", backend.redis, REDIS_FUNCTIONS=functions) as shim:
            b = type(backend)(backend.redis, shim)
            answers[functions] = [ok(b, body([chk("a", 3), chk("b", 1)]))[0]["checks"] for _ in range(4)]
        stats = redis_cli(backend.redis, "INFO", "commandstats").decode()
        used = {m.group(1): int(m.group(2)) for m in re.finditer(r"cmdstat_(fcall|evalsha):calls=(\d+)", stats)}
        # Four calls, and one more when the first found no function or script loaded yet.
        want = "fcall" if functions == "1" else "evalsha"
        assert set(used) == {want} and used[want] in (4, 5), used
    # Times move on between the runs; the decisions must not.
    same = {f: [[(c["allowed"], c["count"], c["remaining"]) for c in checks] for checks in answers[f]]
            for f in answers}
    assert same["1"] == same["0"]
    # The first call admits both; then b is spent and, all-or-nothing, a is charged no more.
    assert same["1"] == [[(True, 1, 2), (True, 1, 0)]] + [[(True, 1, 2), (False, 1, 0)]] * 3, same["1"]


def test_the_largest_valid_body(clean):
    """256 requests would not fit 1024 checks in 64 KiB with real keys; 32 x 32 short ones do."""
    requests = [[{"key": f"tollgate:{{{i}.{j}}}", "limit": 9, "ttl_ms": 9000} for j in range(32)]
                for i in range(32)]
    results = ok(clean, body(*requests))
    assert len(results) == 32 and all(r["allowed"] and len(r["checks"]) == 32 for r in results)
    assert redis_cli(clean.redis, "DBSIZE") == 1024
    assert len(ok(clean, {"requests": [{"checks": [chk("x", 1)]}] * 256})) == 256


def test_exact_admission_under_concurrency(tmp_path):
    """Two workers, a small pool, 300 requests from 30 threads on one key of limit 100."""
    with run_redis(tmp_path / "redis") as redis_port, \
            shim_process(tmp_path / "shim", redis_port, SHIM_WORKERS=2, REDIS_POOL_SIZE=4) as shim:
        statuses, lock = [], threading.Lock()

        def worker():
            conn = http.client.HTTPConnection("127.0.0.1", shim.port, timeout=10)
            for _ in range(10):
                r = call(shim.port, body([chk("hot", 100)]), conn=conn)
                with lock:
                    statuses.append(r.json["results"][0]["allowed"] if r.status == 200 else r.status)
            conn.close()

        threads = [threading.Thread(target=worker) for _ in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert statuses.count(True) == 100 and statuses.count(False) == 200, \
            f"{set(statuses)}\n{shim.log_tails()}"
        assert int(redis_cli(redis_port, "GET", key("hot"))) == 100


# --- Bad input: a 400 for a bad body, a refusal for a bad request, the field named ---------

def _checks(n, **fields):
    return [dict({"key": f"tollgate:{{{i}}}", "limit": 1, "ttl_ms": 1}, **fields) for i in range(n)]


def _with(**fields):
    """A body with one check whose fields are overridden (None removes a field)."""
    c = {"key": key("a"), "limit": 10, "ttl_ms": TTL, "cost": 1}
    c.update(fields)
    return body([{k: v for k, v in c.items() if v is not None}])


LIMIT_MSG = "requests[0].checks[0].limit: must be an integer in 1..1000000000000"
TTL_MSG = "requests[0].checks[0].ttl_ms: must be an integer in 1..86400000"
COST_MSG = "requests[0].checks[0].cost: must be an integer in 0..1000000000"
KEY_MSG = "requests[0].checks[0].key: must be a string of 1..512 printable ASCII characters"

BAD_BODIES = [
    ("not json", b"not json", "body: not valid JSON"),
    ("empty body", b"", "body: not valid JSON"),
    ("truncated", b'{"requests":[', "body: not valid JSON"),
    ("top-level array", b'[{"requests":[]}]', "body: must be a JSON object"),
    ("top-level empty array", b"[]", "body: must be a JSON object"),
    ("top-level number", b"42", "body: must be a JSON object"),
    ("top-level null", b"null", "body: must be a JSON object"),
    ("missing requests", {}, "requests: is required"),
    ("empty requests", {"requests": []}, "requests: must be an array of 1..256 requests"),
    ("requests as empty object", {"requests": {}}, "requests: must be an array of 1..256 requests"),
    ("requests as object", {"requests": {"0": {"checks": []}}}, "requests: must be an array of 1..256"),
    ("requests as string", {"requests": "x"}, "requests: must be an array of 1..256"),
    ("request not an object", {"requests": [1]}, "requests[0]: must be an object"),
    ("request is an array", {"requests": [[1]]}, "requests[0]: must be an object"),
    ("missing checks", {"requests": [{}]}, "requests[0].checks: is required"),
    ("empty checks", {"requests": [{"checks": []}]}, "requests[0].checks: must be an array of 1..32 checks"),
    ("checks as object", {"requests": [{"checks": {"key": "x"}}]}, "requests[0].checks: must be an array"),
    ("check not an object", {"requests": [{"checks": ["x"]}]}, "requests[0].checks[0]: must be an object"),
    ("missing key", _with(key=None), "requests[0].checks[0].key: is required"),
    ("key wrong prefix", _with(key="other:{a}:1"), 'requests[0].checks[0].key: must start with "tollgate:{"'),
    ("key without hash tag", _with(key="tollgate:a"), 'requests[0].checks[0].key: must start with "tollgate:{"'),
    ("key prefix only as substring", _with(key="xtollgate:{a}"), "must start with"),
    ("key with space", _with(key="tollgate:{a b}"), KEY_MSG),
    ("key with tab", _with(key="tollgate:{a\tb}"), KEY_MSG),
    ("key with NUL", _with(key="tollgate:{a\u0000}"), KEY_MSG),
    ("key non-ASCII", _with(key="tollgate:{\u00e9}"), KEY_MSG),
    ("key DEL", _with(key="tollgate:{\u007f}"), KEY_MSG),
    ("key too long", _with(key="tollgate:{" + "a" * 503), KEY_MSG),
    ("key empty", _with(key=""), KEY_MSG),
    ("key a number", _with(key=5), KEY_MSG),
    ("key null", b'{"requests":[{"checks":[{"key":null,"limit":1,"ttl_ms":1}]}]}', KEY_MSG),
    ("limit 0", _with(limit=0), LIMIT_MSG),
    ("limit negative", _with(limit=-1), LIMIT_MSG),
    ("limit fractional", _with(limit=1.5), LIMIT_MSG),
    ("limit string", _with(limit="10"), LIMIT_MSG),
    ("limit boolean", _with(limit=True), LIMIT_MSG),
    ("limit too big", _with(limit=10**12 + 1), LIMIT_MSG),
    ("limit huge", _with(limit=10**30), LIMIT_MSG),
    ("limit missing", _with(limit=None), "requests[0].checks[0].limit: is required"),
    ("limit null", b'{"requests":[{"checks":[{"key":"tollgate:{a}","limit":null,"ttl_ms":1}]}]}', LIMIT_MSG),
    ("limit NaN", b'{"requests":[{"checks":[{"key":"tollgate:{a}","limit":NaN,"ttl_ms":1}]}]}', "body: not valid JSON"),
    ("limit Infinity", b'{"requests":[{"checks":[{"key":"tollgate:{a}","limit":Infinity,"ttl_ms":1}]}]}', "body: not valid JSON"),
    ("limit hex", b'{"requests":[{"checks":[{"key":"tollgate:{a}","limit":0x10,"ttl_ms":1}]}]}', "body: not valid JSON"),
    ("limit 1e400", b'{"requests":[{"checks":[{"key":"tollgate:{a}","limit":1e400,"ttl_ms":1}]}]}', LIMIT_MSG),
    ("ttl_ms 0", _with(ttl_ms=0), TTL_MSG),
    ("ttl_ms too big", _with(ttl_ms=86_400_001), TTL_MSG),
    ("ttl_ms missing", _with(ttl_ms=None), "requests[0].checks[0].ttl_ms: is required"),
    ("cost negative", _with(cost=-1), COST_MSG),
    ("cost too big", _with(cost=10**9 + 1), COST_MSG),
    ("cost fractional", _with(cost=0.5), COST_MSG),
    ("cost null", b'{"requests":[{"checks":[{"key":"tollgate:{a}","limit":1,"ttl_ms":1,"cost":null}]}]}', COST_MSG),
    ("unknown check field", _with(colour="red"), "requests[0].checks[0].colour: unknown field"),
    ("unknown request field", {"requests": [{"checks": _checks(1), "id": 1}]}, "requests[0].id: unknown field"),
    ("unknown top-level field", {"requests": [{"checks": _checks(1)}], "v": 2}, "v: unknown field"),
    ("error deep inside names its path",
     {"requests": [{"checks": [chk("first", 5)]}, {"checks": _checks(2) + [{"key": key("x"), "limit": 0, "ttl_ms": 1}]}]},
     "requests[1].checks[2].limit: must be an integer in 1..1000000000000"),
    ("257 requests", {"requests": [{"checks": _checks(1)}] * 257}, "requests: must be an array of 1..256 requests"),
    ("33 checks", {"requests": [{"checks": _checks(33)}]}, "requests[0].checks: must be an array of 1..32 checks"),
    ("1025 checks in total", {"requests": [{"checks": _checks(32)}] * 32 + [{"checks": _checks(1)}]},
     "requests: must hold at most 1024 checks in total"),
    ("huge nesting", b'{"requests":' + b"[" * 20000 + b"]" * 20000 + b"}", "body: not valid JSON"),
    # A valid body nests 5 deep; the shim's cjson allows 16.
    ("nesting just too deep", b'{"requests":[{"checks":[{"key":' + b"[" * 12 + b"]" * 12 + b"}]}]}",
     "body: not valid JSON: Found too many nested data structures (17)"),
    ("nesting 16 deep is a type error", b'{"requests":[{"checks":[{"key":' + b"[" * 11 + b"]" * 11 + b"}]}]}",
     KEY_MSG),
]


# A problem with the body as a whole (its JSON, `requests` itself, a top-level field, the total
# of checks) is a 400; one inside requests[i] refuses that request alone.
BODY_PROBLEMS = [c for c in BAD_BODIES if c[2].startswith(("body:", "requests:", "v:"))]
REQUEST_PROBLEMS = [c for c in BAD_BODIES if c not in BODY_PROBLEMS]


@pytest.mark.parametrize("payload,message", [(p, m) for _, p, m in BODY_PROBLEMS], ids=[i for i, _, _ in BODY_PROBLEMS])
def test_bad_body_is_a_400_naming_the_field(clean, payload, message):
    r = call(clean.shim.port, payload)
    assert r.status == 400, r
    assert r.headers["content-type"] == "application/json"
    assert r.json["error"] == "bad_request"
    assert message in r.json["message"], r.json["message"]
    assert redis_cli(clean.redis, "DBSIZE") == 0


@pytest.mark.parametrize("payload,message", [(p, m) for _, p, m in REQUEST_PROBLEMS],
                         ids=[i for i, _, _ in REQUEST_PROBLEMS])
def test_bad_request_is_refused_alone_naming_the_field(clean, payload, message):
    """The bad request gets {"refused": ...} and costs nothing; a good one after it is charged."""
    good = {"checks": [chk("good", 5)]}
    if isinstance(payload, bytes):  # kept as bytes: 1e400 would not survive Python's json
        assert payload.endswith(b"]}")
        payload = payload[:-2] + b"," + json.dumps(good).encode() + b"]}"
    else:
        payload = dict(payload, requests=payload["requests"] + [good])
    r = call(clean.shim.port, payload)
    assert r.status == 200, f"{r}\n{clean.shim.log_tails()}"
    results = r.json["results"]
    refused = [x for x in results if "refused" in x]
    assert len(refused) == 1 and set(refused[0]) == {"refused"}, results
    assert message in refused[0]["refused"], refused[0]["refused"]
    assert results[-1]["allowed"] is True and results[-1]["checks"][0]["count"] == 1
    assert get(clean, "good") == 1
    # Only the good requests' keys were written.
    assert {k.decode() for k in redis_cli(clean.redis, "KEYS", "*")} <= {key("good"), key("first")}


def test_bad_request_among_good_ones_in_one_call(clean):
    """requests[1] is refused; requests[0] and [2] are checked and charged in the same call, and
    [2] sees [0]'s charge as usual."""
    bad = {"key": "tollgate:{" + "k" * 600 + "}", "limit": 1, "ttl_ms": TTL}
    r = call(clean.shim.port, body([chk("a", 1)], [chk("b", 5), bad], [chk("a", 1), chk("c", 5)]))
    assert r.status == 200, r
    results = r.json["results"]
    assert results[0]["allowed"] is True and results[0]["checks"][0]["count"] == 1
    assert results[1] == {"refused": "requests[1].checks[1].key: must be a string of 1..512 printable"
                                     " ASCII characters (0x21..0x7e)"}
    assert results[2]["allowed"] is False and [c["count"] for c in results[2]["checks"]] == [1, 0]
    assert "now_ms" in r.json, "Redis was called for the others"
    assert (get(clean, "a"), get(clean, "b"), get(clean, "c")) == (1, None, None)


def test_every_request_refused_is_a_200_without_redis(clean):
    r = call(clean.shim.port, {"requests": [{"checks": _checks(33)}, {"checks": []}, 7]})
    assert r.status == 200, r
    assert r.json == {"results": [
        {"refused": "requests[0].checks: must be an array of 1..32 checks"},
        {"refused": "requests[1].checks: must be an array of 1..32 checks"},
        {"refused": "requests[2]: must be an object"},
    ]}
    assert redis_cli(clean.redis, "DBSIZE") == 0


def test_a_refusal_message_is_valid_json_whatever_the_field_name(clean):
    weird = 'a"b\\c\u0001' + "x" * 100
    r = call(clean.shim.port, {"requests": [{"checks": [dict(chk("a", 1), **{weird: 1})]}]})
    assert r.status == 200, r
    message = r.json["results"][0]["refused"]
    assert message.startswith('requests[0].checks[0].a"b\\c?') and message.endswith(": unknown field"), message


def test_key_of_512_bytes_is_accepted(clean):
    k = "tollgate:{" + "a" * 502
    assert len(k) == 512
    assert ok(clean, body([{"key": k, "limit": 1, "ttl_ms": 1000}]))[0]["allowed"] is True


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_64_kib_is_a_413(clean, chunked):
    padding = " " * MAX_BODY_BYTES
    payload = json.dumps(body([chk("a", 1)]))[:-1] + padding + "}"
    conn = http.client.HTTPConnection("127.0.0.1", clean.shim.port, timeout=10)
    try:
        if chunked:
            conn.request("POST", "/v1/check", body=iter([payload.encode()]),
                         headers={"Content-Type": "application/json"}, encode_chunked=True)
        else:
            conn.request("POST", "/v1/check", body=payload.encode(), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        status, raw = r.status, r.read()
    finally:
        conn.close()
    assert status == 413, raw
    assert json.loads(raw)["error"] == "payload_too_large"
    assert redis_cli(clean.redis, "DBSIZE") == 0


def test_body_of_exactly_64_kib_is_accepted(clean):
    payload = json.dumps(body([chk("a", 1)]))
    payload = payload[:-1] + " " * (MAX_BODY_BYTES - len(payload)) + "}"
    assert len(payload) == MAX_BODY_BYTES == 64 * 1024, "nginx.conf.in says 64k"
    assert ok(clean, payload.encode())[0]["allowed"] is True


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD"])
def test_other_methods_are_a_405(clean, method):
    r = call(clean.shim.port, None, method=method)
    assert r.status == 405
    assert r.headers["allow"] == "POST"
    if method != "HEAD":
        assert r.json["error"] == "method_not_allowed"


@pytest.mark.parametrize("path,method", [("/other", "GET"), ("/", "GET"), ("/v1/check/", "POST"),
                                         ("/v1/checks", "POST"), ("/healthz/x", "GET")])
def test_other_paths_are_a_404(clean, path, method):
    r = call(clean.shim.port, body([chk("a", 1)]) if method == "POST" else None, path=path, method=method)
    assert r.status == 404, r
    assert r.json["error"] == "not_found"
    assert redis_cli(clean.redis, "DBSIZE") == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "application/jsonx", "application/json-seq"])
def test_other_content_types_are_a_415(clean, content_type):
    r = call(clean.shim.port, body([chk("a", 1)]), headers={"Content-Type": content_type})
    assert r.status == 415, r
    assert r.json["error"] == "unsupported_media_type"
    assert redis_cli(clean.redis, "DBSIZE") == 0


@pytest.mark.parametrize("content_type", [None, "application/json", "application/json; charset=utf-8",
                                          "Application/JSON"])
def test_json_content_types_are_accepted(clean, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    assert ok(clean, body([chk("a", 1)]), headers=headers)[0]["allowed"] is True


# --- Health and Redis failures ---------------------------------------------------------------

def test_healthz(clean):
    r = call(clean.shim.port, None, path="/healthz", method="GET")
    assert (r.status, r.json) == (200, {"status": "ok"})


def test_redis_down_is_a_503_fast(tmp_path):
    with shim_process(tmp_path / "shim", free_port()) as shim:
        r = call(shim.port, body([chk("a", 1)]))
        assert r.status == 503, r
        assert r.json["error"] == "backend_unavailable"
        assert "connect" in r.json["message"], r.json
        assert r.elapsed_s < 1.0
        h = call(shim.port, None, path="/healthz", method="GET")
        assert h.status == 503 and h.json["error"] == "backend_unavailable"
        # Failures are logged at error level, once each.
        assert "[error]" in tail(shim.dir / "logs" / "error.log")


@pytest.mark.parametrize("requests_while_down", [True, False], ids=["used-while-down", "idle-while-down"])
def test_redis_restart_is_survived(tmp_path, requests_while_down):
    """A pooled connection breaks with the restart; the script cache is empty afterwards."""
    port = free_port()
    redis = start_redis(tmp_path / "redis1", port)
    try:
        with shim_process(tmp_path / "shim", port) as shim:
            b = Backend(port, shim)
            assert ok(b, body([chk("a", 5)]))[0]["checks"][0]["count"] == 1
            stop(redis)
            if requests_while_down:
                for _ in range(3):
                    assert call(shim.port, body([chk("a", 5)])).status == 503
            redis = start_redis(tmp_path / "redis2", port)
            # A fresh Redis: empty, no scripts loaded (NOSCRIPT, then SCRIPT LOAD).
            assert ok(b, body([chk("a", 5)]))[0]["checks"][0]["count"] == 1
            assert call(shim.port, None, path="/healthz", method="GET").status == 200
    finally:
        stop(redis)


def test_slow_redis_times_out_and_its_connection_is_not_reused(clean):
    """A late reply must never be read as the answer to the next request."""
    ok(clean, body([chk("a", 100)]))
    redis_cli(clean.redis, "CLIENT", "PAUSE", "400", "ALL")
    r = call(clean.shim.port, body([chk("a", 100)]))
    assert r.status == 503 and r.json["error"] == "backend_unavailable", r
    assert "timeout" in r.json["message"], r.json
    assert r.elapsed_s < 0.35, "REDIS_READ_TIMEOUT_MS defaults to 100"
    time.sleep(0.5)
    # A different shape: a stale 1-check reply would not decode as this 2-check answer.
    result = ok(clean, body([chk("a", 100), chk("b", 100)]))[0]
    assert result["allowed"] is True
    assert result["checks"][0]["count"] == get(clean, "a")
    assert result["checks"][1]["count"] == 1


def test_connections_are_pooled(clean):
    error_log = clean.shim.dir / "logs" / "error.log"
    log_size = error_log.stat().st_size
    received = int(redis_info(clean.redis, "stats")["total_connections_received"])
    conn = http.client.HTTPConnection("127.0.0.1", clean.shim.port, timeout=10)
    try:
        for i in range(200):
            r = call(clean.shim.port, body([chk(f"k{i % 7}", 1000)]), conn=conn)
            assert r.status == 200, r
            call(clean.shim.port, None, path="/healthz", method="GET", conn=conn)
    finally:
        conn.close()
    opened = int(redis_info(clean.redis, "stats")["total_connections_received"]) - received
    assert opened <= 3, f"{opened} new Redis connections for 400 sequential requests"
    assert int(redis_info(clean.redis, "clients")["connected_clients"]) <= 32 + 2
    assert error_log.stat().st_size == log_size, "nothing is logged per successful request"


# --- Redis settings -------------------------------------------------------------------------

def test_password(tmp_path):
    with run_redis(tmp_path / "redis", extra_args=("--requirepass", "s3cret")) as port:
        with shim_process(tmp_path / "good", port, REDIS_PASSWORD="s3cret") as shim:
            assert ok(Backend(port, shim), body([chk("a", 1)]))[0]["allowed"] is True
        with shim_process(tmp_path / "none", port) as shim:
            r = call(shim.port, body([chk("a", 1)]))
            assert r.status == 503 and "NOAUTH" in r.json["message"], r
        with shim_process(tmp_path / "wrong", port, REDIS_PASSWORD="nope") as shim:
            r = call(shim.port, body([chk("a", 1)]))
            assert r.status == 503 and "AUTH" in r.json["message"], r


def test_acl_user_and_db(tmp_path):
    acl = "tollgate on >pw ~tollgate:* +evalsha +script|load +ping +select +get +incrby +pexpire +pttl"
    with run_redis(tmp_path / "redis", extra_args=("--user", *acl.split())) as port:
        with shim_process(tmp_path / "shim", port, REDIS_USER="tollgate", REDIS_PASSWORD="pw", REDIS_DB=3) as shim:
            assert ok(Backend(port, shim), body([chk("a", 1)]))[0]["allowed"] is True
            assert redis_cli(port, "DBSIZE", db=3) == 1
            assert redis_cli(port, "DBSIZE") == 0
            clients = redis_cli(port, "CLIENT", "LIST").decode()
            assert "user=tollgate" in clients and "db=3" in clients, clients


def test_bad_setting_stops_the_shim_with_the_variable_named(tmp_path):
    with pytest.raises(RuntimeError, match=r"REDIS_PORT=abc: must be an integer in 1\.\.65535"):
        with shim_process(tmp_path / "shim", "abc"):
            pass


def test_key_prefix_setting(tmp_path):
    with run_redis(tmp_path / "redis") as port, \
            shim_process(tmp_path / "shim", port, TOLLGATE_KEY_PREFIX="rl") as shim:
        r = call(shim.port, body([chk("a", 1)]))
        assert r.status == 200 and r.json["results"] == [
            {"refused": 'requests[0].checks[0].key: must start with "rl:{"'}], r
        r = ok(Backend(port, shim), body([{"key": "rl:{a}:1", "limit": 1, "ttl_ms": 1000}]))
        assert r[0]["allowed"] is True


def test_launcher_test_mode(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIM_")}
    done = subprocess.run([str(SHIM_DIR / "shim"), "--prefix", str(tmp_path / "p"), "--test"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr
    conf = (tmp_path / "p" / "nginx.conf").read_text()
    assert not re.search(r"\$\{[A-Z_]+\}", conf), "every placeholder is replaced"
    assert "listen 127.0.0.1:8181;" in conf


# --- Which Redis client library -------------------------------------------------------------

# A stand-in for OpenResty's resty.redis (which has set_timeouts), built on Debian's nginx.redis.
RESTY_REDIS_STAND_IN = """
local base = require "nginx.redis"
local _M = setmetatable({ _VERSION = "0.0-test" }, { __index = base })
local mt = { __index = _M }
function _M.new()
    local red, err = base:new()
    return red and setmetatable(red, mt), err
end
function _M.set_timeouts(self, connect, send, read)
    return rawget(self, "_sock"):settimeouts(connect, send, read)
end
return _M
"""


def _client_line(shim):
    lines = [l for l in (shim.dir / "logs" / "error.log").read_text().splitlines() if "Redis client" in l]
    assert lines, shim.log_tails()
    return lines[-1]


def test_debian_client_is_nginx_redis(backend):
    if any(Path(p, "resty", "redis.lua").exists() for p in ("/usr/share/lua/5.1", "/usr/local/openresty/lualib")):
        pytest.skip("resty.redis is installed here; the shim prefers it")
    line = _client_line(backend.shim)
    assert "[notice]" in line and "Redis client nginx.redis " in line, line


def test_resty_redis_is_preferred(tmp_path):
    shim_dir = tmp_path / "lua-redis-shim"
    shutil.copytree(SHIM_DIR, shim_dir)
    (shim_dir / "lib" / "resty").mkdir()
    (shim_dir / "lib" / "resty" / "redis.lua").write_text(RESTY_REDIS_STAND_IN)
    with run_redis(tmp_path / "redis") as port, \
            shim_process(tmp_path / "shim", port, shim_dir=shim_dir, SHIM_LOG_LEVEL="notice") as shim:
        assert "Redis client resty.redis 0.0-test" in _client_line(shim)
        results = ok(Backend(port, shim), body([chk("a", 2)], [chk("a", 2)], [chk("a", 2)]))
        assert [r["allowed"] for r in results] == [True, True, False]
