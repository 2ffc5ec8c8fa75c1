#!/usr/bin/env python3
"""The Tollgate benchmark: `make bench` (or `python3 bench/run.py [--quick]`).

Runs each setup in turn on this machine, with the same load generators, and reports every
number next to the baseline measured in the same run (bench/README.md says how to read it):

  A   Envoy, no rate limiting (direct_response)                       baseline of A-C, E-G
  B   Envoy + envoy.filters.http.local_ratelimit (nothing denied)
  C   Envoy + envoy.filters.http.lua: httpCall to the shim, same check as Tollgate
  D0  nginx + Lua content handler, no limiting                        baseline of D
  D   the same nginx, access_by_lua doing INCR + EXPIRE in Redis itself
  W   Envoy + a proxy-wasm filter that does nothing (bench/wasm-probe): the Wasm runtime's floor
  E0  Tollgate loaded, but no rule applies: the Wasm filter's own cost, no callout
  E   Tollgate, every request checked in Redis (nothing denied; callouts coalesced, the default)
  E1  the same with coalescing off: one callout per request, like C
  F   Tollgate under abuse: every request over its limit (1 per minute)
  G   Tollgate with the shim down (failure_mode allow, the cluster on a closed port)
  X   accuracy: 2 Envoys x 2 workers, one shim, one Redis, one hot key offered 4x its limit;
      admitted / limit per window (bench/accuracy.py). `--leases on|off|both` sets its plugin's
      `leases` option (default: not sent, the build's default)

Per setup: saturation throughput (closed loop, wrk, 32 and 128 connections), latency
percentiles at fixed offered rates (open loop, oha; 25/50/75 % of A's throughput at 32
connections, and 10 %, a rate every setup should sustain), CPU microseconds per request of
Envoy, nginx and Redis (/proc utime+stime over the measured phases ÷ requests completed), peak
RSS (VmHWM), shim calls and Redis commands per request, and for E Redis memory per key.

Every process gets fresh random loopback ports and is stopped when its setup ends, even on
failure; configs and logs stay in bench/.work/<setup>/. Results: bench/results/latest.md and
latest.svg. Standard library only; the Envoy config comes from tests/envoy_harness.py.
"""

import argparse
import collections
import copy
import contextlib
import dataclasses
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / ".work"
RESULTS = BENCH / "results"
# The .wasm every setup loads: a copy taken at the start, so a rebuild during the run cannot
# give setups different filters (and the sha256 in the results names what ran).
WASM_COPY = WORK / "tollgate.wasm"
PROBE_DIR = BENCH / "wasm-probe"
PROBE_WASM = PROBE_DIR / "target" / "wasm32-wasip1" / "release" / "wasm_probe.wasm"
# What is benchmarked: the work tree's build and shim, unless --wasm / --shim-dir say otherwise.
SOURCES = {"wasm": None, "shim": None}
sys.path.insert(0, str(ROOT / "tests"))

# One place for Envoy configs and process handling: the end-to-end test harness.
from envoy_harness import WASM, Envoy, envoy_command, envoy_config, plugin, route, rule, wait_ready  # noqa: E402
from envoy_harness import stop as stop_popen  # noqa: E402
from shim_harness import SHIM_DIR, Proc, free_port, redis_cli, redis_info, start_redis, start_shim, stop  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
REDIS_POOL_SIZE = 256     # idle Redis connections per nginx worker, shim and D alike (> 128 conns)
NGINX_MODULES_DIR = os.environ.get("NGINX_MODULES_DIR", "/usr/share/nginx/modules")
# `cargo install oha` puts it in ~/.cargo/bin, which is not always on PATH.
OHA = shutil.which("oha") or str(Path.home() / ".cargo" / "bin" / "oha")


from rows import FULL, LATENCY_CONNECTIONS, QUICK, WRK_THREADS, Latency, Plan, Row  # noqa: E402
from report import fmt, markdown, svg_chart, update_readme  # noqa: E402
import accuracy  # noqa: E402  (after the harness is on sys.path)


# --- Processes -------------------------------------------------------------------------------

def descendants(pid: int) -> list:
    """pid and every process below it (nginx workers, Envoy under func-e)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in task.read_text().split())
    return found


def cpu_ticks(pids) -> int:
    """utime + stime of these processes (all their threads), in clock ticks."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])   # fields 14 and 15 of proc(5)
    return total


def peak_rss_kb(pids) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            m = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
            total += int(m.group(1)) if m else 0
    return total


