"""Tiers 2 and 3 judged against ideal arithmetic: the fake-quant model run in float64.

Per-image differences between two float32 implementations of a 4-bit network are the price of
float32, not a defect: a value on a rounding boundary flips a code and the flip propagates. So the
backend is not compared with torch's float32 fake quant (itself one float32 implementation) but,
like it, with the same model in float64 (same float32 scales, zero points and log-sqrt2 boundaries;
all arithmetic in double). The rule, per figure (detections matched one to one, box AP, mask AP):

    excess = (backend's distance to float64) - (torch float32's distance to float64),

paired over the same images (distance: the share of detections not matched one to one with
float64, or |AP - AP of float64|). The backend FAILS a figure when the lower end of the 95%
bootstrap interval of the excess (images resampled with replacement) is above the figure's margin:
it is then shown, at 95%, to be further from ideal arithmetic than torch's float32 is, by more
than the margin. Otherwise it passes, and the upper end says how much further it may still be (the
resolution of the images run: more images narrow it).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..data.coco import CocoDataset
from ..boundary import NetOutput, as_net_output
from .bootstrap import CONFIDENCE, interval, per_image_matches, resample_weights, weighted_aps
from .evaluate import coco_results
from .image_loop import DatasetRun
from .parity import match_detections

MATCH_MARGIN = 0.005  # matched share: 0.5 points fewer matched than torch float32 is tolerated
AP_MARGIN = 0.005  # AP: 0.5 AP points further from float64 than torch float32 is tolerated
SAMPLES = 1000
MIN_IMAGES = 5  # below this a bootstrap over images gives no interval worth the name (1 image: none)
RULE = ("a backend FAILS tier 2 or 3 when, over bootstrap resamples of the images, the lower end of the 95% "
        "interval of its excess (its distance to float64 minus torch float32 fake quant's: share of detections not "
        "matched one to one, |box AP delta|, |mask AP delta|) is above the margin (--match-margin, --ap-margin); "
        "the upper end is what the images cannot rule out.")
SEED = 0


class Float64Reference:
    """The fake-quant model in double (a copy; quantizer state is float32 values, exact in double)."""

    name = "float64"

    def __init__(self, qmodel: nn.Module) -> None:
        self.model = copy.deepcopy(qmodel).cpu().double().eval()

    @torch.no_grad()
    def __call__(self, img: torch.Tensor, img_hw: torch.Tensor) -> NetOutput:
        return as_net_output(self.model(img.cpu().double(), img_hw.cpu().double()))


@dataclass
class Figure:
    """One figure of the rule: both runs' distance to float64, the excess's 95% interval, the verdict."""

    name: str  # 'matched' | 'bbox_AP' | 'segm_AP'
    backend: float  # matched share with float64 (fraction), or AP delta backend - float64
    reference: float  # the same for torch float32 fake quant
    excess: float  # backend's distance minus torch float32's (a fraction; > 0 = backend further away)
    low: float
    high: float
    margin: float

    @property
    def ok(self) -> bool:
        """False when the backend is shown (95%) to be further from float64 than torch, by over the margin."""
        return self.low <= self.margin

    @property
    def resolved(self) -> bool:
        """Whether the images also rule out an excess above the margin (the interval's upper end)."""
        return self.high <= self.margin

    def text(self) -> str:
        """'matched 94.4% (torch 93.2%)' or 'box dAP +0.10 (torch +0.04)', excess interval in points."""
        if self.name == "matched":
            head = f"matched {100 * self.backend:.1f}% (torch {100 * self.reference:.1f}%)"
        else:
            head = f"{self.name[:4].replace('segm', 'mask')} dAP {100 * self.backend:+.2f} (torch {100 * self.reference:+.2f})"
        return f"{head}, excess {100 * self.excess:+.2f} [{100 * self.low:+.2f}, {100 * self.high:+.2f}]"


@dataclass
class Envelope:
    """The three figures of the float64 rule over one set of images."""

    images: int
    samples: int
    figures: list[Figure]

    @property
    def judged(self) -> bool:
        """Whether there are enough images for the rule to judge (MIN_IMAGES); fewer leave tiers 2/3 unjudged."""
        return self.images >= MIN_IMAGES

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.figures)

    def figure(self, name: str) -> Figure:
        return next(f for f in self.figures if f.name == name)

    def as_dict(self) -> dict:
        return {"images": self.images, "bootstrap_samples": self.samples, "confidence": CONFIDENCE,
                "judged": self.judged, "min_images": MIN_IMAGES, "pass": self.ok if self.judged else None, **{f.name: {**asdict(f), "pass": f.ok} for f in self.figures}}


def match_counts(ideal: DatasetRun, run: DatasetRun) -> tuple[np.ndarray, np.ndarray]:
    """Per image: detections matched one to one with the float64 run, and the larger of the two counts."""
    matches = [match_detections(a.net, b.net) for a, b in zip(ideal.images, run.images)]
    return np.array([m.matched for m in matches], float), np.array([max(m.ref, m.got) for m in matches], float)


def _share(matched: np.ndarray, total: np.ndarray, w: np.ndarray) -> float:
    denominator = float(w @ total)
    return 1.0 if denominator == 0 else float(w @ matched) / denominator


def judge_envelope(ideal: DatasetRun, reference: DatasetRun, backend: DatasetRun, dataset: CocoDataset,
                   match_margin: float = MATCH_MARGIN, ap_margin: float = AP_MARGIN,
                   samples: int = SAMPLES, seed: int = SEED) -> Envelope:
    """The float64 rule (module docstring) for ``backend`` against torch float32 ``reference``."""
    n = len(ideal.images)
    ones = np.ones(n)
    weights = resample_weights(n, samples, seed)
    ref_m, ref_t = match_counts(ideal, reference)
    got_m, got_t = match_counts(ideal, backend)
    share = [(_share(ref_m, ref_t, w), _share(got_m, got_t, w)) for w in (ones, *weights)]
    excess = np.array([r - g for r, g in share])  # matching less than torch float32 = further away
    figures = [Figure("matched", share[0][1], share[0][0], float(excess[0]), *interval(excess[1:]), match_margin)]
    ids = ideal.image_ids
    results = [coco_results(run, dataset) for run in (ideal, reference, backend)]
    for index, metric in enumerate(("bbox", "segm")):
        cats = [per_image_matches(dataset.coco, r[index], metric, ids) for r in results]
        aps = np.stack([weighted_aps(c, np.vstack([ones, weights])) for c in cats], axis=1)  # (1 + samples, 3)
        ref_d, got_d = aps[:, 1] - aps[:, 0], aps[:, 2] - aps[:, 0]
        excess = np.abs(got_d) - np.abs(ref_d)
        figures.append(Figure(f"{metric}_AP", float(got_d[0]), float(ref_d[0]), float(excess[0]),
                              *interval(excess[1:]), ap_margin))
    return Envelope(n, samples, figures)
