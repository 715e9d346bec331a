"""The model subcommands of the ``edgefuse`` CLI: train, calibrate, export, evaluate,
quantize.

``register(subparsers)`` adds them to the CLI's argparse subparsers. This
module imports neither torch nor onnx: each handler imports what it needs
when it runs, so ``edgefuse replay`` on an edge box never loads them.
Handlers return an exit code (0) and raise EdgefuseError subclasses with a
message saying what to do; the CLI turns those into exit code 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from edgefuse.runtime.core.errors import ConfigError, EdgefuseError, InputError

TASK_CHOICES = ("detection", "identification", "activity")


def _need_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise EdgefuseError("this command needs PyTorch (the 'train' extra): "
                            "pip install 'edgefuse[train]'") from exc


def _default_data() -> str | None:
    from edgefuse.models.segments import default_data_dir
    return default_data_dir()


def cmd_train(args) -> int:
    _need_torch()
    from edgefuse.models.train import load_config, train
    if not os.path.isfile(args.config):
        raise InputError(f"config {args.config!r} does not exist; give a TOML file like "
                         "models/configs/detection.toml", path=args.config)
    try:
        cfg = load_config(args.config)
    except (TypeError, ValueError) as exc:   # wrong value types
        raise ConfigError(f"{args.config}: {exc}") from exc
    if args.threads is not None:
        import dataclasses
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=args.threads))
    result = train(cfg, out_dir=args.out, max_seconds=args.max_seconds)
    s = result.summary
    counts = dict(zip(s["labels"], s["train_class_counts"]))
    print(f"trained {s['network']} on {s['train_windows']} windows {counts} "
          f"({s['epochs_run']} epochs, {s['train_seconds']} s, loss {s['final_loss']:.3f}); "
          f"held out {s['split_column']} {s['test'] or 'none'} ({s['test_windows']} windows)",
          file=sys.stderr)
    report = s.get("label_report")
    if report:
        print(f"labels: {report['intervals']} intervals ({report['no_window']} label no "
              f"window of their node: {report['outside']} outside its recordings, "
              f"{report['uncut']} where no window was cut, {report['outvoted']} outvoted; "
              f"{report.get('other_node_intervals', 0)} of nodes not recorded); windows "
              f"{report['windows']}", file=sys.stderr)
    calibration = s.get("calibration")
    _print_calibration(calibration)
    if not calibration:
        print("not calibrated (no validation groups or [calibration] enabled = false)",
              file=sys.stderr)
    print(f"checkpoint {result.checkpoint}", file=sys.stderr)
    print(result.model)
    return 0


def _print_calibration(calibration: dict | None) -> None:
    how = "out-of-fold" if (calibration or {}).get("method") == "cross-fit" else "validation"
    for route, e in sorted((calibration or {}).get("routes", {}).items()):
        print(f"calibrated {route}: temperature {e['temperature']:.3f}, abstains below "
              f"{e['threshold']:.3f}, keeping {e['coverage']:.1%} of {e['n']} {how} "
              f"windows at error {e['val_risk']:.2%} (bound {e['risk_bound']:.2%} <= "
              f"{e['target_risk']:g})", file=sys.stderr)


def _checked_for_crossfit(model_path: str, prep) -> None:
    """The model must be one this config's recipe trains: same labels, modalities and
    window grid, same held-out keys (else the folds would calibrate on windows it is
    evaluated on)."""
    import logging
    from edgefuse.models.evaluate import eval_metadata
    from edgefuse.runtime.core.inference import OnnxModel
    model = OnnxModel.load(model_path)
    got, want = model.contract, prep.contract
    if (got.labels, got.alignment) != (want.labels, want.alignment):
        raise ConfigError(f"{model_path} has labels {list(got.labels)} and window, hop (ns), "
                          f"modalities (name, channels, Hz) {got.alignment}; the config trains "
                          f"{list(want.labels)} on {want.alignment}: give the config the model "
                          "was trained with")
    meta = eval_metadata(model)
    held = meta.get("test")
    if held is None:
        logging.getLogger(__name__).warning(
            "%s names no held-out split (no edgefuse.eval metadata): make sure none of its "
            "test windows are in the config's training groups %s", model_path,
            "(all but " + str(list(prep.split.test_keys)) + ")")
    elif meta.get("split_column", prep.split_column) != prep.split_column:
        raise ConfigError(f"{model_path} was split by {meta.get('split_column')!r}, the "
                          f"config splits by {prep.split_column!r}: give the config the model "
                          "was trained with")
    elif sorted(map(str, held)) != sorted(prep.split.test_keys):
        raise ConfigError(f"{model_path} holds out {held} but the config holds out "
                          f"{list(prep.split.test_keys)}: the fold models would be calibrated "
                          "on windows the model is evaluated on; set [data] test to the "
                          "model's held-out keys")


def cmd_calibrate(args) -> int:
    from edgefuse.runtime.core.inference import OnnxModel
    if not os.path.isfile(args.model):
        raise InputError(f"model {args.model!r} does not exist; give an .onnx file written "
                         "by edgefuse train or export", path=args.model)
    if args.remove:
        from edgefuse.exporters.calibrate import set_calibration
        n = len(OnnxModel.load(args.model).contract.fallbacks)
        set_calibration(args.model, None)
        print(f"removed the calibration of {args.model}"
              + (f" and its {n} fallbacks" if n else ""), file=sys.stderr)
        return 0
    if not args.config:
        raise ConfigError("give --config CONFIG (the TOML the model was trained with), or "
                          "--remove")
    _need_torch()
    import dataclasses
    import tempfile
    from edgefuse.models.config import load_config
    from edgefuse.models.crossfit import crossfit_calibrate
    from edgefuse.models.prepare import prepare
    if not os.path.isfile(args.config):
        raise InputError(f"config {args.config!r} does not exist", path=args.config)
    cfg = load_config(args.config)
    if args.folds is not None and not 2 <= args.folds <= 20:
        raise ConfigError(f"--folds must be in [2, 20], found {args.folds}")
    cal = dataclasses.replace(cfg.calibration, enabled=True, method="cross-fit",
                              **({"folds": args.folds} if args.folds is not None else {}))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val=()), calibration=cal,
                              train=dataclasses.replace(cfg.train, threads=args.threads or
                                                        cfg.train.threads))
    prep = prepare(cfg)
    _checked_for_crossfit(args.model, prep)
    if args.work:
        summary = crossfit_calibrate(cfg, prep, args.model, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="edgefuse-crossfit-") as tmp:
            summary = crossfit_calibrate(cfg, prep, args.model, tmp)
    _print_calibration(summary)
    print(f"calibrated {args.model} on {summary['val_windows']} out-of-fold windows of "
          f"{len(summary['val'])} groups in {len(summary['folds'])} folds", file=sys.stderr)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True, default=float)
    return 0


def cmd_export(args) -> int:
    _need_torch()
    from edgefuse.models.export import export_checkpoint
    if not os.path.isfile(args.checkpoint):
        raise InputError(f"checkpoint {args.checkpoint!r} does not exist; give the "
                         "checkpoint.pt written by edgefuse train", path=args.checkpoint)
    if not args.output.endswith(".onnx"):
        raise ConfigError(f"-o must name an .onnx file, found {args.output!r}")
    rep = export_checkpoint(args.checkpoint, args.output, fallbacks=not args.no_fallbacks,
                            name=args.name, version=args.version)
    flops = f", {rep.flops / 1e6:.2f} MFLOP per window" if rep.flops else ""
    print(f"wrote {rep.path} (opset {rep.opset}, {rep.params} parameters{flops})")
    for f, size in rep.files.items():
        print(f"  {f:<40} {size / 1024:8.1f} KiB  parity max|ORT-torch| {rep.parity[f]:.2e}")
    return 0


def _rule_overrides(args) -> dict:
    return {"rule": args.rule, "min_share": args.min_share,
            "any_labels": tuple(args.any_labels) if args.any_labels is not None else None,
            "background": args.background}


def _risk_args(args) -> dict:
    if args.target_risk is not None and not 0.0 < args.target_risk < 1.0:
        raise ConfigError(f"--target-risk must be in (0, 1), found {args.target_risk}")
    out = {"abstain_all": args.abstain_all}
    if args.target_risk is not None:
        out["target_risk"] = args.target_risk
    return out


def cmd_evaluate(args) -> int:
    from edgefuse.models.evaluate import evaluation_on_data
    from edgefuse.models.evaluate_text import (format_confusion, format_risk_coverage,
                                               format_table)
    if not os.path.isfile(args.model):
        raise InputError(f"model {args.model!r} does not exist; give an .onnx file written "
                         "by edgefuse train or export", path=args.model)
    if args.report:
        from edgefuse.models.report import check_plotting
        check_plotting()   # before the evaluation, not after it
    if args.recordings:
        from edgefuse.models.evaluate_recordings import evaluation_on_recordings
        if args.data:
            raise ConfigError("give DATA (a data pack) or --recordings, not both")
        if not args.labels:
            raise ConfigError("--recordings needs --labels FILE (the intervals CSV "
                              "node,start,end,label)")
        evaluation = evaluation_on_recordings(
            args.model, args.recordings, args.labels, args.group, args.test,
            _rule_overrides(args), seed=args.seed, use_fallbacks=not args.no_fallbacks,
            chunk_s=args.chunk_s, **_risk_args(args))
        source = {"recordings": ", ".join(args.recordings), "labels": args.labels}
    else:
        if args.labels or args.group:
            raise ConfigError("--labels and --group go with --recordings PATH...")
        data = args.data or _default_data()
        if not data:
            raise InputError("no DATA given and ../shared/data was not found; pass the data "
                             "pack root (the folder holding goodvibes/ and sp-sw-har/), or "
                             "--recordings and --labels")
        if not os.path.isdir(data):
            raise InputError(f"DATA {data!r} is not a folder; pass the data pack root",
                             path=data)
        keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
        evaluation = evaluation_on_data(args.model, data, task=args.task, split=args.split,
                                        seed=args.seed, use_fallbacks=not args.no_fallbacks,
                                        keys=keys or args.test, **_risk_args(args))
        source = {"data pack": data}
    result = evaluation.result
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"task {result['task']}  split {result['split_column']} {result['split_keys']}")
        print(format_table(result))
        print(format_risk_coverage(result))
        print(format_confusion(result))
    if args.report:
        from edgefuse.models.report import write_report
        path = write_report(args.report, evaluation, args.model, source)
        print(f"report {path}", file=sys.stderr)
    return 0


def cmd_quantize(args) -> int:
    from edgefuse.exporters.quantize import quantize_model
    if not os.path.isfile(args.model):
        raise InputError(f"model {args.model!r} does not exist", path=args.model)
    calibration = None
    if args.mode == "int8-static":
        if args.recordings and args.data:
            raise ConfigError("give --data (a data pack) or --recordings, not both")
        if args.recordings:
            from edgefuse.models.recordings import complete_windows
            from edgefuse.runtime.core.inference import OnnxModel
            contract = OnnxModel.load(args.model).contract
            calibration = complete_windows(args.recordings, contract, n=256,
                                           chunk_s=args.chunk_s or 1.0)
        else:
            from edgefuse.models.evaluate import calibration_windows
            data = args.data or _default_data()
            if not data:
                raise InputError("int8-static needs calibration windows: --recordings P... "
                                 "(your own) or --data (the data pack root)")
            calibration = calibration_windows(args.model, data)
    elif args.recordings or args.data:
        raise ConfigError(f"--recordings/--data calibrate int8-static; --mode {args.mode} "
                          "takes none")
    files = quantize_model(args.model, args.output, args.mode, calibration=calibration)
    for f in files:
        print(f"wrote {f} ({os.path.getsize(f) / 1024:.1f} KiB)")
    return 0


def register(subparsers) -> None:
    """Add train, calibrate, export, evaluate and quantize to an argparse subparsers."""
    p = subparsers.add_parser("train", help="train a fusion model from a TOML config "
                              "(needs the train extra)")
    p.add_argument("config", help="TOML config, e.g. models/configs/detection.toml")
    p.add_argument("--out", default=None, help="run folder (default: [train] out of the config)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: config)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop after the epoch that passes this many seconds (smoke runs); "
                        "with [calibration] method = \"cross-fit\" each fold model gets the "
                        "same budget, so up to (folds + 1) x this in all")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("calibrate", help="calibrate a trained model per route, "
                              "cross-fitted on out-of-fold windows of its training config "
                              "(needs the train extra)")
    p.add_argument("model", metavar="MODEL", help="edgefuse ONNX model (its fallbacks too)")
    p.add_argument("--config", default=None, help="the TOML the model was trained with: its "
                   "recipe trains one model per fold of the training groups")
    p.add_argument("--folds", type=int, default=None, help="default: [calibration] folds (5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: config)")
    p.add_argument("--work", default=None, metavar="DIR",
                   help="keep the fold models in DIR (default: a temporary folder)")
    p.add_argument("--summary", default=None, metavar="FILE",
                   help="write the fitted table, folds and calibrator comparison as JSON")
    p.add_argument("--remove", action="store_true", help="remove the model's calibration")
    p.epilog = ("Only the .onnx files change: a checkpoint.pt beside the model keeps the table "
                "it had, and `edgefuse export` of it writes that one; calibrate the exported "
                "model again.")
    p.set_defaults(func=cmd_calibrate)

    p = subparsers.add_parser("export", help="export a checkpoint to an edgefuse ONNX model "
                              "with per-modality fallbacks (needs the train extra)")
    p.add_argument("checkpoint", help="checkpoint.pt written by edgefuse train")
    p.add_argument("-o", "--output", required=True, help="model.onnx to write (fallbacks "
                   "are written beside it)")
    p.add_argument("--no-fallbacks", action="store_true")
    p.add_argument("--name", default=None, help="model name in the contract (default: the "
                   "training config's)")
    p.add_argument("--version", default=None, help="model version in the contract (default: "
                   "the training config's, else 0.1.0)")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("evaluate", help="accuracy and macro-F1 of a model with all "
                              "modalities, each one removed, each one degraded")
    p.add_argument("model", metavar="MODEL", help="edgefuse ONNX model")
    p.add_argument("data", metavar="DATA", nargs="?", default=None,
                   help="data pack root (default: ../shared/data beside the repository)")
    p.add_argument("--task", choices=TASK_CHOICES, default=None,
                   help="default: the model's (detection for goodvibes, activity for IMU)")
    p.add_argument("--split", choices=("test", "all"), default="test",
                   help="test: the model's held-out day-sites/subjects (default); all: every "
                        "window, training windows included")
    p.add_argument("--keys", default=None,
                   help="comma-separated day-sites (bprf/2023-04-11) or subjects (s03) to "
                        "evaluate on instead of the model's held-out ones")
    p.add_argument("--recordings", nargs="+", default=None, metavar="PATH",
                   help="your own recordings (anything replay reads) instead of DATA")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="intervals CSV node,start,end,label[,group...] for --recordings")
    p.add_argument("--group", default=None,
                   help="split key of --test: node or a labels-file column (default: the "
                        "model's when --test is given, else node)")
    p.add_argument("--test", nargs="+", default=None, metavar="KEY",
                   help="evaluate only these split keys (default with --recordings: every "
                        "labelled window)")
    p.add_argument("--rule", choices=("majority", "centre", "any"), default=None,
                   help="window label rule (default: the one the model was trained with)")
    p.add_argument("--min-share", type=float, default=None)
    p.add_argument("--any-labels", nargs="*", default=None, metavar="LABEL")
    p.add_argument("--background", default=None, metavar="LABEL",
                   help="label of windows no interval touches ('' = leave them out)")
    p.add_argument("--chunk-s", type=float, default=None,
                   help="chunk length the recordings are read in (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the degraded conditions")
    p.add_argument("--no-fallbacks", action="store_true",
                   help="run the main model masked instead of the fallback models")
    p.add_argument("--target-risk", type=float, default=None, metavar="R",
                   help="error rate of coverage_at_risk (default 0.02); the model's own "
                        "thresholds decide `decided` and `risk_decided`")
    p.add_argument("--abstain-all", action="store_true",
                   help="windows with every modality present may abstain too (as the "
                        "runtime's --abstain-all) in `decided` and `risk_decided`")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="also write DIR/index.html: confusion matrices, accuracy per modality "
                        "subset, calibration and a held-out recording's timeline, one "
                        "self-contained page (needs the train extra)")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("quantize", help="INT8 or FP16 copy of a model and its fallbacks")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--mode", choices=("int8", "int8-static", "fp16"), default="int8")
    p.add_argument("--data", default=None, help="data pack root for int8-static calibration "
                   "(default: ../shared/data)")
    p.add_argument("--recordings", nargs="+", default=None, metavar="PATH",
                   help="calibrate int8-static on windows of your own recordings")
    p.add_argument("--chunk-s", type=float, default=None,
                   help="chunk length the recordings are read in (default 1.0)")
    p.set_defaults(func=cmd_quantize)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with only these subcommands (tests, ``python -m``)."""
    parser = argparse.ArgumentParser(prog="edgefuse")
    register(parser.add_subparsers(dest="command", required=True))
    return parser
