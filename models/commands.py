"""The model subcommands of the ``edgefuse`` CLI: train, export, evaluate, quantize.

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
    except (TypeError, ValueError) as exc:   # tomllib errors, wrong value types
        raise ConfigError(f"{args.config}: {exc}") from exc
    if args.threads is not None:
        import dataclasses
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=args.threads))
    path = train(cfg, out_dir=args.out, max_seconds=args.max_seconds)
    print(path)
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
    print(f"wrote {rep.path} (opset {rep.opset}, {rep.params} parameters, "
          f"{rep.flops / 1e6:.2f} MFLOP per window)")
    for f, size in rep.files.items():
        print(f"  {f:<40} {size / 1024:8.1f} KiB  parity max|ORT-torch| {rep.parity[f]:.2e}")
    return 0


def cmd_evaluate(args) -> int:
    from edgefuse.models.evaluate import evaluate_on_data, format_table
    data = args.data or _default_data()
    if not data:
        raise InputError("no DATA given and ../shared/data was not found; pass the data "
                         "pack root (the folder holding goodvibes/ and sp-sw-har/)")
    if not os.path.isdir(data):
        raise InputError(f"DATA {data!r} is not a folder; pass the data pack root", path=data)
    if not os.path.isfile(args.model):
        raise InputError(f"model {args.model!r} does not exist; give an .onnx file written "
                         "by edgefuse export", path=args.model)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    result = evaluate_on_data(args.model, data, task=args.task, split=args.split,
                              seed=args.seed, use_fallbacks=not args.no_fallbacks, keys=keys)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"task {result['task']}  split {result['split_column']} {result['split_keys']}")
        print(format_table(result))
    return 0


def cmd_quantize(args) -> int:
    from edgefuse.exporters.quantize import quantize_model
    if not os.path.isfile(args.model):
        raise InputError(f"model {args.model!r} does not exist", path=args.model)
    calibration = None
    if args.mode == "int8-static":
        from edgefuse.models.evaluate import calibration_windows
        data = args.data or _default_data()
        if not data:
            raise InputError("int8-static needs --data (the data pack root) for calibration")
        calibration = calibration_windows(args.model, data)
    files = quantize_model(args.model, args.output, args.mode, calibration=calibration)
    for f in files:
        print(f"wrote {f} ({os.path.getsize(f) / 1024:.1f} KiB)")
    return 0


def register(subparsers) -> None:
    """Add train, export, evaluate and quantize to an argparse subparsers object."""
    p = subparsers.add_parser("train", help="train a fusion model from a TOML config "
                              "(needs the train extra)")
    p.add_argument("config", help="TOML config, e.g. models/configs/detection.toml")
    p.add_argument("--out", default=None, help="run folder (default: [train] out of the config)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: config)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop after the epoch that passes this many seconds (smoke runs)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("export", help="export a checkpoint to an edgefuse ONNX model "
                              "with per-modality fallbacks (needs the train extra)")
    p.add_argument("checkpoint", help="checkpoint.pt written by edgefuse train")
    p.add_argument("-o", "--output", required=True, help="model.onnx to write (fallbacks "
                   "are written beside it)")
    p.add_argument("--no-fallbacks", action="store_true")
    p.add_argument("--name", default=None, help="model name in the contract")
    p.add_argument("--version", default="0.1.0", help="model version in the contract")
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
    p.add_argument("--seed", type=int, default=0, help="seed of the degraded conditions")
    p.add_argument("--no-fallbacks", action="store_true",
                   help="run the main model masked instead of the fallback models")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("quantize", help="INT8 or FP16 copy of a model and its fallbacks")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--mode", choices=("int8", "int8-static", "fp16"), default="int8")
    p.add_argument("--data", default=None, help="data pack root for int8-static calibration "
                   "(default: ../shared/data)")
    p.set_defaults(func=cmd_quantize)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with only these subcommands (tests, ``python -m``)."""
    parser = argparse.ArgumentParser(prog="edgefuse")
    register(parser.add_subparsers(dest="command", required=True))
    return parser
