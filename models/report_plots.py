"""The evaluation report's figures, as inline PNG data URIs (matplotlib, Agg).

matplotlib belongs to the ``train`` extra and is imported only here, inside the
functions, so the runtime and ``edgefuse evaluate`` without ``--report`` never load
it. Figures are drawn with the object API on an Agg canvas (no pyplot, no global
state, no display). The PNG's text chunks are dropped so the page holds no address
at all, not even matplotlib's own.
"""
from __future__ import annotations

import base64
import io

import numpy as np

from edgefuse.models.report_timeline import Timeline

DPI = 100
ROUTE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")
WRONG, ABSTAIN, TRUTH = "#d62728", "#7f7f7f", "#c7c7c7"
METRIC_COLUMNS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                  ("macro_f1", "macro-F1"))


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def metric_bars(conditions: dict[str, dict]) -> str:
    """Accuracy, balanced accuracy and macro-F1 per condition, grouped bars."""
    names = list(conditions)
    fig = _figure(max(6.0, 1.3 * len(names) + 2), 3.4)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    width = 0.8 / len(METRIC_COLUMNS)
    for k, (key, title) in enumerate(METRIC_COLUMNS):
        values = [conditions[n][key] for n in names]
        bars = ax.bar(x + (k - 1) * width, values, width, label=title,
                      color=ROUTE_COLOURS[k])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("score")
    ax.legend(loc="lower left", fontsize=8, ncols=3)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def reliability_grid(calibration: dict[str, dict]) -> str:
    """One reliability diagram per condition (accuracy per bin of the top probability
    against the diagonal) over the count of windows per bin (log scale)."""
    from matplotlib.ticker import LogLocator, NullFormatter
    names = list(calibration)
    cols = min(5, len(names))
    rows = -(-len(names) // cols)
    fig = _figure(2.6 * cols, 3.3 * rows)
    cells = fig.subfigures(rows, cols, squeeze=False)
    for k, name in enumerate(names):
        cal = calibration[name]
        top, bottom = cells[k // cols][k % cols].subplots(2, 1, sharex=True,
                                                            height_ratios=(3, 1))
        table = [b for b in cal["reliability"] if b["n"]]
        lo = np.array([b["lo"] for b in table])
        width = np.array([b["hi"] - b["lo"] for b in table])
        acc = np.array([b["accuracy"] for b in table])
        conf = np.array([b["confidence"] for b in table])
        top.bar(lo, acc, width, align="edge", color=ROUTE_COLOURS[0], alpha=0.75,
                edgecolor="white")
        top.plot(conf, acc, "o", ms=3, color="black")
        top.plot([0, 1], [0, 1], "--", color=WRONG, lw=1)
        top.set_ylim(0, 1.02)
        title = f"{name}\nECE {_num(cal.get('ece'))}"
        if cal.get("ece_uncalibrated") is not None:
            title += f" (raw {_num(cal['ece_uncalibrated'])})"
        top.set_title(title, fontsize=8)
        top.set_ylabel("accuracy", fontsize=7)
        bottom.bar(lo, [b["n"] for b in table], width, align="edge", color=TRUTH)
        bottom.set_yscale("log")
        bottom.yaxis.set_major_locator(LogLocator(numticks=3))
        bottom.yaxis.set_minor_formatter(NullFormatter())
        bottom.set_ylabel("windows", fontsize=7)
        bottom.set_xlim(0, 1)
        bottom.set_xlabel("top probability", fontsize=7)
        for ax in (top, bottom):
            ax.tick_params(labelsize=6)
    return _png(fig)


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def risk_coverage_plot(calibration: dict[str, dict]) -> str:
    """Risk among the windows kept against the share kept, every condition, with the
    target risk as a line."""
    fig = _figure(10.5, 4.2)
    ax = fig.add_subplot()
    target = None
    for k, (name, cal) in enumerate(calibration.items()):
        curve = cal["risk_coverage"]
        ax.plot(curve["coverage"], curve["risk"], color=ROUTE_COLOURS[k % len(ROUTE_COLOURS)],
                lw=1.5, label=f"{name} (AURC {cal['aurc']:.3f}, "
                              f"{cal['coverage_at_risk']:.1%} kept)")
        target = cal.get("target_risk", target)
    if target is not None:
        ax.axhline(target, color=WRONG, ls="--", lw=1, label=f"target risk {target:g}")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (share of windows decided, most confident first)")
    ax.set_ylabel("risk (error among the decided)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def _broken(t: np.ndarray, y: np.ndarray, hop_s: float) -> tuple[np.ndarray, np.ndarray]:
    """t, y with a NaN after every jump longer than a hop, so lines do not bridge gaps."""
    cut = np.flatnonzero(np.diff(t) > 1.5 * hop_s) + 1
    return np.insert(t.astype(float), cut, np.nan), np.insert(y.astype(float), cut, np.nan)


def timeline_figure(tl: Timeline, labels: list[str]) -> str:
    """Three panels on one time axis: energy per modality (gaps where missing), true
    label and decision (colour = route, red x = wrong, grey = abstained), top score."""
    t = tl.seconds
    fig = _figure(13.0, 7.2)
    axes = fig.subplots(3, 1, sharex=True, height_ratios=(2.2, 1.6, 1.4))
    ax = axes[0]
    hop = tl.hop_ns / 1e9
    for k, (m, e) in enumerate(tl.energy_db.items()):
        colour = ROUTE_COLOURS[k % len(ROUTE_COLOURS)]
        ax.plot(*_broken(t, e, hop), ".-", ms=3, lw=1, color=colour, label=m)
        gone = np.isnan(e)
        if gone.any():
            ax.plot(t[gone], np.full(gone.sum(), np.nanmin(e) if (~gone).any() else 0.0),
                    "|", ms=9, color=colour, label=f"{m} missing")
    ax.set_ylabel("energy (dB)")
    ax.legend(fontsize=8, loc="upper right", ncols=4)
    ax.grid(alpha=0.3)

    ax = axes[1]
    rows = {name: i for i, name in enumerate(labels)}
    abstain_row = len(labels)
    truth_y = [rows.get(x, np.nan) for x in tl.truth]
    ax.hlines(truth_y, t, t + hop, color=TRUTH, lw=8, label="true label")
    routes = sorted({d.route or "none" for d in tl.decisions})
    colour_of = {r: ROUTE_COLOURS[i % len(ROUTE_COLOURS)] for i, r in enumerate(routes)}
    for r in routes:
        sel = [i for i, d in enumerate(tl.decisions)
               if (d.route or "none") == r and d.label is not None]
        if sel:
            ax.plot(t[sel], [rows[tl.decisions[i].label] for i in sel], "o", ms=4,
                    color=colour_of[r], label=f"decided by {r}")
    wrong = [i for i, d in enumerate(tl.decisions)
             if d.label is not None and d.label != tl.truth[i]]
    if wrong:
        ax.plot(t[wrong], [rows[tl.decisions[i].label] for i in wrong], "x", ms=8,
                color=WRONG, label="wrong")
    gave_up = [i for i, d in enumerate(tl.decisions) if d.label is None]
    if gave_up:
        ax.plot(t[gave_up], np.full(len(gave_up), abstain_row), "o", ms=5, mfc="none",
                color=ABSTAIN, label="abstained")
    ax.set_yticks(range(len(labels) + 1), [*labels, "abstain"], fontsize=8)
    ax.set_ylim(-0.6, len(labels) + 0.6)
    ax.legend(fontsize=7, loc="upper right", ncols=3)
    ax.grid(axis="x", alpha=0.3)

    ax = axes[2]
    for r in routes:
        sel = [i for i, d in enumerate(tl.decisions) if (d.route or "none") == r]
        top = [max(tl.decisions[i].scores.values(), default=0.0) for i in sel]
        ax.plot(t[sel], top, "o", ms=3, color=colour_of[r], label=r)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("top probability")
    ax.set_xlabel(f"seconds from the first window ({tl.name})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncols=len(routes))
    return _png(fig)
