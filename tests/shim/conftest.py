"""Fixtures of the shim tests: a real Redis and a real shim (nginx), over HTTP."""

import pytest

from client import Backend
from shim_harness import redis_cli, run_redis, shim_process


@pytest.fixture(scope="module")
def backend(tmp_path_factory, request):
    """One Redis and one shim (1 worker, log level notice), shared by the module's tests. A
    module sets SHIM_ENV (a dict of settings) to start its shim with more, e.g. a longer read
    timeout or the test clock."""
    base = tmp_path_factory.mktemp("shim")
    env = dict(SHIM_LOG_LEVEL="notice", **getattr(request.module, "SHIM_ENV", {}))
    with run_redis(base / "redis") as redis_port, shim_process(base / "shim", redis_port, **env) as shim:
        yield Backend(redis_port, shim)


@pytest.fixture
def clean(backend):
    """The shared backend with an empty Redis."""
    redis_cli(backend.redis, "FLUSHALL")
    return backend
