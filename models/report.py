"""``edgefuse evaluate ... --report DIR``: the evaluation as one self-contained HTML page.

DIR/index.html holds everything inline (CSS in a <style>, figures as base64 PNG, the
evaluate result as a JSON <script> block): it opens from a USB stick or a mail with no
network and no other file. Sections:

- model and data: the contract, the data evaluated on, the held-out split;
- accuracy per modality subset: evaluate's conditions (all, without:m, degraded:m)
  with the modalities each one leaves, as a table and grouped bars;
- confusion matrices per condition, as tables (numbers you can copy), shaded by row share;
- the timeline of one held-out recording (models/report_timeline.py);
- calibration, when the result has it (per condition ``reliability``, ``risk_coverage``,
  ``ece``, ``aurc``, ``coverage_at_risk``, see models/calibration.py
  ``condition_report``): reliability diagrams and risk-coverage curves.

The numbers come from the evaluate result unchanged; only the timeline runs the model
again (what the runtime decides on that recording). Figures need matplotlib, in the
``train`` extra: ``check_plotting`` says so in one line before any work is done.
"""
from __future__ import annotations

import html
import json
import os
from typing import TYPE_CHECKING, Sequence

from edgefuse.runtime.core.errors import EdgefuseError

if TYPE_CHECKING:
    from edgefuse.models.evaluate import Evaluation

