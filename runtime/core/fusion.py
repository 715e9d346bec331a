"""Fuse aligned windows into decisions, with fallbacks for missing modalities.

Each window takes one route:

- every modality present      -> the main model, fallback "none";
- some modalities missing     -> the fallback model declared for exactly the
  present subset, fallback "subset:a+b" (contract order), or else the main
  model with the missing inputs zeroed and their mask entries 0, "masked";
- no modality present         -> no model runs: label None, fallback
  "abstain", every label scored 0.0 (0.0 = not computed; the score keys are
  always the model's labels so consumers see one schema);
- after a fallback route, a top probability below ``abstain_below`` turns the
  decision into label None, fallback "abstain" (the scores are kept, so one
  can see how unsure the model was). Windows with every modality present are
  never abstained on: the main model's answer is the best there is.

Windows are grouped by route and each group runs in batches of at most
``max_batch`` windows: one ORT call per batch.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from edgefuse.runtime.core.decision import (FALLBACK_ABSTAIN, FALLBACK_MASKED, FALLBACK_NONE,
                                       Decision)
from edgefuse.runtime.core.errors import ConfigError, ModalityMismatchError
from edgefuse.runtime.core.inference import OnnxModel
from edgefuse.runtime.core.window import Window

MAX_BATCH_LIMIT = 4096
UNKNOWN_REASON = "unknown"


class Fuser:
    """Turns windows into decisions. Stateless across windows but for its counters:
    a decision's ``seq`` is its window's index (see Decision), not a count."""

    def __init__(self, model: OnnxModel, abstain_below: float = 0.0, max_batch: int = 64):
        if not 0.0 <= float(abstain_below) <= 1.0:
            raise ConfigError(f"abstain_below must be a probability in [0, 1], "
                              f"found {abstain_below!r}")
        if not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
            raise ConfigError(f"max_batch must be an integer in [1, {MAX_BATCH_LIMIT}], "
                              f"found {max_batch!r}")
        self.model = model
        self.contract = model.contract
        self.abstain_below = float(abstain_below)
        self.max_batch = max_batch
        self._routes: Counter[str] = Counter()   # decisions per fallback value
        self._batches: Counter[str] = Counter()  # ORT calls per route

    def stats(self) -> dict[str, dict[str, int]]:
        """Decisions and ORT calls per route, for metrics."""
        return {"decisions": dict(self._routes), "batches": dict(self._batches)}

    def decide(self, windows: Sequence[Window]) -> list[Decision]:
        """One decision per window, in input order."""
        names = self.contract.modality_names
        presents = [tuple(m for m in names if w.present.get(m, False)) for w in windows]
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, present in enumerate(presents):
            groups.setdefault(present, []).append(i)

        scores: list[np.ndarray | None] = [None] * len(windows)
        route: list[str] = [FALLBACK_ABSTAIN] * len(windows)
        for present, idx in groups.items():
            if not present:
                continue
            tag, model = self._route(present)
            for lo in range(0, len(idx), self.max_batch):
                part = idx[lo:lo + self.max_batch]
                probs = self._run(model, present, [windows[i] for i in part])
                self._batches[tag] += 1
                for row, i in enumerate(part):
                    scores[i] = probs[row]
                    route[i] = tag
        return [self._decision(w, presents[i], scores[i], route[i])
                for i, w in enumerate(windows)]

    def _route(self, present: tuple[str, ...]) -> tuple[str, OnnxModel]:
        if len(present) == len(self.contract.modalities):
            return FALLBACK_NONE, self.model
        fb = self.model.fallbacks.get(present)
        if fb is not None:
            return "subset:" + "+".join(present), fb
        return FALLBACK_MASKED, self.model

    def _run(self, model: OnnxModel, present: tuple[str, ...],
             windows: list[Window]) -> np.ndarray:
        """Stack the windows' arrays for ``model`` (zeros for modalities not present)
        and run one batch."""
        c = model.contract
        batch = len(windows)
        inputs = {}
        for spec in c.modalities:
            shape = (spec.channels, spec.samples(c.window_ns))
            stacked = np.zeros((batch,) + shape, np.float32)
            if spec.name in present:
                for row, w in enumerate(windows):
                    x = w.data.get(spec.name)
                    if x is None or x.shape != shape:
                        raise ModalityMismatchError(
                            f"window {w.index} of node {w.node}: {spec.name} is marked present "
                            f"but its data is {None if x is None else list(x.shape)}; expected "
                            f"float32 {list(shape)} [channels, samples] on the model's grid")
                    stacked[row] = x
            inputs[spec.name] = stacked
        mask = np.array([[1.0 if m in present else 0.0 for m in c.modality_names]],
                        np.float32).repeat(batch, axis=0)
        return model.run(inputs, mask)

    def _decision(self, w: Window, present: tuple[str, ...], probs: np.ndarray | None,
                  route: str) -> Decision:
        labels = self.contract.labels
        missing = tuple(m for m in self.contract.modality_names if m not in present)
        if probs is None:
            label, scores = None, {lab: 0.0 for lab in labels}
        else:
            scores = {lab: float(p) for lab, p in zip(labels, probs)}
            top = int(np.argmax(probs))
            label = labels[top]
            if missing and float(probs[top]) < self.abstain_below:
                label, route = None, FALLBACK_ABSTAIN
        self._routes[route] += 1
        return Decision(
            node=w.node, seq=int(w.index), window_start_ns=int(w.start_ns),
            window_end_ns=int(w.end_ns),
            label=label, scores=scores, used=present, missing=missing, fallback=route,
            missing_reason={m: w.missing_reason.get(m, UNKNOWN_REASON) for m in missing},
            model=self.contract.ident, coverage=dict(w.coverage),
            received_ns=w.received_ns, closed_by=w.closed_by)
