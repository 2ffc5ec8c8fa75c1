"""Fixtures shared by the end-to-end tests: one Redis and one shim per test module."""

import pytest

from shim_harness import redis_cli, run_redis, run_shim


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """A Redis and a shim in front of it, shared by the module's tests."""
    base = tmp_path_factory.mktemp("backend")
    with run_redis(base / "redis") as redis_port, run_shim(base / "shim", redis_port) as shim_port:
        yield {"redis": redis_port, "shim": shim_port, "dir": base}


@pytest.fixture
def clean(backend):
    redis_cli(backend["redis"], "FLUSHALL")
    return backend


