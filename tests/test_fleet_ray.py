"""Fleet replay on a real Ray: `edgefuse replay INPUT... --ray [ADDRESS]`.

A Ray head with 2 CPUs (`ray start --head --block`) is started for the module;
the replays are whole `edgefuse replay --ray` processes, as a user runs them,
against it (and once against a local Ray the command starts itself). The
fleet's decisions are the single-process replay's, line for line once both are
sorted by (node, seq): for pass folders, for a raw recording added to a node's
passes (two inputs, one stream) and for one MCAP log holding four nodes (each
task reads the log and keeps its node). A broken input is reported and the
other nodes finish; --resume skips the nodes whose file is complete.

Everything stays on loopback (fleet_ray.LOCAL_RAY_ENV), and ONNX Runtime's
telemetry is off in these processes (ORT_DISABLE_TELEMETRY): in a process that
also starts Ray, onnxruntime 1.32 looks up its telemetry collector.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from edgefuse.runtime.cli import bundled_model_path, main
from edgefuse.runtime.service.fleet_ray import LOCAL_RAY_ENV
from tests.conftest import end_process, free_port, wait_until

pytest.importorskip("ray", reason="the ray extra is not installed (pip install "
                    "'edgefuse[ray]'; deploy/setup.sh installs it)")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "goodvibes"
PASSES = DATA / "passes"          # nodes 123, 129, 121 (close) and 81 (full)
RAW = DATA / "raw"                # node 81 again, 30 s of raw recordings, later that day
SAMPLE = ROOT / "examples" / "data" / "sample.mcap"   # one log, nodes 123, 129, 81, 121
MODEL = str(bundled_model_path())
RAY = str(Path(sys.executable).parent / "ray")
# the head and every driver share one token (Ray's token authentication)
ENV = {**os.environ, **LOCAL_RAY_ENV, "ORT_DISABLE_TELEMETRY": "1", "RAY_AUTH_MODE": "token",
       "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head on 127.0.0.1 with 2 CPUs; its address."""
    temp = tempfile.mkdtemp(prefix="efray", dir="/tmp")  # Ray's socket paths must be short
    port = free_port()
    log = open(os.path.join(temp, "head.log"), "w")  # noqa: SIM115
    proc = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "Ray runtime started" in Path(log.name).read_text()
                   or proc.poll() is not None, 60, "ray start --head", interval_s=0.2)
        assert proc.poll() is None, Path(log.name).read_text()[-3000:]
        yield f"127.0.0.1:{port}"
    finally:
        end_process(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _key(line: str) -> tuple[str, int]:
    d = json.loads(line)
    return d["node"], d["seq"]


def single(tmp_path: Path, *inputs) -> list[str]:
    out = tmp_path / "single.jsonl"
    assert main(["replay", *map(str, inputs), "--model", MODEL, "--out", str(out), "-q"]) == 0
    return sorted(out.read_text().splitlines(), key=_key)


def fleet(out: Path, *inputs, ray: list[str], extra=()) -> subprocess.CompletedProcess:
    """`edgefuse replay INPUTS --out OUT/ ... --ray [ADDRESS]` as its own process."""
    cmd = [sys.executable, "-m", "edgefuse.runtime.cli", "--log-level", "INFO", "replay",
           *map(str, inputs), "--model", MODEL, "--out", f"{out}/", "-q", *extra, "--ray", *ray]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)


def node_lines(out: Path) -> dict[str, list[str]]:
    return {p.name[:-len(".jsonl")]: p.read_text().splitlines()
            for p in sorted(out.glob("*.jsonl"))}


def all_lines(out: Path) -> list[str]:
    return sorted((x for lines in node_lines(out).values() for x in lines), key=_key)


