"""End-to-end tests of the request lifecycle (issue 9, defects 1-4) through a real Envoy 1.40
loading the built `.wasm`, the real shim and a real Redis.

Each test reproduces one measurement of the issue and asserts the correct behaviour, so it fails
while the defect is there. Redis and the shim are shared by the module (conftest.py) and flushed
before each test; every Envoy gets its own random loopback ports and its log stays in the test's
tmp_path. Counting tests use one-hour fixed windows and first make sure the burst cannot straddle
a window edge.
"""

import json
import queue
import re
import socket
import subprocess
import threading
import time

from envoy_harness import envoy_command, envoy_config, plugin, rule, run_envoy
from helpers import statuses
from http_client import wait_for_window_room
from shim_harness import SHIM_DIR, free_port, redis_cli

# The wire bounds (lua-redis-shim/lib/tollgate/bounds.lua, which the shim and, through a
# unit test, the filter read), read, not copied.
BOUNDS_LUA = SHIM_DIR / "lib" / "tollgate" / "bounds.lua"


def shim_bound(name):
    """A bound of the shim's input, read from where it is defined."""
    text = BOUNDS_LUA.read_text()
    found = re.search(rf"^_M\.{name} = (\d+)\b", text, re.M)
    if not found:
        raise RuntimeError(f"no `_M.{name} = <n>` in {BOUNDS_LUA}")
    return int(found.group(1))


SHIM_MAX_CHECKS = shim_bound("MAX_CHECKS")  # checks per gateway request
SHIM_MAX_KEY_BYTES = shim_bound("MAX_KEY_BYTES")

HOUR = 3600

# Eight client-supplied descriptor values of 64 bytes each: short enough to be kept verbatim
# (values above 64 bytes are hashed), together far over the shim's key bound.
LONG_DESCRIPTORS = [f"header:x-d{i}" for i in range(8)]
LONG_HEADERS = {f"x-d{i}": chr(ord("a") + i) * 64 for i in range(8)}


def log_tail(envoy, lines=20):
    """The filter's lines and Envoy's warnings and errors, from the end of its log."""
    relevant = [line for line in envoy.log().splitlines()
                if "wasm log" in line or "][warning][" in line or "][error][" in line]
    return f"envoy log {envoy.log_path} (filter lines, warnings, errors; last {lines}):\n" + "\n".join(relevant[-lines:])


def failed_open(envoy):
    return envoy.stat("wasmcustom.tollgate_failed_open_total")


def validate(tmp_path, plugin_config):
    """`envoy --mode validate` on a bootstrap with this plugin config: (exit code, output)."""
    config_path = tmp_path / "envoy.json"
    config_path.write_text(json.dumps(envoy_config(plugin_config, free_port(), free_port(), free_port()), indent=1))
    cmd, env = envoy_command(config_path, ["--mode", "validate", "-l", "info"])
    result = subprocess.run(cmd, env=env, capture_output=True, timeout=60, cwd=tmp_path)
    return result.returncode, result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")


def tail_text(text, lines=30):
    return "\n".join(text.splitlines()[-lines:])


# --- 1. Configs that silently turn rate limiting off ----------------------------------------

def test_config_with_more_checks_than_the_shim_takes_is_refused(tmp_path):
    """Defect 1a: 9 rules x 4 limits is 36 checks per request, more than the shim's 32 per
    request. Today the filter loads it, the shim answers 400 to every request and the failure
    mode lets everything through. The filter must refuse the config at load, naming `rules`,
    so `envoy --mode validate` fails."""
    limits = [{"limit": 2, "window": w} for w in ("1s", "10s", "1m", "1h")]
    rules = [rule(f"r{i}", descriptors=["header:x-api-key"], limits=limits) for i in range(9)]
    checks = len(rules) * len(limits)
    assert checks > SHIM_MAX_CHECKS
    code, log = validate(tmp_path, plugin(rules))
    assert code != 0, f"a config of {checks} checks per request validated:\n" + tail_text(log)
    assert re.search(r"invalid plugin configuration: rules\b", log), tail_text(log)


