"""The benchmark suite: chatserver against python-socketio (Tornado, aiohttp) and nginx + Nchan, one command.

    pip install -r bench/requirements.txt        # the peers and matplotlib; nginx + Nchan from Debian
    python bench/run.py                           # quick: every workload, smaller sizes (a few minutes)
    python bench/run.py --full                    # the sizes of docs/benchmarks.md
    python bench/run.py --systems ours,nchan --workloads ws1k,latency

For each workload, each system is started fresh (bench/systems.py), a load generator runs in its own process
(bench/loadgen.py) and reports back; results go to bench/results/<stamp>.json, the table and plots to
docs/benchmarks.md and docs/bench-*.png (`--no-docs` to leave them). A run that lost or duplicated a delivery
fails: the command exits 1 with a loud message. Loopback only; every run is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import WORKLOADS, run_one, with_receivers
from report import print_table, write_docs
from systems import SYSTEMS, raise_nofile

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the full sizes (default: quick)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: " + ",".join(SYSTEMS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ",".join(WORKLOADS))
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md and the plots")
    parser.add_argument("--label", default="", help="a name for this run in the results file")
    parser.add_argument("--receivers", choices=("python", "c"), default="python",
                        help="c: the fan-out runs' subscribers in bench/receivers.c (ours and Nchan), which leave "
                             "the server more of a shared machine's cores")
    args = parser.parse_args(argv)
    raise_nofile()
    # A SIGTERM unwinds like Ctrl-C: every started server and generator is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    systems = [s for s in args.systems.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    for name in systems + workloads:
        if name not in SYSTEMS and name not in WORKLOADS:
            parser.error(f"unknown system or workload {name!r}")
    skipped = {}
    for name in systems:
        why = SYSTEMS[name].available()
        if why:
            skipped[name] = why
            print(f"SKIPPED {name}: {why}", flush=True)
    results: list[dict[str, Any]] = []
    started = time.time()
    for workload in workloads:
        _, quick_sizes, full_sizes = WORKLOADS[workload]
        sizes = full_sizes if args.full else quick_sizes
        for name in systems:
            if name in skipped:
                continue
            print(f"-- {workload} on {name} {sizes}", flush=True)
            t0 = time.monotonic()
            system = SYSTEMS[name]()
            try:
                result = run_one(system, workload, with_receivers(sizes, system, workload, args.receivers))
            except Exception as exc:
                result = {
                    "workload": workload,
                    "system": name,
                    "failed_run": f"{type(exc).__name__}: {exc}",
                    "lost": -1,
                }
            result["seconds"] = round(time.monotonic() - t0, 1)
            results.append(result)
            print("   " + json.dumps({k: v for k, v in result.items() if k not in ("workload", "system")}), flush=True)
    run = {
        "label": args.label,
        "mode": "full" if args.full else "quick",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "skipped": skipped,
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    path = RESULTS / f"{stamp}{'-' + args.label if args.label else ''}.json"
    path.write_text(json.dumps(run, indent=1))
    print(f"\nresults: {path}")
    print_table(run)
    if not args.no_docs:
        write_docs(run)
    bad = [r for r in results if r.get("lost") or r.get("duplicated") or r.get("failed_run")]
    if bad:
        print("\n" + "!" * 100)
        for r in bad:
            print(
                f"!! FAILED: {r['workload']} on {r['system']}: lost={r.get('lost')} "
                f"duplicated={r.get('duplicated')} {r.get('failed_run') or ''}"
            )
        print("!" * 100)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
