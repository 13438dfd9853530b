"""The durable log's figures (issue 13), each beside the peers' of the same run where a peer does the same thing.

    python bench/durable.py post      # POST throughput, p50/p99 with 1/16/64 posters, SQLite and PostgreSQL
    python bench/durable.py cross     # delivery p50/p99, 2 processes on one PostgreSQL, 10,000 deliveries/s
    python bench/durable.py resume    # 1,000 clients resume after every process restarted, both stores
    python bench/durable.py compare --before 96eccf9   # fan-out CPU per delivery, before and after, same run
    python bench/durable.py all --before 96eccf9       # every one of them

- `post`: `--posters` keep-alive connections POST one message after another for `--duration` seconds, nobody
  subscribed, on a fresh server per store and per count. Throughput, p50/p99 of the POST's answer, server CPU
  per POST, and the group-commit size the store's writer saw (`chatserver_store_writes_total` over
  `..._commits_total`). Peer: Nchan's publisher location with the same posters (memory only, no durability).
- `cross`: two server processes on one PostgreSQL database; `--clients` WebSockets on process A, the paced POSTs
  (`--rate` deliveries per second in all) on process B, so every event reaches A through the log (B's commit,
  its NOTIFY, A reading the log). Beside it the same run with the POSTs on A (same process), and Nchan's.
- `resume`: `--processes` servers on one database per store, `--clients` WebSockets spread over them; the
  clients leave, `--missed` events are posted, every process is restarted, and all clients come back at once
  with their cursors. The figure is the time until every client has every event it missed (no reset: a reset
  fails the run). Peer: Nchan's reconnect storm (no resume: ready when connected).
- `compare`: checks `--before` out into a temporary worktree and runs, alternately, that revision's server (its
  run.py, seeded by its own bench/systems.py) and this one's, with this checkout's generator, on bench/run.py's
  WebSocket fan-out (1,000 and 5,000 subscribers) and long-poll (1,000), `--repeat` times each, printing the
  median CPU per 10k deliveries, after ÷ before, and the write system calls per delivery. Peer: Nchan.
  `--workloads` adds pollbatch, mixed and idle (memory per idle WebSocket and parked poll).

Everything runs on loopback, bounded in count and time. Results are printed and saved to
`bench/results/durable-<stamp>.json`. A run that lost or duplicated a delivery, or whose server refused a POST,
makes the command exit 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import WORKLOADS, generate
from systems import SYSTEMS, Ours, OursPostgres, System, raise_nofile

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
STORES = {"sqlite": Ours, "pg": OursPostgres}
STORE_LABELS = {"sqlite": "SQLite", "pg": "PostgreSQL"}
# compare: (bench/run.py workload, its label, the figures compared), at bench/run.py's --full sizes unless --quick.
CPU = ("cpu_per_10k",)
COMPARED = (
    ("ws1k", "WebSocket fan-out, 1,000 subscribers", CPU),
    ("ws5k", "WebSocket fan-out, 5,000 subscribers", CPU),
    ("poll1k", "long-poll, 1,000 pollers, one event per answer", CPU),
    ("pollbatch", "long-poll, 1,000 pollers, events piling up", CPU),
    ("mixed", "mixed, 80% WebSocket 20% long-poll", CPU),
    ("idle", "idle connections held (kB each)", ("kb_per_ws", "kb_per_poll")),
)
DEFAULT_COMPARED = ("ws1k", "ws5k", "poll1k")


class Cluster:
    """`processes` servers of ours on one new database of `store`, the first one owning (and dropping) it."""

    def __init__(self, store: str, processes: int) -> None:
        first = STORES[store]()
        self.servers: list[Ours] = [first, *(STORES[store](db=first.db) for _ in range(processes - 1))]

    def prepare(self, users: int) -> dict[str, Any]:
        return self.servers[0].prepare(users)

    def start(self) -> None:
        for server in self.servers:
            server.start()

    def restart(self) -> list[int]:
        """Every process stopped, then every one started again: nothing of the old ones is left running."""
        for server in self.servers:
            server.stop()
        self.start()
        return self.pids

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    @property
    def pids(self) -> list[int]:
        return [server.pid for server in self.servers]

    def cleanup(self) -> None:
        for server in reversed(self.servers):  # the owner last: its cleanup removes the database
            server.cleanup()


class TreeOurs(Ours):
    """Ours as checked out in `tree`: its run.py, seeded by its own bench/systems.py (its own store API)."""

    def __init__(self, tree: Path) -> None:
        self.root = tree
        super().__init__()

    def prepare(self, users: int) -> dict[str, Any]:
        seed = ("import json, sys; sys.path.insert(0, 'bench'); import systems; "
                "o = systems.Ours.__new__(systems.Ours); "
                "o.db, o.state = sys.argv[1], systems.Path(sys.argv[1]).parent; "
                "print(json.dumps(o.prepare(int(sys.argv[2]))))")
        done = subprocess.run([sys.executable, "-c", seed, self.db, str(users)], cwd=self.root, capture_output=True,
                              text=True, timeout=300, check=False)
        if done.returncode:
            raise RuntimeError(f"seeding in {self.root} failed: {done.stderr[-1000:]}")
        return dict(json.loads(done.stdout.splitlines()[-1]))


def spec_of(kind: str, port: int, pid: int, workload: str, sizes: dict[str, Any], info: dict[str, Any]) -> dict:
    return {"system": kind, "host": "127.0.0.1", "port": port, "pid": pid, "workload": workload, **sizes, **info}


def run_cluster(store: str, processes: int, workload: str, sizes: dict[str, Any], users: int,
                publish_to: int = 0) -> dict[str, Any]:
    """One generator run against a fresh cluster: subscribers spread over every process (`sizes["ports"]`, when
    given, names which), publishers on process `publish_to`."""
    cluster = Cluster(store, processes)
    try:
        info = cluster.prepare(users)
        cluster.start()
        spec = spec_of("ours", cluster.ports[0], cluster.pids[0], workload, sizes, info)
        spec.update(ports=[cluster.ports[i] for i in sizes.get("subscribe_to", range(processes))],
                    publish_port=cluster.ports[publish_to], pids=cluster.pids)
        return generate(spec, cluster.restart)
    finally:
        cluster.cleanup()


def run_peer(name: str, workload: str, sizes: dict[str, Any], users: int) -> dict[str, Any]:
    system: System = SYSTEMS[name]()
    try:
        info = system.prepare(users)
        system.start()

        def restart() -> list[int]:
            system.restart()
            return [system.pid]

        return generate(spec_of(system.kind, system.port, system.pid, workload, sizes, info), restart)
    finally:
        system.cleanup()


def peers_available(names: list[str]) -> list[str]:
    ready = []
    for name in names:
        why = SYSTEMS[name].available()
        if why:
            print(f"SKIPPED peer {name}: {why}", flush=True)
        else:
            ready.append(name)
    return ready


def failed(result: dict[str, Any]) -> bool:
    return bool(result.get("failed_run") or result.get("lost") or result.get("duplicated") or result.get("error_count"))


def show(label: str, result: dict[str, Any], keys: tuple[str, ...]) -> None:
    if result.get("failed_run"):
        print(f"  {label:<44} FAILED: {result['failed_run']}", flush=True)
        return
    cells = []
    for key in keys:
        value = result.get(key)
        cells.append(f"{key} {value:,.3f}" if isinstance(value, float) else f"{key} {value}")
    problems = {k: result[k] for k in ("lost", "duplicated", "error_count") if result.get(k)}
    extra = f"   !! {problems} {result.get('errors', [])[:2]}" if problems else ""
    print(f"  {label:<44} " + "   ".join(cells) + extra, flush=True)


# -- the benchmarks --------------------------------------------------------------------------------------


def bench_post(args: argparse.Namespace, peers: list[str]) -> list[dict[str, Any]]:
    print(f"\n== POST throughput: posters POST one after another for {args.duration:g} s, nobody subscribed")
    keys = ("posts_per_s", "p50_ms", "p99_ms", "cpu_per_post_ms", "writes_per_commit")
    out = []
    for posters in args.posters:
        sizes = {"posters": posters, "duration": args.duration}
        for store in args.stores:
            result = run_cluster(store, 1, "post", sizes, posters)
            out.append({"bench": "post", "system": f"ours-{store}", **sizes, **result})
            show(f"{posters:>2} posters, chatserver on {STORE_LABELS[store]}", result, keys)
        for name in peers:
            result = run_peer(name, "post", sizes, posters)
            out.append({"bench": "post", "system": name, **sizes, **result})
            show(f"{posters:>2} posters, {name}", result, keys[:4])
    return out


def bench_cross(args: argparse.Namespace, peers: list[str]) -> list[dict[str, Any]]:
    print(f"\n== Delivery at {args.rate:,} deliveries/s to {args.clients:,} WebSockets, {args.duration:g} s, "
          "two processes on one PostgreSQL")
    keys = ("p50_ms", "p99_ms", "max_ms", "deliveries_per_s", "server_cpu")
    sizes = {"clients": args.clients, "rate": args.rate, "duration": args.duration, "subscribe_to": [0]}
    out = []
    for label, publish_to in (("cross-process: subscribers on A, POSTs on B", 1),
                              ("same process: subscribers and POSTs on A", 0)):
        result = run_cluster("pg", 2, "latency", sizes, args.clients + 1, publish_to=publish_to)
        out.append({"bench": "cross", "system": "ours-pg", "publish_to": publish_to, **sizes, **result})
        show(label, result, keys)
    for name in peers:
        peer_sizes = {k: v for k, v in sizes.items() if k != "subscribe_to"}
        result = run_peer(name, "latency", peer_sizes, args.clients + 1)
        out.append({"bench": "cross", "system": name, **peer_sizes, **result})
        show(f"{name} (one process)", result, keys)
    return out


def bench_resume(args: argparse.Namespace, peers: list[str]) -> list[dict[str, Any]]:
    print(f"\n== Resume: {args.clients:,} WebSockets over {args.processes} processes, {args.missed} events posted "
          "while they were away, every process restarted, all come back with their cursors")
    keys = ("time_to_all_ready_s", "time_to_connected_s", "resets", "server_cpu")
    sizes = {"clients": args.clients, "missed": args.missed}
    out = []
    for store in args.stores:
        result = run_cluster(store, args.processes, "storm", sizes, args.clients + 1)
        out.append({"bench": "resume", "system": f"ours-{store}", "processes": args.processes, **sizes, **result})
        show(f"chatserver on {STORE_LABELS[store]}, caught up", result, keys)
        if not result.get("failed_run") and not result.get("caught_up"):
            result["failed_run"] = "not every client was caught up within 60 s"
    for name in peers:
        result = run_peer(name, "storm", {"clients": args.clients}, args.clients + 1)
        out.append({"bench": "resume", "system": name, "clients": args.clients, **result})
        show(f"{name} (no resume: connected)", result, keys[:2])
    return out


def run_tree(tree: Path, workload: str, quick: bool) -> dict[str, Any]:
    """One workload of bench/run.py against the server checked out in `tree`, with this checkout's generator."""
    kind, quick_sizes, full_sizes = WORKLOADS[workload]
    sizes = quick_sizes if quick else full_sizes
    server = TreeOurs(tree)
    try:
        info = server.prepare(sizes["clients"] + sizes.get("polls", 0) + 1)
        server.start()
        return generate(spec_of("ours", server.port, server.pid, kind, sizes, info), lambda: [server.pid])
    finally:
        server.cleanup()


