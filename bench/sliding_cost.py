"""What the sliding algorithms cost Redis: CPU per check and memory per active key.

    python3 bench/sliding_cost.py        # ~3 min; prints the Markdown table of bench/results/sliding.md

A fresh Redis and shim (1 worker). Redis's EVALSHA time (INFO commandstats `usec`, reset
before each phase) is the scripts' CPU, Lua and Redis commands included, without the network;
divided by the checks the calls carried, it is the CPU per check. Each variant runs on a 2 s
window with limit 100, in three phases:

- 1 hot key: one check per call, the usual per-route or per-tenant limit, at saturation
  (the whole script's cost for one check, its fixed part included);
- 32 saturated keys: 32 checks per call, one per client, each client demanding far more than
  its limit all along, so its state is as large as it gets (a full log of 100, every sub-window
  of a bounded window): the marginal cost of a check on a full key;
- 1000 keys below the limit: 32 checks per call over 1000 clients in turn, each sending a few
  per window (the per-client limit of a crowd).

Memory: MEMORY USAGE of each key the variant keeps for one client (both window counters for
sliding_window_estimate), summed per client and averaged over the clients of a phase: the 32 saturated
ones (a full log; a bounded window admits a saturating client's whole limit in one sub-window,
so it keeps few fields) and the crowd (requests spread over the whole window: every sub-window
of a bounded window holds some); keys are ~35 bytes, like `tollgate:{r|=198.51.0.7}:swb:2000:10`.
The median of 3 runs per figure.
"""

import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from shim_harness import redis_cli, run_redis, shim_process  # noqa: E402

LIMIT, WINDOW_MS = 100, 2000


def check(variant, name, now_ms):
    """The check the filter would send for a rule of `variant` (the config's algorithm names;
    `sliding_window/n`: n sub-windows) on client `name` at `now_ms`."""
    key = lambda suffix: f"tollgate:{{r|={name}}}:{suffix}"  # noqa: E731
    if variant == "fixed_window":
        i = now_ms // WINDOW_MS
        return dict(alg="fixed_window", key=key(f"{WINDOW_MS}:{i}"), limit=LIMIT,
                    ttl_ms=(i + 1) * WINDOW_MS - now_ms)
    if variant == "sliding_window_estimate":
        i = now_ms // WINDOW_MS
        return dict(alg="sliding_window", key=key(f"{WINDOW_MS}:{i}"), prev_key=key(f"{WINDOW_MS}:{i - 1}"),
                    limit=LIMIT, window_ms=WINDOW_MS, weight_ms=WINDOW_MS - now_ms % WINDOW_MS)
    if variant.startswith("sliding_window/"):
        n = int(variant.split("/")[1])
        return dict(alg="sliding_window_bounded", key=key(f"swb:{WINDOW_MS}:{n}"), limit=LIMIT,
                    window_ms=WINDOW_MS, subwindows=n)
    return dict(alg="sliding_log", key=key(f"log:{WINDOW_MS}"), limit=LIMIT, window_ms=WINDOW_MS,
                id=f"r{now_ms}.{time.perf_counter_ns()}")


def evalsha_stats(redis):
    for line in redis_cli(redis, "INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_evalsha:"):
            fields = dict(kv.split("=") for kv in line.split(":", 1)[1].split(","))
            return int(fields["calls"]), float(fields["usec"])
    return 0, 0.0


def phase(conn, redis, variant, names, seconds, per_call=1):
    """Checks `names` in turn for `seconds`, `per_call` of them (one request each) per call;
    returns µs of EVALSHA per check."""
    redis_cli(redis, "CONFIG", "RESETSTAT")
    end = time.time() + seconds
    i = 0
    while time.time() < end:
        now = int(time.time() * 1000)
        batch = [names[(i + k) % len(names)] for k in range(per_call)]
        body = json.dumps({"requests": [{"checks": [check(variant, n, now)]} for n in batch]})
        conn.request("POST", "/v1/check", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
        i += per_call
    calls, usec = evalsha_stats(redis)
    return usec / max(calls * per_call, 1)


def memory_per_client(redis, variant):
    """Bytes per limited client: the sum over the keys of one client, averaged over clients."""
    keys = redis_cli(redis, "KEYS", "tollgate:*")
    per_client = {}
    for k in keys:
        client = k.split(b"}")[0]
        # A key may expire between KEYS and MEMORY USAGE (None): it no longer counts.
        per_client[client] = per_client.get(client, 0) + (redis_cli(redis, "MEMORY", "USAGE", k) or 0)
    sizes = list(per_client.values())
    return statistics.mean(sizes) if sizes else 0


def main():
    variants = ["fixed_window", "sliding_window_estimate", "sliding_window/10", "sliding_window/20", "sliding_log"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, run_redis(Path(tmp) / "redis") as redis, \
            shim_process(Path(tmp) / "shim", redis, REDIS_READ_TIMEOUT_MS=2000) as shim:
        conn = http.client.HTTPConnection("127.0.0.1", shim.port, timeout=10)
        crowd = [f"198.51.{i // 250}.{i % 250}" for i in range(1000)]
        for variant in variants:
            hot, full, spread, mem, mem_crowd = [], [], [], [], []
            for _ in range(3):
                redis_cli(redis, "FLUSHALL")
                hot.append(phase(conn, redis, variant, ["hot"], 2.5))
                redis_cli(redis, "FLUSHALL")
                # One window length of warm-up fills every state; the next is measured.
                phase(conn, redis, variant, crowd[:32], 2.0, per_call=32)
                full.append(phase(conn, redis, variant, crowd[:32], 2.5, per_call=32))
                mem.append(memory_per_client(redis, variant))
                redis_cli(redis, "FLUSHALL")
                phase(conn, redis, variant, crowd, 2.0, per_call=32)
                spread.append(phase(conn, redis, variant, crowd, 2.5, per_call=32))
                mem_crowd.append(memory_per_client(redis, variant))
            rows.append((variant, *map(statistics.median, (hot, full, spread, mem, mem_crowd))))
            print(f"{variant}: {rows[-1][1:]}", file=sys.stderr)
    base = {r[0]: r for r in rows}["sliding_window_estimate"]
    print(f"limit {LIMIT} per {WINDOW_MS} ms; Redis {redis_version()}; "
          f"{time.strftime('%Y-%m-%d')}; `python3 bench/sliding_cost.py`\n")
    print("| algorithm | Redis CPU per check: 1 hot key, 1 check per call | 32 saturated keys, 32 per call "
          "| 1000 keys below the limit, 32 per call | memory per client: saturated | crowd |")
    print("|---|---|---|---|---|---|")
    for variant, *figures in rows:
        cpu = [f"{v:.1f} µs ({v / b:.2f}×)" for v, b in zip(figures[:3], base[1:4])]
        mem = [f"{v:.0f} B ({v / b:.2f}×)" for v, b in zip(figures[3:], base[4:])]
        print(f"| `{variant}` | {' | '.join(cpu)} | {' | '.join(mem)} |")


def redis_version():
    import subprocess
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return out.split()[2].removeprefix("v=")


if __name__ == "__main__":
    main()
