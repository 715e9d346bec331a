"""The layers hold: every module's imports, lazy ones inside functions too, go
only to the rooms its own room may use (ARCHITECTURE.md). Fails naming the
module, the line and the forbidden import, so a shortcut is seen in review.

    runtime/core     numpy, numba, onnxruntime and itself: the pure streaming core
    sensors/readers  core: recorded inputs (MCAP, WAV, CSV, goodvibes, sp-sw-har)
    sensors/live     core: live sources (MQTT, serial) and their transport helpers
    runtime/service  core, readers, live: daemon, config, sinks, outbox, metrics
    exporters        core: torch -> ONNX, quantisation
    models           core, readers, exporters: training, evaluation
    runtime (cli)    anything: the command line on top
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"edgefuse.runtime": "runtime", "edgefuse.sensors": "sensors",
            "edgefuse.models": "models", "edgefuse.exporters": "exporters"}

# room -> rooms it may import (itself always allowed)
ALLOWED = {
    "runtime/core": set(),
    "sensors/readers": {"runtime/core"},
    "sensors/live": {"runtime/core"},
    "runtime/service": {"runtime/core", "sensors/readers", "sensors/live"},
    "exporters": {"runtime/core"},
    "models": {"runtime/core", "sensors/readers", "exporters"},
    "runtime": {"runtime/core", "runtime/service", "sensors/readers", "sensors/live",
                "models", "exporters"},
    "sensors": set(),
}
# third-party packages the core may import (the standard library is always allowed)
CORE_THIRD_PARTY = {"numpy", "numba", "onnxruntime"}


def room_of(module: str) -> str | None:
    """The folder (relative to the repo) that holds an edgefuse module."""
    for pkg, folder in PACKAGES.items():
        if module == pkg or module.startswith(pkg + "."):
            parts = module[len(pkg):].lstrip(".").split(".") if module != pkg else []
            path = ROOT / folder
            for part in parts:
                if (path / part).is_dir():
                    path = path / part
                else:
                    break
            return str(path.relative_to(ROOT))
    return None


def modules() -> list[Path]:
    out = []
    for folder in PACKAGES.values():
        out += [f for f in (ROOT / folder).rglob("*.py") if "bundled" not in f.parts]
    return sorted(out)


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def violations() -> list[str]:
    bad = []
    stdlib = set(sys.stdlib_module_names)
    for path in modules():
        room = str(path.parent.relative_to(ROOT))
        if room not in ALLOWED:
            bad.append(f"{path.relative_to(ROOT)}: folder {room!r} is not a known room; "
                       "add it to ALLOWED (and ARCHITECTURE.md)")
            continue
        for line, name in imports(path):
            target = room_of(name)
            if target is not None:
                if target != room and target not in ALLOWED[room]:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {room} imports {name} "
                               f"({target}); {room} may import only {sorted(ALLOWED[room])}")
                continue
            top = name.split(".")[0]
            if room == "runtime/core" and top not in stdlib and top not in CORE_THIRD_PARTY \
                    and top != "edgefuse":
                bad.append(f"{path.relative_to(ROOT)}:{line}: the core imports {name}; it may "
                           f"import only the standard library and {sorted(CORE_THIRD_PARTY)}")
    return sorted(set(bad))


def test_every_import_respects_the_layers():
    bad = violations()
    assert not bad, "layer violations:\n" + "\n".join(bad)


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_every_room_exists_and_holds_modules(room):
    assert any((ROOT / room).glob("*.py")), f"{room} holds no module"


def test_the_check_sees_a_forbidden_import(tmp_path, monkeypatch):
    """Sanity: a core module importing paho is reported (the check can fail)."""
    core = ROOT / "runtime" / "core"
    probe = core / "_layer_probe.py"
    probe.write_text("def f():\n    import paho.mqtt.client\n    "
                     "from edgefuse.runtime.service import daemon\n")
    try:
        bad = [b for b in violations() if "_layer_probe" in b]
    finally:
        probe.unlink()
    assert any("imports paho.mqtt.client" in b for b in bad), bad
    assert any("runtime/core imports edgefuse.runtime.service" in b for b in bad), bad
