"""Fleet replay on Ray: ``edgefuse replay INPUT... --ray [ADDRESS]``.

The work is split by node (runtime/service/fleet_plan.py): one task replays
every input of one node in time order, so the node's windows and ``seq`` are
those of a single-process replay. Each Ray worker is an actor holding one
``NodeReplayer`` (runtime/service/fleet_worker.py): one model session with
ONNX Runtime's intra-op threads = the CPUs the actor was given, the Numba
cache loaded once. The driver keeps exactly one ``next_part`` call in flight
per worker and waits on them with ``ray.wait``: at most ``workers`` parts
(``part_lines`` decisions each) are in the object store, whatever the size
of the fleet, and a worker runs at most two parts ahead of the driver.
A node that fails (a broken file, a dead worker) is reported and the others
go on; ``--resume`` skips the nodes whose output is complete
(runtime/service/fleet_output.py).

Where Ray runs and how it is reached: runtime/service/fleet_ray.py (Ray is
the optional extra ``edgefuse[ray]``, imported there, only with ``--ray``).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from edgefuse.runtime.core.errors import InputError
from edgefuse.runtime.core.pipeline import PipelineConfig
from edgefuse.runtime.service import fleet_ray
from edgefuse.runtime.service.fleet_output import open_output
from edgefuse.runtime.service.fleet_plan import NodeJob, plan_nodes
from edgefuse.runtime.service.fleet_worker import config_to_dict, summary_from_dict
from edgefuse.runtime.service.replay import ReplaySummary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetOptions:
    model_path: str
    config: PipelineConfig = field(default_factory=PipelineConfig)
    providers: tuple[str, ...] = ("cpu",)
    threads: int = 1                  # ORT intra-op threads = CPUs per worker
    workers: int | None = None        # None: the cluster's CPUs // threads
    address: str | None = None        # None: RAY_ADDRESS, else a local Ray
    chunk_s: float = 1.0
    out: str = "-"
    resume: bool = False
    progress: bool = False
    part_lines: int = 2000


@dataclass
class FleetSummary:
    summary: ReplaySummary            # every node's replay summary, added up
    nodes: int = 0                    # nodes replayed in this run
    skipped: int = 0                  # complete before this run (--resume)
    workers: int = 0
    failed: dict[str, str] = field(default_factory=dict)          # node -> why
    failed_inputs: list[tuple[str, str]] = field(default_factory=list)
    paused_nodes: list[str] = field(default_factory=list)
    ray_nodes: int = 0                # Ray nodes (machines, raylets) the workers ran on
    start_s: float = 0.0              # connect + workers ready (model, Numba cache)
    wall_s: float = 0.0

    def line(self) -> str:
        parts = [f"{self.nodes} nodes on {self.workers} Ray workers in {self.wall_s:.1f} s "
                 f"({self.start_s:.1f} s to start; workers on {self.ray_nodes} Ray "
                 f"node{'s' if self.ray_nodes != 1 else ''})"]
        if self.skipped:
            parts.append(f"{self.skipped} nodes complete before (--resume)")
        if self.failed:
            shown = ", ".join(sorted(self.failed)[:5])
            more = f" and {len(self.failed) - 5} more" if len(self.failed) > 5 else ""
            parts.append(f"{len(self.failed)} nodes failed ({shown}{more})")
        if self.failed_inputs:
            parts.append(f"{len(self.failed_inputs)} inputs could not be opened")
        if self.paused_nodes:
            parts.append(f"{len(self.paused_nodes)} nodes pause longer than "
                         "aligner.evict_after_s between inputs")
        return "; ".join(parts)


def _add(a, b):
    """Summaries added up: numbers summed, dicts merged key by key."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _add(out[k], v) if k in out else v
        return out
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and \
            not isinstance(a, bool) and not isinstance(b, bool):
        return a + b
    return b if a is None else a


def merge_summaries(summaries: list[dict]) -> ReplaySummary:
    merged: dict = {}
    for s in summaries:
        merged = _add(merged, s)
    return summary_from_dict(merged) if merged else ReplaySummary()


def _progress(enabled: bool, total: int):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="node", file=sys.stderr, leave=False, desc="fleet replay")


