"""The accuracy phase: how much of a rule's limit the gateways admit per window, together.

Used by `run.py` (setup X: the shim and Redis on loopback) and `far.py` (Redis behind 20 ms).
Two Envoy processes (`--concurrency 2` each) share one shim and one Redis; one `fixed_window`
rule on one hot key (a constant `x-api-key`) is offered OVERLOAD times its limit by an open-loop
`oha` per gateway for a number of whole windows. Two counts per window:

- **admitted**: the route sends what the filter lets through to a tiny counting upstream (a
  thread of this process), which records Envoy's `%START_TIME%` of each request (a request
  header added by the route) and its own time of arrival. The filter reads the same clock when
  the request's headers arrive, in between; the skew correction is off (`clock.correct_skew:
  false`: on one machine Redis's clock *is* the local clock, and the correction's estimate moves
  window edges by up to half a callout's round trip). A request counts in the window of its
  start, the filter's reading being microseconds later, but on a loaded machine Envoy can be
  descheduled in between: a request whose start and arrival are in different windows is
  *straddling* (its window is not certain). *certain* = admitted − straddling: a window whose
  certain count is above its limit is a proven over-admission.
- **charged**: the window's counter in Redis, whose key names its window, read every POLL_S and
  once more `lead_ms` before the window ends (a counter expires with its window). It is what
  Redis granted: with leases, admitted + the units leased and not spent.

`failure_mode: deny`, so a failed callout cannot admit anything Redis did not count. Nothing here
asserts: the report gives admitted ÷ limit per window; the caller prints `loud_lines()`.
Imports the end-to-end harness (tests/): the importer (`run.py`) puts it on sys.path.
"""

import collections
import contextlib
import json
import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from envoy_harness import Envoy, envoy_command, envoy_config, plugin, rule, static_cluster, upstream_route, wait_ready
from envoy_harness import stop as stop_popen
from shim_harness import RedisConnection

RULE = "accuracy"
HOT_KEY = "hot"
WINDOW_MS = 1000
OVERLOAD = 4            # offered ÷ limit
CONNECTIONS = 32        # oha's, per gateway: enough for the offered rate at 20 ms per callout
POLL_S = 0.025          # how often the Redis counters are read
# The load starts this long before the first whole window (the gateways' connections to the
# upstream open in the partial window before it) and ends as long after it.
LEAD_IN_S = 0.75


# --- The counting upstream -----------------------------------------------------------------

class CountingUpstream:
    """HTTP/1.1 keep-alive server on a free loopback port: answers 200 and records, for every
    request, the gateway that sent it and Envoy's start time of it (µs since the epoch)."""

    def __init__(self):
        arrivals = self.arrivals = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                # list.append is atomic: one list for every connection thread.
                arrivals.append((self.headers.get("x-bench-gateway", "?"),
                                 epoch_us(self.headers.get("x-bench-start", "")), int(time.time() * 1e6)))
                self.send_response(200)
                self.send_header("content-length", "3")
                self.end_headers()
                self.wfile.write(b"ok\n")

            def log_message(self, *_):
                pass

        # A listen backlog for the gateways' connection bursts (the default, 5, drops SYNs: 503s).
        ThreadingHTTPServer.request_queue_size = 1024
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_):
        self.server.shutdown()
        self.server.server_close()


def epoch_us(start: str) -> int:
    """`%START_TIME(%s.%6f)%` ("1700000000.123456") as µs; -1 when absent or malformed."""
    seconds, _, micros = start.partition(".")
    try:
        return int(seconds) * 1_000_000 + int(micros.ljust(6, "0")[:6])
    except ValueError:
        return -1


# --- The Redis counters --------------------------------------------------------------------

# Every string key of the rule, with its value, in one round trip (the bench's Redis holds a
# handful of keys, so KEYS is cheap here). Non-string keys (whatever else a future algorithm
# keeps under the rule's prefix) are skipped: only the window counters are string counters.
READ_COUNTERS = """
local out = {}
for _, k in ipairs(redis.call('KEYS', ARGV[1])) do
  if redis.call('TYPE', k).ok == 'string' then
    out[#out + 1] = k
    out[#out + 1] = redis.call('GET', k)
  end
end
return out
"""


