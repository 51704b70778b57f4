"""The noise floor of parity tiers 2 and 3: how far fake quant moves from itself when the input of
every activation quantizer moves by a few float32 ulps.

Two float implementations of the same network (torch and onnxruntime or TensorRT kernels) differ
by that much before each quantizer (the parity check measures how many ulps); in a 4-bit network the values that sit on a rounding
boundary then flip a code and the flips propagate. A backend whose detections and AP differ from
fake quant by about as much as this floor differs by float rounding, not by its quantization.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..data.coco import CocoDataset
from ..models.build import PreprocessSettings
from ..quant.layers import named_quantizers
from ..runtime.base import Runner
from .evaluate import DatasetRun, ImageResult, run_image, score_run
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


class _Nudge:
    """Forward pre-hook moving a quantizer's input ``ulps`` ulps: all up, all down, or each value up or
    down at random (one seeded generator shared by all hooks of a sample, so a sample is reproducible)."""

    def __init__(self, direction: str, ulps: int = 1, generator: torch.Generator | None = None) -> None:
        self.direction, self.ulps, self.generator = direction, ulps, generator

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if self.direction == "random":
            up = (torch.rand(x.shape, generator=self.generator) < 0.5).to(x.device)
            steps = torch.where(up, self.ulps, -self.ulps)
        else:
            steps = torch.full(x.shape, self.ulps if self.direction == "up" else -self.ulps, device=x.device)
        return (move_ulps(x.float(), steps.long()).to(x.dtype), *args[1:])


def sample_direction(sample: int) -> str:
    """Sample 0 moves every input up, sample 1 down, later samples at random (seed = sample)."""
    return ("up", "down")[sample] if sample < 2 else "random"


@contextmanager
def nudged_activations(model: nn.Module, sample: int = 0, ulps: int = 1) -> Iterator[int]:
    """Inside the block every activation quantizer of ``model`` sees its input ``ulps`` float32 ulps off
    (forward pre-hooks, removed on exit; direction by ``sample_direction``); yields how many quantizers
    are nudged. Weights are left alone."""
    direction = sample_direction(sample)
    generator = torch.Generator().manual_seed(sample) if direction == "random" else None
    nudge = _Nudge(direction, ulps, generator)
    hooks = [q.register_forward_pre_hook(nudge) for name, q in named_quantizers(model)
             if not name.endswith("weight_quantizer")]
    try:
        yield len(hooks)
    finally:
        for hook in hooks:
            hook.remove()


@dataclass
class NoiseFloor:
    """One sample: fake quant against itself nudged, tier-2 matching and the AP deltas (fractions)."""

    sample: int
    ulps: int
    quantizers: int
    detections: DetectionSummary
    bbox_delta: float
    segm_delta: float

    def as_dict(self) -> dict:
        d = self.detections
        return {"sample": self.sample, "direction": sample_direction(self.sample), "ulps": self.ulps,
                "nudged_quantizers": self.quantizers, "match_rate": d.match_rate, "mean_mask_iou": d.mean_mask_iou,
                "max_score_diff": d.max_score_diff, "bbox_mAP_delta": self.bbox_delta, "segm_mAP_delta": self.segm_delta}

    def line(self) -> str:
        return (f"noise floor sample {self.sample} ({sample_direction(self.sample)}, {self.quantizers} activation "
                f"inputs moved by {self.ulps} ulp): {100 * self.detections.match_rate:.1f}% of detections matched, AP delta "
                f"box {100 * self.bbox_delta:+.2f} / mask {100 * self.segm_delta:+.2f} points")


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
        return (f"noise floor over {len(self.samples)} sample(s) of {self.samples[0].ulps} ulp: {min(rates):.1f}-{max(rates):.1f}% matched, "
                f"AP delta box {min(box):+.2f}..{max(box):+.2f} / mask {min(mask):+.2f}..{max(mask):+.2f} points")


def measure_noise_floor(qmodel: nn.Module, ref: Runner, ref_run: DatasetRun, dataset: CocoDataset,
                        settings: PreprocessSettings, samples: int = 1, ulps: int = 1,
                        progress: bool = True) -> NoiseFloorSpread:
    """Rerun the images of ``ref_run`` (``ref`` runs ``qmodel``) once per sample with activations nudged
    by ``ulps`` ulps and compare each rerun with ``ref_run``."""
    ap_ref = score_run(ref_run, dataset)
    floors = []
    for sample in range(samples):
        nudged_run, summary = DatasetRun(f"{ref.name}+{ulps}ulp#{sample}"), DetectionSummary()
        with nudged_activations(qmodel, sample, ulps) as count:
            for image in tqdm(ref_run.images, desc=f"noise floor {sample + 1}/{samples}", unit="img",
                              disable=not progress, leave=False):
                prep, net, dets = run_image(ref, image.path, settings)
                nudged_run.images.append(ImageResult(image.image_id, image.path, prep, net, dets))
                summary.add(match_detections(image.net, net))
        ap = score_run(nudged_run, dataset)
        floors.append(NoiseFloor(sample, ulps, count, summary, ap["bbox_mAP"] - ap_ref["bbox_mAP"],
                                 ap["segm_mAP"] - ap_ref["segm_mAP"]))
    return NoiseFloorSpread(floors)
