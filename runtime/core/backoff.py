"""Capped exponential backoff: the one helper for every retry delay.

The first delay is ``min_s``; each further one doubles, up to ``max_s``;
``reset()`` (after a success) starts again at ``min_s``. A pure object: it
never sleeps and reads no clock, so the caller decides how to wait
(``Event.wait``, ``select``, a deadline on ``time.monotonic()``) and tests
need no sleeps.

    backoff = Backoff(0.5, 5.0)
    while not connected:
        stop.wait(backoff.next())      # 0.5, 1, 2, 4, 5, 5, ...
    backoff.reset()

Callers that keep one attempt count per item (a refused row each with its own
retry) use ``delay(attempt)``, the same schedule without state.
"""
from __future__ import annotations

from .errors import ConfigError

# 2 ** 64 times any positive min_s is past every sensible cap: bounding the
# exponent keeps delay(attempt) finite for any attempt count.
_MAX_DOUBLINGS = 64


class Backoff:
    """Delays from ``min_s`` doubling up to ``max_s`` (seconds, 0 < min_s <= max_s)."""

    def __init__(self, min_s: float, max_s: float):
        if not 0 < min_s <= max_s:
            raise ConfigError(f"backoff delays must satisfy 0 < min_s <= max_s, found "
                              f"min_s={min_s!r}, max_s={max_s!r}")
        self.min_s = float(min_s)
        self.max_s = float(max_s)
        self._current = self.min_s

    @property
    def current(self) -> float:
        """The delay ``next()`` will return (no side effect)."""
        return self._current

    def next(self) -> float:
        """The delay to wait now; the following one is twice as long, up to max_s."""
        delay = self._current
        self._current = min(self.max_s, self._current * 2)
        return delay

    def reset(self) -> None:
        """After a success: the next delay is min_s again."""
        self._current = self.min_s

    def delay(self, attempt: int) -> float:
        """The delay before retry number ``attempt`` (1-based): min_s * 2**(attempt-1), capped."""
        if attempt < 1:
            raise ValueError(f"attempt counts from 1, found {attempt!r}")
        return min(self.max_s, self.min_s * 2 ** min(attempt - 1, _MAX_DOUBLINGS))

    def __repr__(self) -> str:
        return f"Backoff(min_s={self.min_s!r}, max_s={self.max_s!r}, current={self._current!r})"
