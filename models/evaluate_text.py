"""The text form of an evaluation (models/evaluate.py's result dict): the metrics and
calibration table, the risk-coverage table and a confusion matrix, as printed by
``edgefuse evaluate`` without --json."""
from __future__ import annotations


def _num(v, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:{width}{spec}}"


def format_table(result: dict) -> str:
    """Metrics per condition, then calibration: ECE with its noise floor, ECE without
    calibration, AURC, coverage at the target risk, share decided and the error among
    the decided windows (the model's thresholds)."""
    risk = result.get("target_risk", 0.02)
    lines = [f"model {result['model']}  windows {result['windows']}  classes "
             f"{dict(zip(result['labels'], result['class_counts']))}  fallbacks "
             f"{result['fallbacks'] or 'none'}  calibrated routes "
             f"{sorted(result.get('calibration') or {}) or 'none'}",
             f"{'condition':<20}{'acc':>7}{'bal_acc':>9}{'macroF1':>9}"
             f"{'drop acc':>10}{'drop bal':>10}{'drop F1':>9}{'abst':>6}"
             f"{'ECE':>8}{'floor':>7}{'ECEraw':>8}{'AURC':>7}{f'cov@{risk:g}':>9}"
             f"{'decided':>9}{'risk_dec':>9}"]
    for name, r in result["conditions"].items():
        lines.append(f"{name:<20}{r['accuracy']:7.3f}{r['balanced_accuracy']:9.3f}"
                     f"{r['macro_f1']:9.3f}{r['rel_drop_accuracy']:10.1%}"
                     f"{r['rel_drop_balanced_accuracy']:10.1%}{r['rel_drop_macro_f1']:9.1%}"
                     f"{r['abstained']:6d}{_num(r.get('ece'), '.3f', 8)}"
                     f"{_num(r.get('ece_floor'), '.3f', 7)}"
                     f"{_num(r.get('ece_uncalibrated'), '.3f', 8)}"
                     f"{_num(r.get('aurc'), '.4f', 7)}{_num(r.get('coverage_at_risk'), '.3f', 9)}"
                     f"{_num(r.get('decided'), '.3f', 9)}{_num(r.get('risk_decided'), '.4f', 9)}")
    return "\n".join(lines)


def format_risk_coverage(result: dict) -> str:
    """Per condition, the coverage kept (least confident abstained on first) at each
    risk of the report, and the route thresholds the runtime applies."""
    names = list(result["conditions"])
    first = result["conditions"][names[0]].get("coverage_by_risk") or []
    risks = [row["risk"] for row in first]
    lines = ["risk-coverage (coverage kept with the error among kept windows <= risk; "
             "empirical, on these windows)",
             f"{'condition':<20}" + "".join(f"{f'<= {r:g}':>9}" for r in risks)
             + "  thresholds applied"]
    for name in names:
        r = result["conditions"][name]
        cov = {row["risk"]: row["coverage"] for row in r.get("coverage_by_risk") or []}
        th = ", ".join(f"{k} {'none' if v is None else f'{v:.3f}'}"
                       for k, v in sorted((r.get("thresholds") or {}).items()))
        lines.append(f"{name:<20}" + "".join(_num(cov.get(x), '.3f', 9) for x in risks)
                     + f"  {th}")
    return "\n".join(lines)


def format_confusion(result: dict, condition: str = "all") -> str:
    """The confusion matrix of one condition: rows true, columns predicted."""
    labels, cm = result["labels"], result["conditions"][condition]["confusion"]
    width = max(8, *(len(x) + 1 for x in labels))
    lines = [f"confusion ({condition}; rows true, columns predicted)",
             " " * width + "".join(f"{x[:width - 1]:>{width}}" for x in labels)]
    for name, row in zip(labels, cm):
        lines.append(f"{name[:width - 1]:<{width}}" + "".join(f"{v:>{width}d}" for v in row))
    return "\n".join(lines)
