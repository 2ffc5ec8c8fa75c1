"""End-to-end policies through real Envoy, the shim and Redis: every algorithm, several limits
per rule, costs, tiers, concurrency, shadow mode, bypass and the client IP.
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from envoy_harness import DEFAULT_ROUTES, plugin, rule, run_envoy, static_cluster, upstream_route
from helpers import SlowUpstream, statuses
from http_client import request, wait_for_window_room
from shim_harness import redis_cli


API_KEY = {"x-api-key": "k"}


def max_in_any_window(times, window_s):
    """The most timestamps inside any interval of length `window_s`."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window_s:
            j += 1
        best = max(best, i - j + 1)
    return best


def most_inside_any_window(spans, window_s):
    """The most requests that provably reached Redis inside one interval shorter than `window_s`.

    A request's arrival time (Redis TIME, when the script ran) is only known to lie between when
    it was sent and when its answer came back. Requests whose whole [sent, answered] span fits in
    [t, t + window_s) arrived inside that interval, whatever their latency; the intervals worth
    trying start at a send time."""
    best = 0
    for start, _ in spans:
        inside = sum(1 for s, r in spans if s >= start and r < start + window_s)
        best = max(best, inside)
    return best


def test_sliding_log_is_exact_under_sustained_load(clean, tmp_path):
    limit, window_s = 10, 1
    config = plugin([rule("log", limit, window=f"{window_s}s", descriptors=[], algorithm="sliding_log")])
    with run_envoy(tmp_path, config, clean["shim"]) as envoy:
        admitted = []
        end = time.time() + 2.5
        while time.time() < end:
            sent = time.time()
            if request(envoy.port, "/").status == 200:
                admitted.append((sent, time.time()))
            time.sleep(0.01)
        key = redis_cli(clean["redis"], "KEYS", "tollgate:{log}*")[0]
        memory = redis_cli(clean["redis"], "MEMORY", "USAGE", key)
    # Redis TIME is read in whole milliseconds: leave 2 ms of rounding.
    worst = most_inside_any_window(admitted, window_s - 0.002)
    by_send_time = max_in_any_window([s for s, _ in admitted], window_s)
    print(f"\nsliding_log: {len(admitted)} admitted over 2.5 s, at most {worst} provably inside one "
          f"{window_s}s window ({by_send_time} by send time alone); {memory} bytes for a full log of {limit}")
    assert worst <= limit
    # Tight: about `limit` per window is admitted, not far fewer.
    assert len(admitted) >= 2 * limit
    assert by_send_time >= limit


def test_token_bucket_bursts_then_refills(clean, tmp_path):
    config = plugin([rule("tb", algorithm="token_bucket", burst=5, rate=5, period="1s")])
    with run_envoy(tmp_path, config, clean["shim"]) as envoy:
        first = statuses(envoy, 6, headers=API_KEY)
        denied = request(envoy.port, "/v1/search", {"x-api-key": "k"})
        time.sleep(0.45)  # two tokens at one per 200 ms
        refilled = statuses(envoy, 3, headers=API_KEY)
    assert first == [200] * 5 + [429]
    assert denied.status == 429 and denied.headers["retry-after"] == "1"
    assert denied.headers["x-ratelimit-limit"] == "5"
    assert refilled == [200, 200, 429]


def test_gcra_spaces_requests_after_the_burst(clean, tmp_path):
    config = plugin([rule("gcra", algorithm="gcra", burst=3, rate=10, period="1s")])
    with run_envoy(tmp_path, config, clean["shim"]) as envoy:
        burst = statuses(envoy, 4, headers=API_KEY)
        time.sleep(0.12)  # one emission interval (100 ms)
        spaced = statuses(envoy, 2, headers=API_KEY)
    assert burst == [200, 200, 200, 429]
    assert spaced == [200, 429]


def test_several_limits_on_one_rule(clean, tmp_path):
    """3 per second and 5 per 10 s on the same key, checked in the same callout."""
    config = plugin([rule("two", limits=[{"limit": 3, "window": "1s"}, {"limit": 5, "window": "10s"}])])
    with run_envoy(tmp_path, config, clean["shim"]) as envoy:
        wait_for_window_room(10, 3)
        wait_for_window_room(1, 0.8)
        first = statuses(envoy, 4, headers=API_KEY)
        time.sleep(1 - time.time() % 1 + 0.05)
        second = statuses(envoy, 3, headers=API_KEY)
        denied = request(envoy.port, "/v1/search", {"x-api-key": "k"})
    assert first == [200, 200, 200, 429], "per second"
    assert second == [200, 200, 429], "per 10 s: 5 in all"
    assert denied.headers["x-ratelimit-limit"] == "5"
    assert '"two";q=5;w=10' in denied.headers["ratelimit-policy"]


