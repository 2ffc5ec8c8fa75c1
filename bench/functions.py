#!/usr/bin/env python3
"""What running the check script as a Redis function library saves Redis, per call:
`make bench-functions` (about a minute; Redis and the shim on 127.0.0.1).

The same shim, with REDIS_FUNCTIONS=1 (FUNCTION LOAD once, then FCALL) and REDIS_FUNCTIONS=0
(EVALSHA: Redis runs the whole composed script, prelude and setup included, on every call),
in interleaved rounds; for each: Redis's own time per call (INFO commandstats usec_per_call)
and Redis's CPU per call (used_cpu_user + used_cpu_sys over the calls). Two shapes of call: one
check on a hot key, and a batch of 12 checks on distinct keys (what a coalesced callout
carries). The minimum over rounds is reported: these machines are shared and noisy.
"""

import http.client
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from shim_harness import redis_cli, run_redis, shim_process  # noqa: E402

CALLS = 2000
ROUNDS = 5


def body(n_checks: int, i: int) -> bytes:
    checks = [{"key": f"tollgate:{{bench|={(i * n_checks + j) % 10_000 if n_checks > 1 else 0}}}:60000:1",
               "limit": 10**12, "ttl_ms": 60_000} for j in range(n_checks)]
    return json.dumps({"requests": [{"checks": checks}]}).encode()


def redis_cpu(port: int) -> float:
    info = redis_cli(port, "INFO", "cpu").decode()
    user = float(re.search(r"used_cpu_user:([\d.]+)", info).group(1))
    sys_ = float(re.search(r"used_cpu_sys:([\d.]+)", info).group(1))
    return user + sys_


def usec_per_call(port: int, command: str) -> float:
    stats = redis_cli(port, "INFO", "commandstats").decode()
    m = re.search(rf"cmdstat_{command}:calls=(\d+),usec=(\d+)", stats)
    return int(m.group(2)) / int(m.group(1))


def run(redis_port: int, shim_port: int, n_checks: int, command: str) -> tuple:
    conn = http.client.HTTPConnection("127.0.0.1", shim_port, timeout=10)
    for i in range(50):  # load the library or script, warm the connection
        conn.request("POST", "/v1/check", body=body(n_checks, i), headers={"Content-Type": "application/json"})
        conn.getresponse().read()
    redis_cli(redis_port, "CONFIG", "RESETSTAT")
    cpu0 = redis_cpu(redis_port)
    for i in range(CALLS):
        conn.request("POST", "/v1/check", body=body(n_checks, i), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
    cpu = (redis_cpu(redis_port) - cpu0) / CALLS * 1e6
    return usec_per_call(redis_port, command), cpu


def main():
    results = {}
    with tempfile.TemporaryDirectory() as tmp, run_redis(Path(tmp) / "redis") as redis_port:
        for rnd in range(ROUNDS):
            for functions in ("1", "0"):
                command = "fcall" if functions == "1" else "evalsha"
                with shim_process(Path(tmp) / f"shim{functions}{rnd}", redis_port, REDIS_FUNCTIONS=functions,
                                  REDIS_READ_TIMEOUT_MS=2000) as shim:
                    for n_checks in (1, 12):
                        redis_cli(redis_port, "FLUSHALL")
                        got = run(redis_port, shim.port, n_checks, command)
                        best = results.get((command, n_checks), (float("inf"), float("inf")))
                        results[(command, n_checks)] = (min(best[0], got[0]), min(best[1], got[1]))
    print(f"Redis per call, min of {ROUNDS} interleaved rounds of {CALLS} calls:\n")
    print("| call | checks | EVALSHA µs in Redis | FCALL µs in Redis | ratio | EVALSHA Redis CPU µs | FCALL Redis CPU µs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n_checks, what in ((1, "one hot key"), (12, "12 distinct keys")):
        e, f = results[("evalsha", n_checks)], results[("fcall", n_checks)]
        print(f"| {what} | {n_checks} | {e[0]:.1f} | {f[0]:.1f} | {f[0] / e[0]:.2f}× | {e[1]:.1f} | {f[1]:.1f} |")


if __name__ == "__main__":
    main()
