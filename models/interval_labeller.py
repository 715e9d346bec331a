"""Labels a user's windows from an intervals file, node by node, and reports the
intervals that label nothing (numpy only). Used by models/recordings.py: one
``IntervalLabeller`` per build, ``for_node(node)`` is the labeller of that node's
unit (dataset.build_windows), ``report`` is the build's ``WindowSet.info`` and
``warn_about`` logs what it says is wrong (on every build or cache load).
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from edgefuse.models.dataset import Labelled
from edgefuse.models.intervals import (IGNORE, IntervalRule, Intervals, nearest_interval,
                                       overlapping, window_labels)
from edgefuse.runtime.core.errors import ConfigError

log = logging.getLogger(__name__)

_REPORT_LINES = 20   # interval lines named in the report


class IntervalLabeller:
    """Labels each node's windows from the intervals; keeps the report."""

    def __init__(self, intervals: Intervals, labels: tuple[str, ...], rule: IntervalRule,
                 group: str = "node"):
        rule.check(labels)
        if group != "node" and group not in intervals.columns:
            raise ConfigError(f"[data] group {group!r} is neither 'node' nor a column of "
                              f"{intervals.path} (its columns: node, start, end, label"
                              f"{''.join(', ' + c for c in intervals.columns)})")
        if group != "node":
            empty = np.flatnonzero(intervals.columns[group] == "")
            if empty.size:
                raise ConfigError(f"{intervals.path} line {int(intervals.line[empty[0]])}: "
                                  f"the split column {group!r} is empty")
        self.iv, self.labels, self.rule, self.group = intervals, labels, rule, group
        self.inside = np.zeros(len(intervals), bool)    # overlaps a window of its node
        self.won = np.zeros(len(intervals), bool)       # its label is some such window's
        self.extent: dict[str, tuple[int, int]] = {}    # node -> first start, last end
        self.counts = {"labelled": 0, "background": 0, "no_interval": 0, "unknown_label": 0,
                       "below_rule": 0, "no_group": 0}

    def for_node(self, node: str) -> Callable[[np.ndarray, np.ndarray], Labelled]:
        def label(start: np.ndarray, end: np.ndarray) -> Labelled:
            idx = self.iv.for_node(node)
            self.inside[idx] |= overlapping(self.iv, idx, start, end)
            codes, share, counts = window_labels(self.iv, idx, start, end, self.labels,
                                                 self.rule)
            self._note(node, idx, start, end, codes)
            meta = {"target": np.array([self.labels[c] if c >= 0 else "" for c in codes])}
            if self.group == "node":
                meta["group"] = np.full(codes.size, node)
            else:
                near = nearest_interval(self.iv, idx, start, end)
                if near.size and near[0] < 0:   # no interval names this node's group
                    counts["no_group"] = counts.pop("labelled") + counts.pop("background")
                    codes = np.full(codes.size, IGNORE, np.int64)
                    meta["group"] = np.full(codes.size, "")
                else:
                    meta["group"] = self.iv.columns[self.group][near]
                meta[self.group] = meta["group"]
            for k, v in counts.items():
                self.counts[k] += v     # outcomes of windows, each counted once
            return Labelled(codes, {"share": share}, meta)
        return label

    def _note(self, node: str, idx: np.ndarray, start: np.ndarray, end: np.ndarray,
              codes: np.ndarray) -> None:
        """Which intervals gave their label to a window; the node's recorded extent."""
        for c in np.unique(codes[codes >= 0]):
            mine = idx[self.iv.label[idx] == self.labels[c]]
            self.won[mine] |= overlapping(self.iv, mine, start[codes == c], end[codes == c])
        if start.size:
            lo, hi = self.extent.get(node, (int(start.min()), int(end.max())))
            self.extent[node] = (min(lo, int(start.min())), max(hi, int(end.max())))

    def report(self, nodes: list[str],
               spans: dict[str, tuple[int, int]] | None = None) -> dict:
        """Intervals that label nothing: of a node not in the recordings (``other_nodes``),
        or of a recorded node but labelling no window of it (``no_window``), counted
        apart: ``outside`` every recording of the node (its extent: ``spans`` from the
        streams' headers, widened by its windows), ``uncut`` (inside it, but no window
        was cut there: a recording shorter than a window, a file start or end, a gap)
        and ``outvoted`` (it touches windows, but each went to another label or was left
        out: shorter than the rule needs, or another label covers more)."""
        recorded = np.isin(self.iv.node, nodes) | (self.iv.node == "*")
        known = np.isin(self.iv.label, self.labels)
        silent = recorded & known & ~self.won
        in_extent = np.zeros(len(self.iv), bool)
        for node in nodes:
            lo, hi = self.extent.get(node, (None, None))
            if spans and node in spans:
                lo = spans[node][0] if lo is None else min(lo, spans[node][0])
                hi = spans[node][1] if hi is None else max(hi, spans[node][1])
            if lo is not None:
                idx = self.iv.for_node(node)
                in_extent[idx] |= (self.iv.start_ns[idx] < hi) & (self.iv.end_ns[idx] > lo)
        cases = {"outside": silent & ~self.inside & ~in_extent,
                 "uncut": silent & ~self.inside & in_extent,
                 "outvoted": silent & self.inside}
        no_window = np.flatnonzero(silent)
        by_label: dict[str, int] = {}
        for name in self.iv.label[no_window].tolist():
            by_label[name] = by_label.get(name, 0) + 1
        foreign = sorted(set(self.iv.label.tolist()) - set(self.labels))
        return {"labels_file": self.iv.path, "intervals": len(self.iv),
                "no_window": int(no_window.size), "no_window_by_label": by_label,
                "no_window_lines": [int(x) for x in self.iv.line[no_window][:_REPORT_LINES]],
                **{k: int(v.sum()) for k, v in cases.items()},
                "outside_lines": [int(x) for x in
                                  self.iv.line[np.flatnonzero(cases["outside"])][:_REPORT_LINES]],
                "other_nodes": sorted(set(self.iv.node[~recorded].tolist())),
                "other_node_intervals": int((~recorded).sum()),
                "labels_not_in_contract": foreign, "windows": dict(self.counts),
                "nodes": nodes, "rule": self.rule.to_dict(), "group": self.group}


