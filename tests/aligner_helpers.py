"""Builders shared by the aligner tests: a contract and synthetic streams."""
from __future__ import annotations

import numpy as np

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.contract import ModelContract

T0 = 1_681_140_928_000_000_000  # a real goodvibes day, in ns


def contract(rates=(("a", 1, 400.0), ("s", 1, 100.0)), window_ns=1_000_000_000,
             hop_ns=500_000_000) -> ModelContract:
    return ModelContract.from_dict({
        "contract": 1, "name": "t", "version": "1",
        "modalities": [{"name": n, "channels": c, "rate_hz": r, "input": n} for n, c, r in rates],
        "window_ns": window_ns, "hop_ns": hop_ns, "labels": ["x", "y"],
        "mask_input": "modality_mask", "output": "scores"})


def stream_chunks(node, modality, rate, seconds, chunk_n, t0=T0, channels=1, seed=0,
                  signal=None, give_rate=True):
    """Chunks of a stream sampled at `rate` from t0; signal(t_seconds) -> values."""
    rng = np.random.default_rng(seed)
    total = int(seconds * rate)
    t = np.arange(total) / rate
    if signal is None:
        values = rng.standard_normal((total, channels)).astype(np.float32)
    else:
        values = np.repeat(signal(t)[:, None], channels, axis=1).astype(np.float32)
    out = []
    for seq, lo in enumerate(range(0, total, chunk_n)):
        t0_ns = t0 + int(round(lo * 1e9 / rate))
        out.append(Chunk(node, modality, t0_ns, rate if give_rate else None,
                         values[lo:lo + chunk_n], seq))
    return out, values


def run(aligner, chunks):
    windows = []
    for c in chunks:
        windows.extend(aligner.push(c))
    windows.extend(aligner.flush())
    return windows


def by_time(*streams):
    merged = [c for s in streams for c in s]
    merged.sort(key=lambda c: (c.t0_ns, c.modality))
    return merged