def run_peer_workload(name: str, workload: str, quick: bool) -> dict[str, Any]:
    kind, quick_sizes, full_sizes = WORKLOADS[workload]
    sizes = quick_sizes if quick else full_sizes
    return run_peer(name, kind, sizes, sizes["clients"] + 1)


def bench_compare(args: argparse.Namespace, peers: list[str]) -> list[dict[str, Any]]:
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.before], capture_output=True,
                         text=True, check=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    print(f"\n== Before ({rev}) and after ({head}{'+changes' if dirty() else ''}): server CPU-s per 10k deliveries, "
          f"{'quick' if args.quick else 'full'} sizes, {args.repeat} runs each, alternating")
    tree = Path(tempfile.mkdtemp(prefix="chatserver-before-"))
    tree.rmdir()
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)
    out: list[dict[str, Any]] = []
    try:
        for workload, label, keys in ((w, label, k) for w, label, k in COMPARED if w in args.workloads):
            figures: dict[tuple[str, str], list[float]] = {(s, k): [] for s in ("before", "after") for k in keys}
            writes: dict[str, list[float]] = {"before": [], "after": []}
            for n in range(args.repeat):
                order = [("before", tree), ("after", ROOT)]
                for side, where in order if n % 2 == 0 else order[::-1]:
                    result = run_tree(where, workload, args.quick)
                    out.append({"bench": "compare", "workload": workload, "side": side,
                                "revision": rev if side == "before" else head, **result})
                    if failed(result):
                        show(f"{workload} {side}", result, keys)
                        continue
                    for key in keys:
                        figures[side, key].append(result[key])
                    if "write_calls_per_delivery" in result:
                        writes[side].append(result["write_calls_per_delivery"])
            for key in keys:
                before, after = (statistics.median(figures[s, key]) if figures[s, key] else None
                                 for s in ("before", "after"))
                ratio = f"{after / before:.2f}x" if before and after else "—"
                print(f"  {label + ', ' + key:<60} before {fmt_runs(figures['before', key])}   "
                      f"after {fmt_runs(figures['after', key])}   after ÷ before {ratio} (medians)", flush=True)
            if writes["before"] or writes["after"]:
                print(f"  {'':<60} write(2)-family calls (syscw) per delivery: before {fmt_runs(writes['before'])}"
                      f"   after {fmt_runs(writes['after'])}", flush=True)
            for name in peers:
                result = run_peer_workload(name, workload, args.quick)
                out.append({"bench": "compare", "workload": workload, "side": name, **result})
                show(f"    {name}, same sizes", result, keys + (("write_calls_per_delivery",) if keys == CPU else ()))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False,
                       capture_output=True)
        shutil.rmtree(tree, ignore_errors=True)
    return out


