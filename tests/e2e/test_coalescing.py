"""Coalesced callouts through real Envoy, the shim and Redis: one callout carries the checks of
many paused requests; admissions stay exact, a client that goes away never strands the others,
and a shim that stops answering never leaves a request paused.
"""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from envoy_harness import plugin, rule, run_envoy
from http_client import hammer, request, wait_for_window_room


class DelayingRelay:
    """A TCP relay in front of the shim that holds every reply chunk for `delay_s`, so callouts
    overlap and batches form (a fault injector on loopback, not a stand-in for the shim)."""

    def __init__(self, target_port, delay_s):
        self.target_port = target_port
        self.delay_s = delay_s
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while self.open:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, 0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.delay_s), daemon=True).start()

    @staticmethod
    def _pipe(src, dst, delay_s):
        try:
            while data := src.recv(65536):
                if delay_s:
                    time.sleep(delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.open = False
        self.sock.close()


def test_batches_form_and_admission_stays_exact(clean, tmp_path):
    relay = DelayingRelay(clean["shim"], 0.02)
    config = plugin([rule("batched", 150)], over_limit_cache=False)
    try:
        with run_envoy(tmp_path, config, relay.port) as envoy:
            wait_for_window_room(60, 20)
            counts = hammer(envoy.port, 600, 60, "/v1/search", {"x-api-key": "k"})
            callouts = envoy.stat("cluster.tollgate_shim.upstream_rq_total")
    finally:
        relay.close()
    print(f"coalescing: 600 requests at concurrency 60 → {dict(counts)} in {callouts} callouts "
          f"({600 / callouts:.1f} requests per callout)")
    assert counts == {200: 150, 429: 450}
    assert callouts < 200, "requests that arrive during a callout share the next one"


def test_clients_leaving_mid_batch_strand_nobody(clean, tmp_path):
    relay = DelayingRelay(clean["shim"], 0.15)
    config = plugin([rule("leavers", 10_000)], shim={"upstream": "tollgate_shim", "timeout": "1s"})
    try:
        with run_envoy(tmp_path, config, relay.port) as envoy:

            def leave_early(_):
                # Send a request and hang up before the verdict can arrive.
                with socket.create_connection(("127.0.0.1", envoy.port)) as s:
                    s.sendall(b"GET /v1/search HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\n\r\n")
                    time.sleep(0.03)

            def stay(_):
                return request(envoy.port, "/v1/search", {"x-api-key": "k"}, timeout_s=5)

            with ThreadPoolExecutor(40) as pool:
                for _ in range(3):
                    leavers = [pool.submit(leave_early, i) for i in range(20)]
                    stayers = [pool.submit(stay, i) for i in range(20)]
                    answers = [f.result() for f in stayers]
                    for f in leavers:
                        f.result()
                    assert [a.status for a in answers] == [200] * 20
                    assert max(a.elapsed_s for a in answers) < 2, "answered by the shim, not a timeout"
            assert envoy.proc.poll() is None
    finally:
        relay.close()


def test_blackholed_shim_under_load_answers_everyone_within_the_timeout(tmp_path):
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(1024)  # accepts (kernel backlog) and never answers
    config = plugin([rule("hole", 100)], failure_mode="deny", shim={"upstream": "tollgate_shim", "timeout": "200ms"})
    try:
        with run_envoy(tmp_path, config, hole.getsockname()[1]) as envoy:
            start = time.monotonic()
            with ThreadPoolExecutor(50) as pool:
                answers = list(pool.map(lambda _: request(envoy.port, "/v1/search", {"x-api-key": "k"}, timeout_s=10),
                                        range(300)))
            took = time.monotonic() - start
    finally:
        hole.close()
    slowest = max(a.elapsed_s for a in answers)
    print(f"blackholed shim: {len(answers)} sent, {len(answers)} answered "
          f"({sum(a.status == 503 for a in answers)} failed closed) in {took:.1f}s, slowest {slowest * 1000:.0f} ms")
    assert {a.status for a in answers} == {503}
    # Each request waits at most the callout timeout plus the watchdog's grace and a tick,
    # plus queueing behind at most two batches; far below the client's 10 s.
    assert slowest < 3
