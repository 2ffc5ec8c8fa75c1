"""Processes for the shim and end-to-end tests: a Redis, the lua-redis-shim, a tiny RESP client.

Every process listens on a random loopback port, is waited for with a deadline, and is stopped
(terminate, wait, kill) when its context manager exits, even when the test failed. Its logs stay
in the directory the caller gave (pytest's tmp_path), and a process that does not come up fails
with the tail of its logs. Standard library only.

    with run_redis(tmp_path / "redis") as redis_port, run_shim(tmp_path / "shim", redis_port) as shim_port:
        ...
"""

import contextlib
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIM_DIR = ROOT / "lua-redis-shim"
STARTUP_TIMEOUT_S = 10.0

# Inherited settings that would make a test depend on the shell it runs in.
_HERMETIC_PREFIXES = ("REDIS_", "SHIM_", "TOLLGATE_")


class RedisError(Exception):
    """An error reply from Redis."""


@dataclass
class Proc:
    """A started process: its Popen, its port, and where its logs are."""

    popen: subprocess.Popen
    port: int
    dir: Path
    logs: list

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(f"--- {p} (last {lines} lines)\n{tail(p, lines)}" for p in self.logs)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def stop(proc: Proc, timeout_s: float = 10.0) -> None:
    """SIGTERM (nginx and Redis both stop at once), then SIGKILL if it lingers."""
    p = proc.popen
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout_s)


def _wait_until(proc: Proc, ready, what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.popen.returncode}\n{proc.log_tails()}")
        if ready():
            return
        time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"{what} not ready after {STARTUP_TIMEOUT_S}s\n{proc.log_tails()}")


# --- Redis ----------------------------------------------------------------------------------

class RedisConnection:
    """One connection to a Redis, for commands sent one after another (a poller, a session).
    `call` returns the reply as `redis_cli` does and raises an error reply as RedisError."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout_s: float = 5.0):
        self._sock = socket.create_connection((host, port), timeout=timeout_s)
        self._f = self._sock.makefile("rwb")

    def call(self, *args):
        self._f.write(_resp_command(args))
        self._f.flush()
        reply = _read_reply(self._f)
        if isinstance(reply, RedisError):
            raise reply
        return reply

    def close(self):
        self._f.close()
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def redis_cli(port: int, *args, db: int = 0, timeout_s: float = 5.0):
    """Runs one command on a new connection (after SELECT db when db != 0) and returns its
    reply: str for a status, int, bytes or None for a bulk string, list for an array. An error
    reply raises RedisError."""
    with RedisConnection(port, timeout_s=timeout_s) as r:
        if db:
            r.call("SELECT", db)
        return r.call(*args)


def _resp_command(args) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


def _read_reply(f):
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError(f"connection closed mid-reply: {line!r}")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RedisError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise ConnectionError(f"unexpected RESP line {line!r}")


def redis_info(port: int, section: str) -> dict:
    """INFO <section> as a dict of strings."""
    text = redis_cli(port, "INFO", section).decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def start_redis(dir, port: int = None, extra_args=()) -> Proc:
    """A redis-server on 127.0.0.1 (port: given, else free) without persistence; its log is
    dir/redis.log. extra_args: more redis-server options, e.g. ("--requirepass", "secret")."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = dir / "redis.log"
    popen = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(dir), "--logfile", str(log), *extra_args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    proc = Proc(popen, port, dir, [log])

    def answers():
        try:
            redis_cli(port, "PING", timeout_s=1)
        except RedisError:
            pass  # NOAUTH from a password-protected Redis: it is up
        except OSError:
            return False
        return True

    _wait_until(proc, answers, f"redis-server on port {port}")
    return proc


@contextlib.contextmanager
def run_redis(dir, port: int = None, extra_args=()):
    """Yields the port of a fresh Redis; stops it on exit."""
    proc = start_redis(dir, port, extra_args)
    try:
        yield proc.port
    finally:
        stop(proc)


# --- The shim -------------------------------------------------------------------------------

def start_shim(dir, redis_port: int, shim_dir: Path = SHIM_DIR, port: int = None, **env) -> Proc:
    """`lua-redis-shim/shim --prefix dir` on a free port, with REDIS_PORT=redis_port and `env`
    (e.g. REDIS_POOL_SIZE=4). Ready when GET /healthz answers at all: a shim whose Redis is
    down answers 503, which some tests want. Logs: dir/logs/error.log and dir/stderr.log."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(_HERMETIC_PREFIXES)}
    full_env.update(SHIM_LISTEN=f"127.0.0.1:{port}", REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis_port))
    full_env.update({k: str(v) for k, v in env.items()})
    stderr_log = dir / "stderr.log"
    with open(stderr_log, "wb") as err:
        popen = subprocess.Popen(
            [str(shim_dir / "shim"), "--prefix", str(dir)],
            env=full_env, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
        )
    proc = Proc(popen, port, dir, [dir / "logs" / "error.log", stderr_log])

    def answers():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    _wait_until(proc, answers, f"the shim on port {port}")
    return proc


@contextlib.contextmanager
def shim_process(dir, redis_port: int, port: int = None, **env):
    """Yields the shim's Proc (port, dir, log_tails()); stops it on exit."""
    proc = start_shim(dir, redis_port, port=port, **env)
    try:
        yield proc
    finally:
        stop(proc)


@contextlib.contextmanager
def run_shim(dir, redis_port: int, port: int = None, **env):
    """Yields the port of a shim in front of Redis on redis_port (on `port`, else a free one);
    stops it on exit."""
    with shim_process(dir, redis_port, port=port, **env) as proc:
        yield proc.port
