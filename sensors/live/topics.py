"""MQTT topics of chunks: ``edgefuse/{node}/{modality}`` and its subscription filters.

The subscription names the modalities: ``edgefuse/+/acoustic``,
``edgefuse/+/seismic``, ... one filter per modality the source is given, so
that the daemon's own decisions (``edgefuse/{node}/decisions``, the same
shape) are never even delivered to it. Only a source that knows no
modalities subscribes to the catch-all ``edgefuse/+/+`` (and then skips the
reserved modalities in its callback).

Standard library only (the MQTT receiver process imports it without numpy).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from edgefuse.runtime.core.errors import ConfigError
from edgefuse.sensors.live.accounting import BAD_TOPIC, RejectedMessage

DEFAULT_PATTERN = "edgefuse/{node}/{modality}"
RESERVED_MODALITIES = frozenset({"decisions"})


class TopicPattern:
    """``a/{node}/{modality}`` <-> subscription filter ``a/+/+`` and a parser."""

    def __init__(self, pattern: str):
        levels = pattern.split("/")
        if levels.count("{node}") != 1 or levels.count("{modality}") != 1:
            raise ConfigError(f"topic pattern must hold {{node}} and {{modality}} once each, as "
                              f"whole levels (e.g. {DEFAULT_PATTERN!r}); found {pattern!r}")
        regex, filt = [], []
        for level in levels:
            if level in ("{node}", "{modality}"):
                regex.append(f"(?P<{level[1:-1]}>[^/]+)")
                filt.append("+")
            elif level == "+":
                regex.append("[^/]+")
                filt.append("+")
            elif not level or any(c in level for c in "#+{}"):
                raise ConfigError(f"topic pattern level {level!r} in {pattern!r} must be a "
                                  "literal, '+', '{node}' or '{modality}' ('#' is not supported)")
            else:
                regex.append(re.escape(level))
                filt.append(level)
        self.pattern = pattern
        self.filter = "/".join(filt)   # the catch-all: any node, any modality
        self._modality_level = levels.index("{modality}")
        self._regex = re.compile("/".join(regex) + r"\Z")

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
        return match["node"], match["modality"]

    def topic(self, node: str, modality: str) -> str:
        """The topic a sender of (node, modality) publishes to."""
        if "+" in self.pattern.split("/"):
            raise ConfigError(f"pattern {self.pattern!r} has '+' levels; cannot build a topic")
        return self.pattern.format(node=node, modality=modality)
