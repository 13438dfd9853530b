"""What every benchmark command shares: bench/run.py's workloads and sizes, and running one workload of one
system (the system started fresh, the load generator bench/loadgen.py in a process of its own).

bench/run.py, bench/durable.py and bench/workers.py import it (a module of its own, so that none of them imports
bench/run.py under the name `run`, which is also the server's top-level run.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from systems import System, raise_nofile

BENCH = Path(__file__).resolve().parent

# name -> (generator workload, sizes for --quick, sizes for --full)
WORKLOADS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "ws1k": ("ws", {"clients": 1000, "events": 60}, {"clients": 1000, "events": 300}),
    "ws5k": ("ws", {"clients": 5000, "events": 16}, {"clients": 5000, "events": 60}),
    "poll1k": ("poll", {"clients": 1000, "events": 30, "window": 1}, {"clients": 1000, "events": 100, "window": 1}),
    "pollbatch": (
        "poll",
        {"clients": 1000, "events": 60, "window": 30},
        {"clients": 1000, "events": 200, "window": 50},
    ),
    "mixed": ("mixed", {"clients": 1000, "events": 40}, {"clients": 1000, "events": 150}),
    "idle": ("idle", {"clients": 2000}, {"clients": 5000}),
    "latency": (
        "latency",
        {"clients": 1000, "rate": 10000, "duration": 5},
        {"clients": 1000, "rate": 10000, "duration": 15},
    ),
    # Issue 3's figure: the same paced POSTs received by 1,000 WebSocket and 1,000 long-poll clients at once.
    "latency2k": (
        "latency",
        {"clients": 1000, "polls": 1000, "rate": 5000, "duration": 5},
        {"clients": 1000, "polls": 1000, "rate": 5000, "duration": 15},
    ),
    "slow": ("slow", {"clients": 50, "events": 2000}, {"clients": 100, "events": 3000}),
    # Ours resumes with cursors after the restart and is caught up once it has the 3 events it missed.
    "storm": ("storm", {"clients": 1000, "missed": 3}, {"clients": 1000, "missed": 3}),
}


def run_one(system: System, workload: str, sizes: dict[str, Any]) -> dict[str, Any]:
    kind = WORKLOADS[workload][0]
    users = sizes["clients"] + sizes.get("polls", 0) + (1 if kind != "slow" else 2)
    info = system.prepare(users)
    system.start()

    def restart() -> list[int]:
        system.restart()
        return [system.pid]

    spec = {
        "system": system.kind,
        "host": "127.0.0.1",
        "port": system.port,
        "pid": system.pid,
        "workload": kind,
        **sizes,
        **info,
    }
    try:
        result = generate(spec, restart)
    finally:
        system.cleanup()
    return {"workload": workload, "system": system.name, **sizes, **result}


# The fan-out workloads bench/receivers.c can receive: their subscribers only count what they get.
C_RECEIVABLE = {"ws", "poll", "mixed"}


def with_receivers(sizes: dict[str, Any], system: System, workload: str, receivers: str) -> dict[str, Any]:
    """`sizes` asking for the C receivers where they apply (ours and Nchan, fan-out workloads)."""
    if receivers == "c" and system.kind in ("ours", "nchan") and WORKLOADS[workload][0] in C_RECEIVABLE:
        return {**sizes, "receivers": "c"}
    return sizes


def generate(spec: dict[str, Any], restart: Callable[[], list[int]]) -> dict[str, Any]:
    """Run the load generator on `spec` in its own process and return its result; `restart` restarts every
    server when the generator asks (the resume storm) and returns their pids."""
    gen = subprocess.Popen(
        [sys.executable, str(BENCH / "loadgen.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=raise_nofile,
    )
    assert gen.stdin is not None and gen.stdout is not None
    gen.stdin.write(json.dumps(spec) + "\n")
    gen.stdin.flush()
    result: dict[str, Any] = {"failed_run": "the generator printed no result", "lost": -1}
    try:
        for line in gen.stdout:
            if line.startswith("RESTART"):
                pids = restart()
                gen.stdin.write(f"RESTARTED {' '.join(map(str, pids))}\n")
                gen.stdin.flush()
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
        gen.wait(30)
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait()
    return result