def fmt_runs(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.median(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def dirty() -> bool:
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, check=False)
    return bool(status.stdout.strip())


BENCHES: dict[str, Callable[[argparse.Namespace, list[str]], list[dict[str, Any]]]] = {
    "post": bench_post,
    "cross": bench_cross,
    "resume": bench_resume,
    "compare": bench_compare,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=[*BENCHES, "all"])
    parser.add_argument("--stores", default="sqlite,pg", help="post, resume: comma-separated, of sqlite,pg")
    parser.add_argument("--posters", default="1,16,64", help="post: comma-separated numbers of posters")
    parser.add_argument("--duration", type=float, default=10.0, help="post, cross: seconds measured")
    parser.add_argument("--clients", type=int, default=1000, help="cross, resume: WebSocket clients")
    parser.add_argument("--rate", type=int, default=10_000, help="cross: deliveries per second in all")
    parser.add_argument("--missed", type=int, default=3, help="resume: events posted while the clients were away")
    parser.add_argument("--processes", type=int, default=2, help="resume: server processes per store")
    parser.add_argument("--before", default="96eccf9", help="compare: the revision to compare with")
    parser.add_argument("--repeat", type=int, default=3, help="compare: runs of each side per workload")
    parser.add_argument("--quick", action="store_true", help="compare: bench/run.py's quick sizes")
    parser.add_argument("--workloads", default=",".join(DEFAULT_COMPARED),
                        help="compare: which of " + ",".join(w for w, _, _ in COMPARED))
    parser.add_argument("--peers", default="nchan", help="comma-separated peers of bench/systems.py, or ''")
    args = parser.parse_args(argv)
    args.stores = [s for s in args.stores.split(",") if s]
    args.posters = [int(n) for n in args.posters.split(",") if n]
    for store in args.stores:
        if store not in STORES:
            parser.error(f"unknown store {store!r}")
    raise_nofile()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if "pg" in args.stores or args.bench in ("cross", "all"):
        why = OursPostgres.available()
        if why:
            print(f"!! {why}")
            return 1
    peers = peers_available([p for p in args.peers.split(",") if p])
    started = time.time()
    results: list[dict[str, Any]] = []
    for name in BENCHES if args.bench == "all" else [args.bench]:
        results += BENCHES[name](args, peers)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    path = RESULTS / f"durable-{stamp}.json"
    path.write_text(json.dumps({"args": vars(args), "started": stamp, "results": results}, indent=1))
    print(f"\nresults: {path}")
    bad = [r for r in results if failed(r)]
    for r in bad:
        print(f"!! FAILED: {r.get('bench')} on {r.get('system') or r.get('side')}: lost={r.get('lost')} "
              f"duplicated={r.get('duplicated')} errors={r.get('error_count')} {r.get('failed_run') or ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
