"""Tables, ratios, target checks and plots of one benchmark run (bench/run.py hands it the run's results).

Every figure of ours is printed beside the peers' from the same run, with the ratio ours / peer (below 1: ours
is cheaper or faster). `write_docs` replaces the generated part of docs/benchmarks.md (between the markers)
and redraws docs/bench-*.png; the prose around the markers is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- results:begin (bench/run.py writes this part) -->", "<!-- results:end -->"
PEERS = ("nchan", "sio-aiohttp", "sio-tornado")
ORDER = ("ours", "ours-pg", *PEERS)
LABELS = {
    "ours": "chatserver",
    "ours-pg": "chatserver on PostgreSQL",
    "nchan": "nginx + Nchan",
    "sio-aiohttp": "python-socketio on aiohttp",
    "sio-tornado": "python-socketio on Tornado",
}

# (workload, key, label, unit, digits): the figures of the table, lower is better for each.
FIGURES: list[tuple[str, str, str, str, int]] = [
    ("ws1k", "cpu_per_10k", "WebSocket fan-out, 1,000 subscribers", "CPU-s / 10k deliveries", 3),
    ("ws5k", "cpu_per_10k", "WebSocket fan-out, 5,000 subscribers", "CPU-s / 10k deliveries", 3),
    ("poll1k", "cpu_per_10k", "long-poll, 1,000 pollers, one event per answer", "CPU-s / 10k deliveries", 3),
    ("pollbatch", "cpu_per_10k", "long-poll, 1,000 pollers, events piling up", "CPU-s / 10k deliveries", 3),
    ("mixed", "cpu_per_10k", "mixed 80% WebSocket / 20% long-poll, 1,000 clients", "CPU-s / 10k deliveries", 3),
    ("idle", "kb_per_ws", "memory per idle WebSocket", "kB", 1),
    ("idle", "kb_per_poll", "memory per parked long-poll", "kB", 1),
    ("latency", "p50_ms", "POST-to-receipt p50 at 10,000 deliveries/s", "ms", 1),
    ("latency", "p99_ms", "POST-to-receipt p99 at 10,000 deliveries/s", "ms", 1),
    ("latency2k", "ws_p50_ms", "p50 with 1,000 WebSocket + 1,000 long-poll clients, over WebSocket", "ms", 1),
    ("latency2k", "ws_p99_ms", "p99 with 1,000 WebSocket + 1,000 long-poll clients, over WebSocket", "ms", 1),
    ("latency2k", "poll_p50_ms", "p50 with 1,000 WebSocket + 1,000 long-poll clients, over long-poll", "ms", 1),
    ("latency2k", "poll_p99_ms", "p99 with 1,000 WebSocket + 1,000 long-poll clients, over long-poll", "ms", 1),
    ("ws1k", "deliveries_per_s", "deliveries per second to 1,000 WebSocket subscribers (higher is better)", "/s", 0),
    ("slow", "rss_growth_kb", "server RSS growth in the stalled-reader run (ours: with its resume history)", "kB", 0),
    ("storm", "time_to_all_ready_s", "resume storm: 1,000 reconnects after a restart, all ready (ours: caught up)",
     "s", 2),
]


def index(run: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["workload"], r["system"]): r for r in run["results"]}


def value(results: dict[tuple[str, str], dict[str, Any]], workload: str, system: str, key: str) -> float | None:
    r = results.get((workload, system))
    if r is None or r.get("failed_run"):
        return None
    v = r.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def fmt(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def ratio(ours: float | None, peer: float | None) -> str:
    if ours is None or peer is None or peer == 0:
        return "—"
    return f"{ours / peer:.2f}x"


def systems_in(run: dict[str, Any]) -> list[str]:
    present = {r["system"] for r in run["results"]}
    return [s for s in ORDER if s in present]


def table_rows(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    results = index(run)
    systems = systems_in(run)
    peers = [s for s in systems if s in PEERS]
    header = ["figure (lower is better)", "unit", *[LABELS[s] for s in systems], *[f"ours ÷ {s}" for s in peers]]
    rows = []
    for workload, key, label, unit, digits in FIGURES:
        values = {s: value(results, workload, s, key) for s in systems}
        if all(v is None for v in values.values()):
            continue
        rows.append(
            [
                label,
                unit,
                *[fmt(values[s], digits) for s in systems],
                *[ratio(values.get("ours"), values[s]) for s in peers],
            ]
        )
    return header, rows


CPU_WORKLOADS = [(w, label) for w, key, label, unit, _ in FIGURES if key == "cpu_per_10k"]


def split_rows(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The CPU figures split into user and system time (the system part is mostly the sockets' kernel work)."""
    results = index(run)
    systems = systems_in(run)
    header = ["CPU-s / 10k deliveries: user + system", *[LABELS[s] for s in systems]]
    rows = []
    for workload, label in CPU_WORKLOADS:
        cells = []
        for system in systems:
            user, sys_, n = (value(results, workload, system, k) for k in ("server_user", "server_sys", "deliveries"))
            cells.append("—" if user is None or sys_ is None or not n else
                         f"{user / n * 10_000:.3f} + {sys_ / n * 10_000:.3f}")
        if any(c != "—" for c in cells):
            rows.append([label, *cells])
    return header, rows


