"""Day-site splits never leak an event or a day-site across sides."""
import numpy as np
import pytest

from edgefuse.models.dataset import WindowSet
from edgefuse.models.splits import Split, check_no_leakage, split_by_day_site
from edgefuse.runtime.core.errors import ConfigError


def _ws(sites, dates, groups):
    n = len(sites)
    meta = {"site": np.array(sites), "date": np.array(dates), "group": np.array(groups),
            "node": np.array(["1"] * n), "kind": np.array(["pass"] * n),
            "target": np.array(["X"] * n)}
    return WindowSet(("a",), {"a": np.zeros((n, 1, 4), np.float32)},
                     np.ones((n, 1), np.float32), np.zeros(n, np.int64), meta)


def test_split_by_day_site_and_no_group_on_two_sides():
    ws = _ws(["s1", "s1", "s2", "s2", "s3"], ["d1", "d1", "d1", "d2", "d1"],
             ["g1", "g1", "g2", "g3", "g4"])
    sp = split_by_day_site(ws, test=("s2/d1",), val=("s3/d1",))
    assert sp.test.tolist() == [2] and sp.val.tolist() == [4]
    assert sp.train.tolist() == [0, 1, 3]
    for a, b in ((sp.train, sp.test), (sp.train, sp.val), (sp.val, sp.test)):
        assert not set(ws.meta["group"][a]) & set(ws.meta["group"][b])


def test_usable_filter_and_unknown_key():
    ws = _ws(["s1", "s2"], ["d", "d"], ["g1", "g2"])
    sp = split_by_day_site(ws, test=("s2/d",), usable=np.array([False, True]))
    assert sp.train.size == 0 and sp.test.tolist() == [1]
    with pytest.raises(ConfigError, match="known"):
        split_by_day_site(ws, test=("nowhere/d",))


def test_leak_is_detected():
    # one event group spread over two day-sites (a bad group id) must be caught
    ws = _ws(["s1", "s2"], ["d", "d"], ["g", "g"])
    with pytest.raises(ConfigError, match="both"):
        check_no_leakage(ws, Split(np.array([0]), np.array([], int), np.array([1]), (), ()))
