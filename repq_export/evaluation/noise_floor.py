"""The noise floor of parity tiers 2 and 3: how far fake quant moves from itself when the input of
every activation quantizer moves by one float32 ulp.

Two float implementations of the same network (torch and onnxruntime or TensorRT kernels) differ
by about that much before each quantizer; in a 4-bit network the values that sit on a rounding
boundary then flip a code and the flips propagate. A backend whose detections and AP differ from
fake quant by about as much as this floor differs by float rounding, not by its quantization.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..data.coco import CocoDataset
from ..models.build import PreprocessSettings
from ..quant.layers import named_quantizers
from ..runtime.base import Runner
from .evaluate import DatasetRun, ImageResult, run_image, score_run
from .parity import DetectionSummary, match_detections


def _nudge(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (torch.nextafter(x, torch.full_like(x, math.inf)), *args[1:])


@contextmanager
def nudged_activations(model: nn.Module) -> Iterator[int]:
    """Inside the block every activation quantizer of ``model`` sees its input one ulp up (forward
    pre-hooks, removed on exit); yields how many quantizers are nudged. Weights are left alone."""
    hooks = [q.register_forward_pre_hook(_nudge) for name, q in named_quantizers(model)
             if not name.endswith("weight_quantizer")]
    try:
        yield len(hooks)
    finally:
        for hook in hooks:
            hook.remove()


@dataclass
class NoiseFloor:
    """Fake quant against itself nudged: tier-2 matching and the AP deltas (fractions)."""

    quantizers: int
    detections: DetectionSummary
    bbox_delta: float
    segm_delta: float

    def as_dict(self) -> dict:
        d = self.detections
        return {"nudged_quantizers": self.quantizers, "match_rate": d.match_rate, "mean_mask_iou": d.mean_mask_iou,
                "max_score_diff": d.max_score_diff, "bbox_mAP_delta": self.bbox_delta, "segm_mAP_delta": self.segm_delta}

    def line(self) -> str:
        return (f"noise floor (fake quant against itself, {self.quantizers} activation inputs moved by 1 ulp): "
                f"{100 * self.detections.match_rate:.1f}% of detections matched, AP delta box "
                f"{100 * self.bbox_delta:+.2f} / mask {100 * self.segm_delta:+.2f} points")


def measure_noise_floor(qmodel: nn.Module, ref: Runner, ref_run: DatasetRun, dataset: CocoDataset,
                        settings: PreprocessSettings, progress: bool = True) -> NoiseFloor:
    """Rerun the images of ``ref_run`` (``ref`` runs ``qmodel``) with nudged activations and compare."""
    nudged_run, summary = DatasetRun(f"{ref.name}+1ulp"), DetectionSummary()
    with nudged_activations(qmodel) as count:
        for image in tqdm(ref_run.images, desc="noise floor", unit="img", disable=not progress, leave=False):
            prep, net, dets = run_image(ref, image.path, settings)
            nudged_run.images.append(ImageResult(image.image_id, image.path, prep, net, dets))
            summary.add(match_detections(image.net, net))
    ap_ref, ap = score_run(ref_run, dataset), score_run(nudged_run, dataset)
    return NoiseFloor(count, summary, ap["bbox_mAP"] - ap_ref["bbox_mAP"], ap["segm_mAP"] - ap_ref["segm_mAP"])
