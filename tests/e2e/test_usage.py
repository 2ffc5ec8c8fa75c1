"""Usage rules end to end: tokens and bytes counted from the response and charged after it,
through real Envoy, the shim and Redis, in front of a small local upstream that answers JSON
with a `usage` object, server-sent events with a final usage chunk, and large bodies.
"""

import http.server
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlparse

import pytest

from envoy_harness import DEFAULT_ROUTES, plugin, rule, run_envoy, static_cluster, upstream_route
from http_client import request
from shim_harness import redis_cli


class Upstream:
    """An LLM-like and download-like upstream on a random loopback port (standard library only).

    GET /llm/json?tokens=N      JSON with usage.prompt_tokens + usage.completion_tokens = N
    GET /llm/sse?tokens=N       text/event-stream: a few content events, then the usage chunk
    GET /files/bytes?n=N&ms=M   N bytes, sent in 64 KiB chunks M ms apart
    """

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_):
                pass

            def do_GET(self):
                url = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                try:
                    if url.path == "/llm/json":
                        n = int(q["tokens"])
                        body = json.dumps({"id": "cmpl-1", "choices": [{"text": "hi"}],
                                           "usage": {"prompt_tokens": n // 3, "completion_tokens": n - n // 3,
                                                     "total_tokens": n}}).encode()
                        self.send_response(200)
                        self.send_header("content-type", "application/json")
                        self.send_header("content-length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                    elif url.path == "/llm/sse":
                        n = int(q["tokens"])
                        self.send_response(200)
                        self.send_header("content-type", "text/event-stream")
                        self.send_header("transfer-encoding", "chunked")
                        self.end_headers()
                        events = [json.dumps({"choices": [{"delta": {"content": f"w{i}"}}]}) for i in range(3)]
                        events.append(json.dumps({"choices": [], "usage": {"total_tokens": n}}))
                        for e in [*events, "[DONE]"]:
                            self._chunk(f"data: {e}\n\n".encode())
                            time.sleep(0.01)
                        self._chunk(b"")
                    elif url.path == "/files/bytes":
                        n, pause = int(q["n"]), int(q.get("ms", "0")) / 1000
                        self.send_response(200)
                        self.send_header("content-type", "application/octet-stream")
                        self.send_header("content-length", str(n))
                        self.end_headers()
                        sent = 0
                        while sent < n:
                            part = min(64 * 1024, n - sent)
                            self.wfile.write(b"x" * part)
                            self.wfile.flush()
                            sent += part
                            time.sleep(pause)
                    else:
                        self.send_response(404)
                        self.send_header("content-length", "0")
                        self.end_headers()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _chunk(self, data):
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.close()


ROUTES = [upstream_route("llm", {"prefix": "/llm"}, "upstream"),
          upstream_route("files", {"prefix": "/files"}, "upstream"), *DEFAULT_ROUTES]


def gateway(tmp_path, clean, upstream, rules, **kw):
    return run_envoy(tmp_path, plugin(rules, **kw), clean["shim"], routes=ROUTES,
                     clusters=[static_cluster("upstream", upstream.port)])


def counter(clean, rule_name, key, window_ms):
    """The Redis counter of a fixed-window usage rule for `key`, in the current window."""
    index = int(time.time() * 1000) // window_ms
    v = redis_cli(clean["redis"], "GET", f"tollgate:{{{rule_name}|={key}}}:{window_ms}:{index}")
    return int(v) if v else 0


def wait_for(predicate, timeout_s=3.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_llm_tokens_from_json_are_charged_after_the_response_and_enforced(clean, tmp_path, upstream):
    """100 tokens per hour per key: each request reserves 1 token, the JSON usage is charged
    after the response, and once the budget is spent the next request is denied before it
    goes upstream, with a deny body naming the budget and `qu` in RateLimit-Policy."""
    rules = [rule("llm_tokens", 100, window="1h", match={"path_prefix": "/llm"},
                  usage={"from": "json:usage.prompt_tokens+usage.completion_tokens"})]
    with gateway(tmp_path, clean, upstream, rules, headers_on_allow=True) as envoy:
        h = {"x-api-key": "k1"}
        first = request(envoy.port, "/llm/json?tokens=30", h)
        assert first.status == 200, first
        assert 'qu="tokens"' in first.headers["ratelimit-policy"]
        assert wait_for(lambda: counter(clean, "llm_tokens", "k1", 3_600_000) == 30)
        for _ in range(2):
            assert request(envoy.port, "/llm/json?tokens=30", h).status == 200
        assert wait_for(lambda: counter(clean, "llm_tokens", "k1", 3_600_000) == 90)
        # 10 left: admitted (the reserve fits), then it consumes 40: the budget is overspent.
        assert request(envoy.port, "/llm/json?tokens=40", h).status == 200
        assert wait_for(lambda: counter(clean, "llm_tokens", "k1", 3_600_000) == 130)
        denied = request(envoy.port, "/llm/json?tokens=1", h)
        assert denied.status == 429
        body = json.loads(denied.body)
        assert body["detail"] == 'Usage budget "llm_tokens" exceeded: 100 tokens per 3600s.'
        assert counter(clean, "llm_tokens", "k1", 3_600_000) == 130, "a denied request charges nothing"
        assert request(envoy.port, "/llm/json?tokens=5", {"x-api-key": "k2"}).status == 200, "own budget"
        # Five responses, one counter each; charges go out at the root's next tick.
        assert wait_for(lambda: envoy.stat("wasmcustom.tollgate_usage_charges_total") == 5)
        assert envoy.stat("wasmcustom.tollgate_usage_charge_failures_total") == 0


def test_sse_final_usage_chunk_and_response_bytes(clean, tmp_path, upstream):
    """The last server-sent event that carries usage.total_tokens is the amount; a bytes rule
    counts what the body sent."""
    rules = [rule("stream_tokens", 1000, window="1h", match={"path_prefix": "/llm/sse"},
                  usage={"from": "sse:usage.total_tokens", "reserve": 0}),
             rule("download", 10 * 1024 * 1024, window="1h", match={"path_prefix": "/files"},
                  usage={"from": "bytes", "reserve": 0})]
    with gateway(tmp_path, clean, upstream, rules) as envoy:
        h = {"x-api-key": "s"}
        r = request(envoy.port, "/llm/sse?tokens=77", h)
        assert r.status == 200 and b"[DONE]" in r.body
        assert wait_for(lambda: counter(clean, "stream_tokens", "s", 3_600_000) == 77)
        r = request(envoy.port, "/files/bytes?n=3000000", h)
        assert r.status == 200 and len(r.body) == 3_000_000
        assert wait_for(lambda: counter(clean, "download", "s", 3_600_000) == 3_000_000)


def test_a_client_that_leaves_mid_download_is_charged_what_was_sent(clean, tmp_path, upstream):
    rules = [rule("download", 10**12, window="1h", match={"path_prefix": "/files"},
                  usage={"from": "bytes", "reserve": 0})]
    with gateway(tmp_path, clean, upstream, rules) as envoy:
        s = socket.create_connection(("127.0.0.1", envoy.port))
        s.sendall(b"GET /files/bytes?n=20000000&ms=20 HTTP/1.1\r\nhost: x\r\nx-api-key: d\r\n\r\n")
        got = 0
        while got < 1_000_000:
            chunk = s.recv(65536)
            assert chunk
            got += len(chunk)
        s.close()
        # Charged once the stream ends (Envoy resets it when the downstream goes away).
        assert wait_for(lambda: counter(clean, "download", "d", 3_600_000) > 0, timeout_s=5)
        time.sleep(0.5)
        charged = counter(clean, "download", "d", 3_600_000)
        # What passed the filter: at least what the client read, far less than the file.
        assert 1_000_000 <= charged < 20_000_000, charged


def test_budget_across_two_gateways_and_overspend_under_concurrency(clean, tmp_path, upstream):
    """Two gateways share one budget. n concurrent streams admitted against the last units of
    a budget overspend it by at most what they consume in flight; the reserve bounds how many
    get in."""
    limit, tokens, n = 1000, 50, 10
    rules = [rule("shared", limit, window="1h", match={"path_prefix": "/llm"},
                  usage={"from": "json:usage.total_tokens", "reserve": tokens})]
    with gateway(tmp_path / "a", clean, upstream, rules) as a, \
            gateway(tmp_path / "b", clean, upstream, rules) as b:
        h = {"x-api-key": "team"}
        statuses = [request((a, b)[i % 2].port, f"/llm/json?tokens={tokens}", h).status for i in range(10)]
        assert statuses == [200] * 10
        assert wait_for(lambda: counter(clean, "shared", "team", 3_600_000) == 500)
        # 500 left. 20 concurrent requests of 50 tokens each, reserving 50: exactly 10 fit.
        with ThreadPoolExecutor(20) as pool:
            got = list(pool.map(lambda i: request((a, b)[i % 2].port, f"/llm/json?tokens={tokens}", h).status,
                                range(20)))
        assert got.count(200) == n and got.count(429) == 20 - n, got
        assert wait_for(lambda: counter(clean, "shared", "team", 3_600_000) == limit)
        # With no reserve, everything in flight while the budget still has room gets in: the
        # overspend is what those requests consume.
    rules_no_reserve = [rule("loose", limit, window="1h", match={"path_prefix": "/llm"},
                             usage={"from": "json:usage.total_tokens", "reserve": 0})]
    with gateway(tmp_path / "c", clean, upstream, rules_no_reserve) as c:
        h = {"x-api-key": "team"}
        with ThreadPoolExecutor(20) as pool:
            got = list(pool.map(lambda _: request(c.port, "/llm/json?tokens=100", h).status, range(20)))
        admitted = got.count(200)
        assert wait_for(lambda: counter(clean, "loose", "team", 3_600_000) == 100 * admitted)
        overspend = 100 * admitted - limit
        print(f"no reserve, 20 concurrent requests of 100 tokens against 1000: {admitted} admitted, "
              f"overspend {max(overspend, 0)} tokens")
        assert admitted >= 10, got