@contextlib.contextmanager
def owned(proc: Proc):
    try:
        yield proc
    finally:
        stop(proc)


def wait_http(url: str, what: str, popen: subprocess.Popen, logs, deadline_s: float = 10.0):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if popen.poll() is not None:
            raise RuntimeError(f"{what} exited with {popen.returncode}; see {logs}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {deadline_s}s; see {logs}")


@dataclasses.dataclass
class Target:
    """What the load generators hit, and the processes whose costs count."""

    url: str
    roles: dict          # role ("envoy", "nginx", "redis") -> root pid
    envoy: Envoy = None
    redis_port: int = None
    shim_up: bool = False   # a shim is running: every callout should succeed

    def pids(self) -> dict:
        return {role: descendants(pid) for role, pid in self.roles.items()}


# --- Configs ---------------------------------------------------------------------------------

# The same routes for every Envoy setup; the route metadata picks the Tollgate rules.
ROUTES = [
    route("keys", {"prefix": "/keys"}, policy="keys", body="ok\n"),
    route("bench", {"prefix": "/"}, policy="bench", body="ok\n"),
]
NO_DENY = 10**9

# E and G: a per-client-IP rule on every request, a per-API-key rule on /keys (memory phase).
CHECKED_RULES = [
    rule("bench", NO_DENY, descriptors=["client_ip"], match={"policies": ["bench"]}),
    rule("keys", NO_DENY, descriptors=["header:x-api-key"], match={"policies": ["keys"]}),
]
# E0: the filter runs on every request, but no rule applies: what the Wasm costs by itself.
NO_MATCH_RULES = [rule("bench", NO_DENY, descriptors=["client_ip"], match={"path_prefix": "/never"})]
# F: one key, one request per minute: after the first request everything is over the limit.
ABUSE_RULES = [rule("bench", 1, descriptors=["client_ip"])]

LOCAL_RATELIMIT = {
    "name": "envoy.filters.http.local_ratelimit",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "bench_local_rate_limit",
        "token_bucket": {"max_tokens": NO_DENY, "tokens_per_fill": NO_DENY, "fill_interval": "1s"},
        # Both default to 0 %: without them the filter neither counts nor enforces.
        "filter_enabled": {"runtime_key": "lrl_enabled", "default_value": {"numerator": 100}},
        "filter_enforced": {"runtime_key": "lrl_enforced", "default_value": {"numerator": 100}},
    },
}


def lua_filter() -> dict:
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": (BENCH / "envoy" / "lua_check.lua").read_text()},
        },
    }


