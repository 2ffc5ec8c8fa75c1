"""A small HTTP/1.1 client for the end-to-end tests: one request, or many at a concurrency."""

import http.client
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor


class Response:
    def __init__(self, status: int, headers: dict, body: bytes, elapsed_s: float):
        self.status = status
        self.headers = headers  # lower-case names
        self.body = body
        self.elapsed_s = elapsed_s

    def __repr__(self):
        return f"<{self.status} {self.headers} {self.body[:200]!r}>"


def request(port: int, path: str = "/", headers=None, method: str = "GET", conn=None, timeout_s: float = 10.0) -> Response:
    """Sends one request to 127.0.0.1:port; a hung request fails after `timeout_s`."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    start = time.monotonic()
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, body, time.monotonic() - start)
    finally:
        if own:
            conn.close()


def hammer(port: int, n: int, concurrency: int, path: str = "/", headers=None) -> Counter:
    """Sends `n` requests over `concurrency` keep-alive connections; counts the statuses."""
    local = threading.local()

    def one(_):
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            return request(port, path, headers, conn=local.conn).status
        except (OSError, http.client.HTTPException):
            local.conn.close()
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            return request(port, path, headers, conn=local.conn).status

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return Counter(pool.map(one, range(n)))


def wait_for_window_room(window_s: float, needed_s: float):
    """Sleeps into a fresh window when fewer than `needed_s` seconds are left in this one,
    so a test's burst is not split across two fixed windows by the wall clock."""
    left = window_s - (time.time() % window_s)
    if left < needed_s:
        time.sleep(left + 0.05)
