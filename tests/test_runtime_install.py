"""The runtime-only install an edge box gets: `pip install .` without extras.

A fresh virtual environment (``python -m venv``) gets the repository installed
the way a user installs it, from a copy of the tree (so the build writes nothing
here), with pip's cache and configured indexes as they are. In it: torch is
absent; every third-party module the runtime and the readers/live sources
import, lazily or not, is installed and declared (imports in a ``try`` that
catches ImportError are alternatives, of a ``sys.version_info`` branch only this
Python's counts, and a package of an extra, such as ray, may be absent); every
module of ``edgefuse.runtime`` and ``edgefuse.sensors`` imports; ``edgefuse
replay`` of the bundled sample writes what the development environment writes;
and ``edgefuse run`` over a real broker decides what a replay of the same chunks
decides.

The environment is built once for this module (about 25 s here from the local
wheel mirror; a machine that downloads ~150 MB of wheels takes longer once,
then pip's cache serves them).
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from edgefuse.runtime.cli import main
from edgefuse.runtime.service.simulate import simulate
from tests.daemon_helpers import (SAMPLE, DaemonProcess, mqtt_args, mqtt_publisher, replay_text,
                                  synthetic_chunks, write_log)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
# what a built distribution is made of (pyproject.toml: [tool.setuptools.package-dir])
SOURCES = ("pyproject.toml", "README.md", "runtime", "sensors", "exporters", "models")
# the rooms an edge box runs: the CLI, the service, the core, readers and live sources
RUNTIME_ROOMS = ("runtime", "sensors")


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh venv with `pip install .` of a copy of this tree; its python."""
    base = tmp_path_factory.mktemp("runtime-install")
    src = base / "src"
    src.mkdir()
    for name in SOURCES:
        item = ROOT / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.egg-info", "*.nbi", "*.nbc"))
        else:
            shutil.copy2(item, src / name)
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # --no-compile: byte-compiling scipy and numba takes longer than the install
    done = subprocess.run([python, "-m", "pip", "install", "--no-compile",
                           "--disable-pip-version-check", "-q", str(src)],
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, f"pip install . failed:\n{done.stdout}\n{done.stderr}"
    return python


# Run in the fresh venv: import each name; say which distribution provides each
# third-party one and whether edgefuse declares it (its installed metadata).
IMPORT_CHECK = """
import importlib, importlib.metadata as md, json, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
name_of = lambda req: norm(re.match(r"[A-Za-z0-9._-]+", req).group())
requires = md.requires("edgefuse")
declared = {name_of(r) for r in requires if "extra ==" not in r}
extras = {name_of(r) for r in requires if "extra ==" in r}
owners = md.packages_distributions()
failed, undeclared = [], []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        if not (isinstance(exc, ImportError) and norm(name.split(".")[0]) in extras):
            failed.append(f"{name}: {exc!r}")  # (an extra's package, e.g. ray, may be absent)
        continue
    top = name.split(".")[0]
    if top != "edgefuse" and not {norm(d) for d in owners.get(top, [])} & declared:
        undeclared.append(f"{name} (from {owners.get(top)})")
print(json.dumps({"failed": failed, "undeclared": undeclared}))
"""


def _run(python: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """python ARGS in the venv, outside the checkout: its cwd would be on sys.path, and
    a stale edgefuse.egg-info there would answer importlib.metadata."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(python), *args], capture_output=True, text=True,
                          cwd=python.parents[2], env=env, timeout=timeout)


def _version_test(test: ast.expr) -> bool:
    """True for a test on sys.version_info alone (and constants)."""
    names = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)}
    attrs = {n.attr for n in ast.walk(test) if isinstance(n, ast.Attribute)}
    return names == {"sys"} and attrs == {"version_info"}


def _third_party_imports() -> dict[str, list[str]]:
    """Third-party modules the runtime rooms import -> where. Imports in a ``try`` that
    catches ImportError are alternatives and left out; of a branch on
    ``sys.version_info`` only the one for this Python counts."""
    stdlib = set(sys.stdlib_module_names)
    found: dict[str, list[str]] = {}

    def visit(node: ast.AST, where: Path, optional: bool) -> None:
        if isinstance(node, ast.If) and _version_test(node.test):
            # `if sys.version_info >= (3, 11): import tomllib else: import tomli`
            applies = eval(compile(ast.Expression(node.test), str(where), "eval"), {"sys": sys})
            for child in (node.body if applies else node.orelse):
                visit(child, where, optional)
            return
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError",
                                                               "ModuleNotFoundError")
                for h in node.handlers):
            optional = True  # `try: import tomllib / except ImportError: import tomli`
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if not optional and top not in stdlib and top != "edgefuse":
                found.setdefault(name, []).append(f"{where.relative_to(ROOT)}:{node.lineno}")
        for child in ast.iter_child_nodes(node):
            visit(child, where, optional)

    for room in RUNTIME_ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            visit(ast.parse(path.read_text(), str(path)), path, False)
    return found


def _modules() -> list[str]:
    out = []
    for room in RUNTIME_ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append(".".join(("edgefuse", *parts)))
    return out


def test_torch_is_absent_and_the_runtime_needs_no_undeclared_module(runtime_venv):
    done = _run(runtime_venv, "-c", "import torch")
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr
    imports = _third_party_imports()
    assert "tqdm" in imports  # imported inside functions only: the walk sees lazy imports
    done = _run(runtime_venv, "-c", IMPORT_CHECK, *sorted(imports), *_modules())
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    where = {name: places[0] for name, places in imports.items()}
    assert found["failed"] == [], "these do not import after `pip install .`:\n" + "\n".join(
        f"{line}  (imported at {where.get(line.split(':')[0], 'an edgefuse module')})"
        for line in found["failed"])
    # installed is not enough: a module that only comes with another dependency
    # (protobuf with onnxruntime) must be declared too, or an update can drop it
    assert found["undeclared"] == [], "imported but not in [project] dependencies:\n" + \
        "\n".join(f"{line}  (imported at {where[line.split(' ')[0]]})"
                  for line in found["undeclared"])
    check = _run(runtime_venv, "-m", "pip", "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_replay_of_the_bundled_sample_matches_the_development_install(runtime_venv, tmp_path):
    edge_out, dev_out = tmp_path / "edge.jsonl", tmp_path / "dev.jsonl"
    done = _run(runtime_venv, "-m", "edgefuse.runtime.cli", "replay", "-q", str(SAMPLE),
                "--out", str(edge_out))
    assert done.returncode == 0, done.stderr
    assert "decisions" in done.stderr
    assert main(["replay", "-q", str(SAMPLE), "--out", str(dev_out)]) == 0
    assert edge_out.read_text() == dev_out.read_text() != ""


def test_the_daemon_runs_from_the_runtime_only_install(runtime_venv, tmp_path, broker,
                                                       monkeypatch):
    # DaemonProcess starts `sys.executable -m edgefuse.runtime.cli run`: the venv's python,
    # outside the checkout (see _run)
    monkeypatch.setattr(sys, "executable", str(runtime_venv))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "d.jsonl"
    daemon = DaemonProcess(tmp_path, mqtt_args(broker, out, tmp_path / "ob"))
    try:
        daemon.wait_ready()
        chunks = synthetic_chunks("edge1", 4.0)
        simulate(chunks, mqtt_publisher(broker), speed=20.0)
        daemon.wait_metric("edgefuse_source_decoded_total", len(chunks))
        assert daemon.terminate() == 0, daemon.log()
    finally:
        daemon.close()
    assert out.read_text() == replay_text(write_log(tmp_path / "in.mcap", chunks)) != ""
