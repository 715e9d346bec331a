import logging

from edgefuse.runtime.core.ratelimit import WarnLimiter


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_first_then_one_per_period_with_the_count_since(caplog):
    clock = Clock()
    lim = WarnLimiter(logging.getLogger("t.rl"), period_s=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="t.rl"):
        assert lim.warn(("n1", "acoustic", "late"), "late chunk on %s", "n1/acoustic")
        for _ in range(5):
            assert not lim.warn(("n1", "acoustic", "late"), "late chunk on %s", "n1/acoustic")
        # another key is not hidden by the flood of the first
        assert lim.warn(("n2", "acoustic", "late"), "late chunk on %s", "n2/acoustic")
        clock.t = 61.0
        assert lim.warn(("n1", "acoustic", "late"), "late chunk on %s", "n1/acoustic")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["late chunk on n1/acoustic", "late chunk on n2/acoustic",
                    "late chunk on n1/acoustic (5 more like this in the last 60 s)"]


def test_keys_are_bounded():
    lim = WarnLimiter(logging.getLogger("t.rl2"), max_keys=3)
    for i in range(10):
        lim.warn(i, "x")
    assert len(lim._keys) == 3
