"""The filter on Kong's Wasm engine: a real nginx with ngx_wasm_module, Redis and the shim.

Skipped unless NGX_WASM_NGINX and NGX_WASM_MODULE name the binary and the module (see
ngx_wasm_harness). What issue 12 found there, each pinned here: the module loads and
configures (no import Kong types differently), limits are enforced with every header, requests
at concurrency are admitted exactly and no worker crashes (coalescing is off on this host),
a shim that is down takes the failure mode, concurrency slots are released from the root's tick,
rules are scoped per route (a location with its own filter config, as a Kong route with its
own filter chain), and without a shared-data zone nginx refuses to start, naming it.
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from envoy_harness import rule
from helpers import SlowUpstream
from http_client import hammer, request, wait_for_window_room
from ngx_wasm_harness import SKIP_REASON, crashes, plugin, provided, run_nginx
from shim_harness import free_port, redis_cli

pytestmark = pytest.mark.skipif(not provided(), reason=SKIP_REASON)

KEY = {"x-api-key": "k"}


def test_configures_on_ngx_wasm_and_enforces_with_every_header(clean, tmp_path):
    config = plugin(clean["shim"], [rule("search", 3, window="1m")])
    with run_nginx(tmp_path, {"/": config}) as nginx:
        wait_for_window_room(60, 10)
        responses = [request(nginx.port, "/v1/search", KEY) for _ in range(4)]
        log = nginx.log()
    assert [r.status for r in responses] == [200, 200, 200, 429], responses
    first, denied = responses[0], responses[3]
    assert first.headers["x-ratelimit-limit"] == "3"
    assert first.headers["x-ratelimit-remaining"] == "2"
    assert first.headers["ratelimit-policy"] == '"search";q=3;w=60'
    h = denied.headers
    assert int(h["retry-after"]) >= 1
    assert h["ratelimit"] == f'"search";r=0;t={h["retry-after"]}'
    assert h["content-type"] == "application/problem+json"
    body = json.loads(denied.body)
    assert body["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"
    assert body["violated-policies"] == ["search"]
    assert "host ngx_wasm_module" in log
    assert "coalescing is off on ngx_wasm_module" in log
    assert not crashes(log), crashes(log)
    assert nginx.alive_at_end


def test_exact_admission_under_concurrency_without_crashing_a_worker(clean, tmp_path):
    # coalesce defaults to true: the filter must turn it off here rather than deliver verdicts
    # from the root context (which crashed both workers with signal 11).
    config = plugin(clean["shim"], [rule("burst", 5, window="1m")])
    with run_nginx(tmp_path, {"/": config}, workers=2) as nginx:
        wait_for_window_room(60, 15)
        statuses = hammer(nginx.port, 40, 10, "/v1/search", KEY)
        log = nginx.log()
    assert statuses == {200: 5, 429: 35}, statuses
    assert not crashes(log), crashes(log)
    assert nginx.alive_at_end


def test_the_over_limit_cache_denies_without_redis(clean, tmp_path):
    config = plugin(clean["shim"], [rule("cached", 1, window="1m")])
    with run_nginx(tmp_path, {"/": config}, workers=1) as nginx:
        wait_for_window_room(60, 10)
        first = [request(nginx.port, "/", KEY) for _ in range(2)]
        redis_cli(clean["redis"], "FLUSHALL")  # only the cache can deny now
        cached = request(nginx.port, "/", KEY)
    assert [r.status for r in first] == [200, 429]
    assert cached.status == 429, "denied by the over-limit cache (shm_kv), without Redis"
    assert json.loads(cached.body)["violated-policies"] == ["cached"]
    assert cached.headers["ratelimit-policy"] == first[1].headers["ratelimit-policy"]


def test_a_shim_that_is_down_takes_the_failure_mode(clean, tmp_path):
    down = free_port()  # nothing listens there
    deny = plugin(down, [rule("any", 100)], failure_mode="deny")
    allow = plugin(down, [rule("any", 100)], failure_mode="allow")
    with run_nginx(tmp_path, {"/closed": deny, "/": allow}) as nginx:
        closed = request(nginx.port, "/closed", KEY)
        opened = request(nginx.port, "/open", KEY)
        log = nginx.log()
    assert closed.status == 503, closed
    assert json.loads(closed.body)["type"] == "about:blank"
    assert opened.status == 200, opened
    assert "applying failure mode" in log
    assert not [line for line in crashes(log) if "signal" in line or "panicked" in line]


def test_rules_are_scoped_per_route(clean, tmp_path):
    search = plugin(clean["shim"], [rule("search_only", 1, window="1m")])
    default = plugin(clean["shim"], [rule("everything_else", 100, window="1m")])
    with run_nginx(tmp_path, {"/v1/search": search, "/": default}) as nginx:
        wait_for_window_room(60, 10)
        search_statuses = [request(nginx.port, "/v1/search", KEY).status for _ in range(2)]
        other = [request(nginx.port, "/v1/other", KEY) for _ in range(3)]
    assert search_statuses == [200, 429]
    assert [r.status for r in other] == [200, 200, 200]
    assert other[0].headers["ratelimit-policy"] == '"everything_else";q=100;w=60'


def test_concurrency_slots_are_released_from_the_tick(clean, tmp_path):
    # ngx_wasm_module cannot dispatch from on_log: releases go out on the root's next tick.
    upstream = SlowUpstream(0.6)
    config = plugin(clean["shim"], [rule("inflight", algorithm="concurrency", limit=2, timeout="30s")])
    try:
        with run_nginx(tmp_path, {"/slow": config}, workers=1, upstreams={"/slow": upstream.port}) as nginx:

            def wave():
                with ThreadPoolExecutor(3) as pool:
                    futures = [pool.submit(request, nginx.port, "/slow", KEY) for _ in range(3)]
                    return sorted(f.result().status for f in futures)

            first = wave()
            time.sleep(0.3)
            second = wave()
            time.sleep(0.3)
            held = redis_cli(clean["redis"], "ZCARD", "tollgate:{inflight|=k}:conc")
            log = nginx.log()
    finally:
        upstream.close()
    assert first == [200, 200, 429]
    assert second == [200, 200, 429], "slots were released, not left to time out"
    assert held == 0
    assert not crashes(log), crashes(log)


def test_without_a_shared_data_zone_nginx_refuses_to_start_naming_it(clean, tmp_path):
    # Kong's nginx_wasm_shm_kv missing: fail at configure, not on every request.
    with pytest.raises(RuntimeError, match="could not resolve namespace"):
        with run_nginx(tmp_path, {"/": plugin(clean["shim"], [rule("r", 1)])}, shm_kv=False):
            pass
