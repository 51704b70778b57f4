"""Float against fake quant right after calibration: does the quantized model still detect what float does?

Parity proves that a deployed graph computes what fake quant computes; it says nothing about
whether fake quant is any good. A calibration set that misfits the data (one small image with two
objects gave the bundled Mask R-CNN a W8A8 model 25 box AP worse than float) exports and passes
parity exactly. This check compares the quantized model with the float model it came from, on the
calibration images and on held-out images of the same set, and judges the loss against a bound:

- matched share: each model's confident detections (score >= SCORE_FLOOR) matched one to one with all
  of the other model's detections (same label, box IoU >= 0.5, the parity tier-2 matching), both
  directions pooled: the share of confident detections the other model also makes. A box scoring
  0.32 in one model and 0.28 in the other is thus no miss; a box one model lost or moved is;
- box and mask AP of both against the annotations, where the images have some (a COCO file).

The verdict is taken over all check images together (calibration and held-out): a calibration fits
its own images best, so held-out images are what reveal a misfit, and one image alone gives an AP
too noisy to judge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..data.coco import CocoDataset
from ..data.coco_results import to_coco_results
from ..data.postprocess import Detections
from ..data.transforms import Preprocessed
from ..boundary import NetOutput
from ..runtime.torch_runner import TorchRunner
from .coco_eval import evaluate_coco
from .image_loop import run_prepared
from .parity import match_detections

SCORE_FLOOR = 0.3  # detections below it are compared by AP only: near the test threshold (0.05) float and
# quantized models keep or drop low-confidence boxes at random, which is no sign of a broken calibration

# The bound, two figures, each on all check images together; either one broken fails:
# - AP loss. RepQ-ViT's own largest published loss is W4A4 Mask R-CNN Swin-T on COCO, -9.9 box / -5.6 mask
#   AP; at W6A6 it loses about one point. A loss clearly beyond what the method costs at the precision
#   is a calibration that misfits the data, not quantization: 10 points at 4 bits and fewer, 5 points
#   from 5 bits on (room for the noise of a dozen images: the bundled Mask R-CNN's W4A4 is -4.8 box AP
#   on the demo's 40 images and -6.3 on 9 of them).
# - matched share (judged also where there are no annotations). Measured on the bundled Mask R-CNN,
#   calibration image + 8 held-out ones (tools/diagnose_calibration.py, README): W4A4 calibrated as the
#   demo keeps 96.6% of confident detections matched (box AP -6.3); W8A8 calibrated on one small image
#   keeps 85.2% (box AP -27.4). At 8 bits quantization alone loses almost no detection, so 90% from 5
#   bits on; 80% at 4 bits and fewer.
MIN_MATCHED = {4: 0.80, 8: 0.90}  # matched share below this fails (4: at 4 bits and fewer; 8: at 5 to 8)
MAX_AP_LOSS = {4: 0.10, 8: 0.05}  # box or mask AP lower than float's by more than this fails (fraction)


def bound_for(bits: int) -> tuple[float, float]:
    """(minimum matched share, largest AP loss) at ``bits`` (the lower of W and A): 5 bits and more are held
    to the tighter bound, 4 and fewer to the looser one."""
    key = 8 if bits >= 5 else 4
    return MIN_MATCHED[key], MAX_AP_LOSS[key]


@dataclass
class ImagePair:
    """One check image: its float and fake-quant outputs, and its COCO id where annotations exist."""

    name: str
    float_net: NetOutput
    quant_net: NetOutput
    float_dets: Detections | None = None
    quant_dets: Detections | None = None
    image_id: int | None = None


@dataclass
class SetFigures:
    """The figures of one set of check images ('calibration', 'held-out' or 'all')."""

    name: str
    images: int
    float_detections: int  # float's confident detections
    float_found: int  # of those, matched by a fake-quant detection
    quant_detections: int  # fake quant's confident detections
    quant_found: int  # of those, matched by a float detection
    matched_share: float  # (float_found + quant_found) / (float_detections + quant_detections)
    box_ap_float: float | None = None  # fractions; None without annotations
    box_ap_quant: float | None = None
    mask_ap_float: float | None = None
    mask_ap_quant: float | None = None

    @property
    def box_delta(self) -> float | None:
        return None if self.box_ap_float is None else self.box_ap_quant - self.box_ap_float

    @property
    def mask_delta(self) -> float | None:
        return None if self.mask_ap_float is None else self.mask_ap_quant - self.mask_ap_float

    def as_dict(self) -> dict:
        return {**asdict(self), "box_ap_delta": self.box_delta, "mask_ap_delta": self.mask_delta}


@dataclass
class CalibrationCheck:
    """The check's figures per set, the bound and the verdict over all check images."""

    bits: int  # the lower of weight and activation bits
    sets: list[SetFigures]
    min_matched: float
    max_ap_loss: float
    images: dict[str, list[str]] = field(default_factory=dict)  # set name -> image names

    @property
    def judged(self) -> SetFigures:
        """The figures the verdict is taken on: all check images together."""
        return self.sets[-1]

    @property
    def failures(self) -> list[str]:
        """Each broken bound, with its figure."""
        s, out = self.judged, []
        if s.matched_share < self.min_matched:
            out.append(f"matched {100 * s.matched_share:.1f}% < {100 * self.min_matched:.0f}%")
        for label, delta in (("box", s.box_delta), ("mask", s.mask_delta)):
            if delta is not None and delta < -self.max_ap_loss:
                out.append(f"{label} AP {100 * delta:+.1f} < -{100 * self.max_ap_loss:.0f} points")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def verdict(self) -> str:
        return "PASS" if self.ok else "FAIL"

    def summary(self) -> str:
        """One line: verdict, the judged figures, and what failed."""
        s = self.judged
        parts = [f"{self.verdict()} on {s.images} image(s): matched {100 * s.matched_share:.1f}%"]
        if s.box_delta is not None:
            parts.append(f"box AP {100 * s.box_delta:+.1f}, mask AP {100 * s.mask_delta:+.1f} vs float")
        else:
            parts.append("no AP (no annotations)")
        if not self.ok:
            parts.append("over the bound: " + ", ".join(self.failures))
        return "; ".join(parts)

    def as_dict(self) -> dict:
        """The repq.json ``calibration_check`` block."""
        return {"verdict": self.verdict(), "judged_on": self.judged.name, "score_floor": SCORE_FLOOR,
                "held_out_images": len(self.images.get("held-out", [])),
                "bound": {"min_matched_share": self.min_matched, "max_ap_loss": self.max_ap_loss,
                          "bits": self.bits},
                "failures": self.failures, "images": self.images,
                "sets": {s.name: s.as_dict() for s in self.sets}}


