"""The one interface every decision sink implements (``runtime.service.sinks``
builds them from the config).

A sink is built without I/O and takes its resources in ``open()`` (a file,
an outbox and a broker connection), as live sources do; ``close()`` gives
them back and may be called in any state, opened or not, more than once.
In between the caller hands it batches of decisions:

- ``write_many(decisions)``: take a batch (in the order decided);
- ``flush()``: hand what was written on without waiting for a peer (a file's
  buffer to the OS, the decision publisher woken); the daemon calls it after
  every batch;
- ``drain(timeout_s) -> bool``: at shutdown, wait up to timeout_s until what
  was written has left the process; False when something is still pending
  (a durable sink keeps it for the next start);
- ``stats() -> dict``: its counters, flat numbers (exported as
  ``edgefuse_sink_<key>_total{sink=name}``);
- ``name``: its label in logs and metrics ("mqtt", "jsonl", "stdout").
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from edgefuse.runtime.core.decision import Decision


class Sink(ABC):
    name: str = "sink"

    def open(self) -> None:  # noqa: B027 - a sink that holds nothing has nothing to open
        """Take the sink's resources; a second call does nothing."""

    @abstractmethod
    def write_many(self, decisions: Sequence[Decision]) -> None:
        """Take a batch of decisions."""

    def write(self, decision: Decision) -> None:
        """One decision: a batch of one."""
        self.write_many((decision,))

    def flush(self) -> None:  # noqa: B027 - optional for sinks that do not buffer
        """Hand what was written on, without waiting for a peer."""

    def drain(self, timeout_s: float) -> bool:
        """Wait up to timeout_s until everything written has left; False if not."""
        self.flush()
        return True

    def stats(self) -> dict:
        """Numeric counters of this sink (exported as metrics)."""
        return {}

    @abstractmethod
    def close(self) -> None:
        """Give the resources back; safe before open() and when called twice."""

    def __enter__(self) -> Sink:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
