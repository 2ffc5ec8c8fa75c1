"""The benchmark's report: the Markdown tables, the SVG chart, and the README's copy of the
results, rendered from the rows `run.py` measured (bench/README.md says how to read them).
"""

import math
from pathlib import Path

from rows import LATENCY_CONNECTIONS, WRK_THREADS, Latency, Plan, Row

ROOT = Path(__file__).resolve().parent.parent


def fmt(v, spec=".0f", none="–"):
    return none if v is None else format(v, spec)


def ratio(row: Row, rows: dict, connections: int):
    base = rows.get(row.base)
    base_rps = base and (base.base_rps or base.rps).get(connections)
    if not base_rps or connections not in row.rps:
        return None
    return row.rps[connections] / base_rps


def markdown(rows: dict, plan: Plan, meta: dict) -> str:
    conns = plan.connections
    every_row, rows = rows, {k: r for k, r in rows.items() if r.phase == "load"}
    out = [
        "# Tollgate benchmark",
        "",
        f"- **Date**: {meta['date']} (took {meta['took']})",
        f"- **Command**: `{meta['command']}` — {meta['plan']}",
        f"- **Machine**: {meta['machine']}",
        f"- **Versions**: {meta['versions']}",
        f"- **Tollgate**: {meta['tollgate']}",
        f"- **Drift**: A again at the end of the run: {meta['drift']}. Every throughput ratio is against the "
        "better of A's two runs. Other tenants move absolute numbers a lot;",
        "  compare ratios within one run.",
        f"- {meta.get('pinning', 'Envoy `--concurrency 1`, one nginx worker (shim and D), Redis, wrk and oha all on the same cores.')}",
        "  Ratios are against the baseline of the same run: A for Envoy setups, D0 for D. See bench/README.md.",
        "",
        f"## Throughput at saturation (closed loop: wrk -t{WRK_THREADS}, {plan.saturation_s} s after a "
        f"{plan.warmup_s} s warm-up)",
        "",
        "| | setup | " + " | ".join(f"req/s @{c} | vs base @{c}" for c in conns)
        + " | shim calls/req | Redis cmds/req | no callout | responses |",
        "|---|---|" + "---:|---:|" * len(conns) + "---:|---:|---:|---|",
    ]
    for r in rows.values():
        if r.error:
            out.append(f"| {r.key} | {r.name} | failed: {r.error} |")
            continue
        cells = [f"{fmt(r.rps.get(c))} | {fmt(ratio(r, rows, c), '.2f')}×" for c in conns]
        st = r.statuses
        responses = f"{st.get('2xx', 0)} 2xx, {st.get('non-2xx', 0)} non-2xx"
        if st.get("socket errors"):
            responses += f", {st['socket errors']} socket errors"
        if r.counters.get("callouts_failed"):
            responses += f"; {r.counters['callouts_failed']} shim calls failed"
        checked = r.counters.get("checked")
        local = f"{r.counters.get('local', 0) / checked:.1%}" if checked else "–"
        out.append(f"| {r.key} | {r.name} | " + " | ".join(cells) + f" | {fmt(r.per_request('callouts'), '.3f')} | "
                   f"{fmt(r.per_request('redis_commands'), '.3f')} | {local} | {responses} |")
    out += [
        "",
        f"## Latency at fixed offered rates (open loop: oha -q RATE --latency-correction, "
        f"{LATENCY_CONNECTIONS} connections, {plan.rate_s} s)",
        "",
        "Rates are fractions of A's throughput at 32 connections. Milliseconds; *added* = p50 / p99 "
        "minus the baseline's at the same rate. An achieved rate below the offered one means the setup "
        "is past saturation there: its latency is mostly queueing.",
        "",
        "| | setup | load | offered req/s | achieved | p50 | p90 | p99 | p99.9 | added p50 | added p99 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows.values():
        for fraction, lat in r.latency.items():
            base = rows.get(r.base)
            blat = base.latency.get(fraction) if base else None
            def added(p, lat=lat, blat=blat, r=r):
                return None if blat is None or r.key == r.base else getattr(lat, p) - getattr(blat, p)
            out.append(
                f"| {r.key} | {r.name} | {fraction:.0%} | {lat.offered:.0f} | {lat.achieved:.0f} | "
                f"{lat.p50:.2f} | {lat.p90:.2f} | {lat.p99:.2f} | {lat.p999:.2f} | "
                f"{fmt(added('p50'), '+.2f')} | {fmt(added('p99'), '+.2f')} |")
    singles = [r for r in rows.values() if r.single and not r.error]
    if singles:
        a = rows.get("A").single if rows.get("A") else None
        w = rows.get("W").single if rows.get("W") else None
        out += [
            "",
            f"## One client (oha -c 1 -n {plan.single_requests}: sequential requests on one keep-alive connection)",
            "",
            "Measured first in each setup, before any load. Milliseconds; *added* is over A, and over W (the "
            "do-nothing Wasm filter) for what Tollgate adds beyond any Wasm filter.",
            "",
            "| | setup | p50 | p90 | p99 | p99.9 | added p50 vs A | added p99 vs A | added p50 vs W | added p99 vs W |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in singles:
            t = r.single
            vs = lambda base, p, t=t: None if base is None else getattr(t, p) - getattr(base, p)  # noqa: E731
            out.append(f"| {r.key} | {r.name} | {t.p50:.3f} | {t.p90:.3f} | {t.p99:.3f} | {t.p999:.3f} | "
                       f"{fmt(vs(a, 'p50'), '+.3f')} | {fmt(vs(a, 'p99'), '+.3f')} | "
                       f"{fmt(vs(w, 'p50'), '+.3f')} | {fmt(vs(w, 'p99'), '+.3f')} |")
    out += [
        "",
        "## Cost per request",
        "",
        "CPU: utime+stime from /proc/PID/stat over all measured phases (warm-ups excluded) ÷ requests "
        "completed in them. *nginx* is the shim (C, E, E1, F) or D's own nginx (master + worker). Peak RSS: "
        "VmHWM at the end of the setup.",
        "",
        "| | setup | CPU µs/req Envoy | nginx | Redis | total | peak RSS MB Envoy | nginx | Redis |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows.values():
        if r.error:
            continue
        cpu = [r.cpu_us_per_request(role) for role in ("envoy", "nginx", "redis")]
        total = sum(c for c in cpu if c is not None)
        rss = [r.rss_kb.get(role) for role in ("envoy", "nginx", "redis")]
        out.append(f"| {r.key} | {r.name} | " + " | ".join(fmt(c) for c in cpu) + f" | {total:.0f} | "
                   + " | ".join(fmt(m / 1024 if m is not None else None, '.1f') for m in rss) + " |")
    mem = rows.get("E") and rows["E"].memory_per_key
    if mem:
        out += [
            "",
            "## Redis memory per active key (E)",
            "",
            f"{mem['keys']} requests with distinct `x-api-key` values (statuses {mem['statuses']}) created "
            f"{mem['keys']} counters: INFO `used_memory` grew by **{fmt(mem['bytes_per_key'])} bytes per key** "
            f"(`MEMORY USAGE` of one, `{mem['sample_key']}`: {mem['memory_usage_sample']} bytes).",
        ]
    accuracy = [(r.key, r.leases, r.accuracy, r.error) for r in every_row.values() if r.phase == "accuracy"]
    if accuracy:
        out += ["", *accuracy_section(ACCURACY_TITLE, accuracy)]
    problems = [f"- **{r.key}**: {r.error or r.warning}" for r in every_row.values() if r.error or r.warning]
    if problems:
        out += ["", "## Problems in this run", "", *problems]
    return "\n".join(out) + "\n"


ACCURACY_TITLE = "Accuracy: 2 gateways × 2 workers"


def accuracy_section(title: str, entries) -> list:
    """The accuracy phase (bench/accuracy.py): a summary line per run, then its windows.
    `entries`: (key, leases label, tally or None, error or None)."""
    out = [
        f"## {title}",
        "",
        "Two Envoys (`--concurrency 2` each) share one shim and one Redis; one hot key under a `fixed_window` "
        "rule (1 s), offered 4× its limit (open loop, one oha per gateway); `failure_mode: deny`. *Admitted*: "
        "requests that reached the upstream, in the window in which Envoy started them (*certain*: those that also "
        "reached the upstream in it); *charged*: the window's counter in Redis (admitted + leased and unspent). "
        "The guarantee: admitted ÷ limit never above 1.000.",
        "",
        "| | leases | limit | whole windows | admitted ÷ limit, max | certain ÷ limit, max | mean (whole windows) "
        "| charged ÷ limit, max | charged − admitted (whole windows) | admitted / charged (run) | responses "
        "| failed callouts |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for key, leases, acc, error in entries:
        if acc is None:
            out.append(f"| {key} | {leases or '–'} | {error} |")
            continue
        flag = lambda v: "" if v is None or v <= 1.0 else " **over**"  # noqa: E731
        statuses = ", ".join(f"{n} × {s}" for s, n in sorted(acc["statuses"].items()))
        out.append(f"| {key} | {leases or '–'} | {acc['limit']} | {acc['full_windows']} | "
                   # Above 1 by start time only through requests straddling a window's end:
                   # the filter may have counted them in the next window (the certain column).
                   f"{fmt(acc['max_ratio'], '.3f')}"
                   f"{flag(acc['max_certain_ratio']) or (' (straddling)' if (acc['max_ratio'] or 0) > 1 else '')} | "
                   f"{fmt(acc['max_certain_ratio'], '.3f')}{flag(acc['max_certain_ratio'])} | "
                   f"{fmt(acc['mean_ratio_full'], '.3f')} | "
                   f"{fmt(acc['max_charged_ratio'], '.3f')}{flag(acc['max_charged_ratio'])} | "
                   f"{fmt(acc['unspent_full'])} | {acc['admitted_total']} / {acc['charged_total']} | {statuses} | "
                   f"{acc['callouts_failed']} |")
    for key, leases, acc, _ in entries:
        if acc is None:
            continue
        gateways = sorted({g for w in acc["windows"] for g in w["by_gateway"]})
        out += [
            "",
            f"{key} (leases: {leases or '–'}), per window (*partial*: the load covered only part of it; "
            f"*straddling*: started in it, reached the upstream in the next, so its window is not certain; "
            f"bench/accuracy.py):",
            "",
            "| window | admitted | charged | admitted ÷ limit | charged − admitted | "
            + " | ".join(gateways) + (" | " if gateways else "") + "straddling |",
            "|---|---:|---:|---:|---:|" + "---:|" * len(gateways) + "---:|",
        ]
        first = min((w["window"] for w in acc["windows"] if w["full"]), default=0)
        for w in acc["windows"]:
            charged = w["charged"]
            out.append(f"| {w['window'] - first + 1}{'' if w['full'] else ' (partial)'} | {w['admitted']} | "
                       f"{fmt(charged)} | {w['admitted'] / acc['limit']:.3f} | "
                       f"{fmt(None if charged is None else charged - w['admitted'])} | "
                       + "".join(f"{w['by_gateway'].get(g, 0)} | " for g in gateways) + f"{w['straddling']} |")
        out.append(f"\nRedis expired {acc.get('counters_expired', '?')} window counters for {len(acc['windows'])} "
                   "windows (more: a counter was re-created after its window ended, by a charge that reached Redis "
                   "late, and what it admitted is not in *charged*).")
        if acc.get("counter_errors"):
            out.append(f"\nReading the Redis counters failed: {acc['counter_errors'][0]}")
    return out


README_START = "<!-- bench-results:start (written by make bench) -->"
README_END = "<!-- bench-results:end -->"


def update_readme(md: str, meta: dict):
    """Copies the tables of a full run into README.md, between the bench-results markers:
    throughput, CPU per request, latency at 10 % and 50 % of A's saturation, one client, and the
    accuracy phase's summary."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        print("README.md has no bench-results markers: not updated", flush=True)
        return
    tables = {}
    for section in md.split("\n## ")[1:]:
        title, _, body = section.partition("\n")
        # A section's first table (the accuracy section's per-window tables stay in latest.md).
        lines = body.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
        end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
        tables[title.split(" (")[0]] = lines[start:end]
    latency = tables["Latency at fixed offered rates"]
    latency = latency[:2] + [line for line in latency[2:] if line.split(" | ")[2] in ("10%", "50%")]
    block = "\n".join([
        README_START,
        f"Latest run: {meta['date']}, `make bench` ({meta['took']}); machine and versions in "
        "[`bench/results/latest.md`](bench/results/latest.md).",
        "",
        *tables["Throughput at saturation"],
        "",
        "CPU per request (from `/proc` over the run) and peak RSS:",
        "",
        *tables["Cost per request"],
        "",
        "Latency at 10 % and 50 % of A's saturation (open loop; *added* is over A at the same rate):",
        "",
        *latency,
        *(["", "One client, sequential requests on one keep-alive connection, before any load (ms):", "",
            *tables["One client"]] if "One client" in tables else []),
        *(["", "Accuracy: 2 gateways × 2 workers on one hot key, offered 4× its limit (per window: "
           "`bench/results/latest.md`):", "", *tables[ACCURACY_TITLE]] if ACCURACY_TITLE in tables else []),
        README_END,
    ])
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + block + text[end:])
    print("README.md: benchmark tables updated", flush=True)


def overloaded(lat: Latency) -> bool:
    """Past saturation at this offered rate: the open-loop queue grows, latency is queueing."""
    return lat.achieved < 0.95 * lat.offered


def nice_ticks(low: float, high: float, n: int = 5) -> list:
    """Round axis ticks covering low..high (low <= 0 <= high), zero among them."""
    raw = (high - low) / n or 1.0
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [step * i for i in range(math.floor(low / step), math.ceil(high / step) + 1)]


class BarPanel:
    """One grouped bar chart in the SVG: groups (setups) of bars (series) on a linear axis."""

    WIDTH, LEFT, BAR, GAP, HEIGHT = 900, 70, 30, 34, 190

    def __init__(self, y0, title, series_colors, value_fmt):
        self.y0, self.title, self.colors, self.fmt = y0, title, series_colors, value_fmt

    def render(self, groups, low, high, clipped_note=None) -> list:
        """groups: [(label, [(value or None, clipped?)])]. The axis spans low..high; a value
        outside is drawn to the edge, and hatched when marked clipped, with its real value."""
        p, top_y, bottom_y = [], self.y0, self.y0 + self.HEIGHT
        p.append(f'<text x="{self.LEFT}" y="{self.y0 - 14}" font-size="14" font-weight="bold">{esc(self.title)}</text>')
        ticks = nice_ticks(min(low, 0.0), max(high, 0.0))
        lo, hi = ticks[0], ticks[-1]
        y_of = lambda v: bottom_y - (bottom_y - top_y) * (max(lo, min(v, hi)) - lo) / (hi - lo)  # noqa: E731
        for t in ticks:
            p.append(f'<line x1="{self.LEFT}" y1="{y_of(t):.1f}" x2="{self.WIDTH - 10}" y2="{y_of(t):.1f}" '
                     f'stroke="{"#999" if t == 0 else "#e3e3e3"}"/>')
            p.append(f'<text x="{self.LEFT - 6}" y="{y_of(t) + 4:.1f}" font-size="10" text-anchor="end">'
                     f'{self.fmt(t)}</text>')
        zero, x = y_of(0.0), self.LEFT + 12
        for label, bars in groups:
            for j, (v, clipped) in enumerate(bars):
                bx, cx = x + j * self.BAR, x + j * self.BAR + (self.BAR - 3) / 2
                if v is None:
                    p.append(f'<text x="{cx}" y="{zero - 3}" font-size="9" text-anchor="middle">n/a</text>')
                    continue
                y = y_of(v)
                fill = f"url(#hatch{j})" if clipped else list(self.colors.values())[j]
                p.append(f'<rect x="{bx}" y="{min(y, zero):.1f}" width="{self.BAR - 3}" height="{abs(zero - y):.1f}" '
                         f'fill="{fill}"><title>{esc(label)}: {self.fmt(v)}</title></rect>')
                label_y = y - 3 if v >= 0 else y + 11
                p.append(f'<text x="{cx}" y="{label_y:.1f}" font-size="9" text-anchor="middle">'
                         f'{self.fmt(v)}{"*" if clipped else ""}</text>')
            p.append(f'<text x="{x + len(bars) * self.BAR / 2}" y="{bottom_y + 15}" font-size="12" '
                     f'text-anchor="middle" font-weight="bold">{esc(label)}</text>')
            x += len(bars) * self.BAR + self.GAP
        lx = self.LEFT + 12
        for name, color in self.colors.items():
            p.append(f'<rect x="{lx}" y="{bottom_y + 26}" width="10" height="10" fill="{color}"/>')
            p.append(f'<text x="{lx + 14}" y="{bottom_y + 35}" font-size="11">{esc(name)}</text>')
            lx += 24 + 6 * len(name)
        if clipped_note:
            p.append(f'<text x="{lx + 10}" y="{bottom_y + 35}" font-size="11" fill="#555">{esc(clipped_note)}</text>')
        return p


def latency_panel(rows: dict, shown: list, fraction: float, y0: int) -> list:
    """Added p50 / p99 over the baseline at one offered rate; overloaded setups hatched."""
    groups, in_range = [], [0.5]
    for r in shown:
        lat, base = r.latency.get(fraction), rows[r.base].latency.get(fraction) if r.base in rows else None
        bars = []
        for p in ("p50", "p99"):
            if lat is None or base is None:
                bars.append((None, False))
                continue
            bars.append((getattr(lat, p) - getattr(base, p), overloaded(lat)))
            if not overloaded(lat):
                in_range.append(getattr(lat, p) - getattr(base, p))
        groups.append((r.key, bars))
    rate = rows["A"].latency[fraction].offered if "A" in rows and fraction in rows["A"].latency else 0
    panel = BarPanel(y0, f"Added latency at {fraction:.0%} of A's throughput ({rate:.0f} req/s, open loop), "
                     "ms over the baseline", {"p50": "#f28e2b", "p99": "#e15759"},
                     lambda v: f"{v:.0f}" if abs(v) >= 10 else f"{v:.2f}")
    return panel.render(groups, min(in_range) * 1.2, max(in_range) * 1.2,
                        "* hatched: past saturation at this rate (queueing), axis clipped")


def svg_chart(rows: dict, plan: Plan, meta: dict) -> str:
    """Throughput vs the baseline at each connection count; added p50/p99 latency at 50 % load
    and at the lowest rate."""
    shown = [r for r in rows.values() if not r.error and r.key != r.base and r.phase == "load"]
    conns = plan.connections
    blues = ["#4e79a7", "#a0cbe8", "#2b4c6f"]
    throughput = BarPanel(50, "Throughput at saturation vs the baseline (A; for D: D0), closed loop",
                          {f"{c} connections": blues[i % 3] for i, c in enumerate(conns)}, lambda v: f"{v:.2f}×")
    groups = [(r.key, [(ratio(r, rows, c), False) for c in conns]) for r in shown]
    parts = throughput.render(groups, 0.0, max([1.0] + [v for _, bars in groups for v, _ in bars if v is not None]))

    # The issue's view (50 % of A), and the lowest rate, where every setup should keep up.
    fractions = sorted({0.5 if 0.5 in plan.load_fractions else plan.load_fractions[-1], min(plan.load_fractions)},
                       reverse=True)
    for i, fraction in enumerate(fractions):
        parts += latency_panel(rows, shown, fraction, 350 + 300 * i)

    y = 350 + 300 * len(fractions) - 30
    for r in (r for r in rows.values() if r.phase == "load"):
        parts.append(f'<text x="{BarPanel.LEFT}" y="{y}" font-size="11" fill="#333"><tspan font-weight="bold">'
                     f'{esc(r.key)}</tspan>  {esc(r.name)}</text>')
        y += 15
    parts.append(f'<text x="{BarPanel.LEFT}" y="{y + 6}" font-size="10" fill="#777">{esc(meta["date"])}, '
                 f'{esc(meta["plan"])}; every number, the machine and the versions: bench/results/latest.md</text>')
    hatches = "".join(
        f'<pattern id="hatch{j}" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
        f'<rect width="6" height="6" fill="white"/><rect width="3" height="6" fill="{c}"/></pattern>'
        for j, c in enumerate(("#f28e2b", "#e15759")))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{BarPanel.WIDTH}" height="{y + 20}" '
            f'font-family="sans-serif">\n<defs>{hatches}</defs>\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(parts) + "\n</svg>\n")


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- Metadata --------------------------------------------------------------------------------
