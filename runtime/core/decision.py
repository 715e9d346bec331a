"""Fused decisions and their JSON Lines form.

One decision per (node, window). The JSON is canonical (fixed key order,
scores rounded to 6 decimals) so that replaying the same input twice gives
byte-identical output, and live and replay agree.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

SCORE_DECIMALS = 6

FALLBACK_NONE = "none"
FALLBACK_MASKED = "masked"
FALLBACK_ABSTAIN = "abstain"

# What json.dumps(obj, separators=(",", ":"), allow_nan=False) builds on every call,
# built once: the same bytes, without a new encoder per decision.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class Decision:
    """The model's answer for window ``seq`` of ``node``.

    ``seq`` is the window's index on the absolute timeline: the window spans
    [seq * hop_ns, seq * hop_ns + window_ns) (``window_start_ns`` is
    ``seq * hop_ns``). It increases per node but skips the numbers of windows
    that had no data (a silent node, a gap), and it is the same live and in
    replay, across restarts and model reloads (a reload that would change
    hop_ns is refused). So ``(node, seq)`` names one window for good:
    consumers deduplicate on it, and a window decided again after a crash
    carries the same key. Only a model with another hop_ns, deployed by a
    restart, numbers windows anew; ``window_start_ns`` tells those apart.

    ``fallback`` says what was decided with: "none" (the main model, every modality
    present), a fallback's tag ("subset:seismic"), "masked", or "abstain" (label
    None). ``route`` names the model route that scored the window, whatever the
    outcome: "all", the fallback's tag, "masked", or None when no model ran (no
    modality present). So an abstention says whose confidence was too low
    (``"fallback":"abstain","route":"subset:seismic"``) and keeps its scores, which
    are calibrated probabilities when the model's contract calibrates that route.

    ``received_ns`` and ``closed_by`` are copied from the window (see Window):
    when and by which chunk it was closed, for latency. Not data: not in the
    JSON, not compared.
    """

    node: str
    seq: int
    window_start_ns: int
    window_end_ns: int
    label: str | None
    scores: dict[str, float]
    used: tuple[str, ...]
    missing: tuple[str, ...]
    fallback: str
    missing_reason: dict[str, str]
    model: str
    coverage: dict[str, float] = field(default_factory=dict)
    route: str | None = None
    received_ns: int | None = field(default=None, compare=False, repr=False)
    closed_by: tuple[str, str, int] | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {
            "node": self.node,
            "seq": self.seq,
            "window_start_ns": self.window_start_ns,
            "window_end_ns": self.window_end_ns,
            "label": self.label,
            "scores": {k: round(float(v), SCORE_DECIMALS) for k, v in self.scores.items()},
            "used": list(self.used),
            "missing": list(self.missing),
            "fallback": self.fallback,
            "route": self.route,
            "missing_reason": dict(self.missing_reason),
            "coverage": {k: round(float(v), 4) for k, v in self.coverage.items()},
            "model": self.model,
        }

    def to_json(self) -> str:
        return _ENCODER.encode(self.to_dict())
