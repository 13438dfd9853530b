"""Worker processes (issue 15), one command: chatserver with 1 and 2 workers beside nginx + Nchan at
`worker_processes` 1 and 2 and python-socketio, in one run; connections held by one worker; kill -9 of a worker
under load.

    pip install -r bench/requirements.txt        # python-socketio, aiohttp, matplotlib
    apt-get install nginx libnginx-mod-nchan
    python bench/workers.py                       # every part (about 10 minutes on 2 cores)
    python bench/workers.py --quick               # smaller sizes (a few minutes)
    python bench/workers.py --parts fanout --workloads ws1k,poll1k --no-docs
    python bench/workers.py --parts fanout --workloads ws1k --systems ours-w1,ours-w2 --rate 200   # a fixed load

- fanout: deliveries per second and server CPU per delivery, `ws1k`, `ws5k` and `poll1k` of bench/run.py (the
  same generator, bench/loadgen.py, in a process of its own), each system started fresh for each workload.
- hold: one worker holds `--hold` idle WebSockets and as many parked long-polls (two generator processes, one of
  each kind); its memory per connection, then broadcasts to all of them (time until every one has each, p50/p99).
- kill: two workers, WebSocket subscribers, paced posts; kill -9 of one worker; its clients reconnect (to the
  other worker, or to it once it is back) with their cursor; time until every client has every event posted
  before the kill and a live one after it; no loss, no duplicate, no reset.

Results go to bench/results/workers-<stamp>.json, the section between the markers in docs/benchmarks.md and
docs/bench-workers.png are rewritten from them (`--no-docs` leaves them). Loopback only; every run is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
from harness import run_one, with_receivers
from systems import Nchan, Ours, SocketIOAiohttp, System, raise_nofile

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
DOCS = ROOT / "docs"
BEGIN, END = "<!-- workers: begin (bench/workers.py) -->", "<!-- workers: end -->"
# This machine's hard limit on open files per process is 20,000: one worker holding 2 x 9,900 client
# connections keeps room for its listener, database and log.
HOLD = 9900

# The C receivers read their sockets in rounds this far apart: each recv takes the frames that gathered, as a
# client reading in batches does, so that the generator's share of the two cores stays small.
RECEIVER_PAUSE_US = 30_000

# bench/run.py's workloads of these names (their kind), with (quick, full) sizes of this run. WINDOW events may be
# published and not yet delivered to every client, and PUBLISHERS connections post them at once (their writes
# share commits): enough to keep two workers busy, so that the rate is what the servers can deliver rather than
# one event's round trip or one write path's. The C receivers take C_EVENTS times the events (a longer window
# measured at their rates; the Python ones of socket.io take the sizes as they are).
WINDOW = 128
PUBLISHERS = 16
C_EVENTS = 5


def _sizes(clients: int, events: int) -> dict[str, Any]:
    return {"clients": clients, "events": events, "window": WINDOW, "publishers": PUBLISHERS}


FANOUT: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "ws1k": (_sizes(1000, 100), _sizes(1000, 400)),
    "ws5k": (_sizes(5000, 30), _sizes(5000, 100)),
    "poll1k": (_sizes(1000, 60), _sizes(1000, 300)),
}


# -- the systems ----------------------------------------------------------------------------------------


class OursWorkers(Ours):
    """`python run.py --workers N` on a SQLite file of its own; ready once /metrics names every worker."""

    def __init__(self, workers: int, **env: str) -> None:
        self.name = f"ours-w{workers}"
        super().__init__()
        self.workers = workers
        self.extra_env = env
        self.spread: dict[str, float] = {}

    def command(self) -> list[str]:
        return [*super().command(), "--workers", str(self.workers)]

    def env(self) -> dict[str, str]:
        # Room for 2 x 9,900 clients under this machine's 20,000 open files (the hold part).
        return {**super().env(), "CHATSERVER_MAX_CONNECTIONS": "19950", **self.extra_env}

    def start(self) -> None:
        super().start()
        if self.workers > 1:
            self.wait_workers()

    def wait_workers(self, limit: float = 30.0) -> None:
        """Until every worker serves: a connection accepted before would go to whichever started first."""
        wanted = {f'chatserver_worker_scraped{{worker="{i}"}} 1.0' for i in range(1, self.workers + 1)}
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                text = self.metrics()
            except OSError:
                text = ""
            if wanted <= set(text.splitlines()):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: not every worker serves after {limit:.0f}s")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as answer:
            return str(answer.read().decode())

    def cleanup(self) -> None:
        self.spread = self.deliveries_by_worker() if self.workers > 1 and self.proc is not None else {}
        super().cleanup()

    def deliveries_by_worker(self) -> dict[str, float]:
        """Events each worker handed to its connections: how evenly the shared listening socket spread them."""
        spread: dict[str, float] = {}
        for line in self.metrics().splitlines():
            found = re.match(r'chatserver_events_delivered_total\{transport="\w+",worker="(\d+)"\} (\S+)', line)
            if found:
                spread[found.group(1)] = spread.get(found.group(1), 0.0) + float(found.group(2))
        return spread

    def worker_pids(self) -> list[int]:
        return [pid for pid in loadgen.process_tree(self.pid) if pid != self.pid]


class NchanWorkers(Nchan):
    """nginx + Nchan with `worker_processes` set (Nchan shares its channels between workers in shared memory)."""

    def __init__(self, workers: int) -> None:
        self.name = f"nchan-w{workers}"
        super().__init__()
        self.workers = workers

    def command(self) -> list[str]:
        command = super().command()
        conf = self.tmp / "nginx.conf"
        conf.write_text(conf.read_text().replace("worker_processes 1;", f"worker_processes {self.workers};"))
        return command


SYSTEMS = ("ours-w1", "ours-w2", "nchan-w1", "nchan-w2", "sio-aiohttp")


def fanout_systems() -> list[System]:
    return [OursWorkers(1), OursWorkers(2), NchanWorkers(1), NchanWorkers(2), SocketIOAiohttp()]


# -- fanout ---------------------------------------------------------------------------------------------


def run_fanout(quick: bool, workloads: list[str], names: list[str], receivers: str = "c",
               pause_us: int = 0, rate: float = 0.0) -> list[dict[str, Any]]:
    results = []
    for workload in workloads:
        sizes = FANOUT[workload]
        for system in fanout_systems():
            if system.name not in names:
                system.cleanup()
                continue
            why = system.available()
            if why:
                print(f"SKIPPED {system.name}: {why}", flush=True)
                continue
            chosen = with_receivers(sizes[0 if quick else 1], system, workload, receivers)
            if chosen.get("receivers") == "c":
                chosen = {**chosen, "receiver_pause_us": pause_us, "events": chosen["events"] * C_EVENTS}
                if rate:
                    chosen["rate"] = rate
            print(f"-- {workload} on {system.name} {chosen}", flush=True)
            load = os.getloadavg()[0]
            result = guarded("fanout", lambda s=system, w=workload, c=chosen: run_one(s, w, c))
            result.update(workload=workload, system=system.name)
            # The machine's run queue over the last minute, before and after: above the core count, other work
            # took CPU from this run, and its rates say more of that than of the servers.
            result["load_before"], result["load_after"] = load, os.getloadavg()[0]
            if isinstance(system, OursWorkers) and system.workers > 1:
                result["spread"] = system.spread
            results.append(result)
            keys = ("deliveries_per_s", "cpu_per_10k", "server_user", "server_sys", "gen_cpu", "wall", "lost",
                    "duplicated", "gen_bound", "failed_run")
            print("   " + json.dumps({k: result.get(k) for k in keys}), flush=True)
    return results


# -- the generator side of hold and kill (`bench/workers.py --generate`, spec on stdin) ---------------------


async def generate_hold(gen: loadgen.Generator) -> dict[str, Any]:
    """Hold `clients` WebSockets (or parked polls), say CONNECTED, count the broadcasts that follow."""
    spec = gen.spec
    n, events = spec["clients"], spec["events"]
    if spec["transport"] == "ws":
        clients: list[Any] = await gen.connect_ws(n, first=spec["first"])
    else:
        clients = await gen.start_pollers(n, first=spec["first"])
    gen.arm(events, clients)
    gen.track_latency = True
    print("CONNECTED", flush=True)
    complete = await gen.wait_complete(spec.get("limit", 120))
    return {"complete": complete, "lost": gen.losses(clients), "duplicated": gen.duplicates,
            "latencies": gen.latencies, "received": gen.delivered}


async def generate_kill(gen: loadgen.Generator) -> dict[str, Any]:
    """WebSocket subscribers and paced posts; one worker killed; clients reconnect with their cursors."""
    spec = gen.spec
    n, events, rate = spec["clients"], spec["events"], spec["rate"]
    target = gen.target
    assert isinstance(target, loadgen.Ours)
    gen.track_cursor = True
    pubs = await gen.publishers(4)
    clients = await gen.connect_ws(n)
    await gen.warm_up(pubs[0], n)
    gen.arm(events, clients)
    stats = {"reconnects": 0, "resets": 0}
    reconnected_at: list[float] = []
    published = 0
    # A reconnected client counts into its predecessor's counts from its first frame (the replay comes before
    # the connection is handed back).
    counts_of = {c.index: c.counts for c in clients}
    count = gen.on_ws_message

    def on_message(client: Any, payload: bytes) -> None:
        if client.counts is None:
            client.counts = counts_of.get(client.index)
        count(client, payload)

    gen.on_ws_message = on_message  # type: ignore[method-assign]

    async def keep(client: Any) -> None:
        while gen.running:
            await client.closed
            if not gen.running:
                return
            cursor = client.cursor
            for attempt in range(50):
                try:
                    client = await gen.open_ws(client.index, cursor)
                    break
                except (ConnectionError, OSError, TimeoutError):
                    await asyncio.sleep(0.05 * (attempt + 1))
            else:
                gen.errors.append(f"client {client.index} could not reconnect")
                return
            client.cursor = client.cursor or cursor
            stats["reconnects"] += 1
            reconnected_at.append(time.perf_counter())
            if client.extra.get("reset"):
                stats["resets"] += 1

    keepers = [gen.loop.create_task(keep(c)) for c in clients]

    path = f"/api/messages/dialog/{target.dialog}"
    headers = {"Authorization": f"Bearer {target.publisher_token}", "Content-Type": "application/json"}
    replacement: dict[Any, Any] = {}  # a publisher's connection cut off with its worker -> its new one

    async def post(conn: Any, content: str) -> None:
        """The generator's publish for this run: one event, posted until the server answers. A retry names the
        same clientMessageId, so an event whose first POST the killed worker had committed is stored once."""
        nonlocal published
        idx = int(content[len(loadgen.MARKER) : len(loadgen.MARKER) + 8])
        published = max(published, idx + 1)
        body = json.dumps({"content": content, "type": "text", "clientMessageId": f"k{idx}"}).encode()
        for _ in range(50):
            live = replacement.get(conn, conn)
            try:
                answer = await asyncio.wait_for(live.request("POST", path, headers, body), 10)
            except (ConnectionError, OSError, TimeoutError):
                live.close()
                replacement[conn] = await gen.open_http()
                continue
            if answer.status >= 300:
                gen.errors.append(f"post answered {answer.status}")
            return
        gen.errors.append(f"event {idx} could not be posted")

    gen.publish = post  # type: ignore[method-assign]
    publisher = gen.loop.create_task(gen.publish_paced(pubs, events, rate))
    await asyncio.sleep(spec["kill_after"])
    victim = spec["victim"]
    before_kill = published
    killed_at = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    # Caught up: every client has every event posted before the kill, and one posted after it reached all.
    caught_up = None
    while time.perf_counter() - killed_at < 60:
        behind = sum(c.counts[:before_kill].count(0) for c in gen.ws_clients + clients if c.counts is not None)
        live = any(n == gen.expected for n in gen.per_event_counts[before_kill:])
        if behind == 0 and live:
            caught_up = time.perf_counter() - killed_at
            break
        await asyncio.sleep(0.005)
    await publisher
    complete = await gen.wait_complete(30)
    gen.running = False
    for task in keepers:
        task.cancel()
    lost = gen.losses(clients)
    return {"complete": complete, "lost": lost, "duplicated": gen.duplicates, "events": events,
            "posted_before_kill": before_kill, "caught_up_s": caught_up,
            "all_reconnected_s": max(reconnected_at) - killed_at if reconnected_at else None, **stats}


def generate() -> None:
    async def main() -> None:
        raise_nofile()
        spec = json.loads(sys.stdin.readline())
        gen = loadgen.Generator(spec)
        work = {"hold": generate_hold, "kill": generate_kill}[spec["workload"]]
        try:
            result = await asyncio.wait_for(work(gen), spec.get("deadline", 600))
        except Exception as exc:  # reported as a failed run, never a traceback-only exit
            result = {"failed_run": f"{type(exc).__name__}: {exc}", "lost": -1, "duplicated": 0}
        await gen.shutdown()
        result["errors"] = gen.errors[:10]
        print("RESULT " + json.dumps(result), flush=True)

    asyncio.run(main())


def start_generator(spec: dict[str, Any]) -> subprocess.Popen[str]:
    gen = subprocess.Popen([sys.executable, __file__, "--generate"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True, preexec_fn=raise_nofile)
    assert gen.stdin is not None
    gen.stdin.write(json.dumps(spec) + "\n")
    gen.stdin.flush()
    return gen


def read_until(gen: subprocess.Popen[str], prefix: str) -> str:
    assert gen.stdout is not None
    for line in gen.stdout:
        if line.startswith(prefix) or line.startswith("RESULT "):
            return line
    raise RuntimeError(f"the generator ended before {prefix}")


def result_of(line: str) -> dict[str, Any]:
    if not line.startswith("RESULT "):
        raise RuntimeError(f"the generator said {line!r}")
    return dict(json.loads(line[7:]))


# -- hold -----------------------------------------------------------------------------------------------


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] if ordered else float("nan")


def post_event(system: OursWorkers, info: dict[str, Any], idx: int) -> None:
    target = loadgen.Ours({**info, "host": "127.0.0.1", "port": system.port})
    body = json.dumps({"content": target.content(idx), "type": "text"}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{system.port}/api/messages/dialog/{info['dialog']}", data=body, method="POST",
        headers={"Authorization": f"Bearer {target.publisher_token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 (http://127.0.0.1 only)
        assert answer.status == 201, answer.status


def run_hold(count: int, events: int) -> dict[str, Any]:
    system = OursWorkers(1, CHATSERVER_POLL_MAX_EVENTS="500")
    info = system.prepare(2 * count)
    system.start()
    gens: list[subprocess.Popen[str]] = []
    try:
        time.sleep(1.0)
        base = loadgen.rss_kb([system.pid])
        common = {**info, "system": "ours", "host": "127.0.0.1", "port": system.port, "pid": system.pid,
                  "workload": "hold", "clients": count, "events": events, "poll_timeout": 300}
        rss = {}
        for transport, first in (("ws", 0), ("poll", count)):
            gen = start_generator({**common, "transport": transport, "first": first})
            gens.append(gen)
            line = read_until(gen, "CONNECTED")
            if not line.startswith("CONNECTED"):
                return {"part": "hold", **result_of(line)}
            time.sleep(3.0)
            rss[transport] = loadgen.rss_kb([system.pid])
        parked = 0.0
        for _ in range(100):  # every poll parked before the broadcast
            found = re.search(r"^chatserver_polls_waiting ([0-9.e+]+)$", system.metrics(), re.M)
            parked = float(found.group(1)) if found else 0.0
            if parked >= count:
                break
            time.sleep(0.1)
        cpu0 = sum(loadgen.cpu_seconds([system.pid]))
        for idx in range(events):
            post_event(system, info, idx)
            time.sleep(3.0)
        outcomes = [result_of(read_until(gen, "RESULT ")) for gen in gens]
        cpu = sum(loadgen.cpu_seconds([system.pid])) - cpu0
        latencies = [x for o in outcomes for x in o.get("latencies", [])]
        return {
            "part": "hold", "system": system.name, "ws": count, "polls": count, "parked_before": parked,
            "rss_base_kb": base, "rss_ws_kb": rss["ws"], "rss_all_kb": rss["poll"],
            "kb_per_ws": (rss["ws"] - base) / count, "kb_per_poll": (rss["poll"] - rss["ws"]) / count,
            "broadcasts": events, "deliveries": sum(o.get("received", 0) for o in outcomes),
            "wanted": 2 * count * events, "complete": all(o.get("complete") for o in outcomes),
            "lost": sum(o.get("lost", 0) for o in outcomes),
            "duplicated": sum(o.get("duplicated", 0) for o in outcomes),
            "p50_ms": 1000 * percentile(latencies, 0.5), "p99_ms": 1000 * percentile(latencies, 0.99),
            "max_ms": 1000 * max(latencies, default=float("nan")), "server_cpu": cpu,
            "errors": [e for o in outcomes for e in o.get("errors", [])][:10],
        }
    finally:
        for gen in gens:
            if gen.poll() is None:
                gen.kill()
                gen.wait(10)
        system.cleanup()


# -- kill -----------------------------------------------------------------------------------------------


def run_kill(clients: int, rate: float, seconds: float) -> dict[str, Any]:
    system = OursWorkers(2)
    info = system.prepare(clients + 1)
    system.start()
    try:
        victim = system.worker_pids()[0]
        spec = {**info, "system": "ours", "host": "127.0.0.1", "port": system.port, "pid": system.pid,
                "workload": "kill", "clients": clients, "events": int(rate * seconds), "rate": rate,
                "kill_after": seconds / 3, "victim": victim}
        gen = start_generator(spec)
        result = result_of(read_until(gen, "RESULT "))
        gen.wait(30)
        restarted = [pid for pid in system.worker_pids() if pid != victim]
        return {"part": "kill", "system": system.name, "clients": clients, "rate": rate, **result,
                "workers_after": len(restarted)}
    finally:
        system.cleanup()


# -- the report -----------------------------------------------------------------------------------------


def fanout_table(results: list[dict[str, Any]]) -> list[str]:
    names = SYSTEMS
    lines = ["| workload | figure | " + " | ".join(names) + " |", "| --- | --- |" + " --- |" * len(names)]
    for workload in FANOUT:
        row = {r["system"]: r for r in results if r.get("workload") == workload}
        for key, label, digits in (("deliveries_per_s", "deliveries/s", 0), ("cpu_per_10k", "CPU s / 10k", 3),
                                   ("gen_cpu_per_10k", "generator CPU s / 10k", 3),
                                   ("load_before", "load average", 1)):
            cells = []
            for name in names:
                value = row.get(name, {}).get(key)
                cells.append("—" if value is None else f"{value:,.{digits}f}")
            lines.append(f"| {workload} | {label} | " + " | ".join(cells) + " |")
    return lines


def checks(run: dict[str, Any]) -> list[str]:
    """The issue's targets, each with the figures it compares."""
    fanout = {(r.get("workload"), r["system"]): r for r in run.get("fanout", [])}
    out = []
    for workload in FANOUT:
        one, two = fanout.get((workload, "ours-w1"), {}), fanout.get((workload, "ours-w2"), {})
        nchan = fanout.get((workload, "nchan-w2"), {})
        if one.get("deliveries_per_s") and two.get("deliveries_per_s"):
            ratio = two["deliveries_per_s"] / one["deliveries_per_s"]
            load = (f" (load average {one['load_before']:.1f} and {two['load_before']:.1f} on {os.cpu_count()} "
                    "cores when they started)" if "load_before" in one and "load_before" in two else "")
            out.append(f"- {workload}: 2 workers deliver {ratio:.2f}x the rate of 1 (target 1.7x): "
                       f"{'met' if ratio >= 1.7 else 'NOT met'}{load}")
        if one.get("cpu_per_10k") and one.get("gen_cpu_per_10k") and one.get("deliveries_per_s"):
            # The generator shares the cores: at ours-w1's CPU per delivery, server and generator together can
            # deliver at most this many per second on every core of the machine.
            most = os.cpu_count() or 1
            ceiling = most * 10_000 / (one["cpu_per_10k"] + one["gen_cpu_per_10k"]) / one["deliveries_per_s"]
            out.append(f"- {workload}: the generator's own CPU per delivery ({one['gen_cpu_per_10k']:.3f} s / 10k) "
                       f"shares the {most} cores: at ours-w1's CPU per delivery, the most any number of workers "
                       f"could show here is {ceiling:.2f}x ours-w1's rate")
        if one.get("cpu_per_10k") and two.get("cpu_per_10k"):
            # Not a measured rate: what two whole cores would give at the CPU per delivery measured with 2 workers.
            share = two["cpu_per_10k"] / one["cpu_per_10k"]
            out.append(f"- {workload}: CPU per delivery with 2 workers is {share:.2f}x "
                       f"that with 1: two free cores would deliver about "
                       f"{2 * one['cpu_per_10k'] / two['cpu_per_10k']:.2f}x the rate of one (inferred, not measured)")
        if two.get("cpu_per_10k") and nchan.get("cpu_per_10k"):
            ratio = two["cpu_per_10k"] / nchan["cpu_per_10k"]
            limit = 2.0 if workload == "poll1k" else 1.2
            out.append(f"- {workload}: CPU per delivery, ours-w2 / nchan-w2 = {ratio:.2f} (target at most {limit}): "
                       f"{'met' if ratio <= limit else 'NOT met'}")
    hold = run.get("hold") or {}
    if hold.get("kb_per_ws") is not None:
        out.append(f"- memory per idle WebSocket {hold['kb_per_ws']:.1f} kB (target at most 12): "
                   f"{'met' if hold['kb_per_ws'] <= 12 else 'NOT met'}; per parked poll {hold['kb_per_poll']:.1f} kB "
                   f"(target at most 6): {'met' if hold['kb_per_poll'] <= 6 else 'NOT met'}")
    return out


