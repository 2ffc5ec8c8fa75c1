"""Adversarial traffic through real Envoy, the shim and Redis: each algorithm's stated worst case
(docs/algorithms.md, "Worst cases") against the patterns that push it.

Every algorithm gets the same budget: 20 per 2 s (a window limit of 20; a burst of 10 refilled at
10 per 2 s, so at most 20 in any 2 s), one rule per path, one shared key, all driven at once by
the same pattern. A test asserts, per algorithm, that no window length held more than its stated
worst case, counted the way an outside observer sees it: by the time each admission was
answered. Redis (or the gateway, for the window keys) decided each admission at some instant
between its sending and its answer, on this machine's clock; so two admissions answered less
than `W − J` apart (J: the longest latency seen) were decided less than `W` apart, and counting
answers in spans of `W − J` can never exceed what the algorithm promises for spans of `W`,
however loaded the machine. No assertion is on speed. `failure_mode: deny`, so a slow check is
never counted as an admission the algorithm did not make.

The patterns: the fixed-window edge burst; a burst just before a window ends, then steady
demand; steady saturating load from four clients; bursts straddling edges with cost 3; and two
gateways splitting the traffic.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from envoy_harness import plugin, rule, run_envoy
from http_client import request

LIMIT, WINDOW_S = 20, 2
WINDOW_ALGS = ["fixed_window", "sliding_window_estimate", "sliding_window", "sliding_log"]
RATE_ALGS = ["token_bucket", "gcra"]

# The most any span of WINDOW_S may hold, per algorithm, in cost units (docs/algorithms.md).
# A fixed window may add the admissions in flight across an edge (Observer.late_at_an_edge).
WORST = {
    "fixed_window": 2 * LIMIT,              # L before an edge, L after (+ the late ones)
    "sliding_window_estimate": 2 * LIMIT - 1,  # L packed at a window's end, then up to L − 1 more
    "sliding_window": LIMIT,                # the oldest sub-window counts in full
    "sliding_log": LIMIT,               # exact
    "token_bucket": LIMIT,              # burst + rate per period
    "gcra": LIMIT,                      # burst + rate per period
}


def rules():
    # One rule per path; the trailing slash keeps /sliding_window/ out of /sliding_window_estimate/.
    cost = {"header": "x-cost", "default": 1, "max": 10}
    out = [rule(alg, LIMIT, window=f"{WINDOW_S}s", descriptors=[], algorithm=alg, cost=cost,
                match={"path_prefix": f"/{alg}/"}) for alg in WINDOW_ALGS]
    out += [rule(alg, descriptors=[], algorithm=alg, burst=LIMIT // 2, rate=LIMIT // 2, period=f"{WINDOW_S}s",
                 cost=cost, match={"path_prefix": f"/{alg}/"}) for alg in RATE_ALGS]
    return out


def config():
    return plugin(rules(), failure_mode="deny")


class Observer:
    """What an outside observer of one algorithm saw: (sent, answered, cost) per admission."""

    def __init__(self, alg):
        self.alg = alg
        self.admitted = []
        self.denied = 0
        self.lock = threading.Lock()

    def send(self, port, cost=1):
        sent = time.time()
        r = request(port, f"/{self.alg}/", {"x-cost": str(cost)})
        answered = time.time()
        with self.lock:
            if r.status == 200:
                self.admitted.append((sent, answered, cost))
            else:
                assert r.status == 429, f"{self.alg}: {r}"
                self.denied += 1

    def worst_seen(self):
        """The most cost answered inside any span of WINDOW_S − J (J: the longest latency, plus
        2 ms for Redis's whole-ms clock): a lower bound's mirror, it can only over-state what
        any span of WINDOW_S really held if the algorithm broke its promise."""
        if not self.admitted:
            return 0, 0.0
        latency = max(a - s for s, a, _ in self.admitted) + 0.002
        span = WINDOW_S - latency
        answered = sorted((a, c) for _, a, c in self.admitted)
        best, total, j = 0, 0, 0
        for a, c in answered:
            total += c
            while answered[j][0] <= a - span:
                total -= answered[j][1]
                j += 1
            best = max(best, total)
        return best, latency

    def late_at_an_edge(self):
        """The cost admitted by requests sent before a window edge and answered after it. A
        fixed window's key expires at its window's end (by the gateway's clock), so a request
        the gateway built just before the edge that reaches Redis after the expiry counts
        afresh in that window (docs/algorithms.md, fixed_window)."""
        return sum(c for s, a, c in self.admitted if s // WINDOW_S != a // WINDOW_S)

    def provably_inside(self):
        """The most cost that provably reached its algorithm inside one span of WINDOW_S: the
        admissions whose whole [sent, answered] lies in it (used to show a pattern bites)."""
        best = 0
        for start, _, _ in self.admitted:
            inside = sum(c for s, a, c in self.admitted if s >= start and a < start + WINDOW_S)
            best = max(best, inside)
        return best


def run_pattern(pattern, ports):
    """Sleeps until 0.3 s before a window edge (85 % of the window, after a whole idle one),
    then runs `pattern(observer, ports, edge)` for every algorithm at once; returns the
    observers and the edge."""
    now = time.time()
    edge = (now // WINDOW_S + 2) * WINDOW_S
    time.sleep(max(0.0, edge - 0.3 - now))
    observers = [Observer(alg) for alg in WINDOW_ALGS + RATE_ALGS]
    with ThreadPoolExecutor(len(observers)) as pool:
        list(pool.map(lambda o: pattern(o, ports, edge), observers))
    return {o.alg: o for o in observers}, edge


def check_worst_cases(name, observers):
    lines, broken = [], []
    for alg, o in observers.items():
        worst, latency = o.worst_seen()
        stated = WORST[alg] + (o.late_at_an_edge() if alg == "fixed_window" else 0)
        lines.append(f"  {alg:24} admitted {sum(c for *_, c in o.admitted):3}, worst span {worst:3} "
                     f"({worst / LIMIT:.2f} L; stated ≤ {stated / LIMIT:.2f} L), provably in one window "
                     f"{o.provably_inside():3}, J = {latency * 1000:.0f} ms")
        if worst > stated:
            broken.append(alg)
    print(f"\n{name}, limit {LIMIT} per {WINDOW_S} s:\n" + "\n".join(lines))
    assert not broken, f"{name}: over the stated worst case: {broken}"


# --- The patterns ---------------------------------------------------------------------------------

def hammer_until(o, port, end, cost=1, pause_s=0.002):
    while time.time() < end:
        o.send(port, cost)
        time.sleep(pause_s)


def edge_burst(cost=1):
    """Four clients sending as fast as they are answered from 0.3 s before a window edge to
    0.3 s after it."""
    def pattern(o, ports, edge):
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda c: hammer_until(o, ports[c % len(ports)], edge + 0.3, cost), range(4)))
    return pattern


def burst_then_steady(o, ports, edge):
    """A burst of 25 (more than the limit) at 85 % of a window, then one request every 50 ms
    for a window and a half; with two gateways, the requests alternate between them."""
    for i in range(25):
        o.send(ports[i % len(ports)])
    i = 0
    while time.time() < edge + 1.5 * WINDOW_S:
        o.send(ports[i % len(ports)])
        i += 1
        time.sleep(0.05)


def steady_four_clients(o, ports, edge):
    """Four clients, each sending one request every 20 ms (far more than the limit) for 2.5
    windows."""
    end = edge + 2.5 * WINDOW_S
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda c: hammer_until(o, ports[c % len(ports)], end, pause_s=0.02), range(4)))


# --- The tests -------------------------------------------------------------------------------------

def test_edge_burst(clean, tmp_path):
    with run_envoy(tmp_path, config(), clean["shim"]) as envoy:
        observers, _ = run_pattern(edge_burst(), [envoy.port])
    check_worst_cases("edge burst", observers)
    # The pattern bites: a fixed window lets most of 2 L through around its edge.
    assert observers["fixed_window"].provably_inside() >= 1.5 * LIMIT


def test_burst_before_the_edge_then_steady_demand(clean, tmp_path):
    with run_envoy(tmp_path, config(), clean["shim"]) as envoy:
        observers, edge = run_pattern(burst_then_steady, [envoy.port])
    check_worst_cases("burst at 85 % of a window, then one request per 50 ms", observers)
    # The pattern bites the two-window estimate (the issue measured 1.80 L): when the burst was
    # all answered before the edge, the estimate provably admits more than L in one window.
    estimate = observers["sliding_window_estimate"]
    if sorted(a for _, a, _ in estimate.admitted)[LIMIT - 1] < edge:
        assert estimate.provably_inside() > LIMIT


def test_steady_saturating_load_from_four_clients(clean, tmp_path):
    with run_envoy(tmp_path, config(), clean["shim"]) as envoy:
        observers, _ = run_pattern(steady_four_clients, [envoy.port])
    check_worst_cases("steady saturating load, four clients", observers)
    # Not starved either: over 2.5 windows each admits well over one window's worth (the
    # bounded window gives at least L per window and sub-window, docs/algorithms.md).
    for alg, o in observers.items():
        assert sum(c for *_, c in o.admitted) >= 1.5 * LIMIT, alg


def test_bursts_straddling_edges_with_cost_3(clean, tmp_path):
    with run_envoy(tmp_path, config(), clean["shim"]) as envoy:
        observers, _ = run_pattern(edge_burst(cost=3), [envoy.port])
    check_worst_cases("edge burst, cost 3 per request", observers)


@pytest.mark.parametrize("pattern", [burst_then_steady, steady_four_clients], ids=["burst-then-steady", "steady"])
def test_two_gateways_splitting_the_traffic(clean, tmp_path, pattern):
    with run_envoy(tmp_path / "a", config(), clean["shim"]) as a, \
            run_envoy(tmp_path / "b", config(), clean["shim"]) as b:
        observers, _ = run_pattern(pattern, [a.port, b.port])
    check_worst_cases(f"two gateways, {pattern.__name__}", observers)
