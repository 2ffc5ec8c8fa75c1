"""The lua-redis-shim's Redis connection layer against real servers: TLS with a least-privilege ACL
user (lua-redis-shim/acl.conf), a Sentinel failover, and Redis Cluster (slots, MOVED/ASK during a
resharding). Every process runs on random loopback ports under pytest's tmp_path and is stopped
even when a test fails; failures quote the logs.

Needs redis-server, redis-cli and redis-sentinel (Debian: redis-server, redis-tools,
redis-sentinel) and openssl.
"""

import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from client import call
from shim_harness import (
    SHIM_DIR, Proc, RedisError, _wait_until, free_port, redis_cli, redis_info, shim_process,
    start_redis, stop, tail,
)

ACL_FILE = SHIM_DIR / "acl.conf"
SCRIPTS = SHIM_DIR / "scripts"
PASSWORD = "s3cret-shim-pw"
ADMIN_PASSWORD = "admin-pw"

pytestmark = pytest.mark.skipif(
    not (shutil.which("redis-server") and shutil.which("redis-cli") and shutil.which("openssl")),
    reason="needs redis-server, redis-cli and openssl",
)


# --- HTTP helpers ---------------------------------------------------------------------------

def fw(name, limit, cost=1, prefix="tollgate"):
    """A fixed_window check on tollgate:{name}:w."""
    return {"key": f"{prefix}:{{{name}}}:w", "limit": limit, "ttl_ms": 60000, "cost": cost}


def one(*checks):
    return {"requests": [{"checks": list(checks)}]}


def check_ok(shim: Proc, body):
    r = call(shim.port, body)
    status, reply = r.status, r.json
    assert status == 200, f"{status} {reply}\n{shim.log_tails()}"
    return reply["results"]


def healthz(shim: Proc) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{shim.port}/healthz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize("env,message", [
    ({"REDIS_SENTINELS": "127.0.0.1:1"}, "REDIS_SENTINELS needs REDIS_SENTINEL_MASTER"),
    ({"REDIS_SENTINELS": "localhost", "REDIS_SENTINEL_MASTER": "m"}, "is not host:port"),
    ({"REDIS_CLUSTER_NODES": "127.0.0.1:1", "REDIS_SENTINELS": "127.0.0.1:2",
      "REDIS_SENTINEL_MASTER": "m"}, "exclude each other"),
    ({"REDIS_CLUSTER_NODES": "127.0.0.1:1", "REDIS_DB": "2"}, "REDIS_DB must be 0"),
    ({"REDIS_TLS": "1", "REDIS_TLS_VERIFY": "1"}, "REDIS_TLS_VERIFY=1 needs REDIS_TLS_CA_FILE"),
    ({"REDIS_TLS": "maybe"}, "REDIS_TLS=maybe: must be 1 or 0"),
])
def test_bad_settings_refuse_to_start(tmp_path, env, message):
    with pytest.raises(RuntimeError) as e:
        with shim_process(tmp_path / "shim", 1, **env):
            pass
    assert message in str(e.value), str(e.value)


# --- TLS and ACL ----------------------------------------------------------------------------

def make_certs(dir: Path):
    """A throwaway CA and a server certificate for DNS:redis.test and IP:127.0.0.1."""
    dir.mkdir(parents=True, exist_ok=True)

    def ssl(*args):
        subprocess.run(["openssl", *args], cwd=dir, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=tollgate test CA",
        "-keyout", "ca.key", "-out", "ca.crt")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=redis.test", "-keyout", "redis.key",
        "-out", "redis.csr")
    (dir / "ext.cnf").write_text("subjectAltName=DNS:redis.test,IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "redis.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "ext.cnf", "-out", "redis.crt")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=tollgate shim", "-keyout", "client.key",
        "-out", "client.csr")
    ssl("x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-out", "client.crt")
    # nginx's workers (user nobody when started as root) read the CA bundle, and pytest's tmp
    # dirs are private: the CA certificate (public) goes to a world-readable directory.
    public = Path(tempfile.mkdtemp(prefix="tollgate-ca-"))
    public.chmod(0o755)
    shutil.copy(dir / "ca.crt", public / "ca.crt")
    (public / "ca.crt").chmod(0o644)
    _public_dirs.append(public)
    return {"ca": public / "ca.crt", "cert": dir / "redis.crt", "key": dir / "redis.key",
            "client_cert": dir / "client.crt", "client_key": dir / "client.key"}


_public_dirs = []


@pytest.fixture(scope="module", autouse=True)
def _remove_public_dirs():
    yield
    while _public_dirs:
        shutil.rmtree(_public_dirs.pop(), ignore_errors=True)


