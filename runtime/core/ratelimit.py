"""Rate-limited warnings: every anomaly is logged, never only the first of a run.

One ``WarnLimiter`` per owner of a check. ``warn(key, msg, *args)`` logs the
first occurrence of ``key`` at once, then at most one line per ``period_s``
for that key, saying how many occurred since the last line. ``key`` names
what the anomaly is about, e.g. ``(node, modality, reason)``, so a flood
from one stream never hides another stream's first warning.

Bounded: at most ``max_keys`` keys are tracked; past that the least recently
logged keys are forgotten (their next occurrence is logged as a first one).
The clock is injectable so tests need no sleeps.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Callable, Hashable

DEFAULT_PERIOD_S = 60.0
DEFAULT_MAX_KEYS = 4096


class WarnLimiter:
    def __init__(self, logger: logging.Logger, *, period_s: float = DEFAULT_PERIOD_S,
                 max_keys: int = DEFAULT_MAX_KEYS, level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.period_s = period_s
        self.max_keys = max_keys
        self.level = level
        self._clock = clock
        # key -> [time of the last line logged, occurrences not logged since]
        self._keys: OrderedDict[Hashable, list] = OrderedDict()

    def warn(self, key: Hashable, msg: str, *args: object) -> bool:
        """Count one occurrence of ``key``; log it if due. True when a line was logged."""
        now = self._clock()
        entry = self._keys.get(key)
        if entry is None:
            if len(self._keys) >= self.max_keys:
                self._keys.popitem(last=False)
            self._keys[key] = [now, 0]
            self.logger.log(self.level, msg, *args)
            return True
        if now - entry[0] < self.period_s:
            entry[1] += 1
            return False
        suppressed = entry[1]
        entry[0], entry[1] = now, 0
        self._keys.move_to_end(key)
        if suppressed:
            self.logger.log(self.level, msg + " (%d more like this in the last %.0f s)",
                            *args, suppressed, self.period_s)
        else:
            self.logger.log(self.level, msg, *args)
        return True
