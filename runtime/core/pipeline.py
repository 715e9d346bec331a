"""The streaming core: chunks -> aligner -> micro-batches -> fusion -> decisions.

Replay, the live daemon and the benchmarks all drive this one object; there
is no second path. It has no threads and does no I/O: the caller pushes
chunks and calls ``poll()`` when its input is idle (live) so that a partial
batch waits at most ``max_wait_s``.

Decisions are numbered and attributed here, not by the caller: ``seq`` is
the window index (so a model swap keeps the numbering with nothing carried
over), and every window a push emits carries that chunk's receipt time and
identity (``Window.received_ns``, ``closed_by``, copied onto its Decision),
from which the daemon measures latency however windows wait for a batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from edgefuse.runtime.core.aligner import Aligner, AlignerConfig
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.decision import Decision
from edgefuse.runtime.core.errors import ConfigError
from edgefuse.runtime.core.fusion import Fuser
from edgefuse.runtime.core.inference import OnnxModel
from edgefuse.runtime.core.window import Window


@dataclass(frozen=True)
class PipelineConfig:
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    max_batch: int = 64          # windows per ONNX Runtime call (across nodes)
    max_wait_s: float = 0.005    # a partial batch waits at most this long (live)
    # Abstention (see fusion.py): None follows the thresholds in the model's contract;
    # a probability overrides every route's threshold (0 = never abstain).
    abstain_below: float | None = None
    abstain_all: bool = False    # windows with every modality present may abstain too
    calibration: bool = True     # False: ignore the contract's temperatures and thresholds

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_wait_s <= 10.0:
            raise ConfigError(f"max_wait_s = {self.max_wait_s!r} is out of range; allowed: 0..10 s")
        if self.abstain_below is not None and not 0.0 <= self.abstain_below <= 1.0:
            raise ConfigError(f"abstain_below = {self.abstain_below!r} is out of range; "
                              "allowed: 0..1 (a probability), or leave it out to follow the "
                              "model's calibrated thresholds")


class Pipeline:
    def __init__(self, model: OnnxModel, config: PipelineConfig | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config or PipelineConfig()
        self.model = model
        self.aligner = Aligner(model.contract, self.config.aligner)
        self.fuser = self._fuser(model)
        self._clock = clock
        self._pending: list[Window] = []
        self._pending_since = 0.0
        self.timing = {"align_s": 0.0, "infer_s": 0.0}

    def push(self, chunk: Chunk) -> list[Decision]:
        """Feed one chunk; returns the decisions of any batch it filled."""
        t = time.perf_counter()
        windows = self.aligner.push(chunk)
        self.timing["align_s"] += time.perf_counter() - t
        if windows:
            closed_by = (chunk.node, chunk.modality, chunk.seq)
            for w in windows:  # this chunk closed them (other nodes' too: evictions)
                w.received_ns = chunk.received_ns
                w.closed_by = closed_by
            if not self._pending:
                self._pending_since = self._clock()
            self._pending.extend(windows)
            if len(self._pending) >= self.config.max_batch:
                return self._run()
        return []

    def poll(self, force: bool = False) -> list[Decision]:
        """Run the pending partial batch once it has waited max_wait_s (or now if forced)."""
        if self._pending and (force or
                              self._clock() - self._pending_since >= self.config.max_wait_s):
            return self._run()
        return []

    def flush(self) -> list[Decision]:
        """End of input: emit every remaining window and decide it (the windows no
        chunk closed carry received_ns None)."""
        t = time.perf_counter()
        self._pending.extend(self.aligner.flush())
        self.timing["align_s"] += time.perf_counter() - t
        return self._run() if self._pending else []

    def swap_model(self, model: OnnxModel) -> None:
        """Decide with ``model`` from now on (SIGHUP reload). The aligner state carries
        over; seq needs no carrying: it is the window index, so it goes on where it
        was as long as the windows are cut alike, which the caller checks."""
        self.model = model
        self.fuser = self._fuser(model)

    def _fuser(self, model: OnnxModel) -> Fuser:
        cfg = self.config
        return Fuser(model, abstain_below=cfg.abstain_below, max_batch=cfg.max_batch,
                     abstain_all=cfg.abstain_all, calibrate=cfg.calibration)

    def pending_windows(self) -> int:
        return len(self._pending)

    def stats(self) -> dict:
        out = self.aligner.stats()
        out["fusion"] = self.fuser.stats()
        out["timing"] = dict(self.timing)
        return out

    def _run(self) -> list[Decision]:
        windows, self._pending = self._pending, []
        t = time.perf_counter()
        decisions = []
        for lo in range(0, len(windows), self.config.max_batch):
            decisions.extend(self.fuser.decide(windows[lo:lo + self.config.max_batch]))
        self.timing["infer_s"] += time.perf_counter() - t
        return decisions
