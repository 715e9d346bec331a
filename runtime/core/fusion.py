"""Fuse aligned windows into decisions, with fallbacks for missing modalities.

Each window takes one route (``Decision.route``; ``Decision.fallback`` when decided):

- every modality present      -> the main model: route "all", fallback "none";
- some modalities missing     -> the fallback model declared for exactly the
  present subset, "subset:a+b" (contract order), or else the main model with
  the missing inputs zeroed and their mask entries 0, "masked";
- no modality present         -> no model runs: label None, fallback
  "abstain", route None, every label scored 0.0 (0.0 = not computed; the score
  keys are always the model's labels so consumers see one schema).

Calibration (the contract's ``calibration``, see contract.py): the route's
temperature divides the logits before the softmax, so decisions report
calibrated probabilities; a masked window uses "masked:<present>" if the
contract has it, else "masked". Abstention: a top probability below the route's
threshold turns the decision into label None, fallback "abstain" (the scores and
the route are kept, so one can see whose confidence was too low). Thresholds
apply to the fallback and masked routes; to the all-present route only with
``abstain_all`` (the main model's answer is the best there is, so by default it
is given). ``abstain_below`` overrides every threshold (0 = never abstain);
``calibrate=False`` ignores the contract's calibration (temperature 1, no
threshold but ``abstain_below``). All of it is fixed when the Fuser is made: a
decision is a pure function of its window, the model and these settings, so
live equals replay.

Windows are grouped by route and each group runs in batches of at most
``max_batch`` windows: one ORT call per batch.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from edgefuse.runtime.core.contract import ROUTE_ALL, ROUTE_MASKED
from edgefuse.runtime.core.decision import (FALLBACK_ABSTAIN, FALLBACK_MASKED, FALLBACK_NONE,
                                       Decision)
from edgefuse.runtime.core.errors import ConfigError, ModalityMismatchError
from edgefuse.runtime.core.inference import OnnxModel
from edgefuse.runtime.core.window import Window

log = logging.getLogger(__name__)

MAX_BATCH_LIMIT = 4096
UNKNOWN_REASON = "unknown"


@dataclass(frozen=True)
class Route:
    """One way of scoring a set of present modalities, with its calibration."""
    name: str                   # Decision.route: "all", "subset:a+b" or "masked"
    key: str                    # the most specific calibration key ("masked:a+b")
    fallback: str               # Decision.fallback when the window is decided
    model: OnnxModel
    temperature: float
    threshold: float | None     # abstain below this top probability; None: never


class Fuser:
    """Turns windows into decisions. Stateless across windows but for its counters:
    a decision's ``seq`` is its window's index (see Decision), not a count."""

    def __init__(self, model: OnnxModel, abstain_below: float | None = None,
                 max_batch: int = 64, abstain_all: bool = False, calibrate: bool = True):
        if abstain_below is not None and not 0.0 <= float(abstain_below) <= 1.0:
            raise ConfigError(f"abstain_below must be a probability in [0, 1], "
                              f"found {abstain_below!r}")
        if not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
            raise ConfigError(f"max_batch must be an integer in [1, {MAX_BATCH_LIMIT}], "
                              f"found {max_batch!r}")
        self.model = model
        self.contract = model.contract
        # Read once per decision: the contract is frozen, so computed once here
        # (each property builds a new tuple / string, 7,000 times an hour of data).
        self._names = self.contract.modality_names
        self._ident = self.contract.ident
        self.abstain_below = None if abstain_below is None else float(abstain_below)
        self.abstain_all = bool(abstain_all)
        self.calibrate = bool(calibrate)
        self.max_batch = max_batch
        self._route_cache: dict[tuple[str, ...], Route] = {}
        self._routes: Counter[str] = Counter()     # decisions per fallback value
        self._batches: Counter[str] = Counter()    # ORT calls per route
        self._abstained: Counter[str] = Counter()  # threshold abstentions per route
        if self.contract.calibration:
            log.info("model %s: calibrated routes %s%s", self.contract.ident,
                     [r for r, _ in self.contract.calibration],
                     "" if self.calibrate else " (ignored: calibration turned off)")

    def stats(self) -> dict[str, dict[str, int]]:
        """Decisions per fallback value, ORT calls and threshold abstentions per route."""
        return {"decisions": dict(self._routes), "batches": dict(self._batches),
                "abstained": dict(self._abstained)}

    def route(self, present: tuple[str, ...]) -> Route:
        """The route of windows whose present modalities are ``present`` (contract
        order, non-empty)."""
        r = self._route_cache.get(present)
        if r is None:
            r = self._route_cache[present] = self._make_route(present)
        return r

    def decide(self, windows: Sequence[Window]) -> list[Decision]:
        """One decision per window, in input order."""
        scores: list[np.ndarray | None] = [None] * len(windows)
        routes: list[Route | None] = [None] * len(windows)
        presents = self._presents(windows)
        for r, part, inputs, mask in self._batches_of(windows, presents):
            probs = r.model.run(inputs, mask, r.temperature)
            for row, i in enumerate(part):
                scores[i], routes[i] = probs[row], r
        return [self._decision(w, presents[i], scores[i], routes[i])
                for i, w in enumerate(windows)]

    def logits(self, windows: Sequence[Window]) -> list[tuple[str | None, np.ndarray | None]]:
        """Per window, in input order: (its route's most specific calibration key, the
        uncalibrated logits float32 [n_labels]); (None, None) when no modality is
        present. What calibration is fitted on (models.calibration)."""
        out: list[tuple[str | None, np.ndarray | None]] = [(None, None)] * len(windows)
        for r, part, inputs, mask in self._batches_of(windows, self._presents(windows)):
            raw = r.model.logits(inputs, mask)
            for row, i in enumerate(part):
                out[i] = (r.key, raw[row])
        return out

    def _presents(self, windows: Sequence[Window]) -> list[tuple[str, ...]]:
        names = self._names
        return [tuple(m for m in names if w.present.get(m, False)) for w in windows]

    def _batches_of(self, windows: Sequence[Window], presents: list[tuple[str, ...]]
                    ) -> Iterator[tuple[Route, list[int], dict[str, np.ndarray], np.ndarray]]:
        """(route, window indices, inputs, mask) per ORT call: grouped by route, at most
        max_batch windows each; windows with nothing present run nothing."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, present in enumerate(presents):
            groups.setdefault(present, []).append(i)
        for present, idx in groups.items():
            if not present:
                continue
            r = self.route(present)
            for lo in range(0, len(idx), self.max_batch):
                part = idx[lo:lo + self.max_batch]
                inputs, mask = self._stack(r.model, present, [windows[i] for i in part])
                self._batches[r.fallback] += 1
                yield r, part, inputs, mask

    def _make_route(self, present: tuple[str, ...]) -> Route:
        c = self.contract
        if len(present) == len(c.modalities):
            name, key, fallback, model = ROUTE_ALL, ROUTE_ALL, FALLBACK_NONE, self.model
        elif present in self.model.fallbacks:
            name = key = fallback = "subset:" + "+".join(present)
            model = self.model.fallbacks[present]
        else:
            name, fallback, model = ROUTE_MASKED, FALLBACK_MASKED, self.model
            key = f"{ROUTE_MASKED}:{'+'.join(present)}"
        cal = c.route_calibration(key, name)
        temperature = cal.temperature if self.calibrate else 1.0
        threshold = cal.threshold if self.calibrate else None
        if self.abstain_below is not None:
            threshold = self.abstain_below
        if name == ROUTE_ALL and not self.abstain_all:
            threshold = None
        return Route(name, key, fallback, model, temperature, threshold)

    def _stack(self, model: OnnxModel, present: tuple[str, ...],
               windows: list[Window]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Stack the windows' arrays for ``model`` (zeros for modalities not present)."""
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
        return inputs, mask

    def _decision(self, w: Window, present: tuple[str, ...], probs: np.ndarray | None,
                  r: Route | None) -> Decision:
        labels = self.contract.labels
        missing = tuple(m for m in self._names if m not in present)
        if probs is None or r is None:
            label, scores, fallback = None, {lab: 0.0 for lab in labels}, FALLBACK_ABSTAIN
        else:
            # tolist(): the same Python floats as float() of each item, in one call.
            values = probs.tolist()
            scores = dict(zip(labels, values))
            top = int(probs.argmax())  # the method: np.argmax's dispatch costs 5x more
            label, fallback = labels[top], r.fallback
            if r.threshold is not None and values[top] < r.threshold:
                label, fallback = None, FALLBACK_ABSTAIN
                self._abstained[r.name] += 1
        self._routes[fallback] += 1
        return Decision(
            node=w.node, seq=int(w.index), window_start_ns=int(w.start_ns),
            window_end_ns=int(w.end_ns),
            label=label, scores=scores, used=present, missing=missing, fallback=fallback,
            missing_reason={m: w.missing_reason.get(m, UNKNOWN_REASON) for m in missing},
            model=self._ident, coverage=dict(w.coverage),
            received_ns=w.received_ns, closed_by=w.closed_by,
            route=None if r is None else r.name)