def envoy_bootstrap(filter_kind: str, rules, shim_port: int, port: int, admin_port: int, probe_config: str = "",
                    **plugin_options) -> dict:
    """tests/envoy_harness.py's config, with the Wasm filter swapped for `filter_kind`'s
    (`probe_config`: the configuration of the "probe" kind, bench/wasm-probe)."""
    tollgate = plugin(rules or CHECKED_RULES, **plugin_options)
    config = envoy_config(tollgate, shim_port, port, admin_port, routes=ROUTES)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm, router = hcm["http_filters"]
    wasm["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(WASM_COPY)
    hcm["stat_prefix"] = "bench"
    probe = copy.deepcopy(wasm)
    probe["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(PROBE_WASM)
    probe["typed_config"]["config"]["configuration"]["value"] = probe_config
    hcm["http_filters"] = {
        "none": [],
        "probe": [probe],
        "local_ratelimit": [LOCAL_RATELIMIT],
        "lua": [lua_filter()],
        "tollgate": [wasm],
    }[filter_kind] + [router]
    return config


def render_nginx_conf(listen_port: int, redis_port: int) -> str:
    conf = (BENCH / "nginx" / "nginx.conf.in").read_text()
    values = {
        "NGINX_MODULES_DIR": NGINX_MODULES_DIR,
        "BENCH_NGINX_DIR": str(BENCH / "nginx"),
        "LISTEN": f"127.0.0.1:{listen_port}",
        "REDIS_PORT": str(redis_port),
        "POOL_SIZE": str(REDIS_POOL_SIZE),
    }
    for name, value in values.items():
        conf = conf.replace("${" + name + "}", value)
    return conf


# --- Pinning ---------------------------------------------------------------------------------

# With two or more CPUs, the gateway under test (Envoy; nginx in D0/D) runs on CPU 0 alone and
# everything else (the shim, Redis, wrk, oha) on CPU 1, so the gateway's throughput is bounded
# by its own CPU and its cost is not blurred by the load generator's (--no-pin: shared cores).
PIN = {"gateway": None, "rest": None}


def pinned(role: str, cmd: list) -> list:
    cpu = PIN[role]
    return ["taskset", "-c", cpu, *cmd] if cpu is not None else cmd


def pin_tree(role: str, pid: int):
    """Moves an already started process and all its threads and children to `role`'s CPU."""
    cpu = PIN[role]
    if cpu is None:
        return
    for p in descendants(pid):
        subprocess.run(["taskset", "-a", "-p", "-c", cpu, str(p)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)


# --- Setups ----------------------------------------------------------------------------------

def redis_and_shim(work: Path, stack: contextlib.ExitStack) -> tuple:
    """Starts Redis and the shim (one worker) in front of it; `stack` stops them."""
    redis = stack.enter_context(owned(start_redis(work / "redis")))
    shim = stack.enter_context(owned(start_shim(work / "shim", redis.port, shim_dir=SOURCES["shim"],
                                                SHIM_WORKERS=1, REDIS_POOL_SIZE=REDIS_POOL_SIZE)))
    pin_tree("rest", redis.popen.pid)
    pin_tree("rest", shim.popen.pid)
    return redis, shim


@contextlib.contextmanager
def envoy_target(work: Path, filter_kind: str, rules=None, with_shim=False, **plugin_options):
    """Envoy (one worker) with `filter_kind`, and Redis + the shim when the setup uses them."""
    with contextlib.ExitStack() as stack:
        roles, redis_port = {}, None
        shim_port = free_port()   # closed, unless a shim takes it below
        if with_shim:
            redis, shim = redis_and_shim(work, stack)
            shim_port, redis_port = shim.port, redis.port
            roles.update(nginx=shim.popen.pid, redis=redis.popen.pid)
        port, admin_port = free_port(), free_port()
        config_path = work / "envoy.json"
        config = envoy_bootstrap(filter_kind, rules, shim_port, port, admin_port, **plugin_options)
        config_path.write_text(json.dumps(config, indent=1))
        log_path = work / "envoy.log"
        cmd, env = envoy_command(config_path, ["--concurrency", "1", "-l", "warn", "--log-path", str(log_path)])
        cmd = pinned("gateway", cmd)
        with open(work / "envoy.stdout", "wb") as out:
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
        stack.callback(stop_popen, popen)
        envoy = Envoy(popen, port, admin_port, log_path)
        wait_ready(envoy)
        roles["envoy"] = popen.pid
        yield Target(f"http://127.0.0.1:{port}/", roles, envoy, redis_port, shim_up=with_shim)


@contextlib.contextmanager
def nginx_target(work: Path, path: str, with_redis: bool):
    """Setup D's nginx (bench/nginx/), one worker; Redis only when the location uses it."""
    with contextlib.ExitStack() as stack:
        roles, redis_port = {}, free_port()
        if with_redis:
            redis = stack.enter_context(owned(start_redis(work / "redis")))
            pin_tree("rest", redis.popen.pid)
            roles["redis"], redis_port = redis.popen.pid, redis.port
        port = free_port()
        for d in ("logs", "tmp"):
            (work / d).mkdir(parents=True, exist_ok=True)
        (work / "nginx.conf").write_text(render_nginx_conf(port, redis_port))
        with open(work / "stderr.log", "wb") as err:
            popen = subprocess.Popen(
                pinned("gateway", ["nginx", "-p", f"{work}/", "-c", str(work / "nginx.conf"), "-g", "daemon off;"]),
                stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
        stack.callback(stop_popen, popen)
        url = f"http://127.0.0.1:{port}{path}"
        wait_http(url, "nginx", popen, work / "logs" / "error.log")
        roles["nginx"] = popen.pid
        yield Target(url, roles, None, redis_port if with_redis else None)


@dataclasses.dataclass(frozen=True)
class Setup:
    key: str
    name: str
    base: str
    start: object   # work dir -> context manager yielding a Target
    # How wrk sends: a script (bench/wrk/) and its environment, else plain GETs of the URL.
    wrk_script: str = None
    wrk_env: dict = None
    # The fixed-rate latency phases (oha sends one URL, so not for the key-distribution setups).
    latency: bool = True
    # The one-client phase: sequential requests on one keep-alive connection.
    single: bool = False
    # A phase of its own instead of `measure` (the accuracy phase): (setup, plan, work) -> Row.
    run: object = None


SETUPS = [
    Setup("A", "Envoy, no rate limiting (direct_response)", "A",
          lambda w: envoy_target(w, "none"), single=True),
    Setup("B", "Envoy + local_ratelimit (token bucket, nothing denied)", "A",
          lambda w: envoy_target(w, "local_ratelimit")),
    Setup("C", "Envoy + Lua filter, httpCall to the shim", "A",
          lambda w: envoy_target(w, "lua", with_shim=True)),
    Setup("D0", "nginx + Lua, no limiting", "D0",
          lambda w: nginx_target(w, "/plain", with_redis=False)),
    Setup("D", "nginx + Lua, INCR+EXPIRE in Redis (access phase)", "D0",
          lambda w: nginx_target(w, "/limited", with_redis=True)),
    Setup("W", "Envoy + a proxy-wasm filter that does nothing", "A",
          lambda w: envoy_target(w, "probe"), single=True),
    Setup("E0", "Tollgate loaded, no rule applies (no callout)", "A",
          lambda w: envoy_target(w, "tollgate", NO_MATCH_RULES)),
    Setup("E", "Tollgate, every request checked in Redis (one hot key)", "A",
          lambda w: envoy_target(w, "tollgate", with_shim=True), single=True),
    Setup("EU", "Tollgate, 10 000 keys, uniform", "A",
          lambda w: envoy_target(w, "tollgate", with_shim=True),
          wrk_script="keys.lua", wrk_env={"BENCH_KEYS": "10000"}, latency=False),
    Setup("EZ", "Tollgate, 100 000 keys, Zipf s = 1.1", "A",
          lambda w: envoy_target(w, "tollgate", with_shim=True),
          wrk_script="keys.lua", wrk_env={"BENCH_KEYS": "100000", "BENCH_ZIPF_S": "1.1"}, latency=False),
    Setup("E1", "Tollgate, coalescing off: one callout per request", "A",
          lambda w: envoy_target(w, "tollgate", with_shim=True, coalesce=False)),
    Setup("F", "Tollgate under abuse (all over the limit)", "A",
          lambda w: envoy_target(w, "tollgate", ABUSE_RULES, with_shim=True), single=True),
    Setup("G", "Tollgate, shim down (failure_mode allow)", "A",
          lambda w: envoy_target(w, "tollgate"), single=True),
]
ACCURACY_NAME = "Accuracy: 2 gateways × 2 workers, one hot key offered 4× its limit"


def accuracy_setups(mode: str) -> list:
    """Setup X, once per leases mode asked for (`--leases both`: X-off and X-on)."""
    modes = {None: [None], "on": ["on"], "off": ["off"], "both": ["off", "on"]}[mode]
    return [Setup("X" if len(modes) == 1 else f"X-{m}", ACCURACY_NAME, "X", None,
                  run=lambda setup, plan, work, m=m: accuracy_row(setup, plan, work, m)) for m in modes]


def accuracy_row(setup: Setup, plan: Plan, work: Path, mode) -> Row:
    """The accuracy phase on a fresh Redis and shim (pinned with the load generators; the two
    Envoys share the cores): see bench/accuracy.py."""
    row = Row(setup.key, setup.name, setup.base, phase="accuracy")
    plan_leases = accuracy.lease_plan(mode, mode is None or accuracy.leases_supported(WASM_COPY, work / "probe"))
    if plan_leases is None:
        row.leases, row.error = mode, accuracy.NOT_AVAILABLE
        return row
    leases, row.leases = plan_leases
    with contextlib.ExitStack() as stack:
        redis, shim = redis_and_shim(work, stack)
        row.accuracy = accuracy.measure(work, shim.port, ("127.0.0.1", redis.port), plan.accuracy_limit,
                                        plan.accuracy_windows, WASM_COPY, OHA, free_port, leases=leases,
                                        load_cmd=lambda cmd: pinned("rest", cmd))
    if row.accuracy["counter_errors"]:
        row.warning = f"reading the Redis counters failed: {row.accuracy['counter_errors'][0]}"
    return row


# --- Load ------------------------------------------------------------------------------------

class LoadLog:
    """Keeps every load generator's command and output in the setup's work dir."""

    def __init__(self, path: Path):
        self.path = path

    def run(self, cmd, timeout_s, env=None) -> str:
        cmd = pinned("rest", cmd)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **(env or {})})
        with open(self.path, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        return proc.stdout


def wrk(log: LoadLog, url: str, connections: int, seconds: int, setup=None) -> tuple:
    """Closed loop: (requests completed, req/s, statuses); with the setup's script, if any."""
    script = ["-s", str(BENCH / "wrk" / setup.wrk_script)] if setup and setup.wrk_script else []
    out = log.run(["wrk", "-t", str(min(WRK_THREADS, connections)), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "2s",
                   *script, url], seconds + 30, env=setup.wrk_env if setup else None)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = int(non_2xx.group(1)) if non_2xx else 0
    return requests, rps, {"2xx": requests - failed, "non-2xx": failed,
                           "socket errors": sum(int(n) for n in errors.groups()) if errors else 0}


def oha(log: LoadLog, url: str, rate: float, seconds: int) -> Latency:
    """Open loop at `rate` req/s; latency counted from each request's scheduled start."""
    out = log.run([OHA, "--no-tui", "--output-format", "json", "--latency-correction",
                   "-q", f"{rate:.0f}", "-z", f"{seconds}s", "-c", str(LATENCY_CONNECTIONS), url], seconds + 60)
    data = json.loads(out)
    pct = data["latencyPercentiles"]
    statuses = {str(k): v for k, v in data.get("statusCodeDistribution", {}).items()}
    ms = lambda s: (s or 0.0) * 1000  # noqa: E731
    return Latency(
        offered=rate,
        achieved=sum(statuses.values()) / seconds,
        p50=ms(pct["p50"]), p90=ms(pct["p90"]), p99=ms(pct["p99"]), p999=ms(pct["p99.9"]),
        statuses=statuses,
        # Requests still in flight when -z ends are "aborted due to deadline": not failures.
        errors=sum(n for e, n in data.get("errorDistribution", {}).items() if "deadline" not in e),
    )


def one_client(log: LoadLog, url: str, requests: int) -> Latency:
    """One client, sequential requests on one keep-alive connection, nothing else running:
    the latency a single caller sees."""
    out = log.run([OHA, "--no-tui", "--output-format", "json", "-n", str(requests), "-c", "1", url], 120)
    data = json.loads(out)
    pct = data["latencyPercentiles"]
    statuses = {str(k): v for k, v in data.get("statusCodeDistribution", {}).items()}
    ms = lambda s: (s or 0.0) * 1000  # noqa: E731
    took = data["summary"].get("total") or 1
    return Latency(offered=0, achieved=requests / took, p50=ms(pct["p50"]), p90=ms(pct["p90"]),
                   p99=ms(pct["p99"]), p999=ms(pct["p99.9"]), statuses=statuses,
                   errors=sum(data.get("errorDistribution", {}).values()))


def counters(target: Target) -> dict:
    """What the setup did, to check it does what it says: callouts Envoy made to the shim cluster
    (failed connects included) and how many failed (4xx, 5xx: refused, timed out, shim error);
    commands Redis processed, those its scripts ran included."""
    c = {}
    if target.envoy:
        stat = lambda name: target.envoy.stat(f"cluster.tollgate_shim.{name}")  # noqa: E731
        c["callouts"] = stat("upstream_rq_completed")
        c["callouts_failed"] = stat("upstream_rq_4xx") + stat("upstream_rq_5xx")
        # Requests Tollgate checked, and those it decided without a callout (a lease, the
        # over-limit cache): the share of requests that needed none.
        own = lambda name: target.envoy.stat(f"wasmcustom.tollgate_{name}")  # noqa: E731
        c["checked"] = own("requests_checked_total")
        c["local"] = own("lease_admitted_total") + own("cache_hits_total")
    if target.redis_port:
        c["redis_commands"] = int(redis_info(target.redis_port, "stats")["total_commands_processed"])
    return c


@contextlib.contextmanager
def metered(row: Row, target: Target):
    """Adds the CPU the target's processes spend inside the block, and its counters, to the row."""
    pids = target.pids()
    before, counted = {role: cpu_ticks(p) for role, p in pids.items()}, counters(target)
    yield
    for role, p in pids.items():
        count(row.cpu_ticks, {role: cpu_ticks(p) - before[role]})
    count(row.counters, {k: v - counted[k] for k, v in counters(target).items()})


def perf_record(target: Target, work: Path, seconds: int):
    """`perf record` on Envoy for `seconds` (started in the background); --perf only. Envoy's
    binary is stripped, so the report splits by DSO: envoy, kernel, the V8 JIT (the Wasm)."""
    if "envoy" not in target.roles or not shutil.which("perf"):
        return None
    return subprocess.Popen(
        ["perf", "record", "-F", "499", "-g", "-o", str(work / "perf.data"), "-p", str(target.roles["envoy"]),
         "--", "sleep", str(seconds)],
        stdout=subprocess.DEVNULL, stderr=open(work / "perf.log", "wb"))


def perf_report(work: Path):
    with open(work / "perf.txt", "w") as out:
        subprocess.run(["perf", "report", "-i", str(work / "perf.data"), "--stdio", "--no-children",
                        "--sort", "dso", "-g", "none"],
                       stdout=out, stderr=subprocess.DEVNULL, timeout=120)


def measure(setup: Setup, target: Target, plan: Plan, rates, work: Path, perf: bool) -> Row:
    """Saturation at each connection count, then latency at each offered rate. `rates` (load
    fraction -> req/s) is None for A, which derives them from its own throughput at 32."""
    row = Row(setup.key, setup.name, setup.base)
    log = LoadLog(work / "load.log")
    if setup.single:
        # First, on an idle machine: one caller's latency.
        wrk(log, target.url, 1, plan.warmup_s)
        row.single = one_client(log, target.url, plan.single_requests)
    for connections in plan.connections:
        wrk(log, target.url, connections, plan.warmup_s, setup)
        recorder = perf and connections == plan.connections[0] and perf_record(target, work, plan.saturation_s)
        with metered(row, target):
            requests, rps, statuses = wrk(log, target.url, connections, plan.saturation_s, setup)
        if recorder:
            recorder.wait()
            perf_report(work)
        row.rps[connections] = rps
        row.requests += requests
        count(row.statuses, statuses)
    if rates is None:
        rates = {f: row.rps[plan.connections[0]] * f for f in plan.load_fractions}
    for fraction, rate in (rates.items() if setup.latency else ()):
        with metered(row, target):
            lat = oha(log, target.url, rate, plan.rate_s)
        row.latency[fraction] = lat
        row.requests += sum(lat.statuses.values())
        count(row.statuses, {"2xx" if s.startswith("2") else "non-2xx": n for s, n in lat.statuses.items()})
        count(row.statuses, {"socket errors": lat.errors})
    row.rss_kb = {role: peak_rss_kb(p) for role, p in target.pids().items()}
    # A few timeouts under overload are real; more than 1 % means the shim is broken.
    failed = row.counters.get("callouts_failed", 0)
    if target.shim_up and failed > 0.01 * row.counters.get("callouts", 0):
        row.warning = (f"{failed} of {row.counters['callouts']} shim calls failed, so this row does not measure what "
                       f"it says: see bench/.work/{setup.key}/shim/logs/error.log")
    return row


def count(into: dict, counts: dict):
    for k, n in counts.items():
        into[k] = into.get(k, 0) + n


def memory_per_key(target: Target, keys: int, threads: int = 8) -> dict:
    """E only: `keys` requests to /keys, each with its own x-api-key, so Tollgate creates that
    many Redis counters; INFO memory before and after ÷ the keys created."""
    host, port = "127.0.0.1", int(target.url.split(":")[2].split("/")[0])

    def send(first):
        statuses = collections.Counter()
        conn = http.client.HTTPConnection(host, port, timeout=5)
        for i in range(first, keys, threads):
            conn.request("GET", "/keys", headers={"x-api-key": f"bench-key-{i:08d}"})
            response = conn.getresponse()
            response.read()
            statuses[response.status] += 1
        conn.close()
        return statuses

    used = lambda: int(redis_info(target.redis_port, "memory")["used_memory"])  # noqa: E731
    keys_before, mem_before = redis_cli(target.redis_port, "DBSIZE"), used()
    with ThreadPoolExecutor(threads) as pool:
        statuses = dict(sum(pool.map(send, range(threads)), collections.Counter()))
    keys_after, mem_after = redis_cli(target.redis_port, "DBSIZE"), used()
    created = keys_after - keys_before
    _, sample = redis_cli(target.redis_port, "SCAN", "0", "MATCH", "tollgate:{keys|*", "COUNT", "1000")
    return {
        "keys": created,
        "statuses": statuses,
        "bytes_per_key": (mem_after - mem_before) / created if created else None,
        "memory_usage_sample": redis_cli(target.redis_port, "MEMORY", "USAGE", sample[0]) if sample else None,
        "sample_key": sample[0].decode() if sample else None,
    }


# --- Report ----------------------------------------------------------------------------------

def first_line(cmd) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def metadata() -> dict:
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    envoy = re.search(r"version: \w+/(\d+\.\d+\.\d+)/", first_line(["envoy", "--version"]))
    lua_mod = first_line(["dpkg-query", "-W", "-f", "${Version}", "libnginx-mod-http-lua"])
    wasm = WASM_COPY.read_bytes()
    head = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "lua-redis-shim"],
                           capture_output=True, text=True).stdout.strip()
    redis = first_line(["redis-server", "--version"]).split(" sha=")[0]
    return {
        "machine": f"{cpu.group(1) if cpu else platform.processor()}, {os.cpu_count()} CPUs, "
                   f"{mem_kb / 1024**2:.0f} GiB, Linux {platform.release()}, load average at start "
                   f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (shared, noisy)",
        "versions": f"Envoy {envoy.group(1) if envoy else '?'}, {first_line(['nginx', '-v']).split(': ')[-1]} + "
                    f"lua-nginx-module {lua_mod} (Debian), {redis}, "
                    f"{first_line(['wrk', '-v']).split(' Copyright')[0]}, {first_line([OHA, '--version'])}, "
                    f"Python {platform.python_version()}",
        "tollgate": f"git {head}{' + uncommitted changes (src/, lua-redis-shim/)' if dirty else ''}, "
                    f"{SOURCES['wasm'].name} sha256 {hashlib.sha256(wasm).hexdigest()[:12]} ({len(wasm) // 1024} KiB)"
                    + ("" if SOURCES["wasm"] == WASM else f" from {SOURCES['wasm']}")
                    + ("" if SOURCES["shim"] == SHIM_DIR.resolve() else f", shim from {SOURCES['shim']}"),
    }


# --- Main ------------------------------------------------------------------------------------

def check_tools():
    missing = [t for t in ("envoy", "nginx", "redis-server", "wrk", OHA) if not shutil.which(t)]
    if missing:
        sys.exit(f"missing: {', '.join(missing)}; run `make bench-setup` (oha: cargo install oha --locked)")
    if not SOURCES["wasm"].exists():
        sys.exit(f"{SOURCES['wasm']} is missing: run `make build`")


def drift_check(plan: Plan) -> dict:
    """A's saturation phases once more, after everything else: how much the machine itself
    changed during the run (other tenants), to read the ratios against."""
    work = WORK / "A-again"
    work.mkdir(parents=True)
    log = LoadLog(work / "load.log")
    rps = {}
    with envoy_target(work, "none") as target:
        for connections in plan.connections:
            wrk(log, target.url, connections, plan.warmup_s)
            rps[connections] = wrk(log, target.url, connections, plan.saturation_s)[1]
    return rps


def run_setups(plan: Plan, only, perf: bool, leases: str = None) -> dict:
    """Each setup in turn, on fresh processes; A first, as its throughput sets the rates."""
    rows, rates, started = {}, None, time.monotonic()
    for setup in SETUPS + accuracy_setups(leases):
        if only and setup.key.split("-")[0] not in only:
            continue
        work = WORK / setup.key
        work.mkdir(parents=True)
        print(f"[{time.monotonic() - started:5.0f}s] {setup.key}: {setup.name}", flush=True)
        try:
            if setup.run:
                row = setup.run(setup, plan, work)
            else:
                with setup.start(work) as target:
                    row = measure(setup, target, plan, rates, work, perf)
                    if setup.key == "E":
                        row.memory_per_key = memory_per_key(target, plan.memory_keys)
        except Exception as e:  # noqa: BLE001 - one failed setup must not lose the others
            if setup.key == "A":
                raise
            first_line = str(e).splitlines()[0] if str(e) else ""
            row = Row(setup.key, setup.name, setup.base, error=f"{type(e).__name__}: {first_line}"[:200],
                      phase="accuracy" if setup.run else "load")
            print(f"  FAILED: {e}\n  (logs: {work})", flush=True)
        rows[setup.key] = row
        if setup.key == "A":
            rates = {f: lat.offered for f, lat in row.latency.items()}
        if row.accuracy:
            acc = row.accuracy
            print(f"  leases: {row.leases}; admitted ÷ limit ({acc['limit']}) per window: max "
                  f"{fmt(acc['max_ratio'], '.3f')}, mean {fmt(acc['mean_ratio_full'], '.3f')} over "
                  f"{acc['full_windows']} whole windows; charged ÷ limit max {fmt(acc['max_charged_ratio'], '.3f')}",
                  flush=True)
            for line in accuracy.loud_lines(acc, setup.key):
                print(line, flush=True)
        elif row.error and row.phase == "accuracy":
            print(f"  {row.error}", flush=True)
        elif not row.error:
            print("  " + ", ".join(f"{c} conns: {row.rps[c]:.0f} req/s" for c in plan.connections)
                  + "; " + ", ".join(f"{f:.0%}: p50 {lat.p50:.2f} ms p99 {lat.p99:.2f} ms"
                                    for f, lat in row.latency.items()), flush=True)
        if row.warning:
            print(f"  WARNING: {row.warning}", flush=True)
    return rows


def build_probe_filter():
    """Setup W's filter: built here (seconds, cached) so `python3 bench/run.py` works alone."""
    subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1",
                    "--manifest-path", str(PROBE_DIR / "Cargo.toml")], check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 s phases, one rate, 1000 keys: a smoke run")
    parser.add_argument("--only", default="", help="comma-separated setups (A always runs), e.g. --only E,F")
    parser.add_argument("--perf", action="store_true", help="perf record Envoy during each setup's 32-connection "
                        "phase (bench/.work/<setup>/perf.txt)")
    parser.add_argument("--wasm", type=Path, default=WASM, help="the .wasm to benchmark (default: the release build)")
    parser.add_argument("--shim-dir", type=Path, default=SHIM_DIR,
                        help="the lua-redis-shim to run (default: the work tree's)")
    parser.add_argument("--leases", choices=("on", "off", "both"), default=None,
                        help="the accuracy phase's plugin option `leases` (default: not sent); `both` runs it twice")
    parser.add_argument("--no-pin", action="store_true",
                        help="share the cores (default with 2+ CPUs: the gateway alone on CPU 0, the rest on CPU 1)")
    args = parser.parse_args()
    if not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        PIN.update(gateway="0", rest="1")
    SOURCES.update(wasm=args.wasm.resolve(), shim=args.shim_dir.resolve())
    check_tools()
    # SIGTERM (e.g. from make) unwinds like Ctrl-C, so every process is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    plan = QUICK if args.quick else FULL
    only = {"A", *args.only.split(",")} if args.only else None
    started = time.monotonic()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    shutil.copyfile(SOURCES["wasm"], WASM_COPY)
    build_probe_filter()
    meta = metadata()
    meta["pinning"] = ("Envoy `--concurrency 1` (nginx in D0/D) alone on CPU 0; the shim (one nginx worker), Redis, "
                       "wrk and oha on CPU 1 (`taskset`)." if PIN["gateway"] is not None else
                       "Envoy `--concurrency 1`, one nginx worker (shim and D), Redis, wrk and oha all on the same "
                       "cores (--no-pin).")
    rows = run_setups(plan, only, args.perf, args.leases)
    print(f"[{time.monotonic() - started:5.0f}s] A again: has the machine changed during the run?", flush=True)
    again = drift_check(plan)
    meta["drift"] = ", ".join(f"{again[c]:.0f} req/s @{c} ({again[c] / rows['A'].rps[c]:.2f}× the first run)"
                              for c in plan.connections)
    rows["A"].base_rps = {c: max(rows["A"].rps[c], again[c]) for c in plan.connections}

    took = time.monotonic() - started
    meta.update(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        took=f"{took // 60:.0f} min {took % 60:.0f} s",
        command="make bench" if len(sys.argv) == 1 else "python3 bench/run.py " + " ".join(sys.argv[1:]),
        plan="full run" if not args.quick else "quick smoke run, not for comparison",
    )
    # A smoke run (or a partial one) must not replace the published results.
    out = RESULTS if not (args.quick or only) else WORK
    out.mkdir(exist_ok=True)
    md = markdown(rows, plan, meta)
    (out / "latest.md").write_text(md)
    (out / "latest.svg").write_text(svg_chart(rows, plan, meta))
    if out == RESULTS:
        update_readme(md, meta)
    raw = {k: dataclasses.asdict(r) for k, r in rows.items()}
    (WORK / "rows.json").write_text(json.dumps(raw, indent=1, default=str))
    print()
    print(md)
    print(f"wrote {out / 'latest.md'} and latest.svg in {meta['took']}; logs in {WORK}")
    # A leases mode this build cannot run is reported, not a failure of the run.
    return 1 if any((r.error and r.error != accuracy.NOT_AVAILABLE) or r.warning for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
