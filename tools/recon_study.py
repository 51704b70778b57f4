#!/usr/bin/env python
"""Does block reconstruction (--recon) close the gap to float? Float, RepQ-ViT and RepQ-ViT + recon, paired.

    python tools/recon_study.py                                   # bundled Mask R-CNN, W4A4, tuning set
    python tools/recon_study.py --models mask cascade --bits 4 6 --val-seed 90210 --val-images 200

Per bundled detector and bit width: RepQ-ViT calibrates on --calib-images images spread over a synthetic
calibration set (seed --calib-seed); reconstruction then runs on --recon-images images spread over the
same set (a superset of the calibration images when the counts divide). Float, RepQ-ViT and each
reconstruction variant are scored (COCO box / mask AP, fake quant in torch) on --val-images images of a
synthetic set of seed --val-seed. The change recon - RepQ-ViT gets the paired bootstrap over the
validation images (repq_export/evaluation/bootstrap.py: the same resampled images for both runs) and its
95% interval; "gap closed" is the change over the float - RepQ-ViT gap.

A variant is ``NAME:key=value,key=value`` over ReconSettings' fields (e.g. ``lsq:step_lr=0.004``,
``weights:step_lr=0,heads=false``), or, for a NAME starting with ``gptq``, over GptqSettings' (``gptq``,
``gptq2:damp=0.02``: ``--recon gptq``); without --variant the defaults run.

``--ablate PREFIX[:w|:a]`` (repeatable) scores RepQ-ViT with the quantizers under PREFIX switched off
(``:w`` weights only, ``:a`` activations only): how much of the gap to float each part of the model holds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import pickle
import sys
import time
from collections.abc import Callable
from typing import NoReturn
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_common import cpu_model  # noqa: E402  (tools/, the script's own folder)
from repq_export.commands.demo import BUNDLED  # noqa: E402
from repq_export.runtime.build import runner_for  # noqa: E402
from repq_export.data.calibration_choice import spread_indices  # noqa: E402
from repq_export.data.coco import CocoDataset  # noqa: E402
from repq_export.data.images import preprocess_file  # noqa: E402
from repq_export.data.synthetic import make_synthetic_coco  # noqa: E402
from repq_export.evaluation.bootstrap import interval, per_image_matches, resample_weights, weighted_ap  # noqa: E402
from repq_export.evaluation.evaluate import coco_results  # noqa: E402
from repq_export.evaluation.image_loop import DatasetRun, run_dataset  # noqa: E402
from repq_export.models.checkpoint import load_checkpoint  # noqa: E402
from repq_export.quant.calibrate import quantize  # noqa: E402
from repq_export.quant.layers import named_quantizers  # noqa: E402
from repq_export.quant.recon_settings import DEFAULT_IMAGES, GptqSettings, ReconSettings  # noqa: E402
from repq_export.quant.reconstruct import reconstruct  # noqa: E402

MODELS = {"mask": BUNDLED[0], "cascade": BUNDLED[1]}
METRICS = ("bbox", "segm")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=["mask"])
    p.add_argument("--bits", nargs="+", type=int, default=[4], help="W and A bits, e.g. 4 6 (default 4)")
    p.add_argument("--calib-seed", type=int, default=7, help="synthetic seed of the calibration set (default 7)")
    p.add_argument("--calib-set", type=int, default=64, help="images in the calibration set (default 64)")
    p.add_argument("--calib-images", type=int, default=8, help="RepQ-ViT calibration images (default 8)")
    p.add_argument("--recon-images", type=int, default=DEFAULT_IMAGES,
                   help="reconstruction images (default 32)")
    p.add_argument("--val-seed", type=int, default=31337, help="synthetic seed of the scoring set (default 31337)")
    p.add_argument("--val-images", type=int, default=50, help="scoring images (default 50)")
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,... over ReconSettings")
    p.add_argument("--samples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/recon_sets"), help="where the synthetic sets go")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", type=Path, help="also write the Markdown report here")
    p.add_argument("--cache", type=Path, help="keep the float and RepQ-ViT runs here and reuse them (they do not "
                   "depend on the reconstruction: a later run with other variants scores only those)")
    p.add_argument("--baselines-only", action="store_true", help="score float and RepQ-ViT only (fill --cache)")
    p.add_argument("--ablate", action="append", default=[], metavar="PREFIX[:w|:a]",
                   help="also score RepQ-ViT with the quantizers under PREFIX off (weights or activations only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for spec in args.ablate:  # before any model work; the prefix is checked against the model later
        if spec.partition(":")[2] not in ("", "w", "a"):
            p.error(f"--ablate {spec}: the role after ':' is w or a")
    return args


def usage_error(message: str) -> NoReturn:
    """One line on stderr and exit 2, as argparse does for a bad option."""
    print(f"recon_study.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_variant(text: str) -> tuple[str, ReconSettings | GptqSettings, tuple[str, ...]]:
    """``NAME:key=value,...`` -> (NAME, ReconSettings with those fields, unit name prefixes to skip); the key
    ``skip=a|b`` leaves the units whose names start with ``a`` or ``b`` in their RepQ-ViT state. A NAME
    starting with ``gptq`` takes GptqSettings' fields instead (``--recon gptq``; no skip)."""
    name, _, rest = text.partition(":")
    kind = GptqSettings if name.startswith("gptq") else ReconSettings
    fields = {f.name: f.type for f in dataclasses.fields(kind)}
    values, skip = {}, ()
    for item in filter(None, rest.split(",")):
        key, _, raw = item.partition("=")
        if key == "skip":
            skip = tuple(filter(None, raw.split("|")))
            continue
        if key not in fields or key == "method":
            usage_error(f"--variant {text}: no field {key!r}")
        default = getattr(kind(), key)
        values[key] = raw.lower() == "true" if isinstance(default, bool) else type(default)(raw)
    return name, kind(**values), skip


