"""Leases for hot keys through real Envoy, the shim and Redis (README, "Leases"): a hot key's
requests are admitted from units Redis granted the gateway, without a callout; admission stays
exact across two gateways of two workers each; the headers stay truthful; a gateway that dies
loses at most the units it held.
"""

import os
import re
import signal
import threading
import time

from envoy_harness import plugin, rule, run_envoy
from http_client import hammer, request, wait_for_window_room
from shim_harness import redis_cli

LIMIT = 300


def callouts(envoy) -> int:
    return envoy.stat("cluster.tollgate_shim.upstream_rq_total")


def test_exact_admission_with_leases_across_two_gateways_of_two_workers(clean, tmp_path):
    config = plugin([rule("hot", LIMIT)])
    counts = []
    with run_envoy(tmp_path / "a", config, clean["shim"], concurrency=2) as a, \
            run_envoy(tmp_path / "b", config, clean["shim"], concurrency=2) as b:
        wait_for_window_room(60, 25)

        def load(envoy):
            counts.append(hammer(envoy.port, 600, 16, "/v1/search", {"x-api-key": "k"}))

        threads = [threading.Thread(target=load, args=(g,)) for g in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = {name: sum(g.stat(f"wasmcustom.tollgate_{name}_total") for g in (a, b))
                 for name in ("lease_admitted", "lease_units_granted", "lease_units_dropped",
                              "lease_refill_failures", "failed_open")}
        made = sum(callouts(g) for g in (a, b))
    admitted = sum(c[200] for c in counts)
    charged = sum(int(redis_cli(clean["redis"], "GET", k)) for k in redis_cli(clean["redis"], "KEYS", "*hot*"))
    print(f"leases: {admitted} of 1200 admitted (limit {LIMIT}), Redis charged {charged}, {made} callouts, "
          f"{stats}; per gateway {[dict(c) for c in counts]}")
    assert admitted == LIMIT, "never more than the limit; leases shrink to none near it"
    assert sum(c[429] for c in counts) == 1200 - LIMIT
    assert stats["lease_admitted"] > 0, "the hot key was spent from leases"
    assert charged == LIMIT, "every unit granted was spent"


def test_headers_from_a_lease_count_down_like_redis(clean, tmp_path):
    config = plugin([rule("hot", 1000)])
    with run_envoy(tmp_path, config, clean["shim"]) as envoy:
        wait_for_window_room(60, 10)
        left = []
        for _ in range(40):
            r = request(envoy.port, "/v1/search", {"x-api-key": "k"})
            assert r.status == 200
            left.append(int(re.search(r"\br=(\d+)", r.headers["ratelimit"]).group(1)))
        leased = envoy.stat("wasmcustom.tollgate_lease_admitted_total")
    assert leased > 20, "most of them came from a lease"
    assert left == list(range(999, 959, -1)), left


def test_a_gateway_that_dies_loses_at_most_its_lease(clean, tmp_path):
    max_units = 20
    config = plugin([rule("hot", 200)], leases={"max_units": max_units, "horizon_ms": 10000})
    with run_envoy(tmp_path / "b", config, clean["shim"]) as b:
        wait_for_window_room(60, 20)
        with run_envoy(tmp_path / "a", config, clean["shim"]) as a:
            admitted_a = sum(request(a.port, "/v1/search", {"x-api-key": "k"}).status == 200
                             for _ in range(30))
            assert a.stat("wasmcustom.tollgate_lease_admitted_total") > 0
            held_a = a.stat("wasmcustom.tollgate_lease_units_granted_total")
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait()
        admitted_b = hammer(b.port, 400, 8, "/v1/search", {"x-api-key": "k"})[200]
    lost = 200 - admitted_a - admitted_b
    print(f"leases: the dead gateway admitted {admitted_a} and held {held_a} units granted; "
          f"the survivor admitted {admitted_b}; lost {lost}")
    assert admitted_a == 30
    assert 0 <= lost <= max_units, "at most the dead gateway's lease is lost"


def test_leases_off_every_request_is_checked_in_redis(clean, tmp_path):
    config = plugin([rule("hot", 1000)], leases={"enabled": False})
    with run_envoy(tmp_path, config, clean["shim"]) as envoy:
        wait_for_window_room(60, 10)
        for _ in range(20):
            assert request(envoy.port, "/v1/search", {"x-api-key": "k"}).status == 200
        assert envoy.stat("wasmcustom.tollgate_lease_admitted_total") == 0
        assert callouts(envoy) == 20


def test_a_lease_config_the_filter_would_refuse_names_the_field(tmp_path):
    from envoy_harness import envoy_command
    import json
    import subprocess
    from envoy_harness import envoy_config
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(envoy_config(plugin([rule("hot", 10)], leases={"max_units": 0}), 1, 2, 3)))
    cmd, env = envoy_command(path, ["--mode", "validate", "-l", "error"])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "leases.max_units" in out.stdout + out.stderr
