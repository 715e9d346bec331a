"""Does `edgefuse replay` of a held-out pass agree with `edgefuse evaluate` on the
same windows?

`evaluate` scores windows cut by models.dataset (the runtime's Aligner over the
pass read by the same goodvibes reader, 0.25 s chunks) through the runtime's
Fuser; `replay --chunk-s 0.25` reads the same pass folder and runs the whole
pipeline. One reader, one chunking, one aligner: the windows are identical
(tests/test_training_equals_serving.py), so the labels and scores must agree
for every window they share.

    python examples/replay_vs_evaluate.py [DATA] [--pass full/2H.22.129] [--model M]

Default: pass 2H.22.129 (bprf 2023-04-11, node 129), a held-out day-site of
the bundled gv_detect model.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgefuse.models.dataset import load_or_build
from edgefuse.models.route_calibration import windows as _windows
from edgefuse.runtime.core.fusion import Fuser
from edgefuse.runtime.core.inference import OnnxModel

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--pass", dest="pass_", default="full/2H.22.129")
    ap.add_argument("--model", default=str(REPO / "models" / "bundled" / "gv_detect.onnx"))
    args = ap.parse_args(argv)
    folder = Path(args.data) / "goodvibes" / "passes" / args.pass_
    meta = json.loads((folder / "meta.json").read_text())

    # evaluate's side: the labelled windows of this pass, all modalities present
    ws = load_or_build(args.data)
    group = f"{meta['location']}:{meta['date']}:pass:{meta['target_id']}.{meta['run']}"
    idx = np.flatnonzero((ws.meta["group"] == group) & (ws.meta["node"] == str(meta["node"])))
    model = OnnxModel.load(args.model)
    present = ws.mask[idx] > 0
    evaluated = Fuser(model).decide(_windows(ws, idx, present))
    by_start = {int(ws.num["start_ns"][i]): d for i, d in zip(idx, evaluated)}

    # replay's side: the CLI on the pass folder
    out = subprocess.run([sys.executable, "-m", "edgefuse.runtime.cli", "replay", str(folder),
                          "--model", args.model, "--chunk-s", "0.25", "-q"],
                         capture_output=True, text=True,
                         check=True).stdout
    replayed = {d["window_start_ns"]: d for d in map(json.loads, out.splitlines())}

    shared = sorted(set(by_start) & set(replayed))
    same_label = sum(by_start[s].label == replayed[s]["label"] for s in shared)
    diffs = [max(abs(by_start[s].scores[k] - replayed[s]["scores"][k]) for k in replayed[s]["scores"])
             for s in shared]
    routes = {(by_start[s].fallback, replayed[s]["fallback"]) for s in shared}
    print(f"pass {args.pass_} ({group}, node {meta['node']}), model {model.contract.ident}")
    print(f"windows: evaluate {len(by_start)}, replay {len(replayed)}, shared {len(shared)}")
    print(f"same label: {same_label}/{len(shared)}; routes (evaluate, replay): {sorted(routes)}")
    print(f"max |score difference|: {max(diffs):.2e}; median {float(np.median(diffs)):.2e}")
    return 0 if shared and same_label == len(shared) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