class WindowCounters:
    """A thread reading the rule's window counters (`<prefix>:{<rule>|...}:<window_ms>:<index>`)
    every POLL_S and `lead_ms` before each window's end; keeps the largest value of each window."""

    def __init__(self, host: str, port: int, lead_ms: float, key_prefix: str = "tollgate"):
        self.host, self.port, self.lead_ms = host, port, lead_ms
        self.pattern = f"{key_prefix}:{{{RULE}|*"
        self.shape = re.compile(rf"^{re.escape(key_prefix)}:\{{{RULE}\|[^}}]*\}}:{WINDOW_MS}:(\d+)$".encode())
        self.last = {}        # window index -> the counter's largest value seen
        self.errors = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self):
        try:
            with RedisConnection(self.port, self.host) as redis:
                while not self._stop.is_set():
                    reply = redis.call("EVAL", READ_COUNTERS, "0", self.pattern)
                    for key, value in zip(reply[::2], reply[1::2]):
                        m = self.shape.match(key)
                        if m and value is not None:
                            # The largest: a counter only grows, and one re-created after its
                            # window ended (see expired_keys) must not hide the original.
                            i = int(m.group(1))
                            self.last[i] = max(self.last.get(i, 0), int(value))
                    # Sleep POLL_S, or less to read once more just before the window ends.
                    now_ms = time.time() * 1000
                    to_last_read = (now_ms // WINDOW_MS + 1) * WINDOW_MS - self.lead_ms - now_ms
                    self._stop.wait((to_last_read if 0 < to_last_read < POLL_S * 1000 else POLL_S * 1000) / 1000)
        except Exception as e:  # noqa: BLE001 - reported, not raised: the admitted counts still stand
            self.errors.append(f"{type(e).__name__}: {e}")


# --- Configs and gateways ------------------------------------------------------------------

def expired_keys(addr: tuple) -> int:
    """Redis's count of keys expired so far (INFO stats): each window counter expires once, so
    more expirations than windows means counters re-created after their window had ended."""
    with RedisConnection(addr[1], addr[0]) as redis:
        info = redis.call("INFO", "stats").decode()
    return int(re.search(r"^expired_keys:(\d+)", info, re.M).group(1))


def plugin_config(limit: int, leases=None, **overrides) -> dict:
    """The one hot-key rule; `leases`: the plugin's `leases` object, sent only when given."""
    options = {"failure_mode": "deny", "clock": {"correct_skew": False}, **overrides}
    if leases is not None:
        options["leases"] = leases
    return plugin([rule(RULE, limit, window=f"{WINDOW_MS}ms", descriptors=["header:x-api-key"])], **options)


def gateway_config(name: str, plugin_cfg: dict, shim_port: int, upstream_port: int, wasm: Path,
                   port: int = 0, admin_port: int = 0) -> dict:
    """The harness's Envoy config, its one route proxied to the counting upstream with the
    request's start time and the gateway's name as headers."""
    r = upstream_route(RULE, {"prefix": "/"}, "counting_upstream")
    r["request_headers_to_add"] = [
        {"header": {"key": "x-bench-start", "value": "%START_TIME(%s.%6f)%"}},
        {"header": {"key": "x-bench-gateway", "value": name}},
    ]
    config = envoy_config(plugin_cfg, shim_port, port, admin_port, routes=[r],
                          clusters=[static_cluster("counting_upstream", upstream_port)])
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][0]["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(wasm)
    return config


def validates(config: dict, work: Path) -> bool:
    """`envoy --mode validate` of the config (it runs the filter's on_configure, which refuses
    unknown fields): the way to learn whether this build knows a plugin option."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / "validate.json"
    path.write_text(json.dumps(config, indent=1))
    cmd, env = envoy_command(path, ["--mode", "validate", "-l", "error"])
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    (work / "validate.log").write_text(p.stdout + p.stderr)
    return p.returncode == 0


def lease_plan(mode: str, supported: bool):
    """What to send for `--leases MODE` ("on", "off"; None: not asked, nothing sent) on a build
    that does or does not know the option: (the `leases` object or None, a label), or None
    when the mode cannot run on this build."""
    if mode is None:
        return None, "not sent (the build's default)"
    if not supported:
        return (None, "off (not sent: this build has no leases)") if mode == "off" else None
    return {"enabled": mode == "on"}, mode


def leases_supported(wasm: Path, work: Path) -> bool:
    return validates(gateway_config("probe", plugin_config(1, leases={"enabled": False}), 1, 1, wasm), work)


NOT_AVAILABLE = "leases: not available in this build (the plugin config refuses `leases`)"


@contextlib.contextmanager
def gateway(work: Path, config, concurrency: int, free_port):
    """One Envoy (`--concurrency` workers) on free loopback ports, its bootstrap
    `config(port, admin_port)`; stopped on exit."""
    work.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    path = work / "envoy.json"
    path.write_text(json.dumps(config(port, admin_port), indent=1))
    log = work / "envoy.log"
    cmd, env = envoy_command(path, ["--concurrency", str(concurrency), "-l", "warn", "--log-path", str(log)])
    with open(work / "envoy.stdout", "wb") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
    try:
        envoy = Envoy(popen, port, admin_port, log)
        wait_ready(envoy)
        yield envoy
    finally:
        stop_popen(popen)


# --- The phase -----------------------------------------------------------------------------

def measure(work: Path, shim_port: int, redis_addr: tuple, limit: int, windows: int, wasm: Path, oha: str,
            free_port, leases=None, lead_ms: float = 5, gateways: int = 2, concurrency: int = 2,
            load_cmd=lambda cmd: cmd) -> dict:
    """Starts the gateways and the counting upstream, offers OVERLOAD × `limit` per window to
    them together for `windows` whole windows, and returns the tally (see `tally`).
    `redis_addr`: where the counters are read (host, port); `load_cmd`: wraps oha's command
    (CPU pinning)."""
    rate = OVERLOAD * limit * 1000 / WINDOW_MS / gateways
    with CountingUpstream() as upstream, contextlib.ExitStack() as stack:
        envoys = [stack.enter_context(gateway(
            work / f"gw{i}",
            lambda port, admin, name=f"gw{i}": gateway_config(name, plugin_config(limit, leases), shim_port,
                                                              upstream.port, wasm, port, admin),
            concurrency, free_port)) for i in range(gateways)]
        expired_before = expired_keys(redis_addr)
        counters = stack.enter_context(WindowCounters(*redis_addr, lead_ms))
        # The load starts LEAD_IN_S before a window edge, so `windows` whole windows follow it.
        now = time.time()
        first = int(now * 1000 // WINDOW_MS) + 1
        if first * WINDOW_MS / 1000 - now < LEAD_IN_S + 0.05:
            first += 1
        time.sleep(first * WINDOW_MS / 1000 - LEAD_IN_S - now)
        duration_ms = int((2 * LEAD_IN_S) * 1000 + windows * WINDOW_MS)
        started = time.time()
        procs = [subprocess.Popen(
            load_cmd([oha, "--no-tui", "--output-format", "json", "-q", f"{rate:.0f}", "-z", f"{duration_ms}ms",
                      "-c", str(CONNECTIONS), "-H", f"x-api-key: {HOT_KEY}", f"http://127.0.0.1:{e.port}/"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for e in envoys]
        outputs = [p.communicate(timeout=duration_ms / 1000 + 60) for p in procs]
        ended = time.time()
        with open(work / "load.log", "w") as f:
            for out, err in outputs:
                f.write(out + err + "\n")
        # Let the last window's final read happen and its counter expire (Redis expires keys
        # lazily or in its 10 Hz cycle: give it time).
        time.sleep(max(0.0, (first + windows + 1) * WINDOW_MS / 1000 + 0.3 - time.time()))
        expired = expired_keys(redis_addr) - expired_before
        callouts_failed = sum(e.stat("cluster.tollgate_shim.upstream_rq_5xx") + e.stat("cluster.tollgate_shim.upstream_rq_4xx")
                              for e in envoys)
    statuses = collections.Counter()
    for p, (out, err) in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"oha failed ({p.returncode}): {err.strip()[-300:]}")
        statuses.update({str(k): v for k, v in json.loads(out).get("statusCodeDistribution", {}).items()})
    result = tally(upstream.arrivals, counters.last, limit, range(first, first + windows),
                   int(started * 1e6), int(ended * 1e6))
    result.update(gateways=gateways, workers=concurrency, offered_per_s=rate * gateways,
                  seconds=round(ended - started, 1), statuses=dict(statuses), callouts_failed=callouts_failed,
                  counter_errors=counters.errors, counters_expired=expired)
    return result


def tally(arrivals, charged: dict, limit: int, full: range, started_us: int, ended_us: int) -> dict:
    """Per window (the index in its Redis key): admitted (from the upstream's records), charged
    (Redis), admitted ÷ limit; `full` are the windows the load covered whole."""
    w_us = WINDOW_MS * 1000
    admitted, straddling, by_gateway = collections.Counter(), collections.Counter(), collections.defaultdict(collections.Counter)
    unknown = 0
    for gw, start_us, arrived_us in arrivals:
        if start_us < 0:
            unknown += 1
            continue
        i = start_us // w_us
        admitted[i] += 1
        by_gateway[i][gw] += 1
        if arrived_us // w_us != i:
            straddling[i] += 1
    first, last = started_us // w_us, ended_us // w_us
    rows = []
    for i in sorted(i for i in set(admitted) | set(charged) if first <= i <= last):
        rows.append({"window": i, "full": i in full, "admitted": admitted[i], "charged": charged.get(i),
                     "straddling": straddling[i], "by_gateway": dict(sorted(by_gateway[i].items()))})
    full_rows = [r for r in rows if r["full"]]
    charged_full = [r for r in full_rows if r["charged"] is not None]
    return {
        "limit": limit,
        "window_ms": WINDOW_MS,
        "windows": rows,
        "full_windows": len(full_rows),
        "max_ratio": max((r["admitted"] / limit for r in rows), default=None),
        "mean_ratio_full": sum(r["admitted"] for r in full_rows) / limit / len(full_rows) if full_rows else None,
        "max_charged_ratio": max((r["charged"] / limit for r in rows if r["charged"] is not None), default=None),
        "max_certain_ratio": max(((r["admitted"] - r["straddling"]) / limit for r in rows), default=None),
        # Charged and not admitted, over the whole windows: leased units never spent (and, with
        # or without leases, requests that Redis counted but whose reply came too late).
        "unspent_full": sum(r["charged"] - r["admitted"] for r in charged_full) if charged_full else None,
        "admitted_total": sum(admitted.values()),
        # Every admitted request is charged first, so more admitted than charged over the run
        # (whatever the windows) means requests admitted without a charge.
        "charged_total": sum(charged.get(r["window"]) or 0 for r in rows),
        "unattributed": unknown,
    }


def loud_lines(result: dict, label: str) -> list:
    """One line per window above its limit (admitted, or charged in Redis), for the console."""
    out, limit = [], result["limit"]
    for r in result["windows"]:
        certain = r["admitted"] - r["straddling"]
        if certain > limit:
            out.append(f"!!! ACCURACY ({label}): window {r['window']} admitted {certain} > limit {limit} "
                       f"({certain / limit:.3f}) !!!")
        elif r["admitted"] > limit:
            # Not a breach: Envoy started them in this window, the filter (a moment later) may
            # have counted them in the next; `certain` is within the limit.
            out.append(f"  note ({label}): window {r['window']} admitted {r['admitted']} by start time, "
                       f"{r['straddling']} of them straddling its end (the filter may have counted them in the next window)")
        if r["charged"] is not None and r["charged"] > limit:
            out.append(f"!!! ACCURACY ({label}): window {r['window']} charged {r['charged']} > limit {limit} in "
                       f"Redis !!!")
    if result["counters_expired"] > len(result["windows"]):
        out.append(f"!!! ACCURACY ({label}): Redis expired {result['counters_expired']} counters for "
                   f"{len(result['windows'])} windows: counters re-created after their window ended !!!")
    if result["admitted_total"] > result["charged_total"] and not result["counter_errors"]:
        out.append(f"!!! ACCURACY ({label}): {result['admitted_total']} admitted, only {result['charged_total']} "
                   f"charged in Redis !!!")
    return out
