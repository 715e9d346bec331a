"""Train/validation/test splits by recording day and site (numpy only).

Windows of one event overlap in time (hop < window) and the nodes of a site
record the same vehicle at the same moment, so random window splits leak.
Splits here are by (site, date) "day-site" keys, e.g. ``bprf/2023-04-11``:
every window of a day-site goes to exactly one side. ``check_no_leakage``
verifies that no event group (pass or noise recording) and no day-site
appears on two sides.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgefuse.models.dataset import WindowSet
from edgefuse.runtime.core.errors import ConfigError


@dataclass(frozen=True)
class Split:
    """Index arrays into a WindowSet."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_keys: tuple[str, ...]
    val_keys: tuple[str, ...]


def day_site_keys(ws: WindowSet) -> np.ndarray:
    return np.char.add(np.char.add(ws.meta["site"].astype(str), "/"), ws.meta["date"].astype(str))


def split_by_day_site(ws: WindowSet, test: tuple[str, ...], val: tuple[str, ...] = (),
                      usable: np.ndarray | None = None) -> Split:
    """Test = windows of the `test` day-sites, val = those of `val`, train = the rest.

    `usable` (bool [N]) drops windows from every side (e.g. windows with no modality).
    Unknown keys are refused with the list of known ones."""
    split = _split_by_keys(day_site_keys(ws), "day-site", test, val, usable)
    check_no_leakage(ws, split)
    return split


def _split_by_keys(keys: np.ndarray, what: str, test: tuple[str, ...], val: tuple[str, ...],
                   usable: np.ndarray | None) -> Split:
    """Every window goes to the side of its key; unknown or doubly used keys are refused."""
    known = sorted(set(keys.tolist()))
    for k in (*test, *val):
        if k not in known:
            raise ConfigError(f"split key {k!r} is not a {what} of this dataset; known: {known}")
    if set(test) & set(val):
        raise ConfigError(f"a {what} cannot be both test and val: {sorted(set(test) & set(val))}")
    ok = np.ones(len(keys), bool) if usable is None else np.asarray(usable, bool)
    is_test = np.isin(keys, list(test))
    is_val = np.isin(keys, list(val))
    return Split(np.flatnonzero(ok & ~is_test & ~is_val), np.flatnonzero(ok & is_val),
                 np.flatnonzero(ok & is_test), tuple(test), tuple(val))


def default_val_keys(keys: np.ndarray, train: np.ndarray, fraction: float, seed: int
                     ) -> tuple[str, ...]:
    """The validation groups when the config names none: round(fraction x training
    groups) of the keys on the training side, at least 1 when there are 3 or more and
    never leaving fewer than 2 to train on; drawn by ``seed`` from the sorted keys, so
    the same config holds out the same groups. Whole groups, never windows; the test
    groups are not on the training side, so never among them."""
    groups = sorted(set(np.asarray(keys)[train].astype(str).tolist()))
    n = int(round(fraction * len(groups)))
    if fraction > 0 and len(groups) >= 3:
        n = max(n, 1)
    n = max(0, min(n, len(groups) - 2))
    pick = np.random.default_rng(seed).permutation(len(groups))[:n]
    return tuple(sorted(groups[i] for i in pick))


def hold_out_events(ws: WindowSet, split: Split, events: tuple[str, ...]) -> Split:
    """The split with the training windows of these event groups moved to validation
    (``val_keys`` then names the events). Every window of an event goes with it, so no
    event straddles train and validation; its day-site may (the test side stays whole)."""
    moved = np.isin(ws.meta["group"][split.train].astype(str), list(events))
    val = np.sort(np.concatenate([split.val, split.train[moved]]))
    return Split(split.train[~moved], val, split.test, split.test_keys,
                 tuple(split.val_keys) + tuple(events))


def _one_side(col: np.ndarray, sides: dict[str, np.ndarray], what: str) -> None:
    seen: dict[str, str] = {}
    for side, idx in sides.items():
        for g in set(col[idx].tolist()):
            if g in seen and seen[g] != side:
                raise ConfigError(f"{what} {g!r} has windows in both {seen[g]} and {side}; "
                                  "split by day-site, never by window")
            seen[g] = side


def check_no_leakage(ws: WindowSet, split: Split, events_in_val: bool = False,
                     column: str = "day_site") -> None:
    """Raise ConfigError when an event group or a split key (``column``: day-site or a
    meta column) has windows on two sides. ``events_in_val``: validation holds whole
    event groups (hold_out_events), so a key may be on the train and validation sides,
    never on the test side too."""
    sides = {"train": split.train, "val": split.val, "test": split.test}
    _one_side(ws.meta["group"], sides, "event group")
    if events_in_val:
        sides = {"train": np.concatenate([split.train, split.val]), "test": split.test}
    keys = day_site_keys(ws) if column == "day_site" else ws.meta[column].astype(str)
    _one_side(keys, sides, "day-site" if column == "day_site" else column)
    overlap = (set(split.train.tolist()) & set(split.test.tolist())) | \
              (set(split.train.tolist()) & set(split.val.tolist()))
    if overlap:
        raise ConfigError(f"{len(overlap)} windows are on two sides of the split")


def counts_table(ws: WindowSet, idx: np.ndarray | None = None) -> list[dict]:
    """Rows (day-site, label, target, acoustic present, seismic present) -> windows."""
    idx = np.arange(len(ws)) if idx is None else idx
    keys = day_site_keys(ws)[idx]
    rows: dict[tuple, int] = {}
    for i, k in zip(idx, keys):
        r = (str(k), int(ws.label[i]), str(ws.meta["target"][i]),
             *(int(v) for v in ws.mask[i]))
        rows[r] = rows.get(r, 0) + 1
    names = ("day_site", "label", "target", *(f"{m}_present" for m in ws.modalities))
    return [dict(zip(names, r), windows=n) for r, n in sorted(rows.items())]


def split_by_column(ws: WindowSet, column: str, test: tuple[str, ...],
                    val: tuple[str, ...] = (), usable: np.ndarray | None = None) -> Split:
    """Like split_by_day_site, keyed by one meta column (e.g. "subject" for sp-sw-har):
    every window of a key goes to one side; event groups never straddle sides."""
    if column not in ws.meta:
        raise ConfigError(f"split column {column!r} is not in this dataset; "
                          f"known: {sorted(ws.meta)}")
    keys = ws.meta[column].astype(str)
    split = _split_by_keys(keys, column, test, val, usable)
    sides = {"train": split.train, "val": split.val, "test": split.test}
    for what, col in (("event group", ws.meta["group"].astype(str)), (column, keys)):
        seen: dict[str, str] = {}
        for side, idx in sides.items():
            for g in set(col[idx].tolist()):
                if g in seen and seen[g] != side:
                    raise ConfigError(f"{what} {g!r} has windows in both {seen[g]} and {side}")
                seen[g] = side
    return split
