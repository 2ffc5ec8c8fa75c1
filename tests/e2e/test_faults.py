"""Faults under steady load, through real Envoy, the shim and Redis: Redis killed and
restarted, the shim killed and restarted, Redis made slow, the shim reloaded, a shim answering
garbage or hanging up mid-reply, and the local failure mode during an outage.

For each: every request sent gets an answer (none lost, none hung), the failure mode is
honoured, Envoy neither crashes nor reloads its Wasm VM, and limits are enforced from Redis again
soon after recovery. Each test prints its figures.
"""

import http.client
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from envoy_harness import plugin, rule, run_envoy
from http_client import request
from shim_harness import free_port, redis_cli, run_redis, run_shim, start_redis, start_shim, stop

# A limit nobody reaches: responses decided by Redis carry X-RateLimit-* headers, fail-open
# responses carry none, which tells the two apart.
OPEN_RULE = rule("steady", 1_000_000_000, descriptors=["header:x-user"])
CLIENT_TIMEOUT_S = 5


class Load:
    """Steady load: `workers` threads, each sending requests back to back over keep-alive."""

    def __init__(self, port, workers=6, path="/v1/search", headers=None):
        self.port, self.path = port, path
        self.headers = headers or {"x-user": "u1"}
        self.results = []  # (sent_at, status or None, latency_s, redis_decided)
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT_S)
        while not self.stop_flag.is_set():
            sent = time.monotonic()
            try:
                conn.request("GET", self.path, headers=self.headers)
                r = conn.getresponse()
                r.read()
                outcome = (sent, r.status, time.monotonic() - sent, r.getheader("x-ratelimit-limit") is not None)
            except (OSError, http.client.HTTPException):
                outcome = (sent, None, time.monotonic() - sent, False)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT_S)
            with self.lock:
                self.results.append(outcome)
            time.sleep(0.002)
        conn.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        for t in self.threads:
            t.join(CLIENT_TIMEOUT_S + 1)

    def figures(self, name):
        r = self.results
        answered = [x for x in r if x[1] is not None]
        figures = {
            "sent": len(r),
            "answered": len(answered),
            "allowed": sum(1 for x in answered if x[1] == 200),
            "denied": sum(1 for x in answered if x[1] == 429),
            "failed_open": sum(1 for x in answered if x[1] == 200 and not x[3]),
            "failed_closed": sum(1 for x in answered if x[1] == 503),
            "max_latency_ms": round(max((x[2] for x in r), default=0) * 1000),
        }
        print(f"\n{name}: {figures}")
        return figures

    def first_redis_decision_after(self, t):
        """Seconds from `t` to the first request sent after it that Redis decided."""
        times = [x[0] for x in self.results if x[0] >= t and x[3]]
        return min(times) - t if times else None


def kill_nginx(shim):
    """SIGKILL the shim's nginx master and its workers (the workers would keep serving)."""
    workers = subprocess.run(["pgrep", "-P", str(shim.popen.pid)], capture_output=True, text=True).stdout.split()
    kill(shim)
    for pid in workers:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def assert_envoy_healthy(envoy):
    """Checked on the Envoy as it was when its test finished with it."""
    assert envoy.alive_at_end, "Envoy must not crash"
    assert envoy.vm_reloads_at_end == 0, "the Wasm VM must not be reloaded (no panic)"


def kill(proc):
    proc.popen.send_signal(signal.SIGKILL)
    proc.popen.wait()


def test_redis_killed_and_restarted(tmp_path):
    redis_port = free_port()
    with run_shim(tmp_path / "shim", redis_port) as shim_port:
        redis = start_redis(tmp_path / "redis", port=redis_port)
        try:
            with run_envoy(tmp_path / "envoy", plugin([OPEN_RULE]), shim_port) as envoy, Load(envoy.port) as load:
                time.sleep(0.7)
                kill(redis)
                time.sleep(1.0)
                redis = start_redis(tmp_path / "redis", port=redis_port)
                back = time.monotonic()
                time.sleep(2.0)
            f = load.figures("Redis SIGKILL + restart")
            recovered = load.first_redis_decision_after(back)
            assert_envoy_healthy(envoy)
        finally:
            stop(redis)
    print(f"  decisions from Redis again {recovered:.2f}s after restart")
    assert f["answered"] == f["sent"] and f["sent"] > 100
    assert f["failed_open"] > 0, "the outage was noticed and failed open"
    assert f["allowed"] == f["answered"], "failure_mode allow never refuses"
    assert recovered is not None and recovered < 1.0


def test_shim_killed_and_restarted(tmp_path, backend):
    shim = start_shim(tmp_path / "shim", backend["redis"])
    try:
        config = plugin([OPEN_RULE], failure_mode="deny")
        with run_envoy(tmp_path / "envoy", config, shim.port) as envoy, Load(envoy.port) as load:
            time.sleep(0.7)
            kill_nginx(shim)
            time.sleep(1.0)
            shim = start_shim(tmp_path / "shim2", backend["redis"], port=shim.port)
            back = time.monotonic()
            time.sleep(2.0)
        f = load.figures("shim killed + restarted (failure_mode deny)")
        recovered = load.first_redis_decision_after(back)
        assert_envoy_healthy(envoy)
    finally:
        stop(shim)
    print(f"  decisions from Redis again {recovered:.2f}s after restart")
    assert f["answered"] == f["sent"]
    assert f["failed_closed"] > 0 and f["failed_open"] == 0
    assert recovered is not None and recovered < 1.0