def test_client_supplied_values_cannot_make_a_key_the_shim_refuses(clean, tmp_path):
    """Defect 1b: a rule with 8 header descriptors, each value 64 client-supplied bytes, makes a
    key over the shim's 512-byte bound. Today the shim answers 400 and the filter fails open:
    six requests against limit 2 all get 200. Keys must be bounded by construction (the tuple
    hashed when too long), so the limit holds."""
    config = plugin([rule("long", 2, window="1h", descriptors=LONG_DESCRIPTORS)])
    with run_envoy(tmp_path, config, clean["shim"]) as envoy:
        wait_for_window_room(HOUR, 15)
        seen = statuses(envoy, 6, headers=LONG_HEADERS)
        opened = failed_open(envoy)
        keys = [k.decode() for k in redis_cli(clean["redis"], "KEYS", "tollgate:*")]
    assert seen == [200, 200, 429, 429, 429, 429], (
        f"statuses {seen}, {opened} requests failed open, Redis keys {keys}\n{log_tail(envoy)}")
    assert all(len(k) <= SHIM_MAX_KEY_BYTES for k in keys), keys


# --- 2. One bad request disables limiting for the worker ------------------------------------

def test_requests_the_shim_refuses_do_not_switch_limiting_off(clean, tmp_path):
    """Defect 2: a 400 for one request counts as a breaker failure per request, so 8 requests
    with an over-long key (defect 1b's) open the circuit breaker and the worker stops asking
    the shim: a normal key with limit 3 then gets six 200s (failure_mode allow, the default).
    A request the shim refuses must fail alone and the breaker must not open: the normal key
    gets 3 x 200, then 3 x 429."""
    rules = [
        rule("long", 100, window="1h", descriptors=LONG_DESCRIPTORS, match={"path_prefix": "/long"}),
        rule("normal", 3, window="1h", match={"path_prefix": "/v1/search"}),
    ]
    with run_envoy(tmp_path, plugin(rules), clean["shim"]) as envoy:
        wait_for_window_room(HOUR, 15)
        long_key = statuses(envoy, 8, path="/long", headers=LONG_HEADERS)
        opened_before = failed_open(envoy)
        normal = statuses(envoy, 6, headers={"x-api-key": "k"})
        opened = failed_open(envoy) - opened_before
    # A healthy shim and Redis: a normal request that failed open was never sent (breaker open).
    assert normal == [200, 200, 200, 429, 429, 429], (
        f"normal key: {normal} after the long-key requests got {long_key}; {opened} of the six "
        f"failed open (circuit breaker)\n{log_tail(envoy)}")


# --- 3. The over-limit cache denies what Redis would allow ---------------------------------

def test_over_limit_cache_does_not_deny_a_higher_tier_on_the_same_key(clean, tmp_path):
    """Defect 3: the over-limit cache is keyed by the counter key alone. With tiers whose tier
    descriptor (`header:x-plan`) is not one of the rule's descriptors, `free` (limit 2) and
    `pro` (limit 10) callers with the same api key share that key: once a free caller is denied,
    the cache denies the pro caller too, while Redis holds a count of 2 and would admit 8 more.
    The cache must never deny what Redis would allow."""
    tiers = {
        "descriptor": "header:x-plan",
        "values": {"free": [{"limit": 2, "window": "1h"}], "pro": [{"limit": 10, "window": "1h"}]},
        "default": [{"limit": 1, "window": "1h"}],
    }
    config = plugin([rule("plan", descriptors=["header:x-api-key"], tiers=tiers)])
    assert config.get("over_limit_cache", True), "the default: the cache is on"
    with run_envoy(tmp_path, config, clean["shim"]) as envoy:
        wait_for_window_room(HOUR, 15)
        free = statuses(envoy, 3, headers={"x-api-key": "K", "x-plan": "free"})
        pro = statuses(envoy, 8, headers={"x-api-key": "K", "x-plan": "pro"})
        hits = envoy.stat("wasmcustom.tollgate_cache_hits_total")
        counts = {k.decode(): redis_cli(clean["redis"], "GET", k) for k in redis_cli(clean["redis"], "KEYS", "tollgate:*")}
    assert free == [200, 200, 429], f"the free caller: {free}\n{log_tail(envoy)}"
    assert pro == [200] * 8, f"the pro caller after the free one: {pro}; {hits} cache hits; Redis counters {counts}"