def checks(run: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The targets of issue 7: (target, measured, met)."""
    results = index(run)
    out: list[tuple[str, str, bool | None]] = []

    def v(w: str, s: str, k: str) -> float | None:
        return value(results, w, s, k)

    def at_most(label: str, x: float | None, limit: float, text: str) -> None:
        out.append((label, text if x is not None else "not measured", None if x is None else x <= limit))

    ws1k, ws5k, poll = (
        v("ws1k", "ours", "cpu_per_10k"),
        v("ws5k", "ours", "cpu_per_10k"),
        v("poll1k", "ours", "cpu_per_10k"),
    )
    nchan_ws, nchan_poll = v("ws1k", "nchan", "cpu_per_10k"), v("poll1k", "nchan", "cpu_per_10k")
    sio_ws = v("ws1k", "sio-tornado", "cpu_per_10k")
    at_most("WebSocket, 1,000 subscribers: at most 0.12 CPU-s / 10k", ws1k, 0.12, f"{fmt(ws1k, 3)}")
    at_most("WebSocket, 5,000 subscribers: at most 0.15 CPU-s / 10k", ws5k, 0.15, f"{fmt(ws5k, 3)}")
    r = ws1k / nchan_ws if ws1k and nchan_ws else None
    at_most("WebSocket: within 1.7x of Nchan (same run)", r, 1.7, f"{fmt(r, 2)}x")
    r = sio_ws / ws1k if ws1k and sio_ws else None
    out.append(
        (
            "WebSocket: at least 6x better than python-socketio on Tornado",
            f"{fmt(r, 2)}x",
            None if r is None else r >= 6,
        )
    )
    at_most("long-poll: at most 0.6 CPU-s / 10k", poll, 0.6, f"{fmt(poll, 3)}")
    r = poll / nchan_poll if poll and nchan_poll else None
    at_most("long-poll: within 3.5x of Nchan (same run)", r, 3.5, f"{fmt(r, 2)}x")
    # Batching: when events wait for a poller, its answer carries all of them. How many wait depends on how fast
    # the server answers (a quicker server leaves fewer to pile up), so the check is that answers did carry
    # several (Nchan's carry one each), not an average number of them.
    per_answer = v("pollbatch", "ours", "events_per_answer")
    several = v("pollbatch", "ours", "answers_with_several")
    most = v("pollbatch", "ours", "max_events_per_answer")
    out.append(
        (
            "long-poll: batching when events pile up",
            f"{fmt(per_answer, 2)} events per answer on average, "
            f"{fmt(None if several is None else 100 * several, 0)}% of answers with several, up to {fmt(most, 0)}",
            None if most is None or several is None else most > 1 and several > 0.05,
        )
    )
    kb_ws, kb_poll = v("idle", "ours", "kb_per_ws"), v("idle", "ours", "kb_per_poll")
    at_most("at most 12 kB per idle WebSocket", kb_ws, 12, f"{fmt(kb_ws, 1)} kB")
    at_most("at most 10 kB per parked long-poll", kb_poll, 10, f"{fmt(kb_poll, 1)} kB")
    concurrent = v("idle", "ours", "concurrent")
    wanted = v("idle", "ours", "wanted")
    out.append(
        (
            "10,000 concurrent clients in one process",
            f"{fmt(concurrent, 0)} of {fmt(wanted, 0)} held",
            None if concurrent is None or wanted is None else concurrent >= 10000 and concurrent == wanted,
        )
    )
    p99, nchan_p99 = v("latency", "ours", "p99_ms"), v("latency", "nchan", "p99_ms")
    r = p99 / nchan_p99 if p99 and nchan_p99 else None
    at_most(
        "latency at 10,000 deliveries/s: p99 within 1.5x of Nchan",
        r,
        1.5,
        f"{fmt(p99, 1)} ms vs {fmt(nchan_p99, 1)} ms: {fmt(r, 2)}x",
    )
    slow = results.get(("slow", "ours"))
    if slow and not slow.get("failed_run"):
        # The close frame reaches the stalled reader only if Tornado had not yet given up the close handshake
        # when it read again; the server's own count says whether it cut the reader off.
        ok = slow.get("slow_close_code") in (1008, 4008) or (slow.get("slow_clients_closed_total") or 0) >= 1
        out.append(
            (
                "slow consumer cut off (4008/1008), the others keep receiving, RSS bounded",
                f"close code {slow.get('slow_close_code')}, cut off {slow.get('slow_clients_closed_total')}, "
                f"lost {slow.get('lost')}, history {fmt((slow.get('history_bytes') or 0) / 1024, 0)} kB, "
                f"RSS +{fmt(slow.get('rss_growth_kb'), 0)} kB for {fmt(slow.get('event_bytes_total', 0) / 1024, 0)}"
                " kB published",
                ok and slow.get("lost") == 0,
            )
        )
    return out


def notes(run: dict[str, Any]) -> list[str]:
    lines = []
    for r in run["results"]:
        where = f"{r['workload']} on {r['system']}"
        if r.get("failed_run"):
            lines.append(f"{where}: FAILED: {r['failed_run']}")
        if r.get("lost") or r.get("duplicated"):
            lines.append(f"{where}: lost {r.get('lost')}, duplicated {r.get('duplicated')}")
        if r.get("gen_bound"):
            lines.append(
                f"{where}: the generator was busy {r['gen_cpu']:.2f} of {r['wall']:.2f} s: it limited the rate "
                f"({r.get('deliveries_per_s', 0):,.0f} deliveries/s); the CPU per delivery is still the server's"
            )
        if r["workload"] == "slow" and not r.get("failed_run"):
            lines.append(
                f"{where}: stalled reader closed={r.get('slow_closed')} code={r.get('slow_close_code')}, "
                f"got {r.get('slow_received')} of {r.get('events')} events; server RSS +{r.get('rss_growth_kb')} kB"
            )
        if r["workload"] == "storm" and not r.get("failed_run"):
            caught_up = (f", each caught up with the {r['missed']} events it missed ({r.get('resets')} resets)"
                         if r.get("missed") else "")
            lines.append(
                f"{where}: {r.get('ready')} ready{caught_up}, {r.get('failed')} failed, in "
                f"{r.get('time_to_all_ready_s', 0):.2f} s (all connected after {r.get('time_to_connected_s', 0):.2f} s)"
            )
        if r["workload"] in ("poll1k", "pollbatch") and r.get("events_per_answer") is not None:
            lines.append(f"{where}: {r['events_per_answer']:.2f} events per poll answer"
                         + (f" ({100 * r['answers_with_several']:.0f}% of answers with several, up to"
                            f" {r['max_events_per_answer']})" if "answers_with_several" in r else ""))
    return lines


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def print_table(run: dict[str, Any]) -> None:
    header, rows = table_rows(run)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    print()
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)))
    split_header, split = split_rows(run)
    if split:
        print()
        widths = [max(len(str(x)) for x in col) for col in zip(split_header, *split, strict=False)]
        for row in [split_header, *split]:
            print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)))
    print("\ntargets of issue 7:")
    for label, measured, met in checks(run):
        mark = "n/a " if met is None else "MET " if met else "MISS"
        print(f"  [{mark}] {label}: {measured}")
    for line in notes(run):
        print("  - " + line)


def plot(run: dict[str, Any]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -r bench/requirements.txt): no plots")
        return []
    results = index(run)
    systems = systems_in(run)
    colors = {"ours": "#1f77b4", "ours-pg": "#9467bd", "nchan": "#2ca02c", "sio-aiohttp": "#ff7f0e",
              "sio-tornado": "#d62728"}
    made = []

    def bars(name: str, groups: list[tuple[str, str, str]], ylabel: str, title: str, log: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / max(1, len(systems))
        for n, system in enumerate(systems):
            xs, ys = [], []
            for g, (workload, key, _) in enumerate(groups):
                y = value(results, workload, system, key)
                if y is not None:
                    xs.append(g + n * width)
                    ys.append(y)
            ax.bar(xs, ys, width, label=LABELS[system], color=colors[system])
            for x, y in zip(xs, ys, strict=True):
                ax.text(x, y, f"{y:.3g}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks([g + width * (len(systems) - 1) / 2 for g in range(len(groups))])
        ax.set_xticklabels([label for _, _, label in groups], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = ROOT / "docs" / f"bench-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path.name)

    bars(
        "cpu",
        [
            ("ws1k", "cpu_per_10k", "WebSocket\n1,000 subs"),
            ("ws5k", "cpu_per_10k", "WebSocket\n5,000 subs"),
            ("poll1k", "cpu_per_10k", "long-poll\n1 event/answer"),
            ("pollbatch", "cpu_per_10k", "long-poll\nevents piling up"),
            ("mixed", "cpu_per_10k", "mixed\n80/20"),
        ],
        "server CPU-s per 10,000 deliveries (log)",
        f"Server CPU per 10,000 deliveries of a ~365-byte event ({run['mode']} run)",
        log=True,
    )
    bars(
        "memory",
        [("idle", "kb_per_ws", "per idle WebSocket"), ("idle", "kb_per_poll", "per parked long-poll")],
        "kB of server RSS",
        "Server memory per idle connection",
    )
    bars(
        "latency",
        [("latency", "p50_ms", "p50"), ("latency", "p99_ms", "p99")],
        "ms",
        "POST-to-receipt latency, 1,000 WebSocket clients at 10,000 deliveries/s",
    )
    return made


def write_docs(run: dict[str, Any]) -> None:
    plots = plot(run)
    header, rows = table_rows(run)
    parts = [
        BEGIN,
        "",
        f"Run: `{run['mode']}`{' (' + run['label'] + ')' if run.get('label') else ''}, started {run['started']}, "
        f"{run['seconds']:.0f} s. Ratios are ours ÷ peer (below 1: ours is cheaper or faster).",
        "",
        markdown_table(header, rows),
        "",
    ]
    split_header, split = split_rows(run)
    if split:
        parts += ["The CPU figures split into user and system time (system: mostly the sockets' kernel work):", "",
                  markdown_table(split_header, split), ""]
    parts += [
        "Targets of issue 7 in this run:",
        "",
        markdown_table(
            ["target", "measured", "met"],
            [[t, m, "n/a" if ok is None else "yes" if ok else "**no**"] for t, m, ok in checks(run)],
        ),
        "",
    ]
    if run.get("skipped"):
        parts += [f"Skipped: {name}: {why}" for name, why in run["skipped"].items()] + [""]
    parts += ["Notes from the run:", ""] + [f"- {line}" for line in notes(run)] + [""]
    parts += [f"![{p}]({p})" for p in plots] + ["", END]
    generated = "\n".join(parts)
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + generated + tail
    else:
        text = text.rstrip() + "\n\n" + generated + "\n"
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)} and {', '.join(plots) or 'no plots'}")


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python bench/report.py bench/results/<stamp>.json  (prints it and rewrites the docs part)")
    saved = json.loads(Path(sys.argv[1]).read_text())
    print_table(saved)
    write_docs(saved)