def shipped_acl_line(password=PASSWORD):
    """acl.conf's line with a password appended (the shipped file has none: nobody can log in
    as the shim's user until the operator adds one)."""
    lines = [l for l in ACL_FILE.read_text().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("user tollgate "), lines
    return f"{lines[0]} >{password}"


def start_tls_redis(dir: Path, certs, auth_clients="no") -> Proc:
    """A TLS-only redis-server (no plain port) with the shipped ACL user, an admin user for the
    test's own commands, and the default user off."""
    dir.mkdir(parents=True, exist_ok=True)
    acl = dir / "users.acl"
    acl.write_text("\n".join([
        shipped_acl_line(),
        f"user admin on >{ADMIN_PASSWORD} ~* &* +@all",
        "user default off",
    ]) + "\n")
    port = free_port()
    log = dir / "redis.log"
    popen = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
         "--tls-cert-file", str(certs["cert"]), "--tls-key-file", str(certs["key"]),
         "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", auth_clients,
         "--aclfile", str(acl), "--save", "", "--appendonly", "no", "--dir", str(dir),
         "--logfile", str(log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = Proc(popen, port, dir, [log])
    _wait_until(proc, lambda: tls_cli(port, certs, "admin", ADMIN_PASSWORD, "PING") == "PONG",
                f"TLS redis-server on {port}")
    return proc


def tls_cli(port, certs, user, password, *args):
    """redis-cli over TLS (verifying the server with the test CA, presenting the client
    certificate); its output, stripped."""
    r = subprocess.run(
        ["redis-cli", "--tls", "--cacert", str(certs["ca"]), "--sni", "redis.test", "-h", "127.0.0.1",
         "--cert", str(certs["client_cert"]), "--key", str(certs["client_key"]),
         "-p", str(port), "--user", user, "--pass", password, "--no-auth-warning", *args],
        capture_output=True, text=True, timeout=10)
    return (r.stdout + r.stderr).strip()


@pytest.fixture(scope="module")
def tls_backend(tmp_path_factory):
    base = tmp_path_factory.mktemp("tls")
    certs = make_certs(base / "certs")
    redis = start_tls_redis(base / "redis", certs)
    try:
        yield {"base": base, "certs": certs, "redis": redis}
    finally:
        stop(redis)


def tls_env(certs, **over):
    env = dict(REDIS_TLS="1", REDIS_TLS_CA_FILE=str(certs["ca"]), REDIS_TLS_SERVER_NAME="redis.test",
               REDIS_USER="tollgate", REDIS_PASSWORD=PASSWORD)
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def test_acl_allows_exactly_the_commands_the_shim_and_scripts_use():
    """acl.conf grants the scripts' redis.call commands plus the shim's own, and nothing else."""
    line = shipped_acl_line()
    granted = {w[1:].lower() for w in line.split() if w.startswith("+")}
    in_scripts = set()
    for f in SCRIPTS.glob("*.lua"):
        in_scripts |= {c.lower() for c in re.findall(r'(?:call|pcall_?)\("([A-Z]+)"', f.read_text())}
    # FCALL and FUNCTION LOAD (the check script as a function library), EVALSHA and SCRIPT LOAD
    # (release, charge, and the check where functions are unavailable), PING (/healthz), ROLE
    # (Sentinel: is it the master?), ASKING and CLUSTER SLOTS (Redis Cluster). AUTH needs no
    # grant; SELECT is added with REDIS_DB.
    shim_own = {"fcall", "function|load", "evalsha", "script|load", "ping", "role", "asking", "cluster|slots"}
    assert in_scripts <= granted, f"scripts call {sorted(in_scripts - granted)} not in acl.conf"
    assert granted == in_scripts | shim_own, f"acl.conf grants more: {sorted(granted - in_scripts - shim_own)}"
    assert " ~tollgate:* " in line and "-@all" in line and "resetchannels" in line
    assert "nopass" not in line and ">" not in ACL_FILE.read_text()


def test_check_over_tls_as_the_acl_user(tls_backend, tmp_path):
    certs, redis = tls_backend["certs"], tls_backend["redis"]
    with shim_process(tmp_path / "shim", redis.port, **tls_env(certs)) as shim:
        conf = (tmp_path / "shim" / "nginx.conf").read_text()
        assert f'lua_ssl_trusted_certificate "{certs["ca"]}";' in conf
        # Every algorithm once, and a release: every command the scripts use is allowed.
        body = {"requests": [{"checks": [
            fw("tls-a", 5),
            {"alg": "sliding_window", "key": "tollgate:{tls-a}:sw:2", "prev_key": "tollgate:{tls-a}:sw:1",
             "limit": 5, "window_ms": 60000, "weight_ms": 30000},
            {"alg": "sliding_log", "key": "tollgate:{tls-a}:log", "limit": 5, "window_ms": 60000, "id": "r1"},
            {"alg": "token_bucket", "key": "tollgate:{tls-a}:tb", "burst": 5, "rate": 1, "period_ms": 1000},
            {"alg": "gcra", "key": "tollgate:{tls-a}:gcra", "burst": 5, "rate": 1, "period_ms": 1000},
            {"alg": "concurrency", "key": "tollgate:{tls-a}:conc", "limit": 5, "ttl_ms": 30000, "id": "r1"},
        ]}]}
        results = check_ok(shim, body)
        assert results[0]["allowed"] is True, results
        assert [c["allowed"] for c in results[0]["checks"]] == [True] * 6
        assert check_ok(shim, one(fw("tls-a", 5)))[0]["checks"][0]["count"] == 2
        r = call(shim.port, {"releases": [{"key": "tollgate:{tls-a}:conc", "id": "r1"}]},
                 path="/v1/release")
        status, reply = r.status, r.json
        assert (status, reply) == (200, {"released": 1}), shim.log_tails()
        with urllib.request.urlopen(f"http://127.0.0.1:{shim.port}/healthz", timeout=5) as r:
            assert r.status == 200
        assert tls_cli(redis.port, certs, "admin", ADMIN_PASSWORD, "GET", "tollgate:{tls-a}:w") == "2"


def test_the_acl_refuses_keys_outside_the_prefix(tls_backend, tmp_path):
    certs, redis = tls_backend["certs"], tls_backend["redis"]
    as_shim = lambda *a: tls_cli(redis.port, certs, "tollgate", PASSWORD, *a)  # noqa: E731
    assert as_shim("SET", "tollgate:{x}:k", "1") == "OK"
    assert "NOPERM" in as_shim("SET", "other:{x}:k", "1")
    assert "NOPERM" in as_shim("GET", "other:{x}:k")
    assert "NOPERM" in as_shim("FLUSHALL")
    assert "NOPERM" in as_shim("CONFIG", "GET", "*")
    assert "NOPERM" in as_shim("EVAL", "return 1", "0")
    assert "NOPERM" in as_shim("KEYS", "*")
    # Through the shim: a shim configured with another prefix gets its keys refused by Redis,
    # inside the script (the EVALSHA's KEYS are checked first).
    with shim_process(tmp_path / "shim", redis.port, **tls_env(certs), TOLLGATE_KEY_PREFIX="other") as shim:
        r = call(shim.port, one(fw("x", 5, prefix="other")))
        status, reply = r.status, r.json
        assert status == 503 and reply["error"] == "backend_unavailable", reply
        assert "NOPERM" in reply["message"] or "permission" in reply["message"], reply
    assert tls_cli(redis.port, certs, "admin", ADMIN_PASSWORD, "EXISTS", "other:{x}:w") == "0"


@pytest.mark.parametrize("what,env,expect", [
    ("wrong password", {"REDIS_PASSWORD": "nope"}, "WRONGPASS"),
    ("no TLS", {"REDIS_TLS": None, "REDIS_TLS_CA_FILE": None, "REDIS_TLS_SERVER_NAME": None}, "redis 127.0.0.1"),
    # lua-nginx-module 0.10.23 sometimes reports a failed host check as a successful handshake
    # on a closed connection (then "AUTH: closed"): nothing is sent either way.
    ("wrong server name", {"REDIS_TLS_SERVER_NAME": "other.test"}, "certificate host mismatch"),
])
def test_backend_unavailable(tls_backend, tmp_path, what, env, expect):
    certs, redis = tls_backend["certs"], tls_backend["redis"]
    with shim_process(tmp_path / "shim", redis.port, **tls_env(certs, **env)) as shim:
        messages = []
        for _ in range(6):
            r = call(shim.port, one(fw("bad", 5)))
            status, reply = r.status, r.json
            assert status == 503 and reply["error"] == "backend_unavailable", (what, reply)
            messages.append(reply["message"])
        assert all(expect in m or "AUTH: closed" in m for m in messages), (what, messages)
        assert any(expect in m for m in messages), (what, messages)


def test_tls_verification_fails_with_another_ca(tls_backend, tmp_path):
    certs, redis = tls_backend["certs"], tls_backend["redis"]
    other = make_certs(tmp_path / "other-ca")
    with shim_process(tmp_path / "shim", redis.port, **tls_env(certs, REDIS_TLS_CA_FILE=str(other["ca"]))) as shim:
        messages = []
        for _ in range(6):
            r = call(shim.port, one(fw("bad", 5)))
            status, reply = r.status, r.json
            assert status == 503, reply
            messages.append(reply["message"])
        assert all("TLS handshake" in m or "AUTH: closed" in m for m in messages), messages
        # (Or "AUTH: closed": see test_backend_unavailable.)
        assert any("TLS handshake" in m for m in messages), messages
    # Without verification (REDIS_TLS_VERIFY=0, no CA) the same server is accepted.
    with shim_process(tmp_path / "shim2", redis.port,
                      **tls_env(certs, REDIS_TLS_CA_FILE=None, REDIS_TLS_VERIFY="0")) as shim:
        check_ok(shim, one(fw("noverify", 5)))


# --- Sentinel -------------------------------------------------------------------------------

FAILOVER_BOUND_S = 10.0


def start_sentinel(dir: Path, master_port: int, name="m", tls_lines=None, ready=None) -> Proc:
    """A redis-sentinel monitoring 127.0.0.1:master_port as `name`: quorum 1, down after
    500 ms, failover timeout 2 s. tls_lines(port): config lines for a TLS-only sentinel."""
    dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = dir / "sentinel.log"
    conf = dir / "sentinel.conf"  # Sentinel rewrites its config file: it must be writable
    conf.write_text("\n".join([
        "bind 127.0.0.1", *(tls_lines(port) if tls_lines else [f"port {port}"]), f"dir {dir}", f"logfile {log}",
        f"sentinel monitor {name} 127.0.0.1 {master_port} 1",
        f"sentinel down-after-milliseconds {name} 500",
        f"sentinel failover-timeout {name} 2000",
        f"sentinel parallel-syncs {name} 1",
    ]) + "\n")
    popen = subprocess.Popen(["redis-sentinel", str(conf)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = Proc(popen, port, dir, [log])

    def answers():
        try:
            return redis_cli(port, "PING", timeout_s=1) == "PONG"
        except OSError:
            return False

    _wait_until(proc, ready and (lambda: ready(port)) or answers, f"redis-sentinel on {port}")
    return proc


def wait_for(what, cond, timeout_s=20.0, every_s=0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except (OSError, RedisError):
            pass
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture
def sentinel_setup(tmp_path):
    if not shutil.which("redis-sentinel"):
        pytest.skip("needs redis-sentinel (Debian: redis-sentinel)")
    procs = []
    try:
        primary = start_redis(tmp_path / "primary")
        procs.append(primary)
        replica = start_redis(tmp_path / "replica", extra_args=("--replicaof", "127.0.0.1", str(primary.port)))
        procs.append(replica)
        wait_for("the replica to sync", lambda: redis_info(replica.port, "replication")
                 .get("master_link_status") == "up")
        sentinels = [start_sentinel(tmp_path / f"sentinel{i}", primary.port) for i in range(3)]
        procs.extend(sentinels)
        # Every sentinel knows the replica and the two other sentinels before anything fails.
        for s in sentinels:
            wait_for("sentinels to discover each other and the replica", lambda s=s: (
                (m := dict(zip(*[iter(redis_cli(s.port, "SENTINEL", "MASTER", "m"))] * 2)))
                and m[b"num-slaves"] == b"1" and m[b"num-other-sentinels"] == b"2"))
        yield {"primary": primary, "replica": replica, "sentinels": sentinels, "dir": tmp_path}
    finally:
        for p in reversed(procs):
            stop(p)


def sentinel_env(setup, **over):
    env = dict(REDIS_SENTINELS=",".join(f"127.0.0.1:{s.port}" for s in setup["sentinels"]),
               REDIS_SENTINEL_MASTER="m", SHIM_LOG_LEVEL="info", REDIS_CONNECT_TIMEOUT_MS="1000",
               REDIS_READ_TIMEOUT_MS="2000")
    env.update(over)
    return env


def test_sentinel_failover_after_the_primary_is_killed(sentinel_setup):
    s = sentinel_setup
    primary, replica = s["primary"], s["replica"]
    with shim_process(s["dir"] / "shim", primary.port, **sentinel_env(s)) as shim:
        for i in range(20):
            assert check_ok(shim, one(fw("ha", 1000)))[0]["checks"][0]["count"] == i + 1
        # Acknowledged by the replica: nothing of it can be lost in the failover.
        assert redis_cli(primary.port, "WAIT", 1, 2000) == 1

        primary.popen.send_signal(signal.SIGKILL)
        primary.popen.wait(5)
        start = time.monotonic()
        failures = 0
        while True:
            r = call(shim.port, one(fw("ha", 1000)), timeout=5)
            status, reply = r.status, r.json
            if status == 200:
                break
            assert status == 503 and reply["error"] == "backend_unavailable", reply
            failures += 1
            assert time.monotonic() - start < FAILOVER_BOUND_S, \
                f"no recovery within {FAILOVER_BOUND_S}s: {reply}\n{shim.log_tails()}"
            time.sleep(0.05)
        took = time.monotonic() - start
        print(f"\nSentinel failover: checks succeed again {took:.2f}s after SIGKILL of the primary "
              f"({failures} requests answered 503 meanwhile; bound {FAILOVER_BOUND_S}s)")
        # The promoted replica had every acknowledged count: the counter continues at 21.
        assert reply["results"][0]["checks"][0]["count"] == 21, reply
        assert redis_info(replica.port, "replication")["role"] == "master"
        assert int(redis_cli(replica.port, "GET", "tollgate:{ha}:w")) == 21
        assert "Sentinel master m is now 127.0.0.1:%d" % replica.port in tail(shim.dir / "logs" / "error.log", 200)
        assert healthz(shim) == 200


def test_sentinel_switchover_with_the_old_primary_alive(sentinel_setup):
    """SENTINEL FAILOVER demotes the primary, which stays up: pooled connections to it now get
    READONLY, and the shim re-resolves instead of failing until its cache expires."""
    s = sentinel_setup
    primary, replica = s["primary"], s["replica"]
    with shim_process(s["dir"] / "shim", primary.port,
                      **sentinel_env(s, REDIS_SENTINEL_REFRESH_MS="600000")) as shim:
        for i in range(5):
            assert check_ok(shim, one(fw("sw", 1000)))[0]["checks"][0]["count"] == i + 1
        assert redis_cli(primary.port, "WAIT", 1, 2000) == 1
        assert redis_cli(s["sentinels"][0].port, "SENTINEL", "FAILOVER", "m") == "OK"
        wait_for("the old primary to be a replica of the new one", lambda: redis_info(
            primary.port, "replication").get("master_port") == str(replica.port)
            and redis_info(primary.port, "replication").get("master_link_status") == "up")
        start = time.monotonic()
        results = []
        while len(results) < 5 and time.monotonic() - start < FAILOVER_BOUND_S:
            results.append(call(shim.port, one(fw("sw", 1000))).status)
        took = time.monotonic() - start
        print(f"\nSentinel switchover: statuses after it {results} ({took:.2f}s)")
        assert results == [200] * 5, shim.log_tails()
        assert int(redis_cli(replica.port, "GET", "tollgate:{sw}:w")) == 10


# --- Redis Cluster --------------------------------------------------------------------------

def crc16_xmodem(data: bytes) -> int:
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def keyslot(key: str) -> int:
    """The Redis Cluster spec's HASH_SLOT (the model of tollgate.cluster.keyslot)."""
    k = key.encode()
    s = k.find(b"{")
    if s >= 0:
        e = k.find(b"}", s + 1)
        if e > s + 1:
            k = k[s + 1:e]
    return crc16_xmodem(k) % 16384


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port > 55535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three primaries, no replicas, all 16384 slots assigned by `redis-cli --cluster create`."""
    base = tmp_path_factory.mktemp("cluster")
    procs = []
    try:
        for i in range(3):
            port = cluster_port()
            procs.append(start_redis(base / f"node{i}", port, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "5000")))
        r = subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p.port}" for p in procs],
                            "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        for p in procs:
            wait_for("cluster_state:ok", lambda p=p: redis_info(p.port, "cluster") is not None and
                     "cluster_state:ok" in redis_cli(p.port, "CLUSTER", "INFO").decode())
        # Every node has the same view of the slots (gossip converged): no test sees a MOVED
        # it did not cause.
        slot_views = lambda: {str(sorted((r[0], r[1], r[2][1]) for r in redis_cli(p.port, "CLUSTER", "SLOTS")))  # noqa: E731
                              for p in procs}
        wait_for("the nodes to agree on the slot map", lambda: len(slot_views()) == 1 and
                 sum(r[1] - r[0] + 1 for r in redis_cli(procs[0].port, "CLUSTER", "SLOTS")) == 16384)
        yield {"nodes": procs, "dir": base}
    finally:
        for p in procs:
            stop(p)


def cluster_env(cluster, **over):
    # Generous timeouts: these tests are about redirections, not about a loaded test machine.
    env = dict(REDIS_CLUSTER_NODES=",".join(f"127.0.0.1:{p.port}" for p in cluster["nodes"][:2]),
               SHIM_LOG_LEVEL="info", REDIS_CONNECT_TIMEOUT_MS="1000", REDIS_SEND_TIMEOUT_MS="1000",
               REDIS_READ_TIMEOUT_MS="2000")
    env.update(over)
    return env


def owner(cluster, slot):
    """The port of the node serving `slot`."""
    for start, end, master, *_ in redis_cli(cluster["nodes"][0].port, "CLUSTER", "SLOTS"):
        if start <= slot <= end:
            return master[1]
    raise AssertionError(f"slot {slot} unserved")


def node_id(port):
    return redis_cli(port, "CLUSTER", "MYID").decode()


def cluster_get(cluster, key):
    v = redis_cli(owner(cluster, keyslot(key)), "GET", key)
    return None if v is None else int(v)


def redirections(shim: Proc) -> int:
    log = tail(shim.dir / "logs" / "error.log", 100000)
    return len(re.findall(r"redis cluster: (MOVED|ASK|TRYAGAIN)", log))


CLUSTER_KEYS = [f"tollgate:{{k{i}}}:w" for i in range(200)] + [
    "tollgate:{}:w", "tollgate:{a}b}:w", "tollgate:{{x}}:w", "tollgate:{user:1000}:w",
    "tollgate:{rule|=10.0.0.1}:60000:29384756", "tollgate:{x{y}z}:w",
]


def test_keyslot_matches_cluster_keyslot(cluster):
    port = cluster["nodes"][0].port
    for k in CLUSTER_KEYS:
        assert keyslot(k) == redis_cli(port, "CLUSTER", "KEYSLOT", k), k


def test_cluster_groups_checks_by_slot_without_redirections(cluster, tmp_path):
    """One body with checks on ~200 slots over the 3 nodes: every group goes straight to its
    owner (a wrong slot computed in Lua would show as a MOVED, or a CROSSSLOT 503)."""
    with shim_process(tmp_path / "shim", cluster["nodes"][0].port, **cluster_env(cluster)) as shim:
        keys = [k for k in CLUSTER_KEYS if k.startswith("tollgate:{") and "{}" not in k]
        nodes_hit = {owner(cluster, keyslot(k)) for k in keys}
        assert len(nodes_hit) == 3
        body = {"requests": [{"checks": [
            {"key": k, "limit": 3, "ttl_ms": 60000} for k in keys[i:i + 8]]}
            for i in range(0, len(keys), 8)]}
        for round_ in range(4):
            r = call(shim.port, body)
            status, reply = r.status, r.json
            assert status == 200, (reply, shim.log_tails())
            for req in reply["results"]:
                assert req["allowed"] is (round_ < 3), req
                assert all(c["count"] == min(round_ + 1, 3) for c in req["checks"]), req
        for k in keys:
            assert cluster_get(cluster, k) == 3, k
        assert redirections(shim) == 0, shim.log_tails()
        r = call(shim.port, {"releases": [
            {"key": f"tollgate:{{c{i}}}:conc", "id": "x"} for i in range(20)]}, path="/v1/release")
        status, reply = r.status, r.json
        assert (status, reply) == (200, {"released": 0})


def test_cluster_request_across_slots_is_decided_per_slot(cluster, tmp_path):
    """A request whose checks land in two slots: the slot where it fits is charged even though
    the other denies it (over-counting, never over-admission), as documented."""
    a, b = "tollgate:{xa}:w", "tollgate:{xb}:w"
    assert keyslot(a) != keyslot(b)
    with shim_process(tmp_path / "shim", cluster["nodes"][0].port, **cluster_env(cluster)) as shim:
        assert check_ok(shim, one({"key": b, "limit": 1, "ttl_ms": 60000}))[0]["allowed"]
        res = check_ok(shim, one({"key": a, "limit": 5, "ttl_ms": 60000}, {"key": b, "limit": 1, "ttl_ms": 60000}))[0]
        assert res["allowed"] is False, res
        assert [c["allowed"] for c in res["checks"]] == [True, False]
        assert cluster_get(cluster, a) == 1 and cluster_get(cluster, b) == 1


def hammer(port, make_body, n=None, concurrency=20, stop_event=None):
    """Sends single-check requests from `concurrency` threads: n in all, or until stop_event.
    Returns the list of (status, allowed or error)."""
    out, lock, sent = [], threading.Lock(), [0]

    def worker():
        while True:
            with lock:
                if (n is not None and sent[0] >= n) or (stop_event is not None and stop_event.is_set()):
                    return
                sent[0] += 1
            r = call(port, make_body())
            status, reply = r.status, r.json
            with lock:
                out.append((status, reply["results"][0]["allowed"] if status == 200 else reply))

    with ThreadPoolExecutor(concurrency) as ex:
        for f in [ex.submit(worker) for _ in range(concurrency)]:
            f.result()
    return out


def test_cluster_exact_admission(cluster, tmp_path):
    key = "tollgate:{exact}:w"
    for node in cluster["nodes"]:
        # Earlier tests of the module loaded the script: the shim must load it again.
        redis_cli(node.port, "SCRIPT", "FLUSH")
        redis_cli(node.port, "FUNCTION", "FLUSH")
    with shim_process(tmp_path / "shim", cluster["nodes"][0].port, **cluster_env(cluster, SHIM_WORKERS=2)) as shim:
        start = time.monotonic()
        out = hammer(shim.port, lambda: one({"key": key, "limit": 100, "ttl_ms": 60000}), n=500)
        took = time.monotonic() - start
        statuses = [s for s, _ in out]
        allowed = sum(1 for s, a in out if s == 200 and a is True)
        print(f"\nCluster exact admission: 500 requests at concurrency 20 in {took:.2f}s: "
              f"{allowed} allowed (limit 100), {statuses.count(503)} x 503")
        assert statuses == [200] * 500, [o for o in out if o[0] != 200][:3]
        assert allowed == 100 and cluster_get(cluster, key) == 100
        assert healthz(shim) == 200
        # Connections to cluster nodes are counted like any other (tollgate.metrics).
        with urllib.request.urlopen(f"http://127.0.0.1:{shim.port}/metrics", timeout=5) as r:
            samples = dict(line.rsplit(" ", 1) for line in r.read().decode().splitlines()
                           if line and not line.startswith("#"))
        print(f"  shim metrics: {float(samples['tollgate_shim_redis_reconnects_total']):.0f} Redis connections "
              f"opened, {float(samples['tollgate_shim_script_loads_total']):.0f} script loads")
        assert float(samples["tollgate_shim_redis_reconnects_total"]) >= 1
        assert float(samples["tollgate_shim_script_loads_total"]) >= 1, "the nodes start without the script"


def test_cluster_resharding_during_load_loses_no_decision(cluster, tmp_path):
    """The slot of the hot key moves to another node (SETSLOT IMPORTING/MIGRATING, MIGRATE, SETSLOT
    NODE) while 20 clients hammer it: every request is answered 200, the shim follows ASK during
    the migration and MOVED after it, and admission stays exact."""
    key, limit = "tollgate:{resharded}:w", 1500
    slot = keyslot(key)
    src = owner(cluster, slot)
    dst = next(p.port for p in cluster["nodes"] if p.port != src)
    src_id, dst_id = node_id(src), node_id(dst)
    with shim_process(tmp_path / "shim", cluster["nodes"][0].port, **cluster_env(cluster, SHIM_WORKERS=2)) as shim:
        # The slot map is fetched before the move (so the shim has to be redirected).
        check_ok(shim, one({"key": key, "limit": limit, "ttl_ms": 60000}))
        stop_event = threading.Event()
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("out", hammer(
            shim.port, lambda: one({"key": key, "limit": limit, "ttl_ms": 60000}), stop_event=stop_event)))
        t.start()
        try:
            time.sleep(0.3)
            assert redis_cli(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id) == "OK"
            assert redis_cli(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id) == "OK"
            time.sleep(0.3)  # migrating, key still on the source: served there
            keys = redis_cli(src, "CLUSTER", "GETKEYSINSLOT", slot, 100)
            assert keys == [key.encode()]
            assert redis_cli(src, "MIGRATE", "127.0.0.1", dst, "", 0, 5000, "KEYS", *keys) == "OK"
            time.sleep(0.3)  # key moved, slot still migrating: ASK to the target
            for p in (dst, src, *[p.port for p in cluster["nodes"] if p.port not in (src, dst)]):
                assert redis_cli(p, "CLUSTER", "SETSLOT", slot, "NODE", dst_id) == "OK"
            time.sleep(0.5)  # moved for good: MOVED from the source
        finally:
            stop_event.set()
            t.join(60)
        out = result["out"]
        statuses = [s for s, _ in out]
        allowed = sum(1 for s, a in out if s == 200 and a is True) + 1
        final = int(redis_cli(dst, "GET", key))
        moved = len(re.findall(r"redis cluster: MOVED", tail(shim.dir / "logs" / "error.log", 100000)))
        asked = len(re.findall(r"redis cluster: ASK", tail(shim.dir / "logs" / "error.log", 100000)))
        print(f"\nCluster resharding under load: {len(out) + 1} requests, {allowed} allowed "
              f"(limit {limit}), {statuses.count(503)} x 503, {moved} MOVED and {asked} ASK followed, "
              f"counter on the new owner {final}")
        assert owner(cluster, slot) == dst
        assert statuses.count(200) == len(out), [o for o in out if o[0] != 200][:3]
        assert allowed == min(len(out) + 1, limit) and final == allowed
        assert moved > 0 and asked > 0, shim.log_tails()


def test_tls_client_certificate(tls_backend, tmp_path):
    """Redis with tls-auth-clients yes: the shim presents REDIS_TLS_CLIENT_CERT/KEY (read by the
    master process: the key stays in a directory the workers cannot read); without them the
    handshake fails."""
    certs = tls_backend["certs"]
    redis = start_tls_redis(tmp_path / "redis", certs, auth_clients="yes")
    try:
        with shim_process(tmp_path / "shim", redis.port, **tls_env(
                certs, REDIS_TLS_CLIENT_CERT=str(certs["client_cert"]),
                REDIS_TLS_CLIENT_KEY=str(certs["client_key"]))) as shim:
            assert check_ok(shim, one(fw("mtls", 5)))[0]["allowed"] is True
        with shim_process(tmp_path / "shim2", redis.port, **tls_env(certs)) as shim:
            r = call(shim.port, one(fw("mtls", 5)))
            status, reply = r.status, r.json
            assert status == 503 and reply["error"] == "backend_unavailable", reply
    finally:
        stop(redis)


def test_sentinel_and_redis_over_tls(tls_backend, tmp_path):
    """TLS-only primary, replica and sentinel: the shim asks the sentinel and talks to the
    master over TLS, verifying both certificates."""
    if not shutil.which("redis-sentinel"):
        pytest.skip("needs redis-sentinel")
    certs = tls_backend["certs"]
    tls = lambda port: ["port 0", f"tls-port {port}", f"tls-cert-file {certs['cert']}",  # noqa: E731
                        f"tls-key-file {certs['key']}", f"tls-ca-cert-file {certs['ca']}",
                        "tls-auth-clients no", "tls-replication yes"]
    ping = lambda port: subprocess.run(  # noqa: E731
        ["redis-cli", "--tls", "--cacert", str(certs["ca"]), "-h", "127.0.0.1", "-p", str(port), "PING"],
        capture_output=True, text=True, timeout=5).stdout.strip() == "PONG"
    procs = []

    def server(name, *extra):
        dir = tmp_path / name
        dir.mkdir()
        port = free_port()
        conf = dir / "redis.conf"
        conf.write_text("\n".join(["bind 127.0.0.1", *tls(port), "save \"\"", "appendonly no",
                                   f"dir {dir}", f"logfile {dir / 'redis.log'}", *extra]) + "\n")
        popen = subprocess.Popen(["redis-server", str(conf)], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = Proc(popen, port, dir, [dir / "redis.log"])
        procs.append(proc)
        _wait_until(proc, lambda: ping(port), f"TLS redis {name}")
        return proc

    try:
        primary = server("primary")
        server("replica", f"replicaof 127.0.0.1 {primary.port}")
        sentinel = start_sentinel(tmp_path / "sentinel", primary.port, tls_lines=tls, ready=ping)
        procs.append(sentinel)
        with shim_process(tmp_path / "shim", 1, REDIS_TLS="1", REDIS_TLS_CA_FILE=str(certs["ca"]),
                          REDIS_TLS_SERVER_NAME="redis.test", REDIS_SENTINELS=f"127.0.0.1:{sentinel.port}",
                          REDIS_SENTINEL_MASTER="m") as shim:
            for i in range(3):
                assert check_ok(shim, one(fw("tls-sentinel", 10)))[0]["checks"][0]["count"] == i + 1
            assert healthz(shim) == 200
    finally:
        for p in reversed(procs):
            stop(p)


def test_cluster_primary_failover(tmp_path):
    """Three primaries with a replica each (node timeout 1 s): the primary owning the test key is
    SIGKILLed; the shim refreshes its slot map on the connection errors and follows the
    promoted replica."""
    procs = []
    try:
        for i in range(6):
            procs.append(start_redis(tmp_path / f"node{i}", cluster_port(), extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "1000")))
        r = subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p.port}" for p in procs],
                            "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        views = lambda: {str(sorted((s[0], s[1], s[2][1]) for s in redis_cli(p.port, "CLUSTER", "SLOTS")))  # noqa: E731
                         for p in procs}
        wait_for("the cluster to be ok and agree", lambda: all(
            "cluster_state:ok" in redis_cli(p.port, "CLUSTER", "INFO").decode() for p in procs)
            and len(views()) == 1 and all(len(s) >= 4 for s in redis_cli(procs[0].port, "CLUSTER", "SLOTS")))
        key = "tollgate:{fo}:w"
        victim_port = None
        for s in redis_cli(procs[0].port, "CLUSTER", "SLOTS"):
            if s[0] <= keyslot(key) <= s[1]:
                victim_port, replica_port = s[2][1], s[3][1]
        victim = next(p for p in procs if p.port == victim_port)
        wait_for("the replica to sync", lambda: redis_info(replica_port, "replication")
                 .get("master_link_status") == "up")
        env = dict(REDIS_CLUSTER_NODES=",".join(f"127.0.0.1:{p.port}" for p in procs), SHIM_LOG_LEVEL="info")
        with shim_process(tmp_path / "shim", procs[0].port, **env) as shim:
            for i in range(10):
                assert check_ok(shim, one(fw("fo", 1000)))[0]["checks"][0]["count"] == i + 1
            assert redis_cli(victim_port, "WAIT", 1, 2000) == 1
            victim.popen.send_signal(signal.SIGKILL)
            victim.popen.wait(5)
            start, failures = time.monotonic(), 0
            while True:
                r = call(shim.port, one(fw("fo", 1000)), timeout=5)
                status, reply = r.status, r.json
                if status == 200:
                    break
                assert status == 503, reply
                failures += 1
                assert time.monotonic() - start < FAILOVER_BOUND_S, f"{reply}\n{shim.log_tails()}"
                time.sleep(0.05)
            took = time.monotonic() - start
            print(f"\nCluster primary failover: checks succeed again {took:.2f}s after SIGKILL "
                  f"({failures} x 503 meanwhile; node timeout 1 s, bound {FAILOVER_BOUND_S}s)")
            assert reply["results"][0]["checks"][0]["count"] == 11, reply
            assert redis_info(replica_port, "replication")["role"] == "master"
    finally:
        for p in procs:
            stop(p)
