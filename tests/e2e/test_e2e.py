"""End-to-end: real Envoy loading the built tollgate.wasm → real lua-redis-shim → real Redis.

Each test starts its own Envoy with its own plugin configuration; Redis and the shim are shared
by the module and flushed between tests. Everything listens on random loopback ports.
"""

import json
import re
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
import time
import urllib.request

import pytest

from envoy_harness import envoy_command, envoy_config, plugin, rule, run_envoy
from http_client import hammer, request, wait_for_window_room
from shim_harness import free_port, redis_cli, run_shim

SEARCH_KEY = {"x-api-key": "k1"}


def test_exact_admission_under_concurrency(clean, tmp_path):
    """Limit 100/min, 500 requests at concurrency 50 on one key: exactly 100 get through."""
    with run_envoy(tmp_path, plugin([rule("exact", 100)]), clean["shim"]) as envoy:
        wait_for_window_room(60, 20)
        statuses = hammer(envoy.port, 500, 50, "/v1/search", SEARCH_KEY)
    print(f"exact admission: {dict(statuses)}")
    assert statuses == {200: 100, 429: 400}


def test_exact_admission_across_two_gateways(clean, tmp_path):
    """Two Envoys (separate processes, 2 workers each) share one limit through the shim:
    limit 100, 1000 requests split across both → exactly 100 allowed."""
    config = plugin([rule("shared", 100)])
    with run_envoy(tmp_path / "a", config, clean["shim"], concurrency=2) as a, \
            run_envoy(tmp_path / "b", config, clean["shim"], concurrency=2) as b:
        wait_for_window_room(60, 20)
        with ThreadPoolExecutor(2) as pool:
            counts = list(pool.map(lambda e: hammer(e.port, 500, 25, "/v1/search", SEARCH_KEY), [a, b]))
    total = counts[0] + counts[1]
    print(f"two gateways: {dict(counts[0])} + {dict(counts[1])} = {dict(total)}")
    assert total == {200: 100, 429: 900}