def replay_fleet(paths: list[str], opts: FleetOptions) -> FleetSummary:
    """Replay every node of the inputs on Ray; see the module docstring."""
    wall0 = time.perf_counter()
    plan = plan_nodes(paths, opts.chunk_s)
    if not plan.jobs:
        raise InputError("the inputs hold no readable stream"
                         + (f" ({len(plan.failed)} could not be opened; the first: "
                            f"{plan.failed[0][0]}: {plan.failed[0][1]})" if plan.failed else ""))
    output = open_output(opts.out, opts.resume)
    done = output.complete_nodes()
    jobs = [j for j in plan.jobs if j.node not in done]
    result = FleetSummary(ReplaySummary(), nodes=len(jobs), skipped=len(plan.jobs) - len(jobs),
                          failed_inputs=plan.failed)
    evict_s = opts.config.aligner.evict_after_s
    result.paused_nodes = sorted(j.node for j in plan.paused_nodes(evict_s))
    if result.paused_nodes:
        log.warning("nodes %s pause longer than aligner.evict_after_s = %g s between their "
                    "inputs: a single-process replay evicts such a node, and starts it afresh, "
                    "when the other nodes record that much data meanwhile; here each keeps "
                    "its state, as in a replay of that node alone", result.paused_nodes[:10],
                    evict_s)
    try:
        if jobs:
            _run(jobs, opts, output, result, wall0)
    finally:
        output.close()
    result.wall_s = time.perf_counter() - wall0
    result.summary.wall_s = result.wall_s
    return result


def _run(jobs: list[NodeJob], opts: FleetOptions, output, result: FleetSummary,
         wall0: float) -> None:
    ray = fleet_ray.import_ray(local=fleet_ray.starts_local(opts.address))
    started = fleet_ray.connect(ray, opts.address,
                                opts.workers * opts.threads if opts.workers else None)
    workers = None
    try:
        count = fleet_ray.worker_count(ray, opts.workers, opts.threads, len(jobs))
        workers = fleet_ray.Workers(ray, count, opts.threads, (
            opts.model_path, list(opts.providers), opts.threads, config_to_dict(opts.config),
            opts.chunk_s, opts.part_lines))
        result.workers = len(workers.all)
        result.ray_nodes = len({i["ray_node"] for i in workers.info})
        log.info("%d Ray workers ready on %d Ray node(s), ONNX Runtime intra-op threads %s, "
                 "each ready in %.1f s at most (model, Numba cache)", result.workers,
                 result.ray_nodes, sorted({i["ort_threads"] for i in workers.info}),
                 max(i["ready_s"] for i in workers.info))
        result.start_s = time.perf_counter() - wall0
        summaries = _drive(ray, workers, jobs, output, result, opts.progress)
        result.summary = merge_summaries(summaries)
    finally:
        if workers is not None:
            workers.kill()
        if started:
            ray.shutdown()


def _drive(ray, workers, jobs: list[NodeJob], output, result: FleetSummary,
           progress: bool) -> list[dict]:
    """Hand nodes to idle workers; one next_part call in flight per busy worker."""
    pending = list(jobs)
    idle = list(workers.all)
    in_flight: dict = {}              # ObjectRef -> (actor, job)
    summaries: list[dict] = []
    bar = _progress(progress, len(jobs))
    try:
        while pending or in_flight:
            while idle and pending:
                actor, job = idle.pop(), pending.pop(0)
                actor.start.remote(job.node, list(job.paths))
                in_flight[actor.next_part.remote()] = (actor, job)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor, job = in_flight.pop(ready[0])
            try:
                part = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # the worker died (or a bug in it)
                _failed(result, output, job, f"worker lost: {fleet_ray.cause(exc)}")
                idle.append(workers.replace(actor))
                _tick(bar, result)
                continue
            if part["lines"]:
                output.write(job.node, part["lines"])
            if not part["done"]:
                in_flight[actor.next_part.remote()] = (actor, job)
                continue
            idle.append(actor)
            if part.get("summary"):
                summaries.append(part["summary"])
            if part.get("note"):
                log.warning("%s", part["note"])
            if part.get("error"):
                _failed(result, output, job, part["error"])
            else:
                output.finish(job.node, ok=True)
            _tick(bar, result)
    finally:
        if bar is not None:
            bar.close()
    return summaries


def _failed(result: FleetSummary, output, job: NodeJob, why: str) -> None:
    log.error("node %s failed (%s): %s", job.node, ", ".join(job.paths[:3]), why)
    result.failed[job.node] = why
    output.finish(job.node, ok=False)


def _tick(bar, result: FleetSummary) -> None:
    if bar is not None:
        bar.update(1)
        if result.failed:
            bar.set_postfix(failed=len(result.failed))


__all__ = ["FleetOptions", "FleetSummary", "merge_summaries", "replay_fleet"]