REPORT_FILE = "index.html"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1320px;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: 2px; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 6px 0 12px; }
th, td { border: 1px solid #ddd; padding: 2px 7px; text-align: right; }
table.kv td { max-width: 560px; }
caption { font-size: 0.95em; text-align: left; padding-bottom: 2px; }
table.confusion { font-size: 0.8em; }
th { background: #f4f4f4; }
table.kv th, table.kv td { text-align: left; }
td.name, th.name { text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.grid figure { margin: 0; }
figcaption, .note { font-size: 0.85em; color: #555; }
img { max-width: 100%; }
"""


def check_plotting() -> None:
    """Raise one line saying what to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise EdgefuseError("--report draws its figures with matplotlib, which is not "
                            "installed: pip install 'edgefuse[train]'") from exc


def write_report(out_dir: str, evaluation: Evaluation, model_path: str,
                 source: dict[str, str]) -> str:
    """Write out_dir/index.html for an evaluation (its result and the windows it scored,
    which the timeline draws from); ``source`` says what they were cut from (shown as
    is). Returns the page's path."""
    check_plotting()
    from edgefuse.models.report_timeline import build_timeline
    result = evaluation.result
    timeline = build_timeline(model_path, evaluation.ws, evaluation.idx,
                              use_fallbacks=bool(result["fallbacks"]),
                              abstain_all=bool(result.get("abstain_all", False)))
    page = render(result, model_path, source, timeline)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, REPORT_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path


def calibration_of(row: dict) -> dict | None:
    """A condition's calibration report, whether merged into the row or nested under
    ``calibration``; None when the result has none."""
    for cand in (row, row.get("calibration")):
        if isinstance(cand, dict) and "reliability" in cand and "risk_coverage" in cand:
            return cand
    return None


def render(result: dict, model_path: str, source: dict, timeline=None) -> str:
    """The page as a string (timeline: a report_timeline.Timeline or None)."""
    from edgefuse.models import report_plots as plots
    from edgefuse.runtime.core.inference import OnnxModel
    contract = OnnxModel.load(model_path).contract
    conds = result["conditions"]
    calibration = {name: cal for name, row in conds.items()
                   if (cal := calibration_of(row)) is not None}
    parts = [f"<h1>Evaluation of {_e(result['model'])}</h1>",
             f"<p class='note'>edgefuse evaluate, {result['windows']} held-out windows with "
             f"every modality present; {_e(source_line(source))}</p>",
             _summary(result, model_path, contract, source),
             "<section id='subsets'><h2>Accuracy per modality subset</h2><div class='grid'>",
             _metrics_table(result, contract.modality_names),
             _img(plots.metric_bars(conds), "accuracy, balanced accuracy and macro-F1 per "
                  "condition"), "</div></section>",
             "<section id='confusion'><h2>Confusion matrices</h2><p class='note'>Rows: true "
             "label; columns: decision (top label, no threshold). Shade: share of the row. "
             "Abstentions (no modality left) are not in the matrix.</p><div class='grid'>",
             *(_confusion(name, row, result["labels"]) for name, row in conds.items()),
             "</div></section>",
             "<section id='timeline'><h2>Timeline of one held-out recording</h2>"]
    if timeline is not None:
        parts += [_timeline_text(timeline),
                  _img(plots.timeline_figure(timeline, list(contract.labels)),
                       "top: energy per modality (dB of the de-meaned mean power; ticks where "
                       "missing); middle: true label (grey band) and decision (colour = route "
                       "that scored it, red x = wrong, hollow = abstained); bottom: the "
                       "decision's top probability")]
    else:
        parts.append("<p class='note'>No timeline.</p>")
    parts.append("</section><section id='calibration'><h2>Calibration and abstention</h2>")
    if calibration:
        parts += [_calibration_table(calibration),
                  _img(plots.reliability_grid(calibration), "reliability diagrams: accuracy "
                       "per bin of the top probability (on the dashed diagonal = calibrated), "
                       "windows per bin beneath"),
                  _img(plots.risk_coverage_plot(calibration), "risk-coverage: abstain on the "
                       "least confident windows first; the error among those kept")]
    else:
        parts.append("<p class='note'>This evaluate result has no calibration metrics "
                     "(reliability, risk-coverage).</p>")
    doc = json.dumps(result, sort_keys=True).replace("</", "<\\/")
    parts += ["</section>",
              f"<script type='application/json' id='evaluate-result'>{doc}</script>"]
    return ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>edgefuse evaluation: {_e(result['model'])}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def source_line(source: dict) -> str:
    return "; ".join(f"{k} {v}" for k, v in source.items())


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _img(uri: str, caption: str) -> str:
    return f"<figure><img src='{uri}' alt='{_e(caption)}'><figcaption>{_e(caption)}" \
           "</figcaption></figure>"


def _kv(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{body}</table>"


def _summary(result: dict, model_path: str, contract, source: dict) -> str:
    mods = ", ".join(f"{m.name} ({m.channels} ch, {m.rate_hz:g} Hz)"
                     for m in contract.modalities)
    model_rows = [("model", f"{contract.ident} ({model_path})"),
                  ("description", contract.description or "-"),
                  ("modalities", mods),
                  ("window / hop", f"{contract.window_ns / 1e9:g} s / "
                                   f"{contract.hop_ns / 1e9:g} s"),
                  ("labels", ", ".join(contract.labels)),
                  ("fallbacks", ", ".join(result["fallbacks"]) or "none"),
                  ("calibrated routes", ", ".join(r for r, _ in contract.calibration)
                   or "none (the model's own scores)")]
    keys = result.get("split_keys", "all")
    data_rows = [*source.items(),
                 ("task", result.get("task", "-")),
                 ("split", f"{result.get('split', '-')}: {result.get('split_column', '-')} "
                           f"{keys if keys == 'all' else ', '.join(keys)}"),
                 ("windows", result["windows"]),
                 ("class counts", ", ".join(f"{n} {c}" for n, c in
                                            zip(result["labels"], result["class_counts"]))),
                 ("degraded seed", result.get("seed", "-"))]
    if "label_rule" in result:
        data_rows.append(("label rule", json.dumps(result["label_rule"], sort_keys=True)))
    if "chunk_s" in result:
        data_rows.append(("chunk length", f"{result['chunk_s']:g} s"))
    return ("<section id='summary'><h2>Model and data</h2><div class='grid'>"
            f"{_kv(model_rows)}{_kv(data_rows)}</div></section>")


def subset_of(name: str, modalities: Sequence[str]) -> str:
    """The modalities a condition leaves the model."""
    kind, _, m = name.partition(":")
    if kind == "without":
        return " + ".join(x for x in modalities if x != m) or "none"
    if kind == "degraded":
        return f"all; {m} removed from half the windows"
    return " + ".join(modalities)


def _metrics_table(result: dict, modalities: Sequence[str]) -> str:
    head = ("<tr><th class='name'>condition</th><th class='name'>modalities</th><th>windows"
            "</th><th>accuracy</th><th>balanced acc.</th><th>macro-F1</th><th>drop acc.</th>"
            "<th>drop bal.</th><th>drop F1</th><th>abstained</th></tr>")
    rows = []
    for name, r in result["conditions"].items():
        rows.append(
            f"<tr data-condition='{_e(name)}'><td class='name'>{_e(name)}</td>"
            f"<td class='name'>{_e(subset_of(name, modalities))}</td><td>{r['n']}</td>"
            f"<td>{r['accuracy']:.3f}</td><td>{r['balanced_accuracy']:.3f}</td>"
            f"<td>{r['macro_f1']:.3f}</td><td>{r['rel_drop_accuracy']:.1%}</td>"
            f"<td>{r['rel_drop_balanced_accuracy']:.1%}</td>"
            f"<td>{r['rel_drop_macro_f1']:.1%}</td><td>{r['abstained']}</td></tr>")
    return f"<table class='metrics'>{head}{''.join(rows)}</table>"


def _confusion(name: str, row: dict, labels: Sequence[str]) -> str:
    head = "".join(f"<th>{_e(x)}</th>" for x in labels)
    body = []
    for true, counts in zip(labels, row["confusion"]):
        total = sum(counts) or 1
        cells = []
        for k, v in enumerate(counts):
            colour = "31,119,180" if labels[k] == true else "214,39,40"
            cells.append(f"<td style='background: rgba({colour},{0.6 * v / total:.2f})'>"
                         f"{v}</td>")
        body.append(f"<tr><th class='name'>{_e(true)}</th>{''.join(cells)}</tr>")
    return (f"<div><table class='confusion' data-condition='{_e(name)}'><caption><b>"
            f"{_e(name)}</b><br>accuracy {row['accuracy']:.3f}, {row['abstained']} abstained"
            f"</caption><tr><th class='name'>true \\ decided</th>{head}</tr>"
            f"{''.join(body)}</table></div>")


def _calibration_table(calibration: dict[str, dict]) -> str:
    def fmt(v, pattern="{:.3f}"):
        return "-" if v is None else pattern.format(v)
    target = next(iter(calibration.values())).get("target_risk")
    head = ("<tr><th class='name'>condition</th><th>ECE</th><th>ECE uncalibrated</th>"
            "<th>ECE noise floor</th>"
            f"<th>AURC</th><th>coverage at risk {fmt(target, '{:g}')}</th>"
            "<th>decided by the runtime</th><th>error among decided</th></tr>")
    rows = [f"<tr data-condition='{_e(name)}'><td class='name'>{_e(name)}</td>"
            f"<td>{fmt(c.get('ece'))}</td><td>{fmt(c.get('ece_uncalibrated'))}</td>"
            f"<td>{fmt(c.get('ece_floor'))}</td>"
            f"<td>{fmt(c.get('aurc'))}</td><td>{fmt(c.get('coverage_at_risk'), '{:.1%}')}</td>"
            f"<td>{fmt(c.get('decided'), '{:.1%}')}</td>"
            f"<td>{fmt(c.get('risk_decided'), '{:.1%}')}</td></tr>"
            for name, c in calibration.items()]
    return f"<table class='calibration'>{head}{''.join(rows)}</table>"


def _timeline_text(tl) -> str:
    s = tl.summary()
    cut = "" if s["windows"] == tl.windows_in_recording else \
        f" of {tl.windows_in_recording} (the stretch with the most label changes)"
    routes = ", ".join(f"{n} {k}" for k, n in sorted(s["fallbacks"].items()))
    missing = {m: int((r != "").sum()) for m, r in tl.reasons.items()}
    return (f"<p><b>{_e(tl.name)}</b>: {s['windows']} windows{_e(cut)} as recorded, "
            "decided as the runtime decides them (the model's calibration and abstention "
            f"thresholds): {s['right']} right, "
            f"{s['decided'] - s['right']} wrong, {s['abstained']} abstained. Decided with: "
            f"{_e(routes)}. Windows missing a modality: "
            f"{_e(', '.join(f'{m} {n}' for m, n in missing.items()))}.</p>")
