"""The chaos soak (`bench/soak.py`), short: 2,000 messages to 200 clients through every kind of chaos, nothing lost.

The soak is its own process: a real server process it stops with SIGTERM and with kill -9 and starts again,
the real RabbitMQ it restarts (`rabbitmqctl stop_app` / `start_app`), raw-socket clients on WebSocket, SSE and
long-poll. This test runs it with the suite's size and holds its report to the counts: nothing lost,
duplicated or out of order, and every kind of chaos (each restart, stalls, transport switches, cut-offs of slow
readers, retried sends, Chat3 events republished or not) actually happened, so that a run that skipped the
chaos cannot pass. It runs on SQLite: on PostgreSQL the same run takes minutes on a loaded two-core machine (every
client resumes from the database after each restart; see docs/benchmarks.md, "Chaos soak", for the long runs of
both stores).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chatserver import jsonutil
from tests.conftest import require_service
from tests.test_chat3 import broker_reachable

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["--messages", "2000", "--clients", "200", "--dialogs", "20", "--duration", "24", "--chaos-interval", "6",
         "--timeout", "200"]


def run_soak(tmp_path: Path, *args: str) -> dict[str, Any]:
    report = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), *SHORT, "--report", str(report), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=260,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = jsonutil.loads(report.read_text())
    return result


@pytest.mark.timeout(300)
def test_soak_every_client_holds_every_message_once_in_order_through_restarts(tmp_path: Path) -> None:
    require_service("RabbitMQ at 127.0.0.1:5672", broker_reachable())
    require_service("rabbitmqctl", shutil.which("rabbitmqctl") is not None)
    report = run_soak(tmp_path, "--store", "sqlite")
    counts = report["counts"]

    assert report["failures"] == {}
    for failure in ("losses", "duplicates", "order_violations", "unknown_messages", "foreign_deliveries",
                    "acknowledged_lost", "chat3_lost", "stored_twice", "resets_restarted", "protocol_faults"):
        assert counts.get(failure, 0) == 0, (failure, counts)
    # Everything sent is stored once, and each client got each message of its dialogs.
    assert counts["messages_stored"] == 2000
    assert counts["posts_acknowledged"] + counts["chat3_events_confirmed"] == 2000 + counts["deliberate_resends"]
    assert counts["deliveries"] == counts["expected_deliveries"] > 2000
    # The chaos happened: each kind of restart, stalls and cut-offs, every transport, retries of sends.
    for happened in ("restarts_sigterm", "restarts_kill", "restarts_broker", "stalls", "cut_off_as_slow",
                     "switches_to_ws", "switches_to_sse", "switches_to_poll", "sessions_ws", "sessions_sse",
                     "sessions_poll", "closed_1001", "post_retries", "deliberate_resends", "chat3_events_confirmed"):
        assert counts.get(happened, 0) >= 1, (happened, counts)
