"""The dependency arrows of STYLE.md: the domain in chatserver/ never loads Tornado's web layer, handlers/,
transport/ or pika; transport/ never loads handlers/; no private Tornado name is used outside transport/compat.py.

Checked in a fresh interpreter, so that nothing another test imported can hide an import.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# chatserver/chat3.py is the one module allowed to import pika (the RabbitMQ listener).
ALLOWED = {"chat3"}
FORBIDDEN = ("tornado.web", "tornado.websocket", "handlers", "transport", "pika")

PROBE = """
import importlib, json, pathlib, sys
names = sorted(p.stem for p in pathlib.Path("chatserver").glob("*.py") if p.stem not in {allowed!r})
for name in names:
    importlib.import_module("chatserver." + name if name != "__init__" else "chatserver")
loaded = sorted(m for m in sys.modules if m in {forbidden!r} or m.startswith(tuple(f + "." for f in {forbidden!r})))
print(json.dumps({{"modules": names, "loaded": loaded}}))
"""


def test_domain_modules_load_neither_tornado_web_nor_handlers_nor_transport_nor_pika() -> None:
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


def test_transport_never_loads_handlers() -> None:
    # transport/ sits below handlers/: what both need lives in chatserver/, never in handlers/.
    code = PROBE.format(allowed=set(), forbidden=("handlers",)).replace('"chatserver"', '"transport"')
    code = code.replace('"chatserver." + name', '"transport." + name')
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"compat", "http1", "fastpoll", "outbox", "pings", "poll", "wsframes"} <= set(report["modules"])
    assert report["loaded"] == [], f"transport/ loaded {report['loaded']}"


def _tornado_private_names() -> set[str]:
    """The underscore names Tornado's modules and classes define (dunder names aside)."""
    import importlib
    import pkgutil

    import tornado

    names: set[str] = set()
    for info in pkgutil.iter_modules(tornado.__path__):
        try:
            module = importlib.import_module(f"tornado.{info.name}")
        except ImportError:
            continue  # an optional backend (curl, twisted) that is not installed
        for name, value in vars(module).items():
            names.add(name)
            if isinstance(value, type) and value.__module__ == module.__name__:
                names.update(vars(value))
                for cls in value.__mro__:
                    if cls.__module__.startswith("tornado"):
                        names.update(vars(cls))
        for source in (inspect_source(module),):
            names.update(re.findall(r"self\.(_[a-z]\w*)\s*[:=]", source))
    # A named tuple's own API (`_replace`, `_asdict`, ...) is public, underscore and all.
    return {n for n in names if n.startswith("_") and not n.startswith("__")} - {"_replace", "_asdict", "_fields",
                                                                                 "_make", "_field_defaults"}


def inspect_source(module: object) -> str:
    import inspect

    try:
        return inspect.getsource(module)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def test_no_private_tornado_name_outside_the_compat_module() -> None:
    # A private name is one Tornado defines with a leading underscore that our own code does not define itself
    # (our classes have `_write`, `_run`, ... of their own). Only transport/compat.py may use one.
    sources = {
        path: path.read_text()
        for folder in ("chatserver", "handlers", "transport")
        for path in sorted((ROOT / folder).glob("*.py"))
    } | {ROOT / "run.py": (ROOT / "run.py").read_text()}
    compat = ROOT / "transport" / "compat.py"
    ours: set[str] = set()
    for path, source in sources.items():
        if path == compat:
            continue  # what compat.py defines and sets is Tornado's
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                ours.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                ours.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                ours.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                ours.add(node.target.id)
    private = _tornado_private_names() - ours
    assert {"_as_list", "_read_buffer", "_detach_stream", "_finished", "_receive_frame"} <= private
    found = []
    for path, source in sources.items():
        if path == compat:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and node.attr in private:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tornado"):
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: {a.name}" for a in node.names
                          if a.name.startswith("_")]
    assert found == [], "private Tornado names outside transport/compat.py:\n" + "\n".join(found)


def _imports_of(path: Path, package: str) -> set[str]:
    """The modules of `package` that the file imports anywhere in it (a function's own imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(package + "."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == package:
                found.update(f"{package}.{a.name}" for a in node.names)
            elif node.module.startswith(package + "."):
                found.add(node.module)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph, or [] (a depth-first walk that remembers its path)."""
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> list[str]:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return []
        for nxt in sorted(graph.get(node, ())):
            found = walk(nxt, [*path, node])
            if found:
                return found
        done.add(node)
        return []

    for start in sorted(graph):
        found = walk(start, [])
        if found:
            return found
    return []


@pytest.mark.parametrize("package", ["chatserver", "transport", "handlers"])
def test_no_module_of_a_package_imports_itself_back(package: str) -> None:
    """No import circle inside a part, lazy imports in functions included: each module stands on the ones below."""
    graph = {f"{package}.{p.stem}": _imports_of(p, package) for p in (ROOT / package).glob("*.py")}
    assert _cycle(graph) == []


def test_the_circle_finder_sees_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []
