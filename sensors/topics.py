"""MQTT topics of chunks: ``edgefuse/{node}/{modality}`` and its subscription filter.

Standard library only (the MQTT receiver process imports it without numpy).
"""
from __future__ import annotations

import re

from edgefuse.runtime.errors import ConfigError
from edgefuse.sensors.accounting import BAD_TOPIC, RejectedPayload

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
        self.filter = "/".join(filt)
        self._regex = re.compile("/".join(regex) + r"\Z")

    def parse(self, topic: str) -> tuple[str, str]:
        match = self._regex.match(topic)
        if match is None:
            raise RejectedPayload(BAD_TOPIC, f"topic {topic!r} does not match {self.pattern!r}")
        return match["node"], match["modality"]

    def topic(self, node: str, modality: str) -> str:
        """The topic a sender of (node, modality) publishes to."""
        if "+" in self.pattern.split("/"):
            raise ConfigError(f"pattern {self.pattern!r} has '+' levels; cannot build a topic")
        return self.pattern.format(node=node, modality=modality)
