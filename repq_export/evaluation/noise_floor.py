"""The noise floor of parity tiers 2 and 3: how far fake quant moves from itself when the input of
every activation quantizer moves by a few float32 ulps.

Two float implementations of the same network (torch and onnxruntime or TensorRT kernels) differ
by that much before each quantizer (the parity check measures how many ulps); in a 4-bit network
the values that sit on a rounding boundary then flip a code and the flips propagate. A backend
whose detections and AP differ from fake quant by about as much as this floor differs by float
rounding, not by its quantization.
"""

from __future__ import annotations

from collections.abc import Iterator
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data.coco import CocoDataset
from ..data.transforms import PreprocessSettings
from ..hooks import hooked
from ..quant.layers import named_quantizers
from ..runtime.base import Runner
from .evaluate import score_run
from .image_loop import DatasetRun, run_dataset
from .parity import DetectionSummary, match_detections


def move_ulps(x: Tensor, steps: Tensor) -> Tensor:
    """``x`` (float32) moved by ``steps`` float32 ulps each (positive = up in value), exactly: on the bit
    pattern, whose magnitude part counts ulps; magnitudes stop at 0 and at the largest finite float."""
    bits = x.contiguous().view(torch.int32)
    negative = bits < 0
    magnitude = (bits & 0x7FFFFFFF).to(torch.int64) + torch.where(negative, -steps, steps)
    crossed = magnitude < 0  # moved through zero: continue on the other side
    magnitude = torch.clamp(magnitude.abs(), 0, 0x7F7FFFFF)
    sign = (negative ^ crossed) & (magnitude > 0)
    moved = (magnitude | (sign.long() << 31)).to(torch.int64)
    return torch.where(moved >= 2**31, moved - 2**32, moved).to(torch.int32).view(torch.float32)


Ulps = float | dict[str, float]  # one step for every quantizer, or a step per quantizer name


def ulp_steps(shape: torch.Size, ulps: float, direction: str, generator: torch.Generator) -> Tensor:
    """Signed whole-ulp steps (int64) averaging ``ulps`` in size: each value moves floor(ulps) ulps, or one
    more with probability frac(ulps); up, down, or (``direction`` 'random') each way with probability 1/2."""
    whole = math.floor(ulps)
    size = torch.full(shape, whole, dtype=torch.int64)
    if ulps > whole:
        size += (torch.rand(shape, generator=generator) < ulps - whole).long()
    if direction == "random":
        return torch.where(torch.rand(shape, generator=generator) < 0.5, size, -size)
    return size if direction == "up" else -size


class _Nudge:
    """Forward pre-hook moving a quantizer's input by ``ulps`` ulps on average (see `ulp_steps`); the
    generator is shared by all hooks of a sample, so a sample is reproducible."""

    def __init__(self, direction: str, ulps: float, generator: torch.Generator) -> None:
        self.direction, self.ulps, self.generator = direction, ulps, generator

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        steps = ulp_steps(x.shape, self.ulps, self.direction, self.generator).to(x.device)
        return (move_ulps(x.float(), steps).to(x.dtype), *args[1:])


def sample_direction(sample: int) -> str:
    """Sample 0 moves every input up, sample 1 down, later samples at random (seed = sample)."""
    return ("up", "down")[sample] if sample < 2 else "random"


def step_of(name: str, ulps: Ulps) -> float:
    """The step of quantizer ``name``: ``ulps`` itself, its entry, or (not measured) the entries' mean."""
    if not isinstance(ulps, dict):
        return float(ulps)
    return ulps.get(name, sum(ulps.values()) / len(ulps) if ulps else 1.0)


@contextmanager
def nudged_activations(model: nn.Module, sample: int = 0, ulps: Ulps = 1.0) -> Iterator[list[float]]:
    """Inside the block every activation quantizer of ``model`` sees its input moved by its step of
    ``ulps`` float32 ulps (forward pre-hooks, removed on exit; direction by ``sample_direction``);
    yields the step of each nudged quantizer. Weights are left alone."""
    generator = torch.Generator().manual_seed(sample)
    steps, nudges = [], []
    for name, q in named_quantizers(model):
        if not name.endswith("weight_quantizer"):
            steps.append(step_of(name, ulps))
            nudges.append((q, _Nudge(sample_direction(sample), steps[-1], generator)))
    with hooked(nudges, pre=True):
        yield steps


