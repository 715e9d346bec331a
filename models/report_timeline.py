"""The per-window timeline of one held-out recording, for the evaluation report.

The windows are the ones evaluate scores (the same WindowSet, cut by the runtime's
aligner from the readers replay uses, so they are replay's windows bit for bit;
tests/test_training_equals_serving.py), but taken *as recorded*: a window keeps its
own missing modalities and their reasons (gap, flatline, ...), and it is decided by
the Fuser of a default ``Pipeline`` (the model's calibration and abstention
thresholds), which is what a replay of that recording would answer, whereas
evaluate's conditions score windows with every modality present and then remove some.

A recording is one (node, group) of the held-out windows: a goodvibes pass or noise
recording on one node, an sp-sw-har execution, a node of a user's recordings. The
one shown has the most distinct true labels, then the most windows of its rarest
label (a vehicle passing rather than one stray window), then the most windows; names
break ties. Past ``MAX_WINDOWS`` the stretch with the most label changes is kept.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
import numpy as np

from edgefuse.models.dataset import WindowSet
from edgefuse.runtime.core.decision import Decision
from edgefuse.runtime.core.errors import ModalityMismatchError
from edgefuse.runtime.core.inference import OnnxModel
from edgefuse.runtime.core.pipeline import Pipeline, PipelineConfig
from edgefuse.runtime.core.window import Window

MAX_WINDOWS = 360
POWER_FLOOR = 1e-20   # keeps log10 finite for an all-zero (but present) window


@dataclass
class Timeline:
    """One recording's windows in time order, with the runtime's decisions."""

    node: str
    group: str
    hop_ns: int
    start_ns: np.ndarray                 # int64 [N] window starts
    energy_db: dict[str, np.ndarray]     # modality -> [N], NaN where missing
    reasons: dict[str, np.ndarray]       # modality -> [N] str, "" where present
    truth: list[str]                     # true label per window
    decisions: list[Decision]
    windows_in_recording: int            # before the MAX_WINDOWS cut

    @property
    def name(self) -> str:
        return f"node {self.node}" if self.group == self.node else \
            f"node {self.node}, {self.group}"

    @property
    def seconds(self) -> np.ndarray:
        return (self.start_ns - self.start_ns[0]) / 1e9

    def summary(self) -> dict:
        decided = [d for d in self.decisions if d.label is not None]
        right = sum(d.label == t for d, t in zip(self.decisions, self.truth))
        routes: dict[str, int] = {}
        for d in self.decisions:
            routes[d.fallback] = routes.get(d.fallback, 0) + 1
        return {"windows": len(self.decisions), "decided": len(decided), "right": right,
                "abstained": len(self.decisions) - len(decided), "fallbacks": routes}


def energy_db(x: np.ndarray) -> np.ndarray:
    """Per window: 10 log10 of the mean power of the de-meaned samples over channels
    ([N, C, S] -> [N]). The mean is removed so gravity or a DC offset is not "energy"."""
    x = np.asarray(x, np.float64)
    power = np.mean((x - x.mean(axis=2, keepdims=True)) ** 2, axis=(1, 2))
    return 10.0 * np.log10(np.maximum(power, POWER_FLOOR))


def pick_recording(ws: WindowSet, idx: np.ndarray) -> np.ndarray:
    """Rows of idx forming the recording to show (time order, at most MAX_WINDOWS)."""
    node, group = ws.meta["node"].astype(str), ws.meta["group"].astype(str)
    best_key, best_rows = None, None
    for name in sorted(set(zip(node[idx].tolist(), group[idx].tolist()))):
        rows = idx[(node[idx] == name[0]) & (group[idx] == name[1])]
        counts = np.unique(ws.label[rows], return_counts=True)[1]
        key = (counts.size, int(counts.min()), rows.size)
        if best_key is None or key > best_key:
            best_key, best_rows = key, rows
    rows = best_rows[np.argsort(ws.num["start_ns"][best_rows], kind="stable")]
    if rows.size <= MAX_WINDOWS:
        return rows
    changes = np.r_[0, np.cumsum(ws.label[rows][1:] != ws.label[rows][:-1])]
    in_span = changes[MAX_WINDOWS - 1:] - changes[:rows.size - MAX_WINDOWS + 1]
    lo = int(np.argmax(in_span))
    return rows[lo:lo + MAX_WINDOWS]


def _window(ws: WindowSet, i: int, hop_ns: int, window_ns: int) -> Window:
    start = int(ws.num["start_ns"][i])
    present = {m: bool(ws.mask[i, j] > 0) for j, m in enumerate(ws.modalities)}
    reasons = {m: str(ws.reasons[m][i]) if m in ws.reasons else "unknown"
               for m, p in present.items() if not p}
    return Window(str(ws.meta["node"][i]), start // hop_ns, start, start + window_ns,
                  {m: ws.x[m][i] for m in ws.modalities}, present, reasons,
                  {m: 1.0 if p else 0.0 for m, p in present.items()})


def build_timeline(model_path: str, ws: WindowSet, idx: np.ndarray,
                   use_fallbacks: bool = True, abstain_all: bool = False) -> Timeline:
    """Pick a recording among the windows idx and decide it as the runtime would
    (``abstain_all`` as the runtime's --abstain-all)."""
    model = OnnxModel.load(model_path)
    if not use_fallbacks:
        model.fallbacks = {}
    c = model.contract
    if tuple(ws.modalities) != c.modality_names:
        raise ModalityMismatchError(f"windows of {list(ws.modalities)}, model {c.ident} takes "
                                    f"{list(c.modality_names)}")
    rows = pick_recording(ws, idx)
    windows = [_window(ws, int(i), c.hop_ns, c.window_ns) for i in rows]
    decisions = Pipeline(model, PipelineConfig(abstain_all=abstain_all)).fuser.decide(windows)
    energy = {}
    for j, m in enumerate(ws.modalities):
        e = energy_db(ws.x[m][rows])
        e[ws.mask[rows, j] <= 0] = np.nan
        energy[m] = e
    reasons = {m: np.array([w.missing_reason.get(m, "") for w in windows])
               for m in ws.modalities}
    node, group = str(ws.meta["node"][rows[0]]), str(ws.meta["group"][rows[0]])
    n_rec = int(np.sum((ws.meta["node"][idx] == node) & (ws.meta["group"][idx] == group)))
    logging.getLogger(__name__).info("timeline: node %s, %s, %d of %d windows", node, group,
                                     rows.size, n_rec)
    truth = [c.labels[k] if k >= 0 else "" for k in ws.label[rows]]
    return Timeline(node, group, c.hop_ns, ws.num["start_ns"][rows].astype(np.int64), energy,
                    reasons, truth, decisions, n_rec)
