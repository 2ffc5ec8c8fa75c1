"""Operating the lua-redis-shim: Redis's time in every check reply (`now_ms`), GET /metrics, the
optional shared secret (x-tollgate-secret), the default loopback bind, and the Grafana dashboard
(deploy/grafana/tollgate.json) against the metric names the filter and the shim export.

Real nginx and Redis on random loopback ports (tests/shim_harness.py). Metric tests start their
own shim so counters start at zero and are compared exactly.
"""

import http.client
import json
import os
import re
import subprocess
import threading
import time

import pytest

from client import call, redis_now_ms
from shim_harness import (
    ROOT, SHIM_DIR, free_port, redis_cli, run_redis, shim_process, start_redis, stop,
)

SECRET = "s3cr3t-0123456789abcdef-XYZ"
DASHBOARD = ROOT / "deploy" / "grafana" / "tollgate.json"


# --- Helpers --------------------------------------------------------------------------------

def secret_header(value, name="x-tollgate-secret"):
    """Headers of a JSON POST carrying a shared secret."""
    return {"Content-Type": "application/json", name: value}


def fixed(name, limit, ttl_ms=60000):
    return {"key": f"tollgate:{{{name}}}:60000:1", "limit": limit, "ttl_ms": ttl_ms}


def body(*requests):
    """body([check, ...], ...): one gateway request per list of checks."""
    return {"requests": [{"checks": list(checks)} for checks in requests]}


def release_body(*ids):
    return {"releases": [{"key": "tollgate:{c}:conc", "id": i} for i in ids]}


# Prometheus text format 0.0.4: `name{label="value",...} value`.
SAMPLE = re.compile(r'^([a-z_]+)(\{[a-z_]+="[^"\\]*"(?:,[a-z_]+="[^"\\]*")*\})? (\S+)$')