def test_cost_from_a_header(clean, tmp_path):
    cost = {"header": "x-cost", "default": 1, "max": 5}
    config = plugin([rule("units", 10, cost=cost)])
    with run_envoy(tmp_path, config, clean["shim"]) as envoy:
        wait_for_window_room(60, 10)

        def send(units):
            r = request(envoy.port, "/v1/search", {"x-api-key": "k", "x-cost": units})
            return r.status, r.headers.get("x-ratelimit-remaining")

        seen = [send(u) for u in ["4", "5", "2", "0", "100", "1"]]
    assert seen == [
        (200, "6"),
        (200, "1"),
        (429, "1"),  # 2 > 1 left: denied, nothing consumed
        (200, "1"),  # cost 0 only reads
        (429, "1"),  # capped at 5, still too much
        (200, "0"),
    ]


def test_tiers_by_plan_header(clean, tmp_path):
    tiers = {
        "descriptor": "header:x-plan",
        "values": {"free": [{"limit": 2, "window": "1m"}], "pro": [{"limit": 4, "window": "1m"}]},
        "default": [{"limit": 1, "window": "1m"}],
    }
    config = plugin([rule("plan", descriptors=["header:x-user"], tiers=tiers)])
    with run_envoy(tmp_path, config, clean["shim"]) as envoy:
        wait_for_window_room(60, 10)

        def admitted(user, plan):
            headers = {"x-user": user}
            if plan:
                headers["x-plan"] = plan
            return statuses(envoy, 6, headers=headers).count(200)

        counts = {plan: admitted(f"user-{plan}", plan) for plan in ["free", "pro", "platinum", None]}
    assert counts == {"free": 2, "pro": 4, "platinum": 1, None: 1}


def test_concurrency_limit_holds_and_releases_slots(clean, tmp_path):
    upstream = SlowUpstream(0.6)
    routes = [upstream_route("slow", {"prefix": "/slow"}, "slow_upstream"), *DEFAULT_ROUTES]
    config = plugin([rule("inflight", algorithm="concurrency", limit=2, timeout="30s")])
    try:
        with run_envoy(tmp_path, config, clean["shim"], routes=routes,
                       clusters=[static_cluster("slow_upstream", upstream.port)]) as envoy:

            def wave():
                with ThreadPoolExecutor(3) as pool:
                    futures = [pool.submit(request, envoy.port, "/slow", {"x-api-key": "k"}) for _ in range(3)]
                    responses = [f.result() for f in futures]
                    denials.extend(r for r in responses if r.status == 429)
                    return sorted(r.status for r in responses)

            denials = []
            first = wave()
            time.sleep(0.2)  # releases are sent when each stream ends
            second = wave()
            time.sleep(0.2)
            held = redis_cli(clean["redis"], "ZCARD", "tollgate:{inflight|=k}:conc")
    finally:
        upstream.close()
    assert first == [200, 200, 429]
    assert second == [200, 200, 429], "slots were released, not left to time out"
    assert held == 0
    # draft-12: a concurrency quota counts requests in flight and has no reset time.
    assert denials[0].headers["ratelimit-policy"] == '"inflight";q=2;qu="concurrent-requests"'
    assert denials[0].headers["ratelimit"] == '"inflight";r=0'


def test_shadow_rule_counts_but_never_denies(clean, tmp_path):
    config = plugin([rule("shadowed", 2, shadow=True)])
    with run_envoy(tmp_path, config, clean["shim"]) as envoy:
        wait_for_window_room(60, 10)
        responses = [request(envoy.port, "/v1/search", {"x-api-key": "k"}) for _ in range(4)]
        counter = int(redis_cli(clean["redis"], "GET", redis_cli(clean["redis"], "KEYS", "tollgate:*")[0]))
        time.sleep(0.2)
        log = envoy.log()
    assert [r.status for r in responses] == [200] * 4
    assert [r.headers["x-ratelimit-remaining"] for r in responses] == ["1", "0", "0", "0"]
    assert counter == 2, "over-limit shadow checks are not charged"
    assert "rule shadowed (shadow mode) would have denied a request" in log


def test_bypass_by_value_and_by_client_range(clean, tmp_path):
    rules = [
        rule("keyed", 1, bypass={"values": {"header:x-api-key": ["internal"]}}),
        rule("ranged", 1, descriptors=["header:x-user"], bypass={"cidrs": ["127.0.0.0/8"]}),
    ]
    with run_envoy(tmp_path, plugin(rules), clean["shim"]) as envoy:
        wait_for_window_room(60, 10)
        internal = statuses(envoy, 3, headers={"x-api-key": "internal"})
        regular = statuses(envoy, 2, headers={"x-api-key": "regular"})
        local_client = statuses(envoy, 3, headers={"x-user": "u"})
    assert internal == [200] * 3
    assert regular == [200, 429]
    assert local_client == [200] * 3, "127.0.0.1 is in the bypass range"


