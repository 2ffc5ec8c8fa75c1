#!/usr/bin/env python3
"""Redis far away: `make bench-far` (or `python3 bench/far.py [--quick] [--leases on|off|both]`).

The scale story: one global limit across regions means a Redis that is a round trip away.
Redis runs in a network namespace of its own, joined to this one by a veth pair on a private
/30; everything else stays on loopback. The path to it is delayed 10 ms each way (20 ms round
trip) by `tc netem` on both ends of the veth, or, on a kernel without sch_netem, by a userspace
delay line in the namespace (bench/delay_relay.py; connects are not delayed, requests and replies
are). Only Redis is far: the shim is the gateway's sidecar, next to it, as it would be deployed
(a far shim would add the same round trip to every callout, leases or not, and hide nothing).

Then, with the plugin's `leases` off and on (where this build knows the option; else "not
available in this build"), and with Redis 0 ms (the same topology, no delay) and 20 ms away:

- one gateway (Envoy `--concurrency 2`, one hot key, a limit nothing reaches): one client's
  sequential latency (p50/p99 over ~300 requests), then closed-loop throughput at 32
  connections (wrk) and the shim calls per request;
- 2 gateways × 2 workers against the far Redis, the limit exceeded (bench/accuracy.py):
  admitted ÷ limit per window.

Results: bench/results/far.md (--quick: bench/.work/far/far.md). The namespace, the veth and
every process are removed at the end, also on failure or Ctrl-C. Needs root (ip netns).
Standard library only.
"""

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (puts tests/ on sys.path: the harness)
import accuracy  # noqa: E402
from envoy_harness import envoy_config, plugin, route, rule  # noqa: E402
from report import accuracy_section, fmt  # noqa: E402
from shim_harness import free_port, start_shim, stop  # noqa: E402

BENCH = run.BENCH
WORK = BENCH / ".work" / "far"
DELAY_MS = 10           # each way
NO_DENY = 10**9
CONNECTIONS = 32
SHIM_ENV = {
    # The shim's Redis timeouts (defaults 50 ms connect, 100 ms read) with room for 20 ms.
    "REDIS_CONNECT_TIMEOUT_MS": 1000, "REDIS_SEND_TIMEOUT_MS": 1000, "REDIS_READ_TIMEOUT_MS": 1000,
    "REDIS_POOL_SIZE": run.REDIS_POOL_SIZE, "SHIM_WORKERS": 1,
}
# The filter's callout timeout (envoy_harness.plugin's default, said here): a check is one
# shim → Redis round trip and some queueing, far below it.
SHIM_TIMEOUT = "1s"