@dataclass
class NoiseFloor:
    """One sample: fake quant against itself nudged, tier-2 matching and the AP deltas (fractions)."""

    sample: int
    ulps: float  # mean step over the nudged quantizers
    per_quantizer: bool  # steps measured per quantizer (--noise-ulps auto) rather than one for all
    quantizers: int
    detections: DetectionSummary
    bbox_delta: float
    segm_delta: float

    def as_dict(self) -> dict:
        d = self.detections
        return {"sample": self.sample, "direction": sample_direction(self.sample), "ulps": self.ulps,
                "per_quantizer": self.per_quantizer, "nudged_quantizers": self.quantizers,
                "match_rate": d.match_rate, "mean_mask_iou": d.mean_mask_iou, "max_score_diff": d.max_score_diff,
                "bbox_mAP_delta": self.bbox_delta, "segm_mAP_delta": self.segm_delta}

    def line(self) -> str:
        how = " on average, per quantizer as measured" if self.per_quantizer else ""
        return (f"noise floor sample {self.sample} ({sample_direction(self.sample)}, {self.quantizers} activation "
                f"inputs moved by {self.ulps:.2f} ulp{how}): {100 * self.detections.match_rate:.1f}% of detections "
                f"matched, AP delta box {100 * self.bbox_delta:+.2f} / mask {100 * self.segm_delta:+.2f} points")


@dataclass
class NoiseFloorSpread:
    """All samples of the floor, and whether a backend's tier-2/3 figures lie inside their range."""

    samples: list[NoiseFloor]

    def lowest_match_rate(self) -> float:
        return min(s.detections.match_rate for s in self.samples)

    def largest_delta(self, metric: str) -> float:
        """The largest |AP delta| of any sample, ``metric`` 'bbox' or 'segm' (a fraction)."""
        return max(abs(s.bbox_delta if metric == "bbox" else s.segm_delta) for s in self.samples)

    def contains(self, match_rate: float, bbox_delta: float, segm_delta: float, min_match_rate: float = 1.0,
                 ap_tolerance: float = 0.0) -> bool:
        """Whether a backend matches at least as many detections as the worst sample (or the tier-2 tolerance)
        and moves each AP by no more than the largest sample did (or the tier-3 tolerance): then its
        differences are no larger than float rounding makes them."""
        return (match_rate >= min(self.lowest_match_rate(), min_match_rate)
                and abs(bbox_delta) <= max(self.largest_delta("bbox"), ap_tolerance)
                and abs(segm_delta) <= max(self.largest_delta("segm"), ap_tolerance))

    def as_dict(self) -> dict:
        return {"samples": [s.as_dict() for s in self.samples], "lowest_match_rate": self.lowest_match_rate(),
                "largest_bbox_mAP_delta": self.largest_delta("bbox"),
                "largest_segm_mAP_delta": self.largest_delta("segm")}

    def summary(self) -> str:
        rates = [100 * s.detections.match_rate for s in self.samples]
        box = [100 * s.bbox_delta for s in self.samples]
        mask = [100 * s.segm_delta for s in self.samples]
        return (f"noise floor over {len(self.samples)} sample(s) of {self.samples[0].ulps:.2f} ulp: "
                f"{min(rates):.1f}-{max(rates):.1f}% matched, AP delta box {min(box):+.2f}..{max(box):+.2f} / "
                f"mask {min(mask):+.2f}..{max(mask):+.2f} points")


def measure_noise_floor(qmodel: nn.Module, ref: Runner, ref_run: DatasetRun, dataset: CocoDataset,
                        settings: PreprocessSettings, samples: int = 1, ulps: Ulps = 1.0,
                        progress: bool = True) -> NoiseFloorSpread:
    """Rerun the images of ``ref_run`` (the first images of ``dataset``; ``ref`` runs ``qmodel``) once per
    sample with activations nudged by ``ulps`` ulps (one step, or one per quantizer name) and compare each
    rerun with ``ref_run``."""
    ap_ref = score_run(ref_run, dataset)
    floors = []
    for sample in range(samples):
        with nudged_activations(qmodel, sample, ulps) as steps:
            nudged_run = run_dataset(ref, dataset, settings, len(ref_run.images), progress=progress,
                                     desc=f"noise floor {sample + 1}/{samples}")
        if nudged_run.image_ids != ref_run.image_ids:
            raise ValueError("ref_run is not a run over the first images of dataset")
        summary = DetectionSummary()
        for image, nudged in zip(ref_run.images, nudged_run.images):
            summary.add(match_detections(image.net, nudged.net))
        ap = score_run(nudged_run, dataset)
        floors.append(NoiseFloor(sample, sum(steps) / len(steps), isinstance(ulps, dict), len(steps), summary,
                                 ap["bbox_mAP"] - ap_ref["bbox_mAP"], ap["segm_mAP"] - ap_ref["segm_mAP"]))
    return NoiseFloorSpread(floors)