def test_client_ip_from_forwarded_for_with_ipv6_aggregation(clean, tmp_path):
    config = plugin(
        [rule("per_client", 2, descriptors=["client_ip"])],
        client_ip={"from": "x-forwarded-for", "trusted_hops": 1},
    )
    with run_envoy(tmp_path, config, clean["shim"]) as envoy:
        wait_for_window_room(60, 10)

        def send(xff):
            return request(envoy.port, "/", {"x-forwarded-for": xff}).status

        same_v6_host = [send("2001:db8:1:2::1"), send("2001:db8:1:2::ffff"), send("2001:db8:1:2::1234")]
        other_v6 = send("2001:db8:1:3::1")
        spoofed_left = [send("9.9.9.9, 203.0.113.7"), send("8.8.8.8, 203.0.113.7"), send("7.7.7.7, 203.0.113.7")]
        keys = sorted(k.decode() for k in redis_cli(clean["redis"], "KEYS", "tollgate:*"))
    assert same_v6_host == [200, 200, 429], "one /64 is one client"
    assert other_v6 == 200
    assert spoofed_left == [200, 200, 429], "only the trusted hop's entry counts"
    assert [k.split("}")[0] for k in keys] == [
        "tollgate:{per_client|=2001%3Adb8%3A1%3A2%3A%3A%2F64",
        "tollgate:{per_client|=2001%3Adb8%3A1%3A3%3A%3A%2F64",
        "tollgate:{per_client|=203.0.113.7",
    ]


@pytest.mark.parametrize("algorithm,params", [
    ("fixed_window", {"limit": 100, "window": "1m"}),
    ("sliding_window", {"limit": 100, "window": "1m"}),
    ("sliding_window_estimate", {"limit": 100, "window": "1m"}),
    ("token_bucket", {"burst": 100, "rate": 1, "period": "1s"}),
    ("gcra", {"burst": 100, "rate": 1, "period": "1s"}),
])
def test_exact_admission_for_every_algorithm(clean, tmp_path, algorithm, params):
    """100 admitted of 300 at concurrency 30, whatever the algorithm."""
    from http_client import hammer

    config = plugin([rule("exact", descriptors=[], algorithm=algorithm, **params)])
    with run_envoy(tmp_path, config, clean["shim"]) as envoy:
        wait_for_window_room(60, 15)
        started = time.monotonic()
        counts = hammer(envoy.port, 300, 30, "/")
        took = time.monotonic() - started
    print(f"{algorithm}: {dict(counts)} in {took:.2f}s")
    # Refill-based algorithms earn one token per second while the burst runs (a slow machine
    # stretches it); the windows get nothing back within their minute.
    refilled = int(took) + 1 if algorithm in ("token_bucket", "gcra") else 0
    assert 100 <= counts[200] <= 100 + refilled
    assert counts[200] + counts[429] == 300


def test_every_key_has_a_ttl(clean, tmp_path):
    rules = [
        rule("fw", 5, descriptors=[]),
        rule("sw", 5, descriptors=[], algorithm="sliding_window"),
        rule("swe", 5, descriptors=[], algorithm="sliding_window_estimate"),
        rule("log", 5, descriptors=[], algorithm="sliding_log"),
        rule("tb", descriptors=[], algorithm="token_bucket", burst=5, rate=1, period="1s"),
        rule("gcra", descriptors=[], algorithm="gcra", burst=5, rate=1, period="1s"),
        rule("conc", descriptors=[], algorithm="concurrency", limit=5),
    ]
    with run_envoy(tmp_path, plugin(rules), clean["shim"]) as envoy:
        statuses(envoy, 3, path="/", headers=API_KEY)
        keys = redis_cli(clean["redis"], "KEYS", "tollgate:*")
        ttls = {k.decode(): redis_cli(clean["redis"], "PTTL", k) for k in keys}
        memory = {k.decode(): redis_cli(clean["redis"], "MEMORY", "USAGE", k) for k in keys}
    print("\nkeys after 3 requests:\n" + "\n".join(f"  {k}: ttl {ttls[k]} ms, {memory[k]} bytes" for k in sorted(ttls)))
    # The concurrency set may be gone already (released, so empty): PTTL -2. No key may ever
    # lack a TTL (-1).
    live = {k: t for k, t in ttls.items() if t != -2}
    assert len(live) >= 6, ttls
    assert all(t > 0 for t in live.values()), ttls


def test_decision_headers_are_json_safe_for_every_algorithm(clean, tmp_path):
    """A denial by each algorithm carries a parseable problem body and a positive Retry-After."""
    rules = [rule("tb", algorithm="token_bucket", burst=1, rate=1, period="10s")]
    with run_envoy(tmp_path, plugin(rules), clean["shim"]) as envoy:
        request(envoy.port, "/v1/search", {"x-api-key": "k"})
        denied = request(envoy.port, "/v1/search", {"x-api-key": "k"})
    body = json.loads(denied.body)
    assert denied.status == 429
    assert 9 <= int(denied.headers["retry-after"]) <= 10
    assert body["rule"] == "tb" and body["limit"] == 1 and body["window_seconds"] == 10