def markdown(run: dict[str, Any]) -> str:
    hold, kill = run.get("hold") or {}, run.get("kill") or {}
    parts = [BEGIN, "", f"Run of {run['started']} ({run['mode']}, {run['seconds']:.0f} s, `python bench/workers.py"
             f"{' --quick' if run['mode'] == 'quick' else ''}`), on {os.cpu_count()} cores shared with the load "
             "generator (a Python process that connects and publishes; the receivers of ours and Nchan in "
             "bench/receivers.c, socket.io's in Python).", ""]
    if run.get("fanout"):
        parts += ["Deliveries per second and server CPU-seconds per 10,000 deliveries (the process tree: for ours "
                  "the supervisor and its workers, for nginx its master and workers):", "",
                  *fanout_table(run["fanout"]),
                  "", "![deliveries per second by workers](bench-workers.png)", ""]
        spread = [f"{r['workload']}: {r['spread']}" for r in run["fanout"] if r.get("spread")]
        if spread:
            parts += ["Deliveries per worker of ours-w2 (how the shared listening socket spread the clients): "
                      + "; ".join(spread) + ".", ""]
    for name, part in (("hold", hold), ("kill", kill)):
        if part.get("failed_run"):
            parts += [f"The {name} part failed: {part['failed_run']}.", ""]
    if hold.get("kb_per_ws") is not None:
        parts += [f"One worker holding {hold['ws']:,} idle WebSockets and {hold['polls']:,} parked long-polls at once "
                  f"({hold['parked_before']:.0f} parked when the broadcasts began): RSS "
                  f"{hold['rss_base_kb'] / 1024:.0f} MB empty, {hold['rss_ws_kb'] / 1024:.0f} MB with the WebSockets, "
                  f"{hold['rss_all_kb'] / 1024:.0f} MB "
                  f"with the polls too: **{hold['kb_per_ws']:.1f} kB per WebSocket, {hold['kb_per_poll']:.1f} kB per "
                  f"parked poll**. {hold['broadcasts']} broadcasts to all {hold['ws'] + hold['polls']:,}: "
                  f"{hold['deliveries']:,} of {hold['wanted']:,} delivered, lost {hold['lost']}, duplicated "
                  f"{hold['duplicated']}; latency from the POST to each client p50 {hold['p50_ms']:.0f} ms, "
                  f"**p99 {hold['p99_ms']:.0f} ms**, max {hold['max_ms']:.0f} ms.", ""]
    if kill.get("clients") is not None:
        caught = kill.get("caught_up_s")
        when = f"{caught:.2f} s" if caught is not None else "never (60 s)"
        parts += [f"kill -9 of one of two workers under load ({kill['clients']:,} WebSocket subscribers, "
                  f"{kill['rate']:.0f} posts/s, killed after {kill.get('posted_before_kill')} posts): "
                  f"{kill.get('reconnects')} clients reconnected with their cursor (the last "
                  f"{kill.get('all_reconnected_s') or 0:.2f} s after the kill), resets {kill.get('resets')}, lost "
                  f"{kill.get('lost')}, duplicated {kill.get('duplicated')}; every client had every event posted "
                  f"before the kill, and a live one, **{when} after "
                  f"the kill**. The supervisor had {kill.get('workers_after')} workers again after the run.", ""]
    parts += ["Targets:", "", *checks(run), "", END]
    return "\n".join(parts)


