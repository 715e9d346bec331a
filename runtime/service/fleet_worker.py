"""One fleet replay worker: a model session, warm kernels, one node at a time.

``NodeReplayer`` knows nothing of the engine that hosts it: the Ray driver
(runtime/service/fleet.py) wraps it in an actor, one per worker. It loads
the model once, with ONNX Runtime's intra-op threads set to the CPUs the
worker was given (ORT's default would take every core of the machine, and
N workers would fight over them), and loads the Numba kernels once.

``start(node, paths)`` replays one node with the single-process replay
(runtime/service/replay.py) on a thread of its own; the decisions come out
as JSON lines written by the same JsonlSink, cut into parts of
``part_lines`` lines that ``next_part()`` hands out one at a time. The
thread waits while ``MAX_PARTS_AHEAD`` parts are unclaimed, so a slow
driver holds the worker back instead of the worker's memory growing.
Everything handed out is plain data (str, int, float, dict, list).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time

from edgefuse.runtime.core import kernels
from edgefuse.runtime.core.aligner import AlignerConfig
from edgefuse.runtime.core.errors import EdgefuseError, ModalityMismatchError
from edgefuse.runtime.core.inference import OnnxModel
from edgefuse.runtime.core.pipeline import PipelineConfig
from edgefuse.runtime.service.replay import ReplaySummary, replay
from edgefuse.sensors.readers.inputs import InputSet, OfflineSource, open_inputs

log = logging.getLogger(__name__)

MAX_PARTS_AHEAD = 2
_END = object()


def config_to_dict(config: PipelineConfig) -> dict:
    """A PipelineConfig as plain data (what travels to the workers)."""
    return dataclasses.asdict(config)


def config_from_dict(d: dict) -> PipelineConfig:
    d = dict(d)
    return PipelineConfig(aligner=AlignerConfig(**d.pop("aligner")), **d)


def node_inputs(node: str, paths: list[str], chunk_s: float) -> InputSet:
    """The inputs at ``paths`` with every stream of other nodes left out."""
    inputs = open_inputs(paths, chunk_s=chunk_s)
    sources = []
    for src in inputs.sources:
        streams = tuple(s for s in src.streams if s.node == node)
        if not streams:
            continue
        if len(streams) == len(src.streams):
            sources.append(src)
        else:  # a log of several nodes: read it, keep this one's chunks
            sources.append(OfflineSource(src.label, streams, src.start_ns,
                                         lambda open_=src.open: (c for c in open_()
                                                                 if c.node == node)))
    return InputSet(sources)


class _Parts:
    """A text stream for JsonlSink that cuts what it gets into parts of whole lines."""

    def __init__(self, part_lines: int, out: queue.Queue):
        self._part_lines = part_lines
        self._out = out
        self._pieces: list[str] = []
        self._lines = 0

    def write(self, text: str) -> int:
        self._pieces.append(text)
        self._lines += text.count("\n")
        if self._lines >= self._part_lines:
            self.flush_part()
        return len(text)

    def flush(self) -> None:  # JsonlSink flushes after each batch: parts stay whole
        pass

    def flush_part(self) -> None:
        if self._pieces:
            self._out.put("".join(self._pieces))
            self._pieces, self._lines = [], 0


class NodeReplayer:
    """Replays one node at a time; see the module docstring."""

    def __init__(self, model_path: str, providers: list[str], threads: int, config: dict,
                 chunk_s: float = 1.0, part_lines: int = 2000):
        t = time.perf_counter()
        self._model = OnnxModel.load(model_path, providers=providers, intra_op_threads=threads)
        kernels.warm_up()  # the Numba cache, once per worker
        self.ready_s = time.perf_counter() - t
        self._config = config_from_dict(config)
        self._chunk_s = chunk_s
        self._part_lines = part_lines
        self._parts: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._result: dict = {}

    def info(self) -> dict:
        """How the worker came up: seconds to ready, the model, ORT's intra-op threads."""
        threads = self._model.session.get_session_options().intra_op_num_threads
        return {"ready_s": self.ready_s, "model": self._model.contract.ident,
                "ort_threads": threads, "pid": os.getpid()}

    def start(self, node: str, paths: list[str]) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("start() while a node is still replaying; drain next_part()")
        self._parts = queue.Queue(maxsize=MAX_PARTS_AHEAD)
        self._result = {}
        self._thread = threading.Thread(target=self._run, args=(node, list(paths)),
                                        name=f"replay-{node}", daemon=True)
        self._thread.start()

    def next_part(self) -> dict:
        """{"lines": str, "done": False}, ... then {"lines": "", "done": True,
        "summary": dict | None, "error": str | None, "note": str | None}."""
        if self._parts is None:
            return {"lines": "", "done": True, "summary": None, "note": None,
                    "error": "next_part() before start(): no node to replay"}
        item = self._parts.get()
        if item is _END:
            self._thread.join()
            return {"lines": "", "done": True, **self._result}
        return {"lines": item, "done": False}

    def _run(self, node: str, paths: list[str]) -> None:
        parts = _Parts(self._part_lines, self._parts)
        summary, error, note = None, None, None
        try:
            inputs = node_inputs(node, paths, self._chunk_s)
            summary = replay(inputs, self._model, parts, config=self._config)
        except ModalityMismatchError as exc:
            # a single-process replay refuses this node's chunks and decides nothing for it
            note = f"node {node}: nothing to decide: {exc}"
        except EdgefuseError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a bug must not hang the driver
            log.exception("node %s: replay failed", node)
            error = f"unexpected {type(exc).__name__}: {exc}"
        finally:
            parts.flush_part()
            self._result = {"summary": dataclasses.asdict(summary) if summary else None,
                            "error": error, "note": note}
            self._parts.put(_END)


def summary_from_dict(d: dict) -> ReplaySummary:
    return ReplaySummary(**d)
