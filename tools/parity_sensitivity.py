#!/usr/bin/env python
"""How sensitive the float64 parity verdict is: graded breakages of an exported graph judged on the first
N images, and how many images a given AP tolerance needs.

    python tools/parity_sensitivity.py ARTIFACT --ann FILE --img-dir DIR --max-images 50 [--out FILE.md]

Every breakage leaves the quantizers intact (tier 1 passes it): LayerNorm epsilon, float16 rounding
(Cast pairs) after some LayerNorms / Softmaxes, the RoiAlign coordinate mode (`graph_breakages.py`).
Images needed: the 95% interval of a paired AP delta (a run against float64 on the same images) narrows
as 1/sqrt(images), so its half-width h at N images resolves a delta D with N * (h / D)^2 images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repq_export.data.coco import CocoDataset  # noqa: E402
from repq_export.evaluation import graph_breakages as gb  # noqa: E402
from repq_export.evaluation.bootstrap import interval, per_image_matches, resample_weights, weighted_ap  # noqa: E402
from repq_export.evaluation.envelope import Float64Reference, judge_envelope  # noqa: E402
from repq_export.evaluation.evaluate import coco_results  # noqa: E402
from repq_export.evaluation.image_loop import DatasetRun, run_dataset  # noqa: E402
from repq_export.artifact.artifact_file import Artifact  # noqa: E402
from repq_export.artifact.detector import fake_quant_model  # noqa: E402
from repq_export.runtime.ort_runner import OrtRunner  # noqa: E402
from repq_export.runtime.torch_runner import TorchRunner  # noqa: E402

BREAKAGES = {  # name: graph edit, weaker to stronger within a kind
    "LayerNorm epsilon 1e-4": lambda p: gb.with_layernorm_epsilon(p, 1e-4),
    "LayerNorm epsilon 1e-3": lambda p: gb.with_layernorm_epsilon(p, 1e-3),
    "LayerNorm epsilon 1e-2": lambda p: gb.with_layernorm_epsilon(p, 1e-2),
    "float16 after every 4th LayerNorm/Softmax": lambda p: gb.with_float16_outputs(p, every=4),
    "float16 after every Softmax": lambda p: gb.with_float16_outputs(p, ("Softmax",)),
    "float16 after every LayerNorm": lambda p: gb.with_float16_outputs(p, ("LayerNormalization",)),
    "float16 after every LayerNorm and Softmax": lambda p: gb.with_float16_outputs(p),
    "RoiAlign output_half_pixel": lambda p: gb.with_roi_align_mode(p, "output_half_pixel"),
}


def images_needed(ideal: DatasetRun, run: DatasetRun, dataset: CocoDataset, deltas: tuple[float, ...],
                  samples: int = 1000) -> dict[str, list[int]]:
    """Per metric: images that resolve each AP delta (points) at 95%, from the paired delta's interval."""
    n = len(ideal.images)
    weights = resample_weights(n, samples, 1)
    out = {}
    for index, metric in enumerate(("bbox", "segm")):
        cats = [per_image_matches(dataset.coco, coco_results(r, dataset)[index], metric, ideal.image_ids)
                for r in (ideal, run)]
        diff = np.array([weighted_ap(cats[1], w) - weighted_ap(cats[0], w) for w in weights])
        low, high = interval(diff)
        half = 100 * (high - low) / 2
        out[metric] = [int(np.ceil(n * (half / d) ** 2)) for d in deltas] + [half]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--ann", type=Path, required=True)
    p.add_argument("--img-dir", type=Path, required=True)
    p.add_argument("--max-images", type=int, default=50)
    p.add_argument("--only", nargs="*", help="breakage names to run (default all)")
    p.add_argument("--out", type=Path, help="also write the Markdown tables here")
    args = p.parse_args()
    start = time.time()
    artifact = Artifact.open(args.artifact)
    qmodel, settings = fake_quant_model(artifact), artifact.preprocess
    dataset = CocoDataset(args.ann, args.img_dir)
    n = min(args.max_images, len(dataset))
    ideal = run_dataset(Float64Reference(qmodel), dataset, settings, n, progress=False)
    torch32 = run_dataset(TorchRunner(qmodel, name="quant"), dataset, settings, n, progress=False)
    proto = onnx.load(args.artifact / "model.onnx")
    lines = [f"Breakages judged on {n} images of {args.ann} ({args.artifact}); excess = backend's distance to "
             "float64 minus torch float32's, [95% interval], points; FAIL when the lower end is above the margin.",
             "", "| graph | matched (torch float32) | excess [95%] | box dAP (torch) | excess [95%] | mask dAP (torch) "
             "| excess [95%] | verdict |", "|---|---|---|---|---|---|---|---|"]
    runs = {}
    for name, edit in [("honest (as exported)", lambda p: p), *BREAKAGES.items()]:
        if args.only and name not in args.only and not name.startswith("honest"):
            continue
        path = args.artifact / "sensitivity.onnx"
        onnx.save(edit(proto), path)
        runs[name] = run = run_dataset(OrtRunner(path), dataset, settings, n, progress=False)
        env = judge_envelope(ideal, torch32, run, dataset)
        cells = []
        for f in env.figures:
            scale = 100
            value = f"{scale * f.backend:.1f}% ({scale * f.reference:.1f}%)" if f.name == "matched" else \
                f"{scale * f.backend:+.2f} ({scale * f.reference:+.2f})"
            cells += [value, f"{scale * f.excess:+.2f} [{scale * f.low:+.2f}, {scale * f.high:+.2f}]"
                      + ("" if f.ok else " FAIL")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'PASS' if env.ok else 'FAIL'} |")
        print(lines[-1], flush=True)
        path.unlink()
    deltas = (0.1, 0.3)
    lines += ["", f"Images needed to resolve an AP delta at 95% (paired against float64; half-width at {n} "
              "images, scaled as 1/sqrt(images)):", "",
              "| run against float64 | metric | 95% half-width here (points) | images for 0.1 | images for 0.3 |",
              "|---|---|---|---|---|"]
    for label, run in (("torch float32 fake quant", torch32), ("onnxruntime", runs["honest (as exported)"])):
        for metric, (*need, half) in images_needed(ideal, run, dataset, deltas).items():
            lines.append(f"| {label} | {metric} | {half:.2f} | {need[0]} | {need[1]} |")
    lines.append(f"\n{time.time() - start:.0f} s")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