def sh(*cmd, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


# --- The far side: a namespace, a veth pair, a delay -----------------------------------------

class FarRedis:
    """Redis in namespace `tgfar<pid>` at 10.R.S.2/30 (this side: .1 on veth `tgfh<pid>`), the
    path delayed `delay_ms` each way. `shim_addr`: where the shim connects (through the delay);
    `direct_addr`: where the accuracy phase reads counters (through netem's delay; around the
    relay's)."""

    def __init__(self, work: Path):
        pid = os.getpid()
        self.work, self.ns = work, f"tgfar{pid}"
        self.veth_host, self.veth_ns = f"tgfh{pid}"[:15], f"tgfn{pid}"[:15]
        self.procs, self.mode, self.delay_ms = [], None, None

    def __enter__(self):
        try:
            self._setup()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _setup(self):
        subnet = free_subnet()
        self.host_addr, self.ns_addr = f"{subnet}.1", f"{subnet}.2"
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.veth_host)
        sh("ip", "link", "set", self.veth_host, "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.ns_addr}/30", "dev", self.veth_ns)
        sh("ip", "-n", self.ns, "link", "set", self.veth_ns, "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        netem = [sh("tc", "qdisc", "add", "dev", self.veth_host, "root", "netem", "delay", "0ms", check=False),
                 sh("ip", "netns", "exec", self.ns, "tc", "qdisc", "add", "dev", self.veth_ns, "root", "netem",
                    "delay", "0ms", check=False)]
        self.mode = "netem" if all(p.returncode == 0 for p in netem) else "relay"
        self.netem_error = "; ".join(p.stderr.strip() for p in netem if p.returncode)
        redis_dir = self.work / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        self.redis = self._spawn(["redis-server", "--bind", f"127.0.0.1 {self.ns_addr}", "--port", "6379",
                                  "--save", "", "--appendonly", "no", "--dir", str(redis_dir),
                                  # Reached over the veth, not loopback; the namespace is private.
                                  "--protected-mode", "no",
                                  "--logfile", str(redis_dir / "redis.log")], redis_dir / "stdout.log")
        wait_tcp((self.ns_addr, 6379), self.redis)
        self.direct_addr = (self.ns_addr, 6379)
        self.relay = None

    def _spawn(self, cmd, log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            p = subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def set_delay(self, ms: int):
        """Each way; the shim must be (re)started after a change (the relay's port moves)."""
        self.delay_ms = ms
        if self.mode == "netem":
            sh("tc", "qdisc", "change", "dev", self.veth_host, "root", "netem", "delay", f"{ms}ms")
            sh("ip", "netns", "exec", self.ns, "tc", "qdisc", "change", "dev", self.veth_ns, "root", "netem",
               "delay", f"{ms}ms")
            self.shim_addr = self.direct_addr
            return
        if self.relay:
            run.stop_popen(self.relay)
            self.procs.remove(self.relay)
        port = 6380 + ms   # a fresh port per delay: no pooled connection outlives its relay
        self.relay = self._spawn([sys.executable, str(BENCH / "delay_relay.py"), f"{self.ns_addr}:{port}",
                                  "127.0.0.1:6379", str(ms)], self.work / f"relay-{ms}ms.log")
        self.shim_addr = (self.ns_addr, port)
        wait_tcp(self.shim_addr, self.relay)

    def describe(self) -> str:
        how = ("`tc qdisc netem delay` on both ends of the veth" if self.mode == "netem" else
               f"a userspace delay line in the namespace (bench/delay_relay.py), as this kernel has no netem "
               f"(`tc`: {self.netem_error or 'refused'}); connects are not delayed, requests and replies are")
        return (f"Redis in network namespace `{self.ns}` at {self.ns_addr}, over a veth pair from "
                f"{self.host_addr}/30; delay: {how}")

    def __exit__(self, *_):
        for p in reversed(self.procs):
            run.stop_popen(p)
        self.procs = []
        sh("ip", "link", "del", self.veth_host, check=False)
        sh("ip", "netns", "del", self.ns, check=False)


def free_subnet() -> str:
    """A 10.x.y.0/30 that no interface or route here uses (x.y from the pid: two runs at once
    do not collide)."""
    used = sh("ip", "-4", "addr").stdout + sh("ip", "-4", "route").stdout
    pid = os.getpid()
    for n in range(256):
        subnet = f"10.{200 + (pid + n) % 50}.{(pid // 50 + n) % 256}"
        if f"{subnet}." not in used:
            return subnet
    raise RuntimeError("no free 10.x.y.0/30 found")


def remove_stale_namespaces():
    """Namespaces of far.py runs whose process is gone (a SIGKILL leaves them behind)."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        m = re.match(r"tgfar(\d+)\b", line)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            sh("ip", "link", "del", f"tgfh{m.group(1)}"[:15], check=False)
            sh("ip", "netns", "del", f"tgfar{m.group(1)}", check=False)


def wait_tcp(addr: tuple, popen: subprocess.Popen, deadline_s: float = 10.0):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if popen.poll() is not None:
            raise RuntimeError(f"{popen.args} exited with {popen.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(addr, timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {addr} after {deadline_s}s")


def flush(addr: tuple):
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
        s.recv(64)


# --- One gateway: latency and throughput -----------------------------------------------------

def one_gateway(work: Path, shim_port: int, leases, quick: bool) -> dict:
    """Envoy (2 workers), one hot key under a limit nothing reaches, answered by direct_response."""
    options = {"shim": {"upstream": "tollgate_shim", "timeout": SHIM_TIMEOUT}}
    if leases is not None:
        options["leases"] = leases
    cfg = plugin([rule("far", NO_DENY, window="1m", descriptors=["header:x-api-key"])], **options)

    def config(port, admin):
        c = envoy_config(cfg, shim_port, port, admin, routes=[route("far", {"prefix": "/"}, body="ok\n")])
        hcm = c["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"][0]["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(run.WASM_COPY)
        return c

    log = run.LoadLog(work / "load.log")
    header = ["-H", "x-api-key: hot"]
    with accuracy.gateway(work, config, 2, free_port) as envoy:
        url = f"http://127.0.0.1:{envoy.port}/"
        log.run([run.OHA, "--no-tui", "-n", "20", "-c", "1", *header, url], 60)   # warm: shim connections
        data = json.loads(log.run([run.OHA, "--no-tui", "--output-format", "json", "-n", "100" if quick else "300",
                                   "-c", "1", *header, url], 120))
        pct = data["latencyPercentiles"]
        single = {"p50": pct["p50"] * 1000, "p99": pct["p99"] * 1000,
                  "statuses": {str(k): v for k, v in data.get("statusCodeDistribution", {}).items()}}
        seconds = 2 if quick else 5
        log.run(["wrk", "-t2", f"-c{CONNECTIONS}", "-d1s", *header, url], 40)
        callouts = envoy.stat("cluster.tollgate_shim.upstream_rq_completed")
        out = log.run(["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "5s", "--latency", *header,
                       url], seconds + 40)
        callouts = envoy.stat("cluster.tollgate_shim.upstream_rq_completed") - callouts
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "single": single,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": wrk_ms(out, "50%"), "p99": wrk_ms(out, "99%"),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "callouts_per_request": callouts / requests if requests else None,
    }


def wrk_ms(out: str, percentile: str) -> float:
    m = re.search(rf"^\s+{re.escape(percentile)}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if not m:
        return None
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


# --- Main ------------------------------------------------------------------------------------

def markdown(meta: dict, single_rows: list, accuracy_entries: list) -> str:
    out = [
        "# Tollgate with Redis far away",
        "",
        f"- **Date**: {meta['date']} (took {meta['took']}); `{meta['command']}`{' — quick smoke run' if meta['quick'] else ''}",
        f"- **Machine**: {meta['machine']}",
        f"- **Tollgate**: {meta['tollgate']}",
        f"- **Topology**: {meta['topology']}. The shim (one nginx worker) and Envoy on loopback, Redis's "
        f"timeouts in the shim 1 s, the filter's callout timeout {SHIM_TIMEOUT}. Nothing pinned: Envoy, the shim, "
        "the delay, Redis and the load generators share the 2 cores.",
        *([f"- **{meta['leases_note']}**"] if meta.get("leases_note") else []),
        "",
        "## One gateway, one hot key, nothing denied",
        "",
        "Envoy `--concurrency 2`, a `fixed_window` limit of 10^9 per minute on one `x-api-key`. *One client*: "
        "oha -c 1, sequential requests on one keep-alive connection (after 20 to warm up). *32 connections*: wrk "
        "-t2, closed loop. Milliseconds.",
        "",
        "| Redis | leases | one client p50 | p99 | 32 conns req/s | p50 | p99 | shim calls/req | non-2xx |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for distance, leases, r in single_rows:
        if isinstance(r, str):
            out.append(f"| {distance} | {leases} | {r} |")
            continue
        out.append(f"| {distance} | {leases} | {r['single']['p50']:.2f} | {r['single']['p99']:.2f} | "
                   f"{r['rps']:.0f} | {fmt(r['p50'], '.2f')} | {fmt(r['p99'], '.2f')} | "
                   f"{fmt(r['callouts_per_request'], '.3f')} | {r['non_2xx']} |")
    out += ["", *accuracy_section(f"Accuracy with Redis {2 * DELAY_MS} ms away: 2 gateways × 2 workers",
                                  accuracy_entries)]
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short phases: 100 sequential requests, 2 s, 4 windows")
    parser.add_argument("--leases", choices=("on", "off", "both"), default="both",
                        help="the plugin's `leases` option (default: both; on a build without leases, off = not sent)")
    parser.add_argument("--wasm", type=Path, default=run.WASM, help="the .wasm to run (default: the release build)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("far.py needs root (ip netns, veth, tc)")
    missing = [t for t in ("envoy", "nginx", "redis-server", "wrk", "ip", "tc", run.OHA) if not shutil.which(t)]
    if missing:
        sys.exit(f"missing: {', '.join(missing)}")
    if not args.wasm.exists():
        sys.exit(f"{args.wasm} is missing: run `make build`")
    run.SOURCES.update(wasm=args.wasm.resolve(), shim=run.SHIM_DIR.resolve())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # unwinds: the namespace is deleted
    started = time.monotonic()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    run.WORK.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run.SOURCES["wasm"], run.WASM_COPY)
    remove_stale_namespaces()

    modes = ["off", "on"] if args.leases == "both" else [args.leases]
    supported = accuracy.leases_supported(run.WASM_COPY, WORK / "probe")
    plans = {m: accuracy.lease_plan(m, supported) for m in modes}
    meta = run.metadata()
    meta.update(quick=args.quick, leases_note=None if supported else accuracy.NOT_AVAILABLE)
    single_rows, accuracy_entries, loud = [], [], []
    with FarRedis(WORK) as far:
        meta["topology"] = far.describe()
        print(meta["topology"], flush=True)
        for delay in (0, DELAY_MS):
            distance = f"{2 * delay} ms RTT"
            far.set_delay(delay)
            shim = start_shim(WORK / f"shim-{delay}ms", far.shim_addr[1], REDIS_HOST=far.shim_addr[0], **SHIM_ENV)
            try:
                for mode in modes:
                    if plans[mode] is None:
                        single_rows.append((distance, mode, accuracy.NOT_AVAILABLE))
                        continue
                    leases, label = plans[mode]
                    print(f"[{time.monotonic() - started:4.0f}s] one gateway, Redis {distance}, leases {label}",
                          flush=True)
                    flush(far.direct_addr)
                    r = one_gateway(WORK / f"gw-{delay}ms-{mode}", shim.port, leases, args.quick)
                    single_rows.append((distance, label, r))
                    print(f"  one client p50 {r['single']['p50']:.2f} ms p99 {r['single']['p99']:.2f} ms; "
                          f"{CONNECTIONS} conns {r['rps']:.0f} req/s", flush=True)
                if delay == 0:
                    continue
                for mode in modes:
                    key = f"far-{mode}"
                    if plans[mode] is None:
                        accuracy_entries.append((key, mode, None, accuracy.NOT_AVAILABLE))
                        continue
                    leases, label = plans[mode]
                    print(f"[{time.monotonic() - started:4.0f}s] accuracy, 2 gateways × 2 workers, Redis {distance}, "
                          f"leases {label}", flush=True)
                    flush(far.direct_addr)
                    acc = accuracy.measure(WORK / f"accuracy-{mode}", shim.port, far.direct_addr, 300,
                                           4 if args.quick else 10, run.WASM_COPY, run.OHA, free_port,
                                           leases=leases, lead_ms=5 + (delay if far.mode == "netem" else 0))
                    accuracy_entries.append((key, label, acc, None))
                    loud += accuracy.loud_lines(acc, f"far, leases {label}")
                    print(f"  admitted ÷ limit max {fmt(acc['max_ratio'], '.3f')}, mean {fmt(acc['mean_ratio_full'], '.3f')}; "
                          f"charged ÷ limit max {fmt(acc['max_charged_ratio'], '.3f')}", flush=True)
            finally:
                stop(shim)
    took = time.monotonic() - started
    meta.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                took=f"{took // 60:.0f} min {took % 60:.0f} s",
                command="make bench-far" if len(sys.argv) == 1 else "python3 bench/far.py " + " ".join(sys.argv[1:]))
    md = markdown(meta, single_rows, accuracy_entries)
    out = WORK / "far.md" if args.quick else run.RESULTS / "far.md"
    out.write_text(md)
    print()
    print(md)
    for line in loud:
        print(line)
    if not supported and "on" in modes:
        print(accuracy.NOT_AVAILABLE)
    print(f"wrote {out}; logs in {WORK}")
    failed = [r for _, _, r in single_rows if not isinstance(r, str) and r["non_2xx"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
