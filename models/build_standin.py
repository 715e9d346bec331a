"""Train the stand-in briefly and export the bundled models (torch + onnx needed).

    python -m edgefuse.models.build_standin [--data DIR] [--out DIR] [--seed 0]

Writes into models/bundled/:
  standin_av.onnx          acoustic+seismic stand-in (trained here, seeded)
  standin_av.seismic.onnx  its seismic-only fallback (only the seismic encoder runs)
  bench_3m.onnx            acoustic+seismic+imu, untrained, for the benchmark
  standin_av.train.json    what it was trained on and how well it did

Data (read-only goodvibes pack): vehicle = windows of passes/close items
whose samples are from the labelled time (window_check ok); background =
noise/ windows (the same file name in acoustic/ and seismic/ is the same
span). Each recording is low-passed (4th-order Butterworth at 0.45 x the
model rate, as the aligner does) and interpolated onto the model grid with
np.interp, then cut into 1 s windows. Items are split by recording (not by
window) into train/validation, 75/25, seeded; the exported model is then
retrained on all of them with the same recipe. Training runs on precomputed
front-end features (the front end has no trainable weights), so it takes
seconds.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.io import wavfile
from scipy.signal import butter, sosfilt

from edgefuse.exporters.onnx_export import export, export_with_fallbacks, parity
from edgefuse.models import BUNDLED_DIR
from edgefuse.models import standin
from edgefuse.exporters.quantize import time_per_window_us

log = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "goodvibes"
TRAIN_HOP_S = {"vehicle": 0.25, "background": 0.5}   # denser cuts of the rarer class
MODS = (standin.ACOUSTIC, standin.SEISMIC)


@dataclass
class Recording:
    group: str                      # split unit: one pass item or one noise file
    label: int
    grids: dict[str, np.ndarray]    # modality -> float32 samples on the model grid


def to_grid(x: np.ndarray, rate_in: float, rate_out: float) -> np.ndarray:
    """Anti-alias (when decimating) and interpolate onto the model grid starting at t=0."""
    x = x.astype(np.float64)
    if rate_in > 1.1 * rate_out:
        x = sosfilt(butter(4, 0.45 * rate_out, fs=rate_in, output="sos"), x)
    n_out = int(np.floor((len(x) - 1) / rate_in * rate_out)) + 1
    return np.interp(np.arange(n_out) / rate_out, np.arange(len(x)) / rate_in, x).astype(np.float32)


def _read(path: Path) -> tuple[int, np.ndarray]:
    rate, x = wavfile.read(path)
    return rate, np.asarray(x).reshape(-1)


def load_recordings(data: Path) -> list[Recording]:
    recs = []
    for item in sorted((data / "passes" / "close").iterdir()):
        meta = json.loads((item / "meta.json").read_text())
        if meta.get("window_check", {}).get("status") != "ok":
            continue  # samples not from the labelled run
        grids = {}
        for spec in MODS:
            wav = item / f"{spec.name}.wav"
            if wav.is_file():
                _, x = _read(wav)
                rate = meta["modalities"][spec.name]["rate_hz"]
                grids[spec.name] = to_grid(x, rate, spec.rate_hz)
        if grids:
            recs.append(Recording(f"pass:{item.name}", 1, grids))
    names: dict[str, dict[str, Path]] = {}
    for spec in MODS:
        with open(data / "noise" / spec.name / "noise.csv", newline="") as f:
            for row in csv.DictReader(f):
                wav = data / "noise" / spec.name / row["filename"]
                if wav.is_file() and int(row["samples"]) > 0:
                    names.setdefault(row["filename"], {})[spec.name] = wav
    for name, wavs in sorted(names.items()):
        grids = {}
        for spec in MODS:
            if spec.name in wavs:
                rate, x = _read(wavs[spec.name])
                grids[spec.name] = to_grid(x, rate, spec.rate_hz)
        recs.append(Recording(f"noise:{name}", 0, grids))
    return recs


def cut_windows(recs: list[Recording]) -> dict[str, np.ndarray]:
    """Windows of all recordings: arrays acoustic, seismic [n, 1, samples] (zeros where
    absent), has [n, 2], label [n], group [n] (index into recs)."""
    out = {s.name: [] for s in MODS} | {"has": [], "label": [], "group": []}
    for gi, rec in enumerate(recs):
        dur = max(len(g) / s.rate_hz for s in MODS for g in [rec.grids.get(s.name, [])])
        hop = TRAIN_HOP_S["vehicle" if rec.label else "background"]
        for start in np.arange(0.0, dur - 1.0 + 1e-9, hop):
            has = []
            for spec in MODS:
                n = standin.samples(spec)
                lo = int(round(start * spec.rate_hz))
                g = rec.grids.get(spec.name)
                ok = g is not None and lo + n <= len(g)
                out[spec.name].append(g[lo:lo + n] if ok else np.zeros(n, np.float32))
                has.append(ok)
            if any(has):
                out["has"].append(has)
                out["label"].append(rec.label)
                out["group"].append(gi)
    arrays = {s.name: np.stack(out[s.name])[:, None, :] for s in MODS}
    arrays["has"] = np.array(out["has"], np.float32)
    arrays["label"] = np.array(out["label"], np.int64)
    arrays["group"] = np.array(out["group"], np.int64)
    return arrays


def front_features(net: standin.FusionNet, windows: dict[str, np.ndarray]) -> list[torch.Tensor]:
    feats = []
    with torch.no_grad():
        for enc, spec in zip(net.encoders, MODS):
            x = torch.from_numpy(windows[spec.name])
            feats.append(torch.cat([enc.features(x[i:i + 512]) for i in range(0, len(x), 512)]))
    return feats


def train(net: standin.FusionNet, feats: list[torch.Tensor], has: torch.Tensor,
          labels: torch.Tensor, epochs: int, seed: int, params=None) -> None:
    """Adam, class-weighted cross-entropy, modality dropout and random gain (in log space)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(labels, minlength=len(standin.LABELS)).float()
    loss_fn = torch.nn.CrossEntropyLoss(weight=counts.sum() / (len(counts) * counts))
    opt = torch.optim.Adam(params if params is not None else net.parameters(), lr=3e-3,
                           weight_decay=1e-4)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=g)
        for lo in range(0, len(order), 64):
            idx = order[lo:lo + 64]
            mask = has[idx].clone()
            both = mask.sum(1) == 2
            r = torch.rand(len(idx), generator=g)
            mask[both & (r < 0.25), 0] = 0.0           # drop acoustic
            mask[both & (r >= 0.25) & (r < 0.5), 1] = 0.0  # drop seismic
            batch = [f[idx] + 0.7 * torch.randn(len(idx), 1, 1, generator=g) for f in feats]
            loss = loss_fn(net.forward_features(batch, mask), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


def evaluate(net: standin.FusionNet, feats, has, labels) -> dict[str, dict]:
    """Accuracy and balanced accuracy per route, on windows that have the route's data."""
    routes = {"acoustic+seismic": [1.0, 1.0], "acoustic only (masked)": [1.0, 0.0],
              "seismic only (masked)": [0.0, 1.0]}
    res = {}
    with torch.no_grad():
        for name, m in routes.items():
            need = torch.tensor(m) > 0
            sel = (has[:, need] > 0).all(1)
            if sel.sum() == 0:
                continue
            mask = torch.tensor(m).expand(int(sel.sum()), 2)
            pred = net.forward_features([f[sel] for f in feats], mask).argmax(1)
            y = labels[sel]
            recalls = [float((pred[y == k] == k).float().mean())
                       for k in range(2) if (y == k).any()]
            res[name] = {"windows": int(sel.sum()), "accuracy": float((pred == y).float().mean()),
                         "balanced_accuracy": float(np.mean(recalls))}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=BUNDLED_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    t_start = time.time()

    recs = load_recordings(args.data)
    win = cut_windows(recs)
    net = standin.build_av(args.seed)
    feats = front_features(net, win)
    has, labels = torch.from_numpy(win["has"]), torch.from_numpy(win["label"])
    log.info("%d recordings, %d windows (%d vehicle), %.0f s", len(recs), len(labels),
             int(labels.sum()), time.time() - t_start)

    rng = np.random.default_rng(args.seed)
    val_groups = set()
    for label in (0, 1):
        groups = [i for i, r in enumerate(recs) if r.label == label]
        val_groups |= set(rng.permutation(groups)[: max(1, len(groups) // 4)].tolist())
    is_val = torch.from_numpy(np.isin(win["group"], sorted(val_groups)))
    trial = copy.deepcopy(net)
    train(trial, [f[~is_val] for f in feats], has[~is_val], labels[~is_val], args.epochs, args.seed)
    validation = evaluate(trial, [f[is_val] for f in feats], has[is_val], labels[is_val])
    for route, r in validation.items():
        log.info("validation %-24s %s", route, r)

    train(net, feats, has, labels, args.epochs, args.seed)     # final model: all recordings
    contract = standin.av_contract()
    seismic_only = standin.subset_of(net, contract, ("seismic",))
    av_path = export_with_fallbacks(net, contract, args.out / "standin_av.onnx",
                                    {("seismic",): seismic_only})
    seismic_path = args.out / "standin_av.seismic.onnx"
    bench = standin.build_bench_3m(args.seed)
    bench_path = export(bench, standin.bench_contract(), args.out / "bench_3m.onnx")
    summary = {
        "seed": args.seed, "epochs": args.epochs, "params": standin.n_params(net),
        "params_bench_3m": standin.n_params(bench),
        "recordings": {"vehicle": sum(r.label for r in recs),
                       "background": sum(1 - r.label for r in recs)},
        "windows": {"total": len(labels), "vehicle": int(labels.sum())},
        "validation_groups": sorted(recs[i].group for i in val_groups),
        "validation": validation,
        "parity_max_abs": {"standin_av": parity(net, av_path),
                           "standin_av.seismic": parity(seismic_only, seismic_path),
                           "bench_3m": parity(bench, bench_path)},
        "us_per_window_batch64_1thread": {p.name: time_per_window_us(p, 64, 30) for p in
                                          (av_path, seismic_path, bench_path)},
        "bytes": {p.name: p.stat().st_size for p in sorted(args.out.glob("*.onnx"))},
    }
    (args.out / "standin_av.train.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    log.info("done in %.0f s", time.time() - t_start)


if __name__ == "__main__":
    main()