@pytest.mark.parametrize("how", ["DEBUG SLEEP", "CLIENT PAUSE"])
def test_redis_made_slow(tmp_path, how):
    redis_args = ("--enable-debug-command", "yes")
    with run_redis(tmp_path / "redis", extra_args=redis_args) as redis_port, \
            run_shim(tmp_path / "shim", redis_port) as shim_port:
        config = plugin([OPEN_RULE], shim={"upstream": "tollgate_shim", "timeout": "200ms"})
        with run_envoy(tmp_path / "envoy", config, shim_port) as envoy, Load(envoy.port) as load:
            time.sleep(0.5)
            if how == "DEBUG SLEEP":
                threading.Thread(target=redis_cli, args=(redis_port, "DEBUG", "SLEEP", "1"), daemon=True).start()
            else:
                redis_cli(redis_port, "CLIENT", "PAUSE", "1000", "ALL")
            time.sleep(1.0)
            back = time.monotonic()
            time.sleep(1.5)
        f = load.figures(f"Redis slow ({how} 1 s)")
        recovered = load.first_redis_decision_after(back)
        assert_envoy_healthy(envoy)
    assert f["answered"] == f["sent"]
    assert f["failed_open"] > 0
    # Bounded by the 200 ms callout timeout (plus scheduling on a loaded machine).
    assert f["max_latency_ms"] < 1500
    assert recovered is not None and recovered < 1.0


def test_shim_reloaded_under_load(tmp_path, backend):
    with run_shim(tmp_path / "shim", backend["redis"]) as shim_port:
        config = plugin([OPEN_RULE], failure_mode="deny")
        with run_envoy(tmp_path / "envoy", config, shim_port) as envoy, Load(envoy.port) as load:
            time.sleep(0.5)
            for _ in range(3):
                subprocess.run(
                    ["nginx", "-p", f"{tmp_path / 'shim'}/", "-c", str(tmp_path / "shim" / "nginx.conf"), "-s", "reload"],
                    check=True, capture_output=True, timeout=10,
                )
                time.sleep(0.5)
        f = load.figures("shim reloaded 3x under load (failure_mode deny)")
        assert_envoy_healthy(envoy)
    assert f["answered"] == f["sent"]
    # A graceful reload finishes in-flight requests, but closes idle keep-alive connections: a
    # callout that Envoy sends on one at that instant fails (and takes the failure mode). A few
    # per reload at most, never a hang.
    assert f["failed_closed"] <= max(10, f["sent"] // 100), f


class BrokenShim:
    """A TCP server that answers every request with `reply` (bytes), then closes."""

    def __init__(self, reply):
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(self.reply)
            except OSError:
                pass

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("name,reply", [
    ("garbage", b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\nnot json!"),
    ("wrong shape", b'HTTP/1.1 200 OK\r\ncontent-length: 14\r\n\r\n{"results":[]}'),
    ("closed mid-reply", b'HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n{"results":[{"allo'),
    ("not http", b"\x00\x01garbage\r\n\r\n"),
])
def test_shim_answering_garbage(tmp_path, name, reply):
    broken = BrokenShim(reply)
    try:
        config = plugin([OPEN_RULE], failure_mode="deny")
        with run_envoy(tmp_path, config, broken.port) as envoy, Load(envoy.port, workers=4) as load:
            time.sleep(1.0)
        f = load.figures(f"shim answering {name} (failure_mode deny)")
        assert_envoy_healthy(envoy)
    finally:
        broken.close()
    assert f["answered"] == f["sent"] and f["sent"] > 10
    assert f["failed_closed"] == f["answered"]


def test_local_failure_mode_bounds_abuse_during_an_outage(tmp_path, backend):
    """The shim is down: each worker still enforces its share of the limit; when the shim is
    back, decisions come from Redis again."""
    shim_port = free_port()
    config = plugin(
        [rule("per_user", 10, descriptors=["header:x-user"])],
        failure_mode="local",
        local_fallback={"replicas": 1},
    )
    with run_envoy(tmp_path / "envoy", config, shim_port) as envoy:
        outage = [request(envoy.port, "/v1/search", {"x-user": "abuser"}).status for _ in range(100)]
        with run_shim(tmp_path / "shim", backend["redis"], port=shim_port):
            time.sleep(0.8)  # past the circuit breaker's pause
            after = request(envoy.port, "/v1/search", {"x-user": "someone-else"})
        local = envoy.stat("wasmcustom.tollgate_failed_local_total")
    assert_envoy_healthy(envoy)
    print(f"\nlocal failure mode, shim down: {outage.count(200)} of 100 abusive requests allowed "
          f"(limit 10), {local} local decisions")
    assert outage.count(200) == 10 and outage.count(429) == 90
    assert after.status == 200 and after.headers.get("x-ratelimit-limit") == "10", "Redis decides again"