def warn_about(info: dict, other_nodes_level: int = logging.WARNING) -> None:
    """Log what the label report says is wrong (on every build or cache load).
    Intervals of nodes not recorded are expected when evaluating on some of the
    nodes: the caller picks their level."""
    if info.get("no_window"):
        log.warning("%s: %d of %d intervals label no window of their node (by label %s; "
                    "lines %s): %d outside every recording of it, %d inside one where no "
                    "window was cut (a recording shorter than a window, a file start or "
                    "end, a gap), %d outvoted in every window they touch (shorter than the "
                    "rule needs, or another label covers more)", info["labels_file"],
                    info["no_window"], info["intervals"], info["no_window_by_label"],
                    info["no_window_lines"], info["outside"], info["uncut"],
                    info["outvoted"])
    if info.get("other_node_intervals"):
        log.log(other_nodes_level, "%s: %d intervals name nodes %s, which are not in the "
                "recordings (recorded: %s): they label nothing", info["labels_file"],
                info["other_node_intervals"], info["other_nodes"][:_REPORT_LINES],
                info["nodes"])
    if info.get("labels_not_in_contract"):
        log.warning("%s: labels %s are not among the model's labels; windows they win are "
                    "left out (%d)", info["labels_file"], info["labels_not_in_contract"],
                    info["windows"]["unknown_label"])
    if info.get("windows", {}).get("no_group"):
        log.warning("%d windows of nodes without any interval have no %r: left out",
                    info["windows"]["no_group"], info["group"])
