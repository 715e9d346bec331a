"""The ``edgefuse`` command line.

The only place that prints to the terminal and chooses exit codes:

    0    ok
    1    a run that failed (bad input, bad model, unwritable output, a start
         that cannot work), with one line saying why
    2    usage (bad options, a bad --inject fault spec)
    3    replay: chunks were read but no decision could be made (the line
         says why, e.g. every chunk late because t0 looks like seconds)
    130  interrupted (Ctrl-C)

Heavy and optional imports (torch for train/export) happen inside commands.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from edgefuse.runtime import __version__
from edgefuse.runtime.core.errors import EdgefuseError
from edgefuse.runtime.core.faults import FaultSpecError
from edgefuse.runtime.core.info import DEFAULT_MODEL, bundled_model_path

log = logging.getLogger("edgefuse")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DECISION = 0, 1, 2, 3

EXIT_CODES = """exit codes: 0 ok; 1 the run failed (one line says why); 2 usage (bad options,
bad --inject spec); 3 replay read chunks but made no decision (the summary says why);
130 interrupted"""

INJECT_HELP = """fault injection (replay --inject SPEC, repeatable; seeded by --inject-seed):
  KIND:TARGET[@WHEN][=VALUE]   TARGET = MODALITY or NODE/MODALITY (* = every modality);
  times need a unit (ns, us, ms, s, min) and count from the recording's start
  drop:acoustic@60s+10s     lose the stream's chunks in [60 s, 70 s) (@60s: to the end)
  step:acoustic@300s=+2s    the stream's clock steps by +2 s (or -2s) at 300 s
  jitter:seismic=0.3ms      each t0 moves by a uniform offset in [-0.3, +0.3] ms
  skew:acoustic=+200ppm     the sender's clock runs 200 ppm fast (rate_hz unchanged)
  units:imu=s               the sender writes seconds (ms, us) into t0_ns
  rate:imu=x0.5             the sender declares half its real rate (=800Hz; =0: unknown)
  dup:imu=5%                5 % of the chunks arrive twice
  reorder:imu=5%            5 % arrive after 1..4 later chunks of the stream
                            (reorder:imu=5%,horizon=8 for up to 8)
  Chunks keep their order in the log (arrival order): a stepped stream's chunks are
  not re-sorted by their new t0, as they would not be live. See runtime/core/faults.py."""

def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"ONNX model with the edgefuse contract (default: bundled {DEFAULT_MODEL})")
    p.add_argument("--provider", default="cpu",
                   help="execution providers in order, comma-separated: cpu, cuda, tensorrt")
    p.add_argument("--require-provider", action="store_true",
                   help="fail instead of falling back when the first provider is unavailable")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")


def _add_encoding_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoding", default="protobuf", choices=["protobuf", "chunk-v1"],
                   help="chunks in the MCAP file: protobuf (default: Foxglove and MCAP tools "
                        "decode it) or chunk-v1 (edgefuse's own binary: writes about 2x "
                        "faster, files 4-23%% larger; README, MCAP recordings)")


def _add_abstain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--abstain-below", type=float, default=None, metavar="P",
                   help="abstain when the top score is below P on every route, overriding "
                        "the model's calibrated thresholds (0 = never abstain; default: "
                        "the model's own)")
    p.add_argument("--abstain-all", action="store_true",
                   help="windows with every modality present may abstain too")
    p.add_argument("--no-calibration", action="store_true",
                   help="ignore the model's calibration (raw scores, no thresholds but "
                        "--abstain-below)")


def _load_model(args):
    from edgefuse.runtime.core.inference import OnnxModel
    path = Path(args.model) if args.model else bundled_model_path()
    if not path.exists():
        raise EdgefuseError(f"model {path} does not exist; pass --model PATH to an .onnx file")
    return OnnxModel.load(path, providers=args.provider.split(","),
                          require_provider=args.require_provider, intra_op_threads=args.threads)


@contextlib.contextmanager
def _open_out(path: str):
    if path == "-":
        yield sys.stdout
        return
    try:
        fh = open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise EdgefuseError(f"cannot write decisions to {path}: {exc.strerror}; choose a "
                            "writable path or --out - for stdout") from exc
    with fh:
        yield fh


def cmd_replay(args) -> int:
    from edgefuse.runtime.core.aligner import AlignerConfig
    from edgefuse.runtime.core.pipeline import PipelineConfig
    from edgefuse.runtime.service.replay import replay
    from edgefuse.sensors.readers.inputs import open_inputs
    from edgefuse.runtime.core.faults import parse_fault
    if args.speed is not None and not args.speed > 0:
        raise EdgefuseError(f"--speed must be > 0, found {args.speed}")
    faults = [parse_fault(spec) for spec in args.inject]  # FaultSpecError: exit 2
    config = PipelineConfig(aligner=AlignerConfig(min_coverage=args.min_coverage),
                            max_batch=args.max_batch, abstain_below=args.abstain_below,
                            abstain_all=args.abstain_all, calibration=not args.no_calibration)
    if args.ray is not None:
        return _replay_fleet(args, config)
    if args.workers is not None or args.resume:
        raise EdgefuseError("--workers and --resume go with --ray (a fleet replay); add --ray "
                            "or drop them")
    if args.encoding != "protobuf" and not args.record:
        raise EdgefuseError(f"--encoding {args.encoding} is the encoding of --record OUT.mcap, "
                            "found no --record; add --record OUT.mcap or drop --encoding")
    inputs = open_inputs(args.inputs, chunk_s=args.chunk_s)
    model = _load_model(args)
    with _open_out(args.out) as out:
        summary = replay(inputs, model, out, config=config, speed=args.speed,
                         progress=not args.quiet, faults=faults, inject_seed=args.inject_seed,
                         record=args.record, record_encoding=args.encoding)
    _report_replay(summary, args)
    reason = summary.no_decision_reason()
    if reason is not None:
        print(f"edgefuse replay: error: {reason}", file=sys.stderr)
        return EXIT_NO_DECISION
    return EXIT_OK


def _report_replay(summary, args) -> None:
    """What every replay says at its end: the log line, --stats, the summary line."""
    log.info("replayed %.1f s of data in %.2f s (%.0fx real time): %d chunks, %d decisions",
             summary.span_s, summary.wall_s, summary.realtime_factor, summary.chunks,
             summary.decisions)
    if args.stats:
        Path(args.stats).write_text(json.dumps(summary.stats, indent=1, sort_keys=True))
    print(f"edgefuse replay: {summary.line()}", file=sys.stderr)


def _replay_fleet(args, config) -> int:
    """replay --ray: every node on a Ray worker (runtime/service/fleet.py)."""
    from edgefuse.runtime.service.fleet import FleetOptions, replay_fleet
    unsupported = [flag for flag, given in (("--speed", args.speed is not None),
                                            ("--inject", bool(args.inject)),
                                            ("--record", args.record is not None),
                                            ("--encoding", args.encoding != "protobuf"))
                   if given]
    if unsupported:
        raise EdgefuseError(f"--ray replays each node as fast as it can and cannot take "
                            f"{', '.join(unsupported)}; drop it or replay without --ray")
    if args.workers is not None and args.workers < 1:
        raise EdgefuseError(f"--workers must be >= 1, found {args.workers}")
    _load_model(args)  # a bad model is one line here, before Ray starts
    model = Path(args.model) if args.model else bundled_model_path()
    fleet = replay_fleet(args.inputs, FleetOptions(
        model_path=str(model.resolve()), config=config, providers=tuple(args.provider.split(",")),
        threads=args.threads, workers=args.workers, address=args.ray or None,
        chunk_s=args.chunk_s, out=args.out, resume=args.resume, progress=not args.quiet))
    summary = fleet.summary
    _report_replay(summary, args)
    print(f"edgefuse replay: {fleet.line()}", file=sys.stderr)
    if fleet.failed or fleet.failed_inputs:
        print(f"edgefuse replay: error: {len(fleet.failed)} node(s) failed and "
              f"{len(fleet.failed_inputs)} input(s) could not be opened (each named above); "
              "the other nodes are complete: fix the inputs and run again with --resume",
              file=sys.stderr)
        return EXIT_FAILED
    reason = summary.no_decision_reason() if fleet.nodes else None
    if reason is not None:
        print(f"edgefuse replay: error: {reason}", file=sys.stderr)
        return EXIT_NO_DECISION
    return EXIT_OK


def cmd_record(args) -> int:
    from edgefuse.sensors.readers.inputs import record
    counts = record(args.inputs, args.output, chunk_s=args.chunk_s, encoding=args.encoding)
    log.info("wrote %s: %s", args.output, counts)
    return 0


def cmd_export_streams(args) -> int:
    from edgefuse.sensors.readers.export import export_streams
    from edgefuse.sensors.readers.inputs import open_inputs
    written = export_streams(open_inputs(args.inputs, chunk_s=args.chunk_s), args.output)
    log.info("wrote %d file(s) and recording.toml into %s: %s", len(written), args.output,
             written)
    return 0


def cmd_info(args) -> int:
    from edgefuse.runtime.core.info import describe, describe_json
    model = _load_model(args)
    print(describe_json(model) if args.json else describe(model))
    return 0


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise EdgefuseError(f"{what} must be HOST:PORT (e.g. 127.0.0.1:1883), found {text!r}")
    return host, int(port)


def cmd_run(args) -> int:
    from edgefuse.runtime.service.config import load_config
    from edgefuse.runtime.service.daemon import run_daemon
    over: dict = {}

    def put(path: str, value) -> None:
        table = over
        *parents, last = path.split(".")
        for key in parents:
            table = table.setdefault(key, {})
        table[last] = value

    if args.model:
        put("model.path", args.model)
    if args.mqtt:
        host, port = _host_port(args.mqtt, "--mqtt")
        put("mqtt.host", host)
        put("mqtt.port", port)
    if args.out:
        if args.out == "-":
            put("sink.stdout.enabled", True)
        else:
            put("sink.jsonl.path", args.out)
    if args.serial:
        put("source.serial", [{"device": d, "protocol": args.serial_protocol}
                              for d in args.serial])
    if args.no_mqtt_source:
        put("source.mqtt.enabled", False)
    if args.no_mqtt_sink:
        put("sink.mqtt.enabled", False)
    if args.outbox:
        put("sink.mqtt.outbox", args.outbox)
    if args.record:
        put("daemon.record", args.record)
    if args.metrics:
        host, port = _host_port(args.metrics, "--metrics")
        put("metrics.enabled", True)
        put("metrics.host", host)
        put("metrics.port", port)
    if args.latency_trace:
        put("daemon.latency_trace", args.latency_trace)
    if args.partition:
        put("source.mqtt.partition", args.partition)
    if args.abstain_below is not None:
        put("pipeline.abstain_below", args.abstain_below)
    if args.abstain_all:
        put("pipeline.abstain_all", True)
    if args.no_calibration:
        put("pipeline.calibration", False)
    config = load_config(args.config, over)
    return run_daemon(config)


def cmd_simulate(args) -> int:
    from edgefuse.runtime.service.simulate import MqttPublisher, SerialPublisher, simulate
    from edgefuse.sensors.readers.inputs import open_inputs
    if (args.mqtt is None) == (args.serial is None):
        raise EdgefuseError("give exactly one of --mqtt HOST:PORT or --serial PATH")
    inputs = open_inputs(args.inputs, chunk_s=args.chunk_s)
    if args.mqtt is not None:
        from edgefuse.sensors.live.mqtt_client import MqttSettings
        host, port = _host_port(args.mqtt, "--mqtt")
        publisher = MqttPublisher(MqttSettings(host=host, port=port), qos=args.qos,
                                  topic_pattern=args.topic_pattern, partitions=args.partitions)
    else:
        publisher = SerialPublisher(args.serial, protocol=args.protocol, baud=args.baud)
    summary = simulate(inputs.chunks(), publisher, speed=args.speed, max_idle_s=args.max_idle_s)
    log.info("sent %d chunks of %d streams in %.2f s (pauses shortened by %.1f s)",
             summary.chunks, len(summary.streams), summary.wall_s, summary.skipped_idle_s)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefuse", description=__doc__.splitlines()[0],
                                     epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"edgefuse {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("EDGEFUSE_LOG_LEVEL"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="default: $EDGEFUSE_LOG_LEVEL, else INFO for edgefuse's own "
                             "messages in `run` (a service logs its state changes) and "
                             "WARNING otherwise")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("replay", help="replay recorded sensor logs through a model",
                       description="Replay recorded sensor logs through a model: decisions "
                       "as JSON Lines, then one summary line on stderr.",
                       epilog=INJECT_HELP + "\n\n" + EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="MCAP logs, recording manifests (recording.toml "
                   "or its folder), goodvibes pass folders / raw WAVs, sp-sw-har CSVs or folders")
    _add_model_args(p)
    p.add_argument("--out", default="-", help="decisions as JSON Lines (default: - = stdout)")
    p.add_argument("--speed", type=float, default=None,
                   help="pace by the wall clock at this multiple of real time "
                        "(default: as fast as possible)")
    p.add_argument("--chunk-s", type=float, default=1.0,
                   help="chunk length when reading non-MCAP inputs (s)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--min-coverage", type=float, default=0.9)
    _add_abstain_args(p)
    p.add_argument("--stats", default=None, help="write counters (gaps, drops, drift) as JSON")
    p.add_argument("--inject", action="append", default=[], metavar="SPEC",
                   help="inject a fault into the recording on its way into the pipeline "
                        "(repeatable; see below), e.g. step:acoustic@300s=+2s")
    p.add_argument("--inject-seed", type=int, default=0, metavar="N",
                   help="seed of the injected faults' randomness (default 0): the same "
                        "seed gives the same faults")
    p.add_argument("--record", default=None, metavar="OUT.mcap",
                   help="also write the input (as it entered the pipeline) and its decisions "
                        "(/<node>/decisions) to an MCAP file that Foxglove opens")
    _add_encoding_arg(p)
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="replay node by node on Ray (extra edgefuse[ray]; put it after the "
                        "inputs): ADDRESS of a cluster (auto: the one `ray start` made here), "
                        "else $RAY_ADDRESS, else a local Ray on all cores. With --out DIR/ one "
                        "file per node; README, Scaling out")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="--ray: worker processes, each with --threads CPUs and ORT threads "
                        "(default: the cluster's CPUs / --threads)")
    p.add_argument("--resume", action="store_true",
                   help="--ray with --out DIR/: skip the nodes whose file is complete")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("record", help="convert readable inputs into an MCAP log")
    p.add_argument("inputs", nargs="+", help="anything replay reads, e.g. a folder holding "
                   "recording.toml (your own WAV/CSV files; README, Your own recordings)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--chunk-s", type=float, default=1.0)
    _add_encoding_arg(p)
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("export-streams", help="one WAV/CSV per stream + recording.toml, "
                       "out of an MCAP log or any input (for labelling tools)")
    p.add_argument("inputs", nargs="+", help="MCAP logs or anything replay reads")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="folder to write into (must not hold a recording.toml)")
    p.add_argument("--chunk-s", type=float, default=1.0,
                   help="chunk length when reading non-MCAP inputs (s)")
    p.set_defaults(func=cmd_export_streams)

    p = sub.add_parser("info", help="print a model's contract")
    p.add_argument("model_path", metavar="MODEL", nargs="?", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--provider", default="cpu")
    p.add_argument("--require-provider", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="the daemon: live MQTT/serial sources -> model -> sinks")
    p.add_argument("--config", default=None, help="TOML config (see deploy/edgefuse.toml); "
                   "the options below override it")
    p.add_argument("--model", default=None, help="ONNX model (default: bundled "
                   f"{DEFAULT_MODEL})")
    p.add_argument("--mqtt", default=None, metavar="HOST:PORT",
                   help="broker for the sensor chunks and the decisions")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="also write decisions as JSON Lines (- = stdout)")
    p.add_argument("--serial", action="append", default=[], metavar="PATH",
                   help="read chunks from this serial device (repeatable)")
    p.add_argument("--serial-protocol", default="binary", choices=["binary", "json", "csv"])
    p.add_argument("--no-mqtt-source", action="store_true", help="do not subscribe to chunks")
    p.add_argument("--no-mqtt-sink", action="store_true", help="do not publish decisions")
    p.add_argument("--outbox", default=None, help="SQLite outbox of the decision publisher")
    p.add_argument("--record", default=None, metavar="LOG.mcap",
                   help="record every input chunk, for replay")
    p.add_argument("--metrics", default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics here (e.g. 127.0.0.1:9108)")
    p.add_argument("--partition", default=None, metavar="K/N",
                   help="take only the nodes of partition K of N (0 <= K < N): subscribe to "
                        "edgefuse/pK/+/<modality>; see deploy/edgefuse@.service")
    p.add_argument("--latency-trace", default=None, metavar="FILE",
                   help="per decision: arrival of its closing chunk and output time (JSONL)")
    _add_abstain_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("simulate", help="play recorded inputs as live nodes (MQTT or serial)")
    p.add_argument("inputs", nargs="+", help="MCAP logs or any input replay reads")
    p.add_argument("--mqtt", default=None, metavar="HOST:PORT")
    p.add_argument("--serial", default=None, metavar="PATH")
    p.add_argument("--protocol", default="binary", choices=["binary", "json", "csv"],
                   help="serial framing (README, section Wire formats)")
    p.add_argument("--baud", type=int, default=115200)
    p.add_argument("--qos", type=int, default=1, choices=[0, 1])
    p.add_argument("--topic-pattern", default="edgefuse/{node}/{modality}")
    p.add_argument("--partitions", type=int, default=None, metavar="N",
                   help="send as devices of a fleet shared by N daemons: node X to "
                        "edgefuse/p<k>/X/<modality>, k = CRC-32 of X mod N (README, Scaling out)")
    p.add_argument("--speed", type=float, default=1.0, help="multiple of real time")
    p.add_argument("--max-idle-s", type=float, default=1.0,
                   help="shorten pauses in the recording to this many wall seconds")
    p.add_argument("--chunk-s", type=float, default=1.0,
                   help="chunk length when reading non-MCAP inputs (s)")
    p.set_defaults(func=cmd_simulate)

    # train / export / evaluate / quantize: torch is imported inside their handlers only.
    from edgefuse.models.commands import register
    register(sub)
    from edgefuse.runtime.inspect_cmd import register as register_inspect
    register_inspect(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "model_path", None) is not None:
        args.model = args.model_path
    elif args.command == "info":
        args.model = None
    logging.basicConfig(level=args.log_level or "WARNING", stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level is None and args.command == "run":
        # the daemon's start, ready line, reconnects and reloads; libraries stay at WARNING
        logging.getLogger("edgefuse").setLevel(logging.INFO)
    try:
        return args.func(args)
    except FaultSpecError as exc:  # a bad --inject spec is a usage error
        print(f"edgefuse {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EdgefuseError as exc:
        # one line, whatever the message holds (a wrapped OS or TLS error may not be)
        message = " ".join(str(exc).splitlines())
        print(f"edgefuse {args.command}: error: {message}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