def plot(run: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = SYSTEMS
    fanout = {(r.get("workload"), r["system"]): r for r in run.get("fanout", [])}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.16
    for k, name in enumerate(names):
        xs = [i + (k - 2) * width for i in range(len(FANOUT))]
        axes[0].bar(xs, [fanout.get((w, name), {}).get("deliveries_per_s") or 0 for w in FANOUT], width, label=name)
        axes[1].bar(xs, [fanout.get((w, name), {}).get("cpu_per_10k") or 0 for w in FANOUT], width, label=name)
    for ax, title in zip(axes, ("deliveries per second (higher is better)",
                                "server CPU-seconds per 10,000 deliveries (lower is better)"), strict=True):
        ax.set_xticks(range(len(FANOUT)), list(FANOUT))
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "bench-workers.png", dpi=90)
    plt.close(fig)


def write_docs(run: dict[str, Any]) -> None:
    page = DOCS / "benchmarks.md"
    text = page.read_text()
    section = markdown(run)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Worker processes (issue 15)\n\n" + section + "\n"
    page.write_text(text)
    if run.get("fanout"):
        plot(run)


def guarded(part: str, work: Any) -> dict[str, Any]:
    """A part's result, or what failed it: a run that fails part-way still reports and saves the others."""
    try:
        return dict(work())
    except Exception as exc:
        return {"part": part, "failed_run": f"{type(exc).__name__}: {exc}", "lost": -1}


