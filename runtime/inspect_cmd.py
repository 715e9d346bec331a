"""``edgefuse inspect INPUT... [--json]``: what is in a recording, per stream.

``register(subparsers)`` adds the command to the CLI's argparse subparsers.
The work is ``sensors/readers/inspect.py``; this module prints its report as a
table (or one JSON object) and chooses the exit code: 0, or 1 when an input
failed midway (the table still shows what was read before the failure).
"""
from __future__ import annotations

import json
import sys

EXIT_OK, EXIT_FAILED = 0, 1

COLUMNS = ("node", "modality", "ch", "declared Hz", "actual Hz", "drift ppm", "first (UTC)",
           "last (UTC)", "duration s", "gaps", "gap s", "steps", "non-finite")


def _rate(rate: float | None, nominal: bool | None = None,
          seen: list[float] | None = None) -> str:
    if rate is None:
        return "-"
    text = f"{seen[0]:.7g}..{seen[1]:.7g}" if seen and seen[0] != seen[1] else f"{rate:.7g}"
    return text + (" (nom.)" if nominal else "")


def _time(iso: str | None) -> str:
    return "-" if iso is None else iso[:23] + "Z"  # to the millisecond


def _row(s: dict) -> tuple[str, ...]:
    drift, duration = s["drift_ppm"], s["duration_s"]
    declared = _rate(s["declared_hz"], s["declared_as"] == "nominal", s["declared_hz_range"])
    return (s["node"], s["modality"], ",".join(map(str, s["channels"])) or "-", declared,
            _rate(s["actual_hz"]), "-" if drift is None else f"{round(drift, 1) or 0.0:+.1f}",
            _time(s["first"]), _time(s["last"]), "-" if duration is None else f"{duration:.3f}",
            str(s["gaps"]), f"{s['gap_s']:.3f}", str(s["clock_steps"]),
            str(s["nonfinite_samples"]))


def _notes(s: dict) -> list[str]:
    """The anomalies the table has no column for, one line per stream that has any."""
    parts = []
    if s["overlaps"]:
        parts.append(f"{s['overlaps']} overlap(s) of {s['overlap_s']:.3f} s in all")
    if s["out_of_order"]:
        parts.append(f"{s['out_of_order']} chunk(s) not after the previous one")
    if s["unknown_rate_chunks"]:
        parts.append(f"{s['unknown_rate_chunks']} chunk(s) of unknown rate")
    if s["rate_mismatch"]:
        parts.append(f"{s['rate_mismatch']} chunk(s) whose declared rate disagrees with t0")
    if s["empty_chunks"]:
        parts.append(f"{s['empty_chunks']} empty chunk(s)")
    if s["steps"]:
        parts.append("steps " + ", ".join(f"{st['step_s']:+.3f} s at {_time(st['at'])}"
                                          for st in s["steps"][:3])
                     + (" ..." if s["clock_steps"] > 3 else ""))
    if not s["chunks"]:
        parts.append("no chunks")
    return [f"  {s['node']}/{s['modality']}: " + "; ".join(parts)] if parts else []


def format_table(report: dict) -> str:
    """The report (``Inspection.to_json()``) as an aligned table plus notes."""
    rows = [COLUMNS] + [_row(s) for s in report["streams"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    numeric = set(range(2, len(COLUMNS))) - {6, 7}
    lines = ["  ".join(cell.rjust(w) if i in numeric else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    notes = [line for s in report["streams"] for line in _notes(s)]
    if notes:
        lines += ["notes:", *notes]
    n = len(report["streams"])
    lines.append(f"{n} stream{'s' if n != 1 else ''} in {report['inputs']} input(s)")
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    from edgefuse.sensors.readers.inputs import open_inputs
    from edgefuse.sensors.readers.inspect import inspect_inputs
    report = inspect_inputs(open_inputs(args.inputs, chunk_s=args.chunk_s)).to_json()
    print(json.dumps(report, sort_keys=True) if args.json else format_table(report))
    for error in report["errors"]:
        message = " ".join(error.splitlines())
        print(f"edgefuse inspect: error: {message}", file=sys.stderr)
    return EXIT_FAILED if report["errors"] else EXIT_OK


def register(subparsers) -> None:
    """Add ``inspect`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "inspect", help="per-stream table of a recording: rates, span, gaps, clock steps "
        "(no model)", description="What is in a recording, per stream: node, modality, "
        "channels, declared and actual rate (the progress of t0), first/last sample (UTC), "
        "duration, gaps, clock steps and non-finite samples, judged as the aligner would; "
        "no model is run.")
    p.add_argument("inputs", nargs="+", help="anything replay reads: MCAP logs, recording "
                   "manifests, goodvibes pass folders / raw WAVs, sp-sw-har CSVs or folders")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument("--chunk-s", type=float, default=1.0,
                   help="chunk length when reading non-MCAP inputs (s)")
    p.set_defaults(func=cmd_inspect)