# --- 4. Concurrency slots leak when the client aborts mid-check ------------------------------

class DelayProxy:
    """A TCP proxy in front of the shim that holds every byte Envoy sends for `delay_s` before
    passing it on (replies come back at once), so a check is still in flight when its client
    gives up. Like a network, it delivers what Envoy sent even after Envoy closed the connection
    (a cancelled callout), and waits for the shim's answer before hanging up on the shim."""

    def __init__(self, target_port, delay_s):
        self.target_port = target_port
        self.delay_s = delay_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(down,), daemon=True).start()

    def _serve(self, down):
        try:
            up = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            down.close()
            return
        with self.lock:
            self.sockets += [down, up]
        chunks = queue.Queue()
        last = {"sent": 0.0, "answered": 0.0}

        def forward():
            # In order, each chunk `delay_s` after it arrived; None: Envoy closed its side.
            while True:
                due, data = chunks.get()
                time.sleep(max(0.0, due - time.monotonic()))
                if data is None:
                    break
                try:
                    up.sendall(data)
                except OSError:
                    break
                last["sent"] = time.monotonic()
            # Give the shim up to 2 s to answer what it got last, then hang up.
            end = time.monotonic() + 2
            while last["answered"] < last["sent"] and time.monotonic() < end:
                time.sleep(0.02)
            up.close()

        def back():
            while True:
                try:
                    data = up.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                last["answered"] = time.monotonic()
                try:
                    down.sendall(data)
                except OSError:
                    pass  # Envoy left; keep reading so the shim is never blocked
            down.close()

        threading.Thread(target=forward, daemon=True).start()
        threading.Thread(target=back, daemon=True).start()
        while True:
            try:
                data = down.recv(65536)
            except OSError:
                data = b""
            chunks.put((time.monotonic() + self.delay_s, data or None))
            if not data:
                return

    def close(self):
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                try:
                    s.close()
                except OSError:
                    pass


def send_and_abort(port, headers, after_s):
    """Sends one request, closes the connection after `after_s`; returns what came back by
    then (b"" when nothing did)."""
    head = "GET /v1/search HTTP/1.1\r\nhost: tollgate-test\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head.encode())
        time.sleep(after_s)
        s.setblocking(False)
        try:
            return s.recv(65536)
        except BlockingIOError:
            return b""


def test_client_abort_during_the_check_does_not_leak_concurrency_slots(clean, tmp_path):
    """Defect 4: a client that aborts while its check is in flight leaves its concurrency slot
    taken until the slot timeout (60 s): the request's own callout is cancelled with the stream
    and nobody releases what Redis granted. A delay proxy holds each callout 300 ms; twenty
    clients abort after 100 ms; then, 1.5 s later, three sequential requests on the same key
    (limit 2) get three 429s today. They must all get 200, and no slot may stay held."""
    delay_s, abort_after_s = 0.3, 0.1
    proxy = DelayProxy(clean["shim"], delay_s)
    config = plugin([rule("inflight", algorithm="concurrency", limit=2)])
    headers = {"x-api-key": "k"}
    key = "tollgate:{inflight|=k}:conc"
    try:
        with run_envoy(tmp_path, config, proxy.port) as envoy:
            early = [send_and_abort(envoy.port, headers, abort_after_s) for _ in range(20)]
            time.sleep(1.5)  # past the proxy's delay (twice over), far below the 60 s slot timeout
            held_before = redis_cli(clean["redis"], "ZCARD", key)
            after = statuses(envoy, 3, headers=headers)
            # Releases go through the proxy too: allow them a moment to land.
            end = time.monotonic() + 2
            held = redis_cli(clean["redis"], "ZCARD", key)
            while held and time.monotonic() < end:
                time.sleep(0.1)
                held = redis_cli(clean["redis"], "ZCARD", key)
    finally:
        proxy.close()
    # Each aborted request left before its check was answered (else this proves nothing).
    assert early == [b""] * 20, f"answered before the abort: {[r[:40] for r in early if r]}"
    assert after == [200, 200, 200], (
        f"after 20 aborted requests: {after}; {held_before} slots held before them\n{log_tail(envoy)}")
    assert held == 0, f"{held} concurrency slots still held in {key}"
