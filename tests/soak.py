"""Soak: steady load with a rotating key space through real Envoy, the shim and Redis for a
bounded time (`make soak`, SOAK_SECONDS, default 600). Samples the memory of Envoy, the shim's
nginx workers and Redis over time and checks that it plateaus; at the end every Redis key
Tollgate wrote has a TTL and no component logged an error.

Run: python3 tests/soak.py [seconds]   (everything on 127.0.0.1, stopped at the end)
"""

import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from envoy_harness import plugin, rule, run_envoy  # noqa: E402
from http_client import request  # noqa: E402
from shim_harness import redis_cli, redis_info, run_redis, shim_process  # noqa: E402

SAMPLE_EVERY_S = 10
KEY_SPACE = 5_000  # distinct API keys, rotated; each window's keys expire with it


def rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


def children(pid: int) -> list:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def main(seconds: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="tollgate-soak-"))
    rules = [
        rule("per_key", 50, window="10s"),
        rule("per_key_tb", descriptors=["header:x-api-key"], algorithm="token_bucket", burst=20, rate=5, period="1s"),
    ]
    stop = threading.Event()
    sent = [0]

    def load(envoy_port, worker):
        i = worker
        while not stop.is_set():
            request(envoy_port, "/v1/search", {"x-api-key": f"k{i % KEY_SPACE}"})
            sent[0] += 1
            i += 7

    # Generous timeouts: on a shared 2-core machine a scheduling hiccup is not what a soak is
    # looking for (the fault tests cover timeouts).
    config = plugin(rules, shim={"upstream": "tollgate_shim", "timeout": "1s"})
    with run_redis(work / "redis") as redis_port, \
            shim_process(work / "shim", redis_port, REDIS_READ_TIMEOUT_MS=1000) as shim, \
            run_envoy(work / "envoy", config, shim.port) as envoy:
        threads = [threading.Thread(target=load, args=(envoy.port, w), daemon=True) for w in range(8)]
        for t in threads:
            t.start()
        samples = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(min(SAMPLE_EVERY_S, max(0, end - time.monotonic())))
            workers = children(shim.popen.pid)
            samples.append({
                "t": round(seconds - (end - time.monotonic())),
                "sent": sent[0],
                "envoy_rss_mb": rss_kb(envoy.proc.pid) / 1024,
                "shim_rss_mb": sum(rss_kb(p) for p in workers) / 1024,
                "redis_used_mb": int(redis_info(redis_port, "memory")["used_memory"]) / 2**20,
                "redis_keys": redis_cli(redis_port, "DBSIZE"),
            })
            print("  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in samples[-1].items()),
                  flush=True)
        stop.set()
        for t in threads:
            t.join(5)
        keys = redis_cli(redis_port, "KEYS", "tollgate:*")
        no_ttl = [k for k in keys if redis_cli(redis_port, "PTTL", k) == -1]
        envoy_errors = [line for line in envoy.log().splitlines() if "][error]" in line or "][critical]" in line]
        shim_errors = [line for line in (shim.dir / "logs" / "error.log").read_text().splitlines() if "[error]" in line]

    failures = []
    if len(samples) >= 3:
        third = max(1, len(samples) // 3)
        for name in ("envoy_rss_mb", "shim_rss_mb", "redis_used_mb"):
            middle = max(s[name] for s in samples[third:2 * third])
            last = max(s[name] for s in samples[2 * third:])
            # A plateau: the last third does not grow more than 20% (+2 MB) over the middle one.
            if last > middle * 1.2 + 2:
                failures.append(f"{name} keeps growing: {middle:.1f} → {last:.1f} MB")
    if no_ttl:
        failures.append(f"{len(no_ttl)} keys without a TTL, e.g. {no_ttl[:3]}")
    if envoy_errors or shim_errors:
        failures.append(f"errors logged: {(envoy_errors + shim_errors)[:5]}")
    print(f"\nsoak: {seconds}s, {sent[0]} requests, {len(keys)} keys at the end, all with a TTL: {not no_ttl}")
    for f in failures:
        print(f"FAIL: {f}")
    print("soak passed" if not failures else "soak failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 600))