def without_quantizers(model: torch.nn.Module, spec: str) -> tuple[torch.nn.Module, int]:
    """A copy of ``model`` with the quantizers named by ``PREFIX[:w|:a]`` switched off, and how many."""
    prefix, _, role = spec.partition(":")
    if role not in ("", "w", "a"):
        usage_error(f"--ablate {spec}: the role after ':' is w or a")
    model = copy.deepcopy(model)
    count = 0
    for name, q in named_quantizers(model):
        is_weight = name.endswith("weight_quantizer")
        if name.startswith(prefix) and (role == "" or (role == "w") == is_weight):
            q.enabled, count = False, count + 1
    if count == 0:
        usage_error(f"--ablate {spec}: no quantizer name starts with {prefix!r}")
    return model, count


def synthetic(work: Path, seed: int, n: int) -> CocoDataset:
    """A cached synthetic val split of ``n`` images."""
    root = work / f"seed{seed}-{n}"
    ann = root / "annotations" / "instances_val.json"
    if not ann.is_file():
        make_synthetic_coco(root, "val", n, seed)
    return CocoDataset(ann, root / "val")


def run(model: torch.nn.Module, backend: str, dataset: CocoDataset, settings, n: int, progress: bool) -> DatasetRun:
    return run_dataset(runner_for(backend, model), dataset, settings, n, progress=progress)


def cached(path: Path | None, make: Callable[[], DatasetRun]) -> DatasetRun:
    """``make()``, or its earlier result stored at ``path`` (stored there when missing)."""
    if path is not None and path.is_file():
        with path.open("rb") as f:
            return pickle.load(f)
    result = make()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            pickle.dump(result, f)
    return result


