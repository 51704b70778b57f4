#!/usr/bin/env python
"""Which quantizers make a calibration set damaging: swap one part's calibrated state at a time.

    python tools/diagnose_calibration.py                       # bundled Mask R-CNN, W8A8
    python tools/diagnose_calibration.py --bits 6 --holdout 30

Two calibrations of the same detector: BAD, on one image (by default the first image of synthetic
seed 4343: 243x254 pixels, two objects), and GOOD, on --good-images images spread evenly across a
synthetic set of another seed. Both are scored (COCO box/mask AP) on --holdout fresh images of a
third seed, with float for scale. Then, for each part of the detector (backbone, its log-sqrt2
softmax quantizers alone, neck, RPN head, RoI box head, RoI mask head), the whole state of that
part (quantizer buffers and the weights calibration touched: reparameterized LayerNorm/linear pairs,
biases snapped to the int32 grid) is copied from one calibration into the other and the hybrid is
scored again:

    BAD + part from GOOD   how much of the loss that part's calibration explains (repair)
    GOOD + part from BAD   how much damage that part alone does (harm)

A third table compares every activation quantizer's scale between the two calibrations
(|log2(scale_bad / scale_good)|, by part): where the one image gave different steps.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from repq_export.commands.demo import BUNDLED  # noqa: E402
from repq_export.runtime.build import runner_for  # noqa: E402
from repq_export.data.coco import CocoDataset  # noqa: E402
from repq_export.data.images import preprocess_file  # noqa: E402
from repq_export.data.synthetic import make_synthetic_coco  # noqa: E402
from repq_export.evaluation.evaluate import score_run  # noqa: E402
from repq_export.evaluation.image_loop import run_dataset  # noqa: E402
from repq_export.data.calibration_choice import spread_indices  # noqa: E402
from repq_export.models.checkpoint import load_checkpoint  # noqa: E402
from repq_export.quant.calibrate import quantize  # noqa: E402
from repq_export.quant.kinds import LOG_SQRT2, kind_of  # noqa: E402
from repq_export.quant.layers import named_quantizers  # noqa: E402

# part name -> predicate on a state-dict key / module name
PARTS = {
    "backbone": lambda k: k.startswith("backbone."),
    "backbone softmax (log-sqrt2) only": None,  # filled from the model: the LOG_SQRT2 quantizers' buffers
    "neck (FPN)": lambda k: k.startswith("neck."),
    "rpn head": lambda k: k.startswith("rpn_head."),
    "roi box head": lambda k: k.startswith("roi_head.") and "mask" not in k,
    "roi mask head": lambda k: k.startswith("roi_head.") and "mask" in k,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[b[0] for b in BUNDLED], default=BUNDLED[0][0], help="bundled detector")
    p.add_argument("--bits", type=int, default=8, help="weight and activation bits (default 8)")
    p.add_argument("--bad-seed", type=int, default=4343, help="synthetic seed whose first image is BAD's calibration")
    p.add_argument("--good-seed", type=int, default=11, help="synthetic seed of GOOD's calibration set")
    p.add_argument("--good-images", type=int, default=8, help="GOOD's images, spread over a 40-image set (default 8)")
    p.add_argument("--holdout-seed", type=int, default=12, help="synthetic seed of the scoring images")
    p.add_argument("--holdout", type=int, default=30, help="scoring images (default 30)")
    p.add_argument("--work-dir", type=Path, help="where the synthetic sets go (default: a temporary folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def synthetic(work: Path, seed: int, n: int) -> CocoDataset:
    """A cached synthetic val split of `n` images."""
    root = work / f"seed{seed}-{n}"
    ann = root / "annotations" / "instances_val.json"
    if not ann.is_file():
        make_synthetic_coco(root, "val", n, seed)
    return CocoDataset(ann, root / "val")


def calibrate_on(detector: torch.nn.Module, paths: list[Path], settings, bits: int, progress: bool) -> torch.nn.Module:
    """A calibrated fake-quant copy of `detector`."""
    preps = [preprocess_file(p, settings) for p in paths]
    return quantize(copy.deepcopy(detector), [(p.tensor, p.img_hw_tensor) for p in preps], bits, bits,
                    progress=progress)


def score(model: torch.nn.Module, backend: str, dataset: CocoDataset, settings, n: int, progress: bool) -> tuple[float, float]:
    """(box AP, mask AP) x 100 on the first `n` images."""
    ap = score_run(run_dataset(runner_for(backend, model), dataset, settings, n, progress=progress), dataset)
    return 100 * ap["bbox_mAP"], 100 * ap["segm_mAP"]


def hybrid(base: torch.nn.Module, donor: torch.nn.Module, keys: set[str]) -> torch.nn.Module:
    """A copy of `base` with the state-dict entries `keys` taken from `donor`."""
    model = copy.deepcopy(base)
    state = model.state_dict()
    donor_state = donor.state_dict()
    for k in keys:
        state[k] = donor_state[k].clone()
    model.load_state_dict(state)
    return model


def part_keys(model: torch.nn.Module) -> dict[str, set[str]]:
    """The state-dict keys of every part in PARTS."""
    keys = list(model.state_dict())
    softmax = {name for name, q in named_quantizers(model) if kind_of(q) == LOG_SQRT2}
    out = {}
    for part, pred in PARTS.items():
        if pred is None:
            out[part] = {k for k in keys if k.rsplit(".", 1)[0] in softmax}
        else:
            out[part] = {k for k in keys if pred(k)}
    return out


def part_of(name: str) -> str:
    """The PARTS name of a quantizer (the softmax ones counted with the backbone)."""
    for part, pred in PARTS.items():
        if pred is not None and pred(name + ".scale") and part != "backbone":
            return part
    return "backbone"


def scale_table(bad: torch.nn.Module, good: torch.nn.Module) -> list[list]:
    """Per part and quantizer role: activation quantizers' |log2(scale ratio)|, median and max, and the worst."""
    good_q = dict(named_quantizers(good))
    groups: dict[str, list[tuple[float, str]]] = {}
    for name, q in named_quantizers(bad):
        if name.endswith("weight_quantizer"):
            continue
        ratio = (q.scale.float() / good_q[name].scale.float()).abs().log2().abs()
        role = "softmax" if kind_of(q) == LOG_SQRT2 else "activation"
        key = f"{part_of(name)} / {role}"
        groups.setdefault(key, []).append((float(ratio.max()), name))
    rows = []
    for key, vals in groups.items():
        r = np.array([v for v, _ in vals])
        worst = max(vals)
        rows.append([key, len(vals), f"{np.median(r):.2f}", f"{r.max():.2f}", worst[1]])
    return rows


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    progress = not args.quiet
    _, ckpt, cfg = next(b for b in BUNDLED if b[0] == args.model)
    detector, info = load_checkpoint(ckpt, cfg)
    settings = info.preprocess
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        bad_set = synthetic(work, args.bad_seed, 1)
        good_set = synthetic(work, args.good_seed, 40)
        hold = synthetic(work, args.holdout_seed, args.holdout)
        bad_paths = [bad_set[0][1]]
        good_paths = [good_set[i][1] for i in spread_indices(len(good_set), args.good_images)]
        bad = calibrate_on(detector, bad_paths, settings, args.bits, progress)
        good = calibrate_on(detector, good_paths, settings, args.bits, progress)
        base = [["float", *score(detector, "torch", hold, settings, args.holdout, progress)],
                [f"BAD: 1 image (seed {args.bad_seed} #0)", *score(bad, "quant", hold, settings, args.holdout, progress)],
                [f"GOOD: {args.good_images} images (seed {args.good_seed})",
                 *score(good, "quant", hold, settings, args.holdout, progress)]]
        keys = part_keys(bad)
        swaps = []
        for part, ks in keys.items():
            repair = score(hybrid(bad, good, ks), "quant", hold, settings, args.holdout, progress)
            harm = score(hybrid(good, bad, ks), "quant", hold, settings, args.holdout, progress)
            swaps.append([part, len(ks), *(f"{v:.1f}" for v in repair), *(f"{v:.1f}" for v in harm)])
            print(f"  {part}: repair {repair[0]:.1f}/{repair[1]:.1f}, harm {harm[0]:.1f}/{harm[1]:.1f}", flush=True)
    bits = f"W{args.bits}A{args.bits}"
    print(f"\n{args.model}, {bits}, scored on {args.holdout} images of synthetic seed {args.holdout_seed}\n")
    print(table(["model", "box AP", "mask AP"], [[r[0], f"{r[1]:.1f}", f"{r[2]:.1f}"] for r in base]))
    print()
    print(table(["part swapped", "state entries", "BAD + part from GOOD: box", "mask", "GOOD + part from BAD: box",
                 "mask"], swaps))
    print()
    print(table(["part / role", "quantizers", "median |log2 ratio|", "max", "largest in"], scale_table(bad, good)))
    print(f"\n{time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
