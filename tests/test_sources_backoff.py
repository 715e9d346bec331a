"""The one capped-backoff helper (runtime/core/backoff.py)."""
from __future__ import annotations

import pytest

from edgefuse.runtime.core.backoff import Backoff
from edgefuse.runtime.core.errors import ConfigError


def test_doubles_up_to_the_cap_and_resets():
    b = Backoff(0.5, 5.0)
    assert [b.next() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    b.reset()
    assert b.current == 0.5
    assert b.next() == 0.5
    assert b.current == 1.0


def test_current_has_no_side_effect():
    b = Backoff(1.0, 8.0)
    assert b.current == b.current == 1.0
    assert b.next() == 1.0


def test_equal_min_and_max_is_constant():
    b = Backoff(2.0, 2.0)
    assert [b.next() for _ in range(3)] == [2.0, 2.0, 2.0]


def test_delay_by_attempt_matches_the_sequence():
    b = Backoff(0.25, 3.0)
    fresh = Backoff(0.25, 3.0)
    seq = [fresh.next() for _ in range(8)]
    assert [b.delay(n) for n in range(1, 9)] == seq
    assert b.delay(10**9) == 3.0  # no overflow for any attempt count
    assert b.current == 0.25      # delay() keeps no state
    with pytest.raises(ValueError):
        b.delay(0)


@pytest.mark.parametrize("lo,hi", [(0, 1), (-1, 1), (2, 1)])
def test_bad_bounds_are_refused_naming_them(lo, hi):
    with pytest.raises(ConfigError, match="min_s"):
        Backoff(lo, hi)