def paired(base: DatasetRun, other: DatasetRun, dataset: CocoDataset, weights: np.ndarray) -> dict[str, tuple]:
    """Per metric: (AP base, AP other, delta, low, high) in points; the interval over resampled images."""
    out = {}
    for index, metric in enumerate(METRICS):
        cats = [per_image_matches(dataset.coco, coco_results(r, dataset)[index], metric, base.image_ids)
                for r in (base, other)]
        ones = np.ones(len(base.images))
        a, b = weighted_ap(cats[0], ones), weighted_ap(cats[1], ones)
        diff = np.array([weighted_ap(cats[1], w) - weighted_ap(cats[0], w) for w in weights])
        low, high = interval(diff)
        out[metric] = (100 * a, 100 * b, 100 * (b - a), 100 * low, 100 * high)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = not args.quiet
    variants = [parse_variant(v) for v in args.variant] or [("recon", ReconSettings(), ())]
    calib_set = synthetic(args.work_dir, args.calib_seed, args.calib_set)
    val = synthetic(args.work_dir, args.val_seed, args.val_images)
    n = min(args.val_images, len(val))
    weights = resample_weights(n, args.samples, 0)
    calib_paths = [calib_set[i][1] for i in spread_indices(len(calib_set), args.calib_images)]
    recon_paths = [calib_set[i][1] for i in spread_indices(len(calib_set), args.recon_images)]
    lines = [f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch {args.threads} threads; scored on {n} images of "
             f"synthetic seed {args.val_seed}; RepQ-ViT calibrated on {len(calib_paths)} and reconstruction on "
             f"{len(recon_paths)} images of synthetic seed {args.calib_seed} ({len(calib_set)} images); paired "
             f"bootstrap over the scoring images, {args.samples} resamples, 95% interval", "",
             "| detector | bits | model | box AP | mask AP | box vs RepQ-ViT [95%] | mask vs RepQ-ViT [95%] "
             "| gap closed box / mask | recon s (load) |", "|---|---|---|---|---|---|---|---|---|"]
    for key in args.models:
        name, ckpt, cfg = MODELS[key]
        detector, info = load_checkpoint(ckpt, cfg)
        prep = info.preprocess
        calib = [(p.tensor, p.img_hw_tensor) for p in (preprocess_file(x, prep) for x in calib_paths)]
        recon_inputs = [(p.tensor, p.img_hw_tensor) for p in (preprocess_file(x, prep) for x in recon_paths)]
        key = (f"{name}-val{args.val_seed}x{n}-calib{args.calib_seed}x{len(calib_paths)}of{len(calib_set)}"
               f"-t{args.threads}")
        store = (lambda what: args.cache / f"{key}-{what}.pkl") if args.cache else (lambda what: None)
        float_run = cached(store("float"), lambda: run(detector, "torch", val, prep, n, progress))
        for bits in args.bits:
            repq = quantize(copy.deepcopy(detector), calib, bits, bits, progress=False)
            learned = []  # reconstruct first: a --cache being filled by another run meanwhile is then read
            for label, settings, skip in ([] if args.baselines_only else variants):
                model = copy.deepcopy(repq)
                load0, start = os.getloadavg()[0], time.perf_counter()
                results = reconstruct(model, recon_inputs, settings, progress=progress, log=print,
                                      skip=lambda unit: unit.startswith(skip) if skip else False)
                load = (load0 + os.getloadavg()[0]) / 2
                learned.append((label, model, results, time.perf_counter() - start, load))
            repq_run = cached(store(f"w{bits}a{bits}"), lambda: run(repq, "quant", val, prep, n, progress))
            gap = paired(repq_run, float_run, val, weights)  # float - RepQ-ViT
            cells = [f"{gap[m][1]:.1f}" for m in METRICS]
            lines.append(f"| {name} | W{bits}A{bits} | float | {cells[0]} | {cells[1]} | | | | |")
            lines.append(f"| {name} | W{bits}A{bits} | RepQ-ViT | {gap['bbox'][0]:.1f} | {gap['segm'][0]:.1f} "
                         f"| | | | |")
            print("\n".join(lines[-2:]), flush=True)
            for spec in args.ablate:
                model, count = without_quantizers(repq, spec)
                got = paired(repq_run, run(model, "quant", val, prep, n, progress), val, weights)
                delta = [f"{got[m][2]:+.1f} [{got[m][3]:+.1f}, {got[m][4]:+.1f}]" for m in METRICS]
                lines.append(f"| {name} | W{bits}A{bits} | RepQ-ViT, {count} quantizers of `{spec}` off "
                             f"| {got['bbox'][1]:.1f} | {got['segm'][1]:.1f} | {delta[0]} | {delta[1]} | | |")
                print(lines[-1], flush=True)
            for label, model, results, seconds, load in learned:
                kept = f" ({sum(r.kept_nearest for r in results)}/{len(results)} kept)" if results else ""
                got = paired(repq_run, run(model, "quant", val, prep, n, progress), val, weights)
                delta = [f"{got[m][2]:+.1f} [{got[m][3]:+.1f}, {got[m][4]:+.1f}]" for m in METRICS]
                closed = [f"{100 * got[m][2] / gap[m][2]:.0f}%" if gap[m][2] > 0 else "-" for m in METRICS]
                lines.append(f"| {name} | W{bits}A{bits} | + recon {label}{kept} "
                             f"| {got['bbox'][1]:.1f} | {got['segm'][1]:.1f} | {delta[0]} | {delta[1]} "
                             f"| {closed[0]} / {closed[1]} | {seconds:.0f} ({load:.1f}) |")
                print(lines[-1], flush=True)
    lines.append("")
    if not args.baselines_only:
        lines += [f"variant {label}: {dataclasses.asdict(s)}{f' skipping {list(skip)}' if skip else ''}"
                  for label, s, skip in variants]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
