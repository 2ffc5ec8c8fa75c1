#!/usr/bin/env python3
"""What each host call Tollgate makes costs Envoy: `make bench-hostcalls` (~4 min).

Envoy (one worker) runs bench/wasm-probe, a proxy-wasm filter that makes one host call N times
per request, under a closed-loop load (wrk, 32 connections). The Envoy CPU per request with N
calls, minus the same with none, divided by N, is one call's cost. Phases interleave (every call
once per round, rounds repeated) and each keeps its lowest CPU per request over the rounds: on a
shared machine, interference only ever adds CPU time. Results: bench/results/hostcalls.md.

One call per request cannot be told apart from the noise (a few µs between runs on these
shared machines); focused runs suggest the first property read of a request costs more than
the next ones (source.address: +4.5 µs for one read, ~3 µs for each further one).
"""

import argparse
import contextlib
import re
import time

import run as B

# (probe call, what Tollgate uses it for)
CALLS = [
    ("time", "the clock (`get_current_time`), read for every decision"),
    ("header", "a request header (`:path`, a descriptor header)"),
    ("source_address", "property `source.address` (the `client_ip` descriptor)"),
    ("route_name", "property `xds.route_name` (`match.routes`, the `route` descriptor)"),
    ("route_metadata", "property `xds.route_metadata…policy` (`match.policies`)"),
    ("shared_get", "shared data read (over-limit cache lookup, per check)"),
    ("metric", "`increment_metric` (counters, a few per request)"),
    ("add_header", "add a header (rate-limit headers on allowed responses: five)"),
]


@contextlib.contextmanager
def probe(work, config):
    """Envoy with the probe filter configured `config`; None: Envoy without any filter (A)."""
    with (B.envoy_target(work, "none") if config is None
          else B.envoy_target(work, "probe", probe_config=config)) as target:
        yield target


def envoy_us_per_request(work, config, seconds: int) -> float:
    work.mkdir(parents=True, exist_ok=True)
    with probe(work, config) as target:
        log = B.LoadLog(work / "load.log")
        B.wrk(log, target.url, 32, 1)
        row = B.Row("probe", config, "probe")
        with B.metered(row, target):
            requests, _, statuses = B.wrk(log, target.url, 32, seconds)
        if statuses["socket errors"]:
            raise RuntimeError(f"{config}: {statuses}")
        return row.cpu_ticks["envoy"] / B.CLK_TCK * 1e6 / requests


def envoy_version() -> str:
    found = re.search(r"version: \w+/(\d+\.\d+\.\d+)/", B.first_line(["envoy", "--version"]))
    return f"Envoy {found.group(1) if found else '?'}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--times", type=int, default=10, help="calls per request (default 10)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=3, help="per phase")
    args = parser.parse_args()
    missing = [t for t in ("envoy", "wrk") if not B.shutil.which(t)]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)}; run `make setup`")
    B.build_probe_filter()
    B.WORK.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    phases = [("no filter", None), ("none", "")] + [(c, f"{c} {args.times}") for c, _ in CALLS] + [("reply", "reply 1")]
    best = {}
    for r in range(args.rounds):
        for name, config in phases:
            us = envoy_us_per_request(B.WORK / f"hostcalls-{name}-{r}", config, args.seconds)
            best[name] = min(best.get(name, us), us)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {best[n]:.1f}" for n, _ in phases), flush=True)
    base = best["none"]
    lines = [
        "# What a host call costs Envoy",
        "",
        f"- **Date**: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `make bench-hostcalls` "
        f"({time.monotonic() - started:.0f} s); {envoy_version()}",
        f"- Envoy `--concurrency 1`, wrk 32 connections, {args.seconds} s phases, lowest of {args.rounds} rounds.",
        f"- Envoy CPU per request without any filter (setup A): **{best['no filter']:.1f} µs**; with the probe "
        f"filter doing nothing: **{base:.1f} µs**: {base - best['no filter']:+.1f} µs is the floor of any proxy-wasm "
        "filter (a VM context and its callbacks per request).",
        f"- Each row: (CPU per request with {args.times} calls − the floor) ÷ {args.times}. "
        "Repeated runs move a row by up to ~1 µs: read the magnitudes, not the decimals.",
        "",
        "| host call | µs per call | what Tollgate uses it for |",
        "|---|---:|---|",
    ]
    for name, what in CALLS:
        lines.append(f"| `{name}` | {(best[name] - base) / args.times:.2f} | {what} |")
    lines.append(f"| `send_http_response` (429, 7 headers, 195-byte body) | {best['reply'] - base:.2f} | "
                 "a denial, against `direct_response` answering the same route |")
    out = B.RESULTS / "hostcalls.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
