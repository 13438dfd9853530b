"""The dependency arrows of STYLE.md: the domain in chatserver/ never loads Tornado's web layer, handlers/ or pika.

Checked in a fresh interpreter, so that nothing another test imported can hide an import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# chatserver/chat3.py is the one module allowed to import pika (the RabbitMQ listener).
ALLOWED = {"chat3"}
FORBIDDEN = ("tornado.web", "tornado.websocket", "handlers", "pika")

PROBE = """
import importlib, json, pathlib, sys
names = sorted(p.stem for p in pathlib.Path("chatserver").glob("*.py") if p.stem not in {allowed!r})
for name in names:
    importlib.import_module("chatserver." + name if name != "__init__" else "chatserver")
loaded = sorted(m for m in sys.modules if m in {forbidden!r} or m.startswith(tuple(f + "." for f in {forbidden!r})))
print(json.dumps({{"modules": names, "loaded": loaded}}))
"""


def test_domain_modules_load_neither_tornado_web_nor_handlers_nor_pika() -> None:
    code = PROBE.format(allowed=ALLOWED, forbidden=FORBIDDEN)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"config", "models", "store", "service", "broadcaster"} <= set(report["modules"])
    assert report["loaded"] == [], f"the domain loaded {report['loaded']}"


def test_the_probe_would_see_a_forbidden_import() -> None:
    # The check above cannot pass by accident: the same probe, run on handlers/, finds tornado.web.
    code = PROBE.format(allowed=ALLOWED, forbidden=FORBIDDEN).replace('"chatserver"', '"handlers"')
    code = code.replace('"chatserver." + name', '"handlers." + name')
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "tornado.web" in json.loads(result.stdout)["loaded"]