@pytest.mark.parametrize("inputs", [(PASSES, RAW), (SAMPLE,)], ids=["passes+raw", "mcap"])
def test_fleet_equals_single_process_replay(ray_head, tmp_path, inputs):
    expected = single(tmp_path, *inputs)
    assert len({_key(x)[0] for x in expected}) == 4 and len(expected) > 40
    out = tmp_path / "fleet"
    res = fleet(out, *inputs, ray=[ray_head], extra=["--workers", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "4 nodes on 2 Ray workers" in res.stderr, res.stderr[-3000:]
    assert "ONNX Runtime intra-op threads [1]" in res.stderr, res.stderr[-3000:]
    per_node = node_lines(out)
    assert sorted(per_node) == sorted({_key(x)[0] for x in expected})
    for node, lines in per_node.items():  # each file: its node only, in seq order
        keys = [_key(x) for x in lines]
        assert {k[0] for k in keys} == {node} and keys == sorted(keys)
    assert all_lines(out) == expected


def test_broken_inputs_are_reported_and_the_other_nodes_finish(ray_head, tmp_path):
    """Two kinds: a pass whose meta.json does not parse (found while planning) and a
    pass of node 123 named twice, overlapping in time (found by node 123's task)."""
    root = tmp_path / "passes"
    shutil.copytree(PASSES, root)
    broken = root / "close" / "9Z.1.555"
    broken.mkdir()
    (broken / "meta.json").write_text('{"target_id": "9Z", "run": 1, "node": ')
    shutil.copytree(PASSES / "close" / "2D.16.123", tmp_path / "again" / "2D.16.123")
    expected = [x for x in single(tmp_path, PASSES) if _key(x)[0] != "123"]
    out = tmp_path / "fleet"
    res = fleet(out, root, tmp_path / "again", ray=[ray_head])
    assert res.returncode == 1, res.stderr[-3000:]
    assert "9Z.1.555" in res.stderr and "cannot be opened" in res.stderr, res.stderr[-3000:]
    assert "node 123 failed" in res.stderr and "overlap in time" in res.stderr
    assert "1 node(s) failed and 1 input(s) could not be opened" in res.stderr
    assert sorted(node_lines(out)) == ["121", "129", "81"]
    assert all_lines(out) == expected
    assert (out / "123.jsonl.failed").exists()  # its readable part, kept apart


def test_resume_skips_finished_nodes_on_a_local_ray(tmp_path):
    """No address: the command starts a local Ray of its own (here 1 worker x 2 CPUs)."""
    out = tmp_path / "fleet"
    expected = single(tmp_path, PASSES)
    res = fleet(out, PASSES, ray=[], extra=["--workers", "1", "--threads", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ONNX Runtime intra-op threads [2]" in res.stderr, res.stderr[-3000:]
    assert all_lines(out) == expected
    # A run stopped midway: node 129's file never completed (a partial is left
    # behind) and node 81's is complete; mark 81's so that a rewrite would show.
    (out / "129.jsonl").rename(out / ".129.jsonl.partial")
    finished = (out / "81.jsonl").read_text()
    (out / "81.jsonl").write_text(finished + "kept\n")
    res = fleet(out, PASSES, ray=[])  # a non-empty folder without --resume is refused
    assert res.returncode == 1 and "pass --resume" in res.stderr, res.stderr[-3000:]
    res = fleet(out, PASSES, ray=[], extra=["--resume", "--workers", "1"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 nodes on 1 Ray workers" in res.stderr, res.stderr[-3000:]
    assert "3 nodes complete before (--resume)" in res.stderr
    assert (out / "81.jsonl").read_text() == finished + "kept\n"   # skipped, untouched
    assert not list(out.glob(".*.partial"))
    (out / "81.jsonl").write_text(finished)
    assert all_lines(out) == expected


def test_ray_is_imported_only_with_ray_and_missing_ray_is_one_clear_error(tmp_path):
    code = ("import sys\n"
            "from edgefuse.runtime.cli import main\n"
            f"assert main(['replay', {str(PASSES)!r}, '--out', {str(tmp_path / 'a.jsonl')!r},"
            " '-q']) == 0\n"
            "assert 'ray' not in sys.modules, 'a plain replay imported ray'\n"
            "sys.modules['ray'] = None  # as if the extra were not installed\n"
            f"rc = main(['replay', {str(PASSES)!r}, '--out', {str(tmp_path / 'f')!r} + '/', "
            "'-q', '--ray'])\n"
            "assert rc == 1, rc\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=ENV)
    assert res.returncode == 0, res.stderr
    assert "--ray needs Ray, the optional extra: pip install 'edgefuse[ray]'" in res.stderr