# -- main -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--parts", default="fanout,hold,kill", help="comma-separated: fanout, hold, kill")
    parser.add_argument("--workloads", default=",".join(FANOUT), help="of fanout, comma-separated: " + ",".join(FANOUT))
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="of fanout, comma-separated: " + ",".join(SYSTEMS))
    parser.add_argument("--receivers", choices=("c", "python"), default="c",
                        help="fanout: ours' and Nchan's subscribers in bench/receivers.c (default) or in Python")
    parser.add_argument("--receiver-pause", type=int, default=RECEIVER_PAUSE_US,
                        help=f"fanout, C receivers: microseconds between rounds of reads (default {RECEIVER_PAUSE_US})")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="fanout, C receivers: post this many events a second, a fixed load instead of as many as "
                             "the server takes (CPU per delivery at the same load; the docs are not rewritten)")
    parser.add_argument("--hold", type=int, default=HOLD, help=f"WebSockets and polls held (default {HOLD} each)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md and the plot")
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate:
        generate()
        return 0
    raise_nofile()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parts = set(args.parts.split(","))
    started = time.time()
    run: dict[str, Any] = {"mode": "quick" if args.quick else "full",
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))}
    if "fanout" in parts:
        workloads = [w for w in args.workloads.split(",") if w]
        unknown = set(workloads) - set(FANOUT)
        if unknown:
            parser.error(f"unknown workload {', '.join(sorted(unknown))}")
        names = [n for n in args.systems.split(",") if n]
        if set(names) - set(SYSTEMS):
            parser.error(f"unknown system {', '.join(sorted(set(names) - set(SYSTEMS)))}")
        if args.rate and args.receivers != "c":
            parser.error("--rate needs the C receivers")
        run["fanout"] = run_fanout(args.quick, workloads, names, args.receivers, args.receiver_pause, args.rate)
    if "hold" in parts:
        count = min(args.hold, 2000) if args.quick else args.hold
        print(f"-- hold: {count} WebSockets and {count} polls on one worker", flush=True)
        run["hold"] = guarded("hold", lambda: run_hold(count, 3))
        print("   " + json.dumps({k: v for k, v in run["hold"].items() if k != "errors"}), flush=True)
    if "kill" in parts:
        print("-- kill -9 of a worker under load", flush=True)
        run["kill"] = guarded("kill", lambda: run_kill(1000, 20.0, 9.0 if args.quick else 15.0))
        print("   " + json.dumps(run["kill"]), flush=True)
    run["seconds"] = time.time() - started
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"workers-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}.json"
    path.write_text(json.dumps(run, indent=1))
    print(f"\nresults: {path}\n\n" + markdown(run))
    if not args.no_docs and not args.rate:
        write_docs(run)
    failed = [r for r in [*run.get("fanout", []), run.get("hold") or {}, run.get("kill") or {}]
              if r.get("lost") or r.get("duplicated") or r.get("failed_run")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
