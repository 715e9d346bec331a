"""MQTT topics of chunks: ``edgefuse/{node}/{modality}``, partitions, subscription filters.

The subscription names the modalities: ``edgefuse/+/acoustic``,
``edgefuse/+/seismic``, ... one filter per modality the source is given, so
that the daemon's own decisions (``edgefuse/{node}/decisions``, the same
shape) are never even delivered to it. Only a source that knows no
modalities subscribes to the catch-all ``edgefuse/+/+`` (and then skips the
reserved modalities in its callback).

Partitions (several daemons share the nodes, all streams of a node reach
one daemon): a node publishes to ``edgefuse/p<k>/<node>/<modality>``
(``PARTITIONED_PATTERN``) with

    k = CRC-32 (IEEE 802.3, as zlib.crc32) of the node name's UTF-8 bytes, mod N

(``partition_of``; README "Scaling out: live" has the 3-line C reference);
daemon K of N (``Partition``) subscribes to ``edgefuse/pK/+/<modality>`` only,
and refuses a message whose node does not hash to K (``WRONG_PARTITION``: a
device with another N, or another hash). A pattern with a ``{partition}``
level read by a daemon that has no partition subscribes to every partition.
MQTT's shared subscriptions (``$share/...``) are no substitute: they hand out
single messages round-robin, splitting a node's streams among the daemons
(tests/test_share.py).

Standard library only (the MQTT receiver process imports it without numpy).
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from edgefuse.runtime.core.errors import ConfigError
from edgefuse.sensors.live.accounting import BAD_TOPIC, RejectedMessage

DEFAULT_PATTERN = "edgefuse/{node}/{modality}"
PARTITIONED_PATTERN = "edgefuse/p{partition}/{node}/{modality}"
RESERVED_MODALITIES = frozenset({"decisions"})
WRONG_PARTITION = "wrong_partition"   # stats()["malformed"] key
MAX_PARTITIONS = 1024


def partition_of(node: str, partitions: int) -> int:
    """The partition of a node: CRC-32 of its UTF-8 name mod ``partitions``."""
    return zlib.crc32(node.encode("utf-8")) % partitions


@dataclass(frozen=True)
class Partition:
    """Daemon ``index`` of ``count``: it owns the nodes with partition_of == index."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (1 <= self.count <= MAX_PARTITIONS and 0 <= self.index < self.count):
            raise ConfigError(f"partition {self.index}/{self.count} is out of range; "
                              f"allowed: K/N with 0 <= K < N <= {MAX_PARTITIONS}")

    @classmethod
    def parse(cls, text: str) -> Partition:
        """``"K/N"`` -> Partition(K, N); ConfigError naming what was found."""
        index, sep, count = str(text).strip().partition("/")
        if not sep or not index.isdigit() or not count.isdigit():
            raise ConfigError(f"partition must be K/N (this daemon's index K of N daemons, "
                              f"counted from 0, e.g. \"0/3\"), found {text!r}")
        return cls(int(index), int(count))

    def owns(self, node: str) -> bool:
        return partition_of(node, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class WrongPartition(RejectedMessage):
    """A message of a node that belongs to another daemon's partition."""

    def __init__(self, node: str, modality: str, message: str):
        super().__init__(WRONG_PARTITION, message)
        self.node, self.modality = node, modality


class TopicPattern:
    """``a/{node}/{modality}`` <-> subscription filter ``a/+/+`` and a parser.

    A level may hold ``{partition}`` with a literal prefix or suffix
    (``p{partition}``); with ``partition`` given, the filters name its index
    and ``parse`` refuses a node of another partition.
    """

    def __init__(self, pattern: str, partition: Partition | None = None):
        levels = pattern.split("/")
        if levels.count("{node}") != 1 or levels.count("{modality}") != 1:
            raise ConfigError(f"topic pattern must hold {{node}} and {{modality}} once each, as "
                              f"whole levels (e.g. {DEFAULT_PATTERN!r}); found {pattern!r}")
        if sum(level.count("{partition}") for level in levels) > 1:
            raise ConfigError(f"topic pattern {pattern!r} holds {{partition}} more than once")
        regex, filt = [], []
        self._partition_level: int | None = None
        for i, level in enumerate(levels):
            if level in ("{node}", "{modality}"):
                regex.append(f"(?P<{level[1:-1]}>[^/]+)")
                filt.append("+")
            elif level == "+":
                regex.append("[^/]+")
                filt.append("+")
            elif "{partition}" in level and not _bad_literal(level.replace("{partition}", "")):
                self._partition_level = i
                before, _, after = level.partition("{partition}")
                regex.append(f"{re.escape(before)}(?P<partition>[0-9]+){re.escape(after)}")
                filt.append(level.replace("{partition}", str(partition.index))
                            if partition is not None else "+")
            elif not level or _bad_literal(level):
                raise ConfigError(f"topic pattern level {level!r} in {pattern!r} must be a "
                                  "literal, '+', '{node}', '{modality}' or hold '{partition}' "
                                  "('#' is not supported)")
            else:
                regex.append(re.escape(level))
                filt.append(level)
        self.pattern = pattern
        self.partition = partition if self._partition_level is not None else None
        if partition is not None and self.partition is None:
            raise ConfigError(f"partition {partition} needs a topic pattern with a "
                              f"{{partition}} level (e.g. {PARTITIONED_PATTERN!r}); found "
                              f"{pattern!r}")
        self.filter = "/".join(filt)   # the catch-all: any node, any modality
        self._modality_level = levels.index("{modality}")
        self._regex = re.compile("/".join(regex) + r"\Z")

    @property
    def partitioned(self) -> bool:
        """True when the pattern has a {partition} level."""
        return self._partition_level is not None

    def filters(self, modalities: Iterable[str] | None) -> list[str]:
        """Subscription filters for these modalities (None: the catch-all).

        Reserved modalities are left out; ConfigError when a name cannot be one
        topic level (empty, or holding '/', '+', '#' or NUL).
        """
        if modalities is None:
            return [self.filter]
        out = []
        for modality in sorted(set(modalities)):
            if not modality or any(c in modality for c in "/+#\0"):
                raise ConfigError(f"modality {modality!r} cannot be an MQTT topic level "
                                  f"of {self.pattern!r}; rename it (no '/', '+', '#')")
            if modality in RESERVED_MODALITIES:
                continue
            levels = self.filter.split("/")
            levels[self._modality_level] = modality
            out.append("/".join(levels))
        if not out:
            raise ConfigError(f"no modality to subscribe to on {self.pattern!r}: found "
                              f"{sorted(set(modalities))}")
        return out

    def parse(self, topic: str) -> tuple[str, str]:
        match = self._regex.match(topic)
        if match is None:
            raise RejectedMessage(BAD_TOPIC, f"topic {topic!r} does not match {self.pattern!r}")
        node, modality = match["node"], match["modality"]
        part = self.partition
        if part is not None and (int(match["partition"]) != part.index or not part.owns(node)):
            raise WrongPartition(
                node, modality, f"node {node!r} belongs to partition "
                f"{partition_of(node, part.count)} of {part.count} (CRC-32 of its UTF-8 name "
                f"mod {part.count}), not to this daemon's {part}; make the device publish to "
                f"{self.topic(node, modality, part.count)!r}")
        return node, modality

    def topic(self, node: str, modality: str, partitions: int | None = None) -> str:
        """The topic a sender of (node, modality) publishes to; a partitioned pattern
        needs the number of partitions (else this pattern's partition count)."""
        if "+" in self.pattern.split("/"):
            raise ConfigError(f"pattern {self.pattern!r} has '+' levels; cannot build a topic")
        if not self.partitioned:
            return self.pattern.format(node=node, modality=modality)
        count = partitions or (self.partition.count if self.partition else None)
        if not count:
            raise ConfigError(f"pattern {self.pattern!r} has a {{partition}} level; give the "
                              "number of partitions to build a topic")
        return self.pattern.format(node=node, modality=modality,
                                   partition=partition_of(node, count))


def _bad_literal(text: str) -> bool:
    return any(c in text for c in "#+{}")
