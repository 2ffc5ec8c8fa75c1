"""Hostile input, end to end: huge and binary header values, separators and hash-tag braces,
empty values, one tenant crafting descriptors to land on another's counter, and cardinality
(100 000 distinct keys: Redis memory is bounded by the TTLs).
"""

import json
import socket
import time
import urllib.error
import urllib.request

from envoy_harness import plugin, rule, run_envoy
from http_client import request, wait_for_window_room
from shim_harness import redis_cli, redis_info

PER_KEY = rule("per_key", 1, descriptors=["header:x-api-key"])


def raw_request(port, header_block: bytes) -> int:
    """Sends a request whose headers are given as raw bytes; returns the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /v1/search HTTP/1.1\r\nhost: x\r\n" + header_block + b"connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def keys(redis_port):
    return sorted(redis_cli(redis_port, "KEYS", "tollgate:*"))


def test_huge_binary_and_tricky_values_get_their_own_bounded_keys(clean, tmp_path):
    values = [
        b"a" * 65536,                 # 64 KiB
        b"a" * 65535 + b"b",          # differs in its last byte only
        b"\xff\xfe\x80binary",        # not UTF-8
        b"a|=b}{c",                   # separators and hash-tag braces
        b"a%7C=b%7D%7Bc",             # the same, pre-encoded by the client
        b"",                          # empty
    ]
    with run_envoy(tmp_path, plugin([PER_KEY]), clean["shim"]) as envoy:
        wait_for_window_room(60, 10)
        first = [raw_request(envoy.port, b"x-api-key: " + v + b"\r\n") for v in values]
        second = [raw_request(envoy.port, b"x-api-key: " + v + b"\r\n") for v in values]
        anonymous = raw_request(envoy.port, b"")  # no header: rule skipped
        stored = keys(clean["redis"])
        assert envoy.proc.poll() is None
    print(f"\nhostile values → keys: {[k.decode() for k in stored]}")
    assert first == [200] * len(values), "each value has its own counter"
    assert second == [429] * len(values), "and it counts"
    assert anonymous == 200
    assert len(stored) == len(values)
    assert all(len(k) < 100 and b" " not in k for k in stored)
    assert all(k.count(b"{") == 1 and k.count(b"}") == 1 for k in stored)


def test_a_tenant_cannot_reach_another_tenants_counter(clean, tmp_path):
    """Tenant t1's user u1 exhausts its counter; every crafted (tenant, user) spelling that tries
    to land on the same key gets a counter of its own."""
    config = plugin([rule("tenant_user", 1, descriptors=["header:x-tenant", "header:x-user"])])
    # (Trailing whitespace is not a different value: HTTP trims it before anyone sees it.)
    crafted = [
        ("t1|=u1", ""), ("t1|", "=u1"), ("t1:", "u1"), ("t1%7C", "u1"), ("t1", "%75%31"),
        ("{t1", "u1}"), ("t1}", "u1"), ("T1", "u1"), ("t1\x00", "u1"), ("t1=", "u1"),
    ]
    with run_envoy(tmp_path, config, clean["shim"]) as envoy:
        wait_for_window_room(60, 10)
        victim = [request(envoy.port, "/", {"x-tenant": "t1", "x-user": "u1"}).status for _ in range(2)]
        attacks = []
        for tenant, user in crafted:
            try:
                attacks.append(request(envoy.port, "/", {"x-tenant": tenant, "x-user": user}).status)
            except ValueError:
                attacks.append("client refused")  # http.client rejects some bytes itself
    assert victim == [200, 429]
    assert all(s in (200, 400, "client refused") for s in attacks), attacks
    assert 429 not in attacks, f"a crafted descriptor hit the victim's counter: {list(zip(crafted, attacks))}"


def test_cardinality_is_bounded_by_ttl(clean):
    """100 000 distinct keys through the shim (8 s TTLs): memory grows while they live and
    returns once their TTLs pass."""
    port, redis_port = clean["shim"], clean["redis"]
    before = int(redis_info(redis_port, "memory")["used_memory"])
    t0 = time.time()
    window = int(t0) // 1
    total, per_body = 100_000, 100
    for start in range(0, total, per_body):
        body = {"requests": [
            {"checks": [{"key": f"tollgate:{{card|={i}}}:1000:{window}", "limit": 5, "ttl_ms": 8000}]}
            for i in range(start, min(start + per_body, total))
        ]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/check", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        for attempt in range(3):  # a loaded machine can push one script past the read timeout
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    assert r.status == 200
                break
            except urllib.error.HTTPError as e:
                assert e.code == 503 and attempt < 2, e.read()
    took = time.time() - t0
    peak_keys = redis_cli(redis_port, "DBSIZE")
    peak = int(redis_info(redis_port, "memory")["used_memory"])
    deadline = time.time() + 20
    while redis_cli(redis_port, "DBSIZE") > 1000 and time.time() < deadline:
        time.sleep(0.5)
    after_keys = redis_cli(redis_port, "DBSIZE")
    after = int(redis_info(redis_port, "memory")["used_memory"])
    per_key = (peak - before) / max(peak_keys, 1)
    print(f"\ncardinality: {total} distinct keys in {took:.1f}s; {peak_keys} live at peak, "
          f"+{(peak - before) / 1e6:.1f} MB ({per_key:.0f} B/key); {after_keys} left after their TTL, "
          f"+{(after - before) / 1e6:.1f} MB")
    assert peak_keys >= 0.9 * total
    assert after_keys <= 1000, "expired keys are removed by Redis itself"
    assert after - before < 0.2 * (peak - before)


def test_slow_clients_cannot_starve_the_shim(clean):
    """300 connections trickling a request (slowloris) neither block real checks nor stay open:
    the shim drops them after its 5 s header/body timeouts."""
    port = clean["shim"]
    slow = []
    for i in range(300):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /v1/check HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n" if i % 2 else b"POST /v1/ch")
        slow.append(s)
    body = json.dumps({"requests": [{"checks": [{"key": "tollgate:{slow|=k}:1000:1", "limit": 5, "ttl_ms": 1000}]}]})
    start = time.monotonic()
    for _ in range(20):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/check", data=body.encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
    took = time.monotonic() - start
    time.sleep(6)
    closed = 0
    for s in slow:
        s.settimeout(2)
        try:
            # nginx answers a timed-out request with 408 or resets it; either way it is gone.
            data = s.recv(4096)
            closed += data == b"" or data.startswith(b"HTTP/1.1 408")
        except ConnectionResetError:
            closed += 1
        except socket.timeout:
            pass  # still open: counts against the shim
        finally:
            s.close()
    print(f"\nslowloris: 20 checks answered in {took * 1000:.0f} ms beside 300 trickling connections; "
          f"{closed} of them closed by the shim after its timeouts")
    assert took < 2
    assert closed == 300