def test_a_skewed_gateway_counts_in_the_same_windows(clean, tmp_path):
    """Gateway A's clock runs 3 s ahead (simulated); B's is right. With skew correction A
    learns Redis's time from the shim's replies and uses the same window keys as B; without
    it (control gateway C), it counts in the next window."""
    rules = [rule("skew", 1000, window="10s")]
    skewed = {"simulated_skew_ms": 3000}
    with run_envoy(tmp_path / "a", plugin(rules, clock=skewed), clean["shim"]) as a, \
            run_envoy(tmp_path / "b", plugin(rules), clean["shim"]) as b, \
            run_envoy(tmp_path / "c", plugin(rules, clock={**skewed, "correct_skew": False}), clean["shim"]) as c:
        for envoy in (a, b, c):  # the first reply teaches the offset
            request(envoy.port, "/v1/search", {"x-api-key": "warm-up"})
        # Wait for the last 2.5 s of a 10 s window: A's raw clock is already in the next one.
        while not 7.0 <= time.time() % 10 < 7.5:
            time.sleep(0.05)
        window = int(time.time() // 10)
        for envoy in (a, b):
            for _ in range(5):
                assert request(envoy.port, "/v1/search", {"x-api-key": "shared"}).status == 200
        request(c.port, "/v1/search", {"x-api-key": "control"})
        keys = {k.decode(): int(redis_cli(clean["redis"], "GET", k)) for k in redis_cli(clean["redis"], "KEYS", "tollgate:{skew|=[sc]*")}
        # The counter holds what was charged: the requests checked in Redis, and the units
        # leased (the key turns hot after 3 requests), of which some were spent by requests.
        leased = sum(e.stat("wasmcustom.tollgate_lease_admitted_total") for e in (a, b))
        granted = sum(e.stat("wasmcustom.tollgate_lease_units_granted_total") for e in (a, b))
    print(f"clock skew +3 s: keys {keys} (real window {window}; {leased} from leases of {granted} units)")
    shared = [k for k in keys if "shared" in k]
    assert shared == [f"tollgate:{{skew|=shared}}:10000:{window}"], "A and B counted in one window"
    assert keys[shared[0]] == 10 - leased + granted, "every request charged once, in that window"
    assert f"tollgate:{{skew|=control}}:10000:{window + 1}" in keys, "without correction: the next window"


def test_counters_are_separate_per_value_rule_and_route(clean, tmp_path):
    rules = [
        # Per API key and route, on the search and login policies only.
        rule("per_key_route", 2, descriptors=["header:x-api-key", "route"], match={"policies": ["search", "login"]}),
        # A second rule on the same key, only on /v1/login, with its own counter.
        rule("login_only", 3, match={"path_prefix": "/v1/login"}),
    ]
    with run_envoy(tmp_path, plugin(rules), clean["shim"]) as envoy:
        wait_for_window_room(60, 10)

        def status(path, key):
            return request(envoy.port, path, {"x-api-key": key}).status

        assert [status("/v1/search", "a") for _ in range(3)] == [200, 200, 429]
        assert [status("/v1/search", "b") for _ in range(3)] == [200, 200, 429], "another key has its own counter"
        assert [status("/v1/login", "a") for _ in range(3)] == [200, 200, 429], "another route has its own counter"
        # The default route has no policy: neither rule applies, nothing is counted.
        assert [status("/other", "a") for _ in range(5)] == [200] * 5
        keys = sorted(k.decode() for k in redis_cli(clean["redis"], "KEYS", "tollgate:*"))
    assert len(keys) == 4, keys
    assert any(k.startswith("tollgate:{per_key_route|=a|=search}:60000:") for k in keys), keys
    assert any(k.startswith("tollgate:{per_key_route|=a|=login}:60000:") for k in keys), keys
    assert any(k.startswith("tollgate:{login_only|=a}:60000:") for k in keys), keys


def test_denial_carries_headers_and_problem_body(clean, tmp_path):
    with run_envoy(tmp_path, plugin([rule("search", 2, window="1m")]), clean["shim"]) as envoy:
        wait_for_window_room(60, 10)
        first = request(envoy.port, "/v1/search", SEARCH_KEY)
        request(envoy.port, "/v1/search", SEARCH_KEY)
        denied = request(envoy.port, "/v1/search", SEARCH_KEY)
    window_left = 60 - (time.time() % 60)

    assert first.status == 200
    assert first.headers["x-ratelimit-limit"] == "2"
    assert first.headers["x-ratelimit-remaining"] == "1"
    assert first.headers["ratelimit-policy"] == '"search";q=2;w=60'

    assert denied.status == 429, denied
    h = denied.headers
    retry_after = int(h["retry-after"])
    # Never before the window's end, never beyond it (1 s of rounding).
    assert window_left - 1 <= retry_after <= window_left + 1.5, (retry_after, window_left)
    assert h["x-ratelimit-limit"] == "2"
    assert h["x-ratelimit-remaining"] == "0"
    assert h["x-ratelimit-reset"] == h["retry-after"]
    assert h["ratelimit-policy"] == '"search";q=2;w=60'
    assert h["ratelimit"] == f'"search";r=0;t={retry_after}'
    assert h["content-type"] == "application/problem+json"
    body = json.loads(denied.body)
    # draft-ietf-httpapi-ratelimit-headers-12's problem type, RFC 9457 members.
    assert body["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"
    assert body["violated-policies"] == ["search"]
    assert body["status"] == 429
    assert body["rule"] == "search"
    assert body["limit"] == 2
    assert body["retry_after_seconds"] == retry_after


def test_window_reset_admits_again(clean, tmp_path):
    with run_envoy(tmp_path, plugin([rule("per_second", 2, window="1s")]), clean["shim"]) as envoy:
        wait_for_window_room(1, 0.6)
        burst = [request(envoy.port, "/v1/search", SEARCH_KEY).status for _ in range(3)]
        time.sleep(1 - (time.time() % 1) + 0.05)
        after = [request(envoy.port, "/v1/search", SEARCH_KEY).status for _ in range(3)]
    assert burst == [200, 200, 429]
    assert after == [200, 200, 429]


def test_two_rules_denied_by_one_does_not_consume_the_other(clean, tmp_path):
    """Rule B (per user, 1/min) denies; rule A (per key, 4/min) must not be charged for it."""
    rules = [rule("a_per_key", 4), rule("b_per_user", 1, descriptors=["header:x-user"])]
    with run_envoy(tmp_path, plugin(rules), clean["shim"]) as envoy:
        wait_for_window_room(60, 10)

        def status(user):
            return request(envoy.port, "/v1/search", {"x-api-key": "k", "x-user": user}).status

        assert status("u1") == 200
        assert [status("u1") for _ in range(5)] == [429] * 5, "denied by b_per_user"
        # a_per_key has been charged once; three more users fit, the fifth request does not.
        assert [status(u) for u in ("u2", "u3", "u4", "u5")] == [200, 200, 200, 429]
        counters = {
            k.decode().split("|")[0]: int(redis_cli(clean["redis"], "GET", k))
            for k in redis_cli(clean["redis"], "KEYS", "tollgate:*")
            if b"a_per_key" in k
        }
    assert counters == {"tollgate:{a_per_key": 4}


def test_filter_metrics_count_exactly(clean, tmp_path):
    rules = [rule("search", 3), rule("shadowed", 1, shadow=True, descriptors=["header:x-user"])]
    with run_envoy(tmp_path, plugin(rules), clean["shim"]) as envoy:
        wait_for_window_room(60, 10)
        statuses = [request(envoy.port, "/v1/search", {"x-api-key": "k", "x-user": "u"}).status for _ in range(5)]
        request(envoy.port, "/healthz")  # filter disabled: not counted
        time.sleep(1.2)  # histograms reach /stats/prometheus at the next stats flush
        stats = {name: envoy.stat(f"wasmcustom.{name}") for name in [
            "tollgate_requests_checked_total", "tollgate_requests_allowed_total",
            "tollgate_requests_denied_total", "tollgate_failed_open_total",
            "tollgate_rule_denied_total.rule.search", "tollgate_rule_shadow_denied_total.rule.shadowed",
            "tollgate_cache_hits_total",
        ]}
        with urllib.request.urlopen(f"http://127.0.0.1:{envoy.admin_port}/stats/prometheus") as r:
            prometheus = r.read().decode()
    print(f"filter metrics after {statuses}: {stats}")
    assert statuses == [200, 200, 200, 429, 429]
    assert stats == {
        "tollgate_requests_checked_total": 5,
        "tollgate_requests_allowed_total": 3,
        "tollgate_requests_denied_total": 2,
        "tollgate_failed_open_total": 0,
        "tollgate_rule_denied_total.rule.search": 2,
        "tollgate_rule_shadow_denied_total.rule.shadowed": 2,
        "tollgate_cache_hits_total": 1,  # the 5th request: Redis had said "exhausted"
    }
    assert 'tollgate_rule_denied_total{rule="search"} 2' in prometheus, prometheus[-3000:]
    assert re.search(r"^tollgate_requests_checked_total(\{\})? 5$", prometheus, re.M), prometheus[-3000:]
    assert re.search(r"^tollgate_callout_duration_milliseconds_count(\{\})? 4$", prometheus, re.M)


def test_over_limit_cache_denies_without_callouts_across_workers(clean, tmp_path):
    """Once Redis says a key is exhausted, both workers deny it locally until the window ends:
    the same admissions, a fraction of the callouts."""
    with run_envoy(tmp_path, plugin([rule("cached", 20)]), clean["shim"], concurrency=2) as envoy:
        wait_for_window_room(60, 15)
        statuses = hammer(envoy.port, 400, 16, "/v1/search", SEARCH_KEY)
        callouts = envoy.stat("cluster.tollgate_shim.upstream_rq_total")
        hits = envoy.stat("wasmcustom.tollgate_cache_hits_total")
        denied = envoy.stat("wasmcustom.tollgate_requests_denied_total")
        later = request(envoy.port, "/v1/search", SEARCH_KEY)
    print(f"over-limit cache, 2 workers: {dict(statuses)}, {callouts} callouts, {hits} cache hits")
    assert statuses == {200: 20, 429: 380}, "the cache never changes admissions"
    assert denied == 380
    assert hits >= 300 and callouts < 100, "most denials were answered by the cache"
    assert later.status == 429 and later.headers["x-ratelimit-remaining"] == "0"
    assert 1 <= int(later.headers["retry-after"]) <= 60


def scrape(port):
    """A Prometheus text page as {series: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
        lines = r.read().decode().splitlines()
    return {
        series: float(value)
        for series, _, value in (line.rpartition(" ") for line in lines if line and not line.startswith("#"))
    }


def test_gateway_and_shim_metrics_agree_on_known_traffic(clean, tmp_path):
    """5 requests against a limit of 3, no cache: both ends count 5 checks, 3 allowed, 2 denied."""
    config = plugin([rule("metered", 3)], over_limit_cache=False, coalesce=False)
    with run_envoy(tmp_path, config, clean["shim"]) as envoy:
        wait_for_window_room(60, 10)
        before = scrape(clean["shim"])
        statuses = [request(envoy.port, "/v1/search", SEARCH_KEY).status for _ in range(5)]
        after = scrape(clean["shim"])
        gateway = {n: envoy.stat(f"wasmcustom.tollgate_{n}_total") for n in ("requests_checked", "requests_allowed", "requests_denied")}
    shim = {
        series: after.get(series, 0) - before.get(series, 0)
        for series in (
            "tollgate_shim_checks_total",
            'tollgate_shim_requests_total{decision="allowed"}',
            'tollgate_shim_requests_total{decision="denied"}',
            'tollgate_shim_http_requests_total{endpoint="check",status="200"}',
            "tollgate_shim_redis_duration_seconds_count",
        )
    }
    print(f"metrics after {statuses}: gateway {gateway}, shim {shim}")
    assert statuses == [200, 200, 200, 429, 429]
    assert gateway == {"requests_checked": 5, "requests_allowed": 3, "requests_denied": 2}
    assert shim == {
        "tollgate_shim_checks_total": 5,
        'tollgate_shim_requests_total{decision="allowed"}': 3,
        'tollgate_shim_requests_total{decision="denied"}': 2,
        'tollgate_shim_http_requests_total{endpoint="check",status="200"}': 5,
        "tollgate_shim_redis_duration_seconds_count": 5,
    }


def test_failed_open_is_counted(tmp_path):
    with run_envoy(tmp_path, plugin([rule("r", 10)]), free_port()) as envoy:
        assert [request(envoy.port, "/v1/search", SEARCH_KEY).status for _ in range(3)] == [200] * 3
        assert envoy.stat("wasmcustom.tollgate_failed_open_total") == 3
        assert envoy.stat("wasmcustom.tollgate_requests_allowed_total") == 0


def test_disabled_route_is_never_checked(clean, tmp_path):
    dead_port = free_port()
    config = plugin([rule("all", 1, descriptors=["client_ip"])], failure_mode="deny")
    with run_envoy(tmp_path, config, dead_port) as envoy:
        assert [request(envoy.port, "/healthz").status for _ in range(3)] == [200] * 3
        assert request(envoy.port, "/v1/search").status == 503


# --- Failure modes --------------------------------------------------------------------------

class Blackhole:
    """A TCP server that accepts connections and reads, but never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        self.stopped = True
        self.sock.close()
        for c in self.conns:
            c.close()


def run_failure_case(tmp_path, shim_port, mode):
    """Ten requests with the shim in a broken state: statuses and the slowest answer."""
    config = plugin([rule("f", 1000)], failure_mode=mode, shim={"upstream": "tollgate_shim", "timeout": "100ms"})
    with run_envoy(tmp_path / mode, config, shim_port) as envoy:
        responses = [request(envoy.port, "/v1/search", SEARCH_KEY, timeout_s=5) for _ in range(10)]
        assert envoy.proc.poll() is None, "envoy must survive"
    statuses = {r.status for r in responses}
    slowest = max(r.elapsed_s for r in responses)
    return statuses, slowest, responses[0]


@pytest.mark.parametrize("mode,expected", [("allow", 200), ("deny", 503)])
def test_shim_down(tmp_path, mode, expected):
    statuses, slowest, first = run_failure_case(tmp_path, free_port(), mode)
    print(f"shim down, failure_mode={mode}: statuses {statuses}, slowest {slowest * 1000:.0f} ms")
    assert statuses == {expected}
    assert "x-ratelimit-limit" not in first.headers
    if mode == "deny":
        assert json.loads(first.body)["title"] == "Rate limit service unavailable"


@pytest.mark.parametrize("mode,expected", [("allow", 200), ("deny", 503)])
def test_shim_never_answers(tmp_path, mode, expected):
    hole = Blackhole()
    try:
        statuses, slowest, _ = run_failure_case(tmp_path, hole.port, mode)
    finally:
        hole.close()
    print(f"shim blackholed, failure_mode={mode}: statuses {statuses}, slowest {slowest * 1000:.0f} ms")
    assert statuses == {expected}
    # Bounded by the 100 ms callout timeout (the client would give up after 5 s).
    assert slowest < 5


@pytest.mark.parametrize("mode,expected", [("allow", 200), ("deny", 503)])
def test_redis_down(tmp_path, mode, expected):
    dead_redis = free_port()
    with run_shim(tmp_path / "shim", dead_redis) as shim_port:
        statuses, slowest, _ = run_failure_case(tmp_path, shim_port, mode)
    print(f"redis down, failure_mode={mode}: statuses {statuses}, slowest {slowest * 1000:.0f} ms")
    assert statuses == {expected}


# --- Configuration --------------------------------------------------------------------------

def test_invalid_plugin_config_stops_envoy_with_the_field_named(tmp_path):
    bad = plugin([rule("bad", 10, window="2d")])
    config_path = tmp_path / "envoy.json"
    config_path.write_text(json.dumps(envoy_config(bad, free_port(), free_port(), free_port())))
    cmd, env = envoy_command(config_path, ["--concurrency", "1", "-l", "info"])
    result = subprocess.run(cmd, env=env, capture_output=True, timeout=60, cwd=tmp_path)
    log = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 1, tail_text(log)
    assert 'invalid plugin configuration: rules[0].window: must be between 1s and 1d (got "2d")' in log, tail_text(log)


def test_shipped_envoy_yaml_validates():
    from envoy_harness import ROOT

    cmd, env = envoy_command(ROOT / "envoy.yaml", ["--mode", "validate", "-l", "warn"])
    result = subprocess.run(cmd, env=env, capture_output=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def tail_text(text, lines=30):
    return "\n".join(text.splitlines()[-lines:])
