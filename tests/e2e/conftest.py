"""Fixtures shared by the end-to-end tests: one Redis and one shim per test module."""

import json
import urllib.request

import pytest

from shim_harness import redis_cli, run_redis, run_shim


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """A Redis and a shim in front of it, shared by the module's tests."""
    base = tmp_path_factory.mktemp("backend")
    with run_redis(base / "redis") as redis_port, run_shim(base / "shim", redis_port) as shim_port:
        warm_up(shim_port)
        yield {"redis": redis_port, "shim": shim_port, "dir": base}


def warm_up(shim_port):
    """One check, so the composed script is loaded into Redis before the first timed request."""
    body = json.dumps({"requests": [{"checks": [{"key": "tollgate:{warm-up}:1000:0", "limit": 1, "ttl_ms": 1000}]}]})
    req = urllib.request.Request(f"http://127.0.0.1:{shim_port}/v1/check", data=body.encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


@pytest.fixture
def clean(backend):
    redis_cli(backend["redis"], "FLUSHALL")
    return backend