def confident(net: NetOutput) -> NetOutput:
    """The detections scoring at least SCORE_FLOOR."""
    keep = net.scores >= SCORE_FLOOR
    return NetOutput(net.boxes[keep], net.scores[keep], net.labels[keep], net.masks[keep])


def set_figures(name: str, pairs: list[ImagePair], dataset: CocoDataset | None) -> SetFigures:
    """Matched share (and AP where ``dataset`` annotates every image) of one set of check images."""
    found_by_quant = [match_detections(confident(p.float_net), p.quant_net) for p in pairs]
    found_by_float = [match_detections(confident(p.quant_net), p.float_net) for p in pairs]
    n_float, f_found = sum(m.ref for m in found_by_quant), sum(m.matched for m in found_by_quant)
    n_quant, q_found = sum(m.ref for m in found_by_float), sum(m.matched for m in found_by_float)
    total = n_float + n_quant
    figures = SetFigures(name, len(pairs), n_float, f_found, n_quant, q_found,
                         1.0 if total == 0 else (f_found + q_found) / total)
    if dataset is not None and pairs and all(p.image_id is not None and p.float_dets is not None for p in pairs):
        ids = [p.image_id for p in pairs]
        for side in ("float", "quant"):
            bbox, segm = [], []
            for p in pairs:
                b, s = to_coco_results(getattr(p, f"{side}_dets"), p.image_id, dataset.cat_ids)
                bbox += b
                segm += s
            ap = evaluate_coco(dataset.coco, bbox, segm, img_ids=ids)
            setattr(figures, f"box_ap_{side}", ap["bbox_mAP"])
            setattr(figures, f"mask_ap_{side}", ap["segm_mAP"])
    return figures


