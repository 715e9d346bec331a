"""The Ray side of a fleet replay: importing Ray, reaching it, the worker actors.

Ray is the optional extra ``edgefuse[ray]``; nothing imports this module
but runtime/service/fleet.py, and that only when ``--ray`` is given.

Where Ray runs: ``address`` as given (``auto``: the cluster ``ray start``
made on this machine; ``ray://host:10001``: a remote one's client port);
none given: ``RAY_ADDRESS`` when set, else a local Ray of our own ("local":
never a cluster an earlier ``ray start`` left behind) on all cores, or on
``workers * threads`` CPUs when ``workers`` is given.

Our own local Ray serves this process only and talks to nothing beyond
loopback (LOCAL_RAY_ENV, set while Ray is imported and started; a user's
own value of each wins): it listens on 127.0.0.1 (Ray binds a one-machine
instance there when told multi-node clusters are off, and otherwise to the
first interface's address, open to the network), reports no usage stats,
and the cloud-provider probe that Ray's API server process makes at start
even with usage stats off (HTTP to 169.254.169.254 and
metadata.google.internal) goes to a closed port on loopback through
``http_proxy``, loopback itself exempt (``no_proxy``, which Ray's gRPC
honours too). The workers it starts inherit ORT_DISABLE_TELEMETRY=1:
onnxruntime 1.32 otherwise looks up its telemetry collector
(mobile.events.data.microsoft.com) within about half a minute of inference.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

from edgefuse.runtime.core.errors import ConfigError, EdgefuseError
from edgefuse.runtime.service.fleet_worker import NodeReplayer

log = logging.getLogger(__name__)

_CLOSED_PORT = "http://127.0.0.1:9"   # discard: nothing listens there
_LOOPBACK = "127.0.0.1,localhost,::1"
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "http_proxy": _CLOSED_PORT, "HTTP_PROXY": _CLOSED_PORT,
                 "no_proxy": _LOOPBACK, "NO_PROXY": _LOOPBACK,
                 "ORT_DISABLE_TELEMETRY": "1"}


class RayNodeReplayer(NodeReplayer):
    """The worker as a Ray actor: it also says which Ray node it runs on."""

    def info(self) -> dict:
        import ray
        return {**super().info(), "ray_node": ray.get_runtime_context().get_node_id()}


@contextlib.contextmanager
def local_ray_environment():
    """os.environ with LOCAL_RAY_ENV set (a user's own setting wins), restored after."""
    saved = {k: os.environ.get(k) for k in LOCAL_RAY_ENV}
    for k, v in LOCAL_RAY_ENV.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def starts_local(address: str | None) -> bool:
    return address is None and not os.environ.get("RAY_ADDRESS")


def import_ray(local: bool):
    """The ray module, or a one-line ConfigError naming the extra."""
    with local_ray_environment() if local and "ray" not in sys.modules \
            else contextlib.nullcontext():
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("--ray needs Ray, the optional extra: pip install "
                              f"'edgefuse[ray]' (expected the ray package, found: {exc})") from exc
    return ray


def connect(ray, address: str | None, cpus: int | None) -> bool:
    """Connect to (or start) Ray; True when this call started it (the caller shuts it
    down). ``cpus``: the CPUs of a local Ray (None: all)."""
    if ray.is_initialized():
        return False
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING}
    env = contextlib.nullcontext()
    if starts_local(address):
        address, env = "local", local_ray_environment()
        if cpus:
            kwargs["num_cpus"] = cpus
    try:
        with env:
            ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = address or os.environ.get("RAY_ADDRESS")
        raise ConfigError(f"cannot reach Ray at {where!r}: {exc}; start it (ray start "
                          "--head) or give its address (--ray HOST:PORT, --ray auto)") from exc
    return True


def worker_count(ray, workers: int | None, threads: int, jobs: int) -> int:
    """``workers`` (default: as many as the cluster's CPUs hold), at most one per node."""
    cpus = int(ray.cluster_resources().get("CPU", 0))
    fit = max(1, cpus // threads)
    wanted = workers or fit
    if wanted > fit:
        log.warning("--workers %d with --threads %d needs %d CPUs; the Ray cluster has %d: "
                    "starting %d workers", wanted, threads, wanted * threads, cpus, fit)
        wanted = fit
    return max(1, min(wanted, jobs))


def cause(exc: BaseException) -> str:
    """The last line of a Ray error: the worker's own exception."""
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


class Workers:
    """``count`` NodeReplayer actors, ``threads`` CPUs each; a dead one is replaced."""

    def __init__(self, ray, count: int, threads: int, args: tuple):
        self._ray = ray
        self._cls = ray.remote(num_cpus=threads)(RayNodeReplayer)
        self._args = args
        self.all = [self._cls.remote(*args) for _ in range(count)]
        try:
            self.info = ray.get([a.info.remote() for a in self.all])
        except ray.exceptions.RayError as exc:
            self.kill()
            raise EdgefuseError(f"the Ray workers could not load the model: {cause(exc)}; "
                                "every Ray node needs edgefuse and the model at the same "
                                "path") from exc

    def replace(self, dead):
        self.all.remove(dead)
        actor = self._cls.remote(*self._args)
        self.all.append(actor)
        return actor

    def kill(self) -> None:
        for a in self.all:
            self._ray.kill(a)