def scrape(port):
    """GET /metrics, checked for the text format; returns {'name{labels}': value}."""
    r = call(port, path="/metrics", method="GET")
    assert r.status == 200, r
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = r.raw.decode()
    assert text.endswith("\n")
    samples, typed, helped = {}, {}, set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split(" ")[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            typed[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.groups()
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in typed else name
            assert family in typed and family in helped, f"{name}: no HELP/TYPE before it"
            samples[name + (labels or "")] = float(value)
    assert set(typed) == SHIM_METRICS, set(typed) ^ SHIM_METRICS
    return samples


def histogram(samples, name="tollgate_shim_redis_duration_seconds"):
    """The cumulative buckets [(le, count)], checked for shape, and _count."""
    buckets = [(k.split('"')[1], v) for k, v in samples.items() if k.startswith(name + "_bucket{")]
    assert [le for le, _ in buckets] == [str(b) for b in SHIM_BUCKETS] + ["+Inf"]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    assert samples[name + "_count"] == counts[-1]
    return buckets, samples[name + "_count"]


def http_count(samples, endpoint, status):
    return samples.get(f'tollgate_shim_http_requests_total{{endpoint="{endpoint}",status="{status}"}}', 0)


# What the shim exports (metric families) and the latency histogram's bounds.
SHIM_METRICS = {
    "tollgate_shim_checks_total",
    "tollgate_shim_requests_total",
    "tollgate_shim_http_requests_total",
    "tollgate_shim_redis_errors_total",
    "tollgate_shim_redis_reconnects_total",
    "tollgate_shim_script_loads_total",
    "tollgate_shim_pool_size",
    "tollgate_shim_redis_duration_seconds",
}
SHIM_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]


@pytest.fixture
def redis(tmp_path):
    with run_redis(tmp_path / "redis") as port:
        yield port


# --- now_ms: Redis's clock in every check reply ------------------------------------------------

def test_now_ms_is_the_redis_time_of_the_call(tmp_path, redis):
    with shim_process(tmp_path / "shim", redis) as shim:
        before = redis_now_ms(redis)
        r = call(shim.port, body([fixed("a", 5)], [fixed("a", 5)]))
        after = redis_now_ms(redis)
        assert r.status == 200, r
        assert r.raw.startswith(b'{"results":[') and re.search(rb'\],"now_ms":\d+\}$', r.raw), r.raw
        now_ms = r.json["now_ms"]
        assert before <= now_ms <= after
        assert abs(now_ms - time.time() * 1000) < 1000, "Redis runs on this host"


def test_now_ms_is_the_instant_the_checks_used(tmp_path, redis):
    """A token bucket stores the time of its charge (`ts`): the same instant as now_ms."""
    tb = {"alg": "token_bucket", "key": "tollgate:{t}:tb", "burst": 5, "rate": 1, "period_ms": 1000}
    with shim_process(tmp_path / "shim", redis) as shim:
        r = call(shim.port, body([fixed("w", 9), tb]))
        assert r.status == 200, r
        assert int(redis_cli(redis, "HGET", "tollgate:{t}:tb", "ts")) == r.json["now_ms"]


def test_now_ms_is_left_out_when_the_acl_user_may_not_run_time(tmp_path):
    """An ACL made for fixed windows only (no `time`) keeps working, without now_ms."""
    acl = "tollgate on >pw ~tollgate:* +evalsha +script|load +ping +get +incrby +pexpire +pttl"
    with run_redis(tmp_path / "redis", extra_args=("--user", *acl.split())) as port, \
            shim_process(tmp_path / "shim", port, REDIS_USER="tollgate", REDIS_PASSWORD="pw") as shim:
        r = call(shim.port, body([fixed("a", 1)]))
        assert r.status == 200, r
        assert r.json == {"results": [{"allowed": True, "checks": [
            {"allowed": True, "limit": 1, "count": 1, "remaining": 0, "reset_ms": 60000,
             "retry_after_ms": 0}]}]}


# --- GET /metrics -------------------------------------------------------------------------------

def test_metrics_count_known_traffic_exactly(tmp_path, redis):
    with shim_process(tmp_path / "shim", redis, REDIS_POOL_SIZE=7) as shim:
        # The harness's readiness probe was one GET /healthz; nothing else yet.
        s = scrape(shim.port)
        assert s["tollgate_shim_checks_total"] == 0
        assert s['tollgate_shim_requests_total{decision="allowed"}'] == 0
        assert s['tollgate_shim_requests_total{decision="denied"}'] == 0
        assert s['tollgate_shim_requests_total{decision="refused"}'] == 0
        assert s["tollgate_shim_pool_size"] == 7
        assert histogram(s)[1] == 0
        assert http_count(s, "healthz", 200) == 1

        statuses = [call(shim.port, body([fixed("a", 5)])).json["results"][0]["allowed"]
                    for _ in range(8)]
        assert statuses == [True] * 5 + [False] * 3
        # One call with two gateway requests of two checks each: the second is denied.
        r = call(shim.port, body([fixed("b", 1), fixed("c", 9)], [fixed("b", 1), fixed("c", 9)]))
        assert [x["allowed"] for x in r.json["results"]] == [True, False]
        # A refused request beside a good one (one script call), then one refused alone (none).
        r = call(shim.port, body([fixed("d", 9)], [fixed("d", 0)]))
        assert [x.get("allowed", "refused") for x in r.json["results"]] == [True, "refused"]
        assert "refused" in call(shim.port, body([fixed("e", 0)])).json["results"][0]
        assert call(shim.port, {"requests": []}).status == 400
        assert call(shim.port, path="/nowhere", method="GET").status == 404
        assert call(shim.port, method="GET").status == 405
        assert call(shim.port, release_body("x1", "x2"), path="/v1/release").json == {"released": 0}

        s = scrape(shim.port)
        assert s["tollgate_shim_checks_total"] == 8 + 4 + 1, "checks decided by Redis only"
        assert s['tollgate_shim_requests_total{decision="allowed"}'] == 5 + 1 + 1
        assert s['tollgate_shim_requests_total{decision="denied"}'] == 3 + 1
        assert s['tollgate_shim_requests_total{decision="refused"}'] == 1 + 1
        assert http_count(s, "check", 200) == 9 + 2
        assert http_count(s, "check", 400) == 1
        assert http_count(s, "check", 405) == 1
        assert http_count(s, "other", 404) == 1
        assert http_count(s, "release", 200) == 1
        assert http_count(s, "metrics", 200) == 1, "a scrape is counted once it is answered"
        # One Redis round trip per script call (10 checks, 1 release); none for the 4xx nor
        # for the body whose every request was refused.
        buckets, count = histogram(s)
        assert count == 11
        assert 0 < s["tollgate_shim_redis_duration_seconds_sum"] < 11 * 0.1
        assert s["tollgate_shim_redis_errors_total"] == 0
        # One worker, sequential requests: the connection opened by /healthz serves them all;
        # each script is loaded once (NOSCRIPT on first use).
        assert s["tollgate_shim_redis_reconnects_total"] == 1
        assert s["tollgate_shim_script_loads_total"] == 2


def test_metrics_count_redis_failures(tmp_path):
    port = free_port()
    redis = start_redis(tmp_path / "redis1", port)
    try:
        with shim_process(tmp_path / "shim", port) as shim:
            assert call(shim.port, body([fixed("a", 5)])).status == 200
            # The check script runs as a function library (FCALL); FUNCTION FLUSH is to it what
            # SCRIPT FLUSH is to EVALSHA.
            redis_cli(port, "FUNCTION", "FLUSH")
            assert call(shim.port, body([fixed("a", 5)])).status == 200
            s = scrape(shim.port)
            assert s["tollgate_shim_script_loads_total"] == 2, "a flushed library is loaded again"
            assert s["tollgate_shim_redis_reconnects_total"] == 1
            assert s["tollgate_shim_redis_errors_total"] == 0

            stop(redis)
            assert call(shim.port, body([fixed("a", 5)])).status == 503
            assert call(shim.port, release_body("x"), path="/v1/release").status == 503
            assert call(shim.port, path="/healthz", method="GET").status == 503
            s = scrape(shim.port)
            assert s["tollgate_shim_redis_errors_total"] == 3
            assert histogram(s)[1] == 2 + 2, "failed script calls are observed too"
            assert http_count(s, "check", 503) == 1 and http_count(s, "release", 503) == 1
            assert http_count(s, "healthz", 503) == 1
            assert s["tollgate_shim_checks_total"] == 2, "only checks Redis decided"

            redis = start_redis(tmp_path / "redis2", port)
            assert call(shim.port, body([fixed("a", 5)])).status == 200
            s = scrape(shim.port)
            assert s["tollgate_shim_redis_reconnects_total"] == 2, "a new connection after the restart"
            assert s["tollgate_shim_script_loads_total"] == 3, "the fresh Redis has no scripts"
    finally:
        stop(redis)


def test_metrics_with_redis_down_from_the_start(tmp_path):
    with shim_process(tmp_path / "shim", free_port()) as shim:
        for _ in range(2):
            assert call(shim.port, body([fixed("a", 1)])).status == 503
        s = scrape(shim.port)
        # The readiness probe's /healthz, then two checks.
        assert s["tollgate_shim_redis_errors_total"] == 1 + 2
        assert s["tollgate_shim_redis_reconnects_total"] == 0
        assert histogram(s)[1] == 2


def test_metrics_add_up_across_workers(tmp_path, redis):
    with shim_process(tmp_path / "shim", redis, SHIM_WORKERS=4) as shim:
        def worker():
            for _ in range(25):  # a new connection each time: spread over the workers
                assert call(shim.port, body([fixed("hot", 60)])).status == 200

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        s = scrape(shim.port)
        assert s['tollgate_shim_requests_total{decision="allowed"}'] == 60
        assert s['tollgate_shim_requests_total{decision="denied"}'] == 40
        assert s["tollgate_shim_checks_total"] == 100
        assert histogram(s)[1] == 100
        assert http_count(s, "check", 200) == 100
        assert s["tollgate_shim_redis_reconnects_total"] >= 1


def test_metrics_endpoint_methods(tmp_path, redis):
    with shim_process(tmp_path / "shim", redis) as shim:
        r = call(shim.port, b"", path="/metrics", method="POST")
        assert r.status == 405 and r.headers["allow"] == "GET, HEAD"
        head = call(shim.port, path="/metrics", method="HEAD")
        assert head.status == 200 and head.raw == b""
        assert http_count(scrape(shim.port), "metrics", 405) == 1


def test_payload_too_large_is_counted_on_its_endpoint(tmp_path, redis):
    with shim_process(tmp_path / "shim", redis) as shim:
        assert call(shim.port, b"{" + b" " * (65 * 1024) + b"}").status == 413
        assert http_count(scrape(shim.port), "check", 413) == 1


# --- The shared secret ---------------------------------------------------------------------------

def test_secret_is_required_on_check_and_release(tmp_path, redis):
    with shim_process(tmp_path / "shim", redis, TOLLGATE_SHIM_SECRET=SECRET, SHIM_LOG_LEVEL="info") as shim:
        wrong = [None, "", "nope", SECRET[:-1], SECRET + "x", SECRET[:-1] + "Y", SECRET.upper()]
        for path, payload in (("/v1/check", body([fixed("a", 5)])), ("/v1/release", release_body("x"))):
            for value in wrong:
                headers = {"Content-Type": "application/json"} if value is None else secret_header(value)
                r = call(shim.port, payload, path=path, headers=headers)
                assert r.status == 401, (path, value, r)
                assert r.headers["content-type"] == "application/json"
                assert r.json == {"error": "unauthorized", "message": "missing or wrong x-tollgate-secret"}
            assert call(shim.port, payload, path=path, headers=secret_header(SECRET, "X-Tollgate-Secret")).status == 200
        # Before any other check: a wrong method or body is still a 401.
        assert call(shim.port, method="GET").status == 401
        assert call(shim.port, b"not json").status == 401
        assert redis_cli(redis, "GET", "tollgate:{a}:60000:1") == b"1", "only the authorized check counted"
        # Open without it.
        assert call(shim.port, path="/healthz", method="GET").status == 200
        s = scrape(shim.port)
        assert http_count(s, "check", 401) == len(wrong) + 2
        assert http_count(s, "release", 401) == len(wrong)

        logs = (shim.dir / "logs" / "error.log").read_text() + (shim.dir / "stderr.log").read_text()
        assert "unauthorized: wrong x-tollgate-secret" in logs and "unauthorized: missing" in logs
        assert "s3cr3t" not in logs and "S3CR3T" not in logs and "nope" not in logs


def test_secret_from_a_file(tmp_path, redis):
    """One trailing newline (as `echo` writes) is not part of the secret."""
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    with shim_process(tmp_path / "shim", redis, TOLLGATE_SHIM_SECRET_FILE=path) as shim:
        assert call(shim.port, body([fixed("a", 5)])).status == 401
        r = call(shim.port, body([fixed("a", 5)]), headers=secret_header(SECRET))
        assert r.status == 200, r


def test_longest_secret(tmp_path, redis):
    secret = "~" + "x" * 254 + "!"
    with shim_process(tmp_path / "shim", redis, TOLLGATE_SHIM_SECRET=secret) as shim:
        assert call(shim.port, body([fixed("a", 5)]), headers=secret_header(secret[:-1])).status == 401
        assert call(shim.port, body([fixed("a", 5)]), headers=secret_header(secret)).status == 200


def test_no_secret_configured_means_no_header_needed(tmp_path, redis):
    with shim_process(tmp_path / "shim", redis) as shim:
        assert call(shim.port, body([fixed("a", 5)])).status == 200
        assert call(shim.port, body([fixed("a", 5)]), headers=secret_header("anything")).status == 200


@pytest.mark.parametrize("env,message", [
    ({"TOLLGATE_SHIM_SECRET": SECRET, "SHIM_LOG_LEVEL": "debug"},
     r"TOLLGATE_SHIM_SECRET with SHIM_LOG_LEVEL=debug: the debug log would hold the secret"),
    ({"TOLLGATE_SHIM_SECRET": SECRET, "TOLLGATE_SHIM_SECRET_FILE": "/etc/hostname"},
     r"TOLLGATE_SHIM_SECRET and TOLLGATE_SHIM_SECRET_FILE are both set"),
    ({"TOLLGATE_SHIM_SECRET": "s3cr3t with spaces"},
     r"TOLLGATE_SHIM_SECRET: the secret must be 1\.\.256 printable ASCII characters"),
    ({"TOLLGATE_SHIM_SECRET": "s3cr3t" * 43},
     r"TOLLGATE_SHIM_SECRET: the secret must be 1\.\.256 printable ASCII characters"),
    ({"TOLLGATE_SHIM_SECRET_FILE": "/nonexistent/s3cr3t"},
     r"TOLLGATE_SHIM_SECRET_FILE=/nonexistent/s3cr3t: .*No such file"),
], ids=["debug-log-level", "both-set", "spaces", "too-long", "missing-file"])
def test_bad_secret_settings_stop_the_shim_without_quoting_it(tmp_path, redis, env, message):
    with pytest.raises(RuntimeError, match=message) as failure:
        with shim_process(tmp_path / "shim", redis, **env):
            pass
    # The failure quotes the tails of error.log and of nginx's stderr: no part of the value.
    assert "error.log" in str(failure.value)
    if "TOLLGATE_SHIM_SECRET" in env:
        assert "s3cr3t" not in str(failure.value)


# --- Default bind ---------------------------------------------------------------------------------

def test_default_config_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHIM_", "REDIS_", "TOLLGATE_"))}
    done = subprocess.run([str(SHIM_DIR / "shim"), "--prefix", str(tmp_path / "p"), "--test"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    conf = (tmp_path / "p" / "nginx.conf").read_text()
    listens = re.findall(r"^\s*listen\s+([^;]*);", conf, re.M)
    assert listens == ["127.0.0.1:8181"], listens


# --- The Grafana dashboard ------------------------------------------------------------------------

def filter_metrics():
    """The filter's metric names, from src/metrics.rs (Envoy exports them as they are named
    there; a histogram as _bucket, _sum and _count; the rule names carry a `rule` label)."""
    source = (ROOT / "src" / "metrics.rs").read_text()
    names = set(re.findall(r'"(tollgate_[a-z_]+?)(?:\.rule\.\{rule\})?"', source))
    assert {"tollgate_requests_allowed_total", "tollgate_callout_duration_milliseconds",
            "tollgate_rule_denied_total"} <= names, names
    return names


def metric_family(name, known):
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[:-len(suffix)] in known:
            return name[:-len(suffix)]
    return name


def test_dashboard_structure_and_metric_names():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 39
    assert dash["title"] and dash["uid"]
    inputs = {i["name"]: i for i in dash["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"

    known = filter_metrics() | SHIM_METRICS
    panels = dash["panels"]
    assert len(panels) >= 8
    used = set()
    for p in panels:
        where = p.get("title") or p
        assert p["type"] in ("timeseries", "stat"), where
        assert p["title"] and p["description"], where
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, where
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), where
        assert p["targets"], where
        for t in p["targets"]:
            assert t["expr"] and t["refId"], where
            assert t.get("datasource", p["datasource"]) == p["datasource"], where
            for name in re.findall(r"\btollgate_[a-z_]+", t["expr"]):
                assert metric_family(name, known) in known, f"{where}: {name} is not exported"
                used.add(metric_family(name, known))
    assert len({p["id"] for p in panels}) == len(panels)

    # The panels the dashboard promises.
    for name in ("tollgate_callout_duration_milliseconds", "tollgate_shim_redis_duration_seconds",
                 "tollgate_rule_denied_total", "tollgate_requests_allowed_total",
                 "tollgate_requests_denied_total", "tollgate_failed_open_total",
                 "tollgate_failed_closed_total", "tollgate_failed_local_total",
                 "tollgate_cache_hits_total", "tollgate_rule_shadow_denied_total",
                 "tollgate_shim_redis_errors_total", "tollgate_shim_redis_reconnects_total"):
        assert name in used, f"no panel uses {name}"


# --- A Redis that never keeps a script ------------------------------------------------------

class ForgetfulRedis:
    """A RESP server that says NOSCRIPT to every EVALSHA (a proxy in front of replicas that
    never share their script cache behaves so): the shim must retry once, not forever."""

    def __init__(self):
        import socket
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.counts = {"evalsha": 0, "script": 0}
        self.closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn):
        f = conn.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    return
                n = int(line[1:])
                args = []
                for _ in range(n):
                    size = int(f.readline()[1:])
                    args.append(f.read(size + 2)[:-2])
                cmd = args[0].lower()
                if cmd == b"fcall":
                    # Like Redis 6: no functions, so the shim falls back to EVALSHA.
                    conn.sendall(b"-ERR unknown command 'FCALL', with args beginning with: \r\n")
                elif cmd == b"evalsha":
                    self.counts["evalsha"] += 1
                    conn.sendall(b"-NOSCRIPT No matching script. Please use EVAL.\r\n")
                elif cmd == b"script":
                    self.counts["script"] += 1
                    conn.sendall(b"$40\r\n" + b"0" * 40 + b"\r\n")
                elif cmd == b"ping":
                    conn.sendall(b"+PONG\r\n")
                else:
                    conn.sendall(b"+OK\r\n")
        except (OSError, ValueError):
            return
        finally:
            conn.close()

    def close(self):
        self.closed = True
        self.sock.close()


def test_noscript_after_a_script_load_is_retried_once_not_forever(tmp_path):
    redis = ForgetfulRedis()
    try:
        with shim_process(tmp_path / "shim", redis.port) as shim:
            body = json.dumps({"requests": [{"checks": [{"key": "tollgate:{x}:1000:1", "limit": 1,
                                                         "ttl_ms": 1000}]}]})
            conn = http.client.HTTPConnection("127.0.0.1", shim.port, timeout=5)
            conn.request("POST", "/v1/check", body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            raw = r.read()
            assert r.status == 503, raw
            assert b"NOSCRIPT" in raw, raw
            assert redis.counts == {"evalsha": 2, "script": 1}, redis.counts
    finally:
        redis.close()
