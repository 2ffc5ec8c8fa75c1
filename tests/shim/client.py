"""What the shim tests share: the backend they talk to and one way to call the shim over HTTP
(docs/wire-format.md). Fixtures are in tests/shim/conftest.py."""

import http.client
import json
import time

from shim_harness import Proc, redis_cli


class Backend:
    """A Redis port and a running shim (a shim_harness.Proc: port, dir, log_tails())."""

    def __init__(self, redis_port: int, shim: Proc):
        self.redis = redis_port
        self.shim = shim


class Reply:
    """One HTTP answer: status, headers (lower-case names), raw body, and how long it took."""

    def __init__(self, status, headers, raw, elapsed_s):
        self.status, self.headers, self.raw, self.elapsed_s = status, headers, raw, elapsed_s

    @property
    def json(self):
        return json.loads(self.raw or b"{}")

    def __repr__(self):
        return f"<{self.status} {self.raw[:300]!r}>"


def compact(doc) -> str:
    return json.dumps(doc, separators=(",", ":"))


def call(port, body=None, path="/v1/check", method="POST", headers=None, conn=None, timeout=10) -> Reply:
    """One HTTP request to the shim; a dict or list body is sent as compact JSON, with
    Content-Type: application/json unless `headers` is given (then exactly those)."""
    if isinstance(body, (dict, list)):
        body = compact(body).encode()
    if headers is None:
        headers = {"Content-Type": "application/json"} if body is not None else {}
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.monotonic()
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, raw, time.monotonic() - start)
    finally:
        if own:
            conn.close()


def redis_now_us(port: int) -> int:
    """Redis's clock (TIME) in µs."""
    sec, usec = redis_cli(port, "TIME")
    return int(sec) * 1_000_000 + int(usec)


def redis_now_ms(port: int) -> int:
    """Redis's clock (TIME) in ms, as the scripts read it."""
    return redis_now_us(port) // 1000