def check_calibration(calibration: list[ImagePair], holdout: list[ImagePair], bits: int,
                      dataset: CocoDataset | None = None) -> CalibrationCheck:
    """Figures of the calibration images, the held-out ones (if any) and all together, judged on all."""
    sets = [set_figures("calibration", calibration, dataset)]
    if holdout:
        sets += [set_figures("held-out", holdout, dataset), set_figures("all", calibration + holdout, dataset)]
    min_matched, max_loss = bound_for(bits)
    images = {"calibration": [p.name for p in calibration], "held-out": [p.name for p in holdout]}
    return CalibrationCheck(bits, sets, min_matched, max_loss, images)


def format_check(check: CalibrationCheck) -> str:
    """A Markdown table of the check, one row per set, then the verdict line."""
    def ap(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def delta(v):
        return "-" if v is None else f"{100 * v:+.1f}"

    lines = ["| images | n | float found / quant found (score >= %.1f) | matched | box AP float / quant | delta "
             "| mask AP float / quant | delta |" % SCORE_FLOOR, "|---|---|---|---|---|---|---|---|"]
    for s in check.sets:
        lines.append(f"| {s.name} | {s.images} | {s.float_found}/{s.float_detections}, {s.quant_found}/"
                     f"{s.quant_detections} | {100 * s.matched_share:.1f}% | {ap(s.box_ap_float)} / {ap(s.box_ap_quant)} "
                     f"| {delta(s.box_delta)} "
                     f"| {ap(s.mask_ap_float)} / {ap(s.mask_ap_quant)} | {delta(s.mask_delta)} |")
    lines.append(f"calibration check (float vs fake quant, {check.bits} bits): {check.summary()} "
                 f"[bound: matched >= {100 * check.min_matched:.0f}%, AP loss <= {100 * check.max_ap_loss:.0f} points]")
    return "\n".join(lines)


def image_name(path: Path) -> str:
    """How a check image is named in repq.json."""
    return Path(path).name


@torch.no_grad()
def model_outputs(model: nn.Module, preps: list[Preprocessed], device: str, desc: str,
                  progress: bool = True) -> list[tuple[NetOutput, Detections]]:
    """``model``'s network outputs and host-side detections on each preprocessed image."""
    runner = TorchRunner(model, device, name=desc)
    out = []
    for prep in tqdm(preps, desc=f"check {desc:>5}", unit="img", disable=not progress, leave=False):
        out.append(run_prepared(runner, prep))
    return out


def image_pairs(paths: list[Path], float_outs: list[tuple[NetOutput, Detections]],
                quant_outs: list[tuple[NetOutput, Detections]], ids: dict[Path, int]) -> list[ImagePair]:
    """The check images with both models' outputs and their COCO ids (from ``ids``, by path) where known."""
    return [ImagePair(image_name(p), f[0], q[0], f[1], q[1], ids.get(Path(p)))
            for p, f, q in zip(paths, float_outs, quant_outs)]


def dataset_ids(dataset: CocoDataset | None) -> dict[Path, int]:
    """Image path -> COCO image id of every image of ``dataset`` (empty without one)."""
    if dataset is None:
        return {}
    return {Path(path): int(info["id"]) for info, path in dataset}
