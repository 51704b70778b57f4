"""Run fake quant and a backend on the same images and judge the three parity tiers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
from torch import nn

from ..data.coco import CocoDataset
from ..data.transforms import PreprocessSettings
from ..quant.layers import named_quantizers
from ..quantizer_calls import scope_to_name
from ..runtime.base import GraphRunner, Runner
from .envelope import AP_MARGIN, MATCH_MARGIN, MIN_IMAGES, SAMPLES, Envelope, judge_envelope
from .evaluate import score_run
from .image_loop import DatasetRun, ImageResult, run_together
from .parity import (CodeReport, DetectionSummary, compare_codes, compare_drift,
                     compare_float_parts, find_code_probes, match_detections, record_quantizer_inputs,
                     with_probe_outputs)

AP_TOLERANCE = 0.001  # fixed tier 3 (no float64 run): 0.1 AP points, as a fraction
MATCH_RATE_MIN = 0.99  # fixed tier 2: matched detections over the larger count
MASK_IOU_MIN = 0.95  # fixed tier 2: mean IoU of matched RoI masks
#: tier 1's rule: 'exact' (every code not at a float tie must agree: onnxruntime, TensorRT) or
#: 'near-tie flips' (reported, not judged: OpenVINO computes x * (1/d), not x / d, so a code next to a
#: rounding tie may flip; its verdict is the float64 rule of tiers 2 and 3, as for any float32 backend)
TIER1_EXACT = "exact"
TIER1_REPORTED = "near-tie flips"


@dataclass(frozen=True)
class ParityOptions:
    """How a parity check runs and judges, beside the runners: images, tier-1 probe, tolerances, margins."""

    max_images: int | None = None  # only the first N images (None: all)
    code_images: int = 1  # images for the tier-1 code probe (0 skips it)
    progress: bool = True
    ap_tolerance: float | None = None  # tier 3 by this fixed tolerance instead of the float64 rule
    min_match_rate: float | None = None  # tier 2 by this fixed tolerance instead of the float64 rule
    match_margin: float = MATCH_MARGIN
    ap_margin: float = AP_MARGIN
    samples: int = SAMPLES  # bootstrap resamples of the float64 rule
    float_parts: bool = True  # tier 1 also measures the float parts fed the backend's codes


@dataclass
class ParityReport:
    """The three tiers, with verdicts."""

    backend: str
    images: int
    code_images: int
    codes: list[CodeReport] = field(default_factory=list)
    detections: DetectionSummary = field(default_factory=DetectionSummary)
    ap_ref: dict[str, float] = field(default_factory=dict)
    ap_backend: dict[str, float] = field(default_factory=dict)
    ap_tolerance: float | None = None  # fixed tolerances against torch fake quant, instead of the envelope
    min_match_rate: float | None = None
    envelope: Envelope | None = None  # tiers 2 and 3 against the float64 run (`envelope.py`)
    tier1_rule: str = TIER1_EXACT  # TIER1_EXACT or TIER1_REPORTED

    @property
    def code_elements(self) -> int:
        return sum(r.elements for r in self.codes)

    @property
    def code_mismatches(self) -> int:
        return sum(r.mismatches for r in self.codes)

    @property
    def code_tie_mismatches(self) -> int:
        return sum(r.tie_mismatches for r in self.codes)

    @property
    def first_bad_layer(self) -> str | None:
        """The first quantizer call (forward order) with a mismatch that is not a float tie."""
        return next((r.call for r in self.codes if r.mismatches > r.tie_mismatches), None)

    @property
    def first_drift(self) -> tuple[str, int] | None:
        """The first quantizer call whose codes differ between the torch run and the backend's run."""
        return next(((r.call, r.drift) for r in self.codes if r.drift), None)

    @property
    def float_difference(self) -> tuple[int, int, float] | None:
        """The float parts' difference, both runs fed the backend's codes (`compare_float_parts`):
        (values compared, values that differ, equivalent ulps), where equivalent ulps =
        sum |x_torch - x_backend| / sum ulp(x_torch): a noise floor that moves every input by that many
        ulps moves the inputs as far in total (and flips as many codes, to first order)."""
        values = sum(r.float_values for r in self.codes)
        if not values:
            return None
        ulps = sum(r.float_ulp_sum for r in self.codes)
        return values, sum(r.float_differ for r in self.codes), sum(r.float_abs_diff for r in self.codes) / ulps

    def float_ulps_by_quantizer(self) -> dict[str, float]:
        """Equivalent ulps of the float parts' difference (see `float_difference`) per quantizer module,
        pooled over its calls (sum of |differences| over sum of ulps)."""
        sums: dict[str, list[float]] = {}
        for r in self.codes:
            if r.float_values:
                acc = sums.setdefault(scope_to_name(r.call), [0.0, 0.0])
                acc[0] += r.float_abs_diff
                acc[1] += r.float_ulp_sum
        return {name: diff / ulp for name, (diff, ulp) in sums.items()}

    @property
    def tier1_ok(self) -> bool | None:
        """None: not probed, or reported only (TIER1_REPORTED)."""
        if not self.codes or self.tier1_rule == TIER1_REPORTED:
            return None
        return self.first_bad_layer is None

    @property
    def fixed_tier2(self) -> bool:
        """Tier 2 judged by the fixed tolerance (given, or no float64 run to judge against)."""
        return self.min_match_rate is not None or self.envelope is None

    @property
    def fixed_tier3(self) -> bool:
        return self.ap_tolerance is not None or self.envelope is None

    @property
    def tier2_ok(self) -> bool | None:
        """None: not judged (the float64 rule over fewer images than it needs)."""
        if not self.fixed_tier2:
            return self.envelope.figure("matched").ok if self.envelope.judged else None
        d = self.detections
        return d.match_rate >= (self.min_match_rate or MATCH_RATE_MIN) and d.mean_mask_iou >= MASK_IOU_MIN

    def ap_delta(self, metric: str) -> float:
        return self.ap_backend[f"{metric}_mAP"] - self.ap_ref[f"{metric}_mAP"]

    @property
    def tier3_ok(self) -> bool | None:
        if not self.fixed_tier3:
            if not self.envelope.judged:
                return None
            return self.envelope.figure("bbox_AP").ok and self.envelope.figure("segm_AP").ok
        tolerance = AP_TOLERANCE if self.ap_tolerance is None else self.ap_tolerance
        return all(abs(self.ap_delta(m)) <= tolerance for m in ("bbox", "segm"))

    @property
    def ok(self) -> bool:
        return all(tier is not False for tier in (self.tier1_ok, self.tier2_ok, self.tier3_ok))

    def as_dict(self) -> dict:
        d = self.detections
        return {
            "backend": self.backend, "images": self.images, "pass": self.ok,
            "tier1_codes": {"pass": self.tier1_ok, "rule": self.tier1_rule, "images": self.code_images, "elements": self.code_elements,
                            "mismatches": self.code_mismatches, "tie_mismatches": self.code_tie_mismatches,
                            "first_bad_layer": self.first_bad_layer,
                            "first_drift": self.first_drift,
                            "float_difference": None if self.float_difference is None else dict(
                                zip(("values", "differ", "equivalent_ulps"), self.float_difference)),
                            "per_call": [asdict(r) for r in self.codes]},
            "float64_envelope": None if self.envelope is None else self.envelope.as_dict(),
            "tier2_detections": {"pass": self.tier2_ok, "rule": "fixed" if self.fixed_tier2 else "float64",
                                 "min_match_rate": self.min_match_rate, "ref": d.ref, "backend": d.got, "matched": d.matched,
                                 "match_rate": d.match_rate, "min_iou": d.min_iou,
                                 "max_score_diff": d.max_score_diff, "mean_mask_iou": d.mean_mask_iou},
            "tier3_ap": {"pass": self.tier3_ok, "rule": "fixed" if self.fixed_tier3 else "float64",
                         "tolerance": self.ap_tolerance,
                         **{f"{m}_mAP_{side}": v[f"{m}_mAP"] for m in ("bbox", "segm")
                            for side, v in (("fake_quant", self.ap_ref), ("backend", self.ap_backend))}},
        }

    def table(self) -> str:
        """The human-readable verdict."""
        def mark(ok):
            return "n/a " if ok is None else ("PASS" if ok else "FAIL")
        tier1_mark = "info" if self.codes and self.tier1_rule == TIER1_REPORTED else mark(self.tier1_ok)
        d = self.detections
        codes = (f"{self.code_mismatches} of {self.code_elements} codes differ "
                 f"({self.code_tie_mismatches} at float ties) over {self.code_images} image(s)"
                 if self.codes else "not probed for this backend")
        if self.first_bad_layer:
            codes += f"; first layer: {self.first_bad_layer}"
        if self.codes and self.tier1_rule == TIER1_REPORTED:
            codes = (f"reported, not judged ({self.backend} computes x * (1/d), so codes next to a rounding tie may "
                     f"flip): {self.code_mismatches} code flip(s) in {self.code_elements} codes "
                     f"({self.code_tie_mismatches} within 1e-5 of a tie) over {self.code_images} image(s)"
                     + (f"; first flip off a tie: {self.first_bad_layer}" if self.first_bad_layer else ""))
        drift = ""
        if self.first_drift:
            total = sum(r.drift or 0 for r in self.codes)
            drift = (f"\n  drift              float differences between the two runs first flip {self.first_drift[1]} "
                     f"code(s) at {self.first_drift[0]}; {total} flips in backbone, neck and RPN")
        if self.float_difference:
            values, differ, ulps = self.float_difference
            drift += (f"\n  float parts        fed the same codes, {100 * differ / values:.1f}% of {values} quantizer "
                      f"input values differ between the runs, by {ulps:.2f} ulp on average (--noise-ulps)")
        vs_torch = (f"{d.matched} matched of {d.ref} / {d.got} (rate {d.match_rate:.4f}), min IoU {d.min_iou:.4f}, "
                    f"max |score diff| {d.max_score_diff:.2e}, mask IoU {d.mean_mask_iou:.4f}")
        ap = (f"box {self.ap_ref['bbox_mAP']:.4f} -> {self.ap_backend['bbox_mAP']:.4f} ({self.ap_delta('bbox'):+.4f}), "
              f"mask {self.ap_ref['segm_mAP']:.4f} -> {self.ap_backend['segm_mAP']:.4f} ({self.ap_delta('segm'):+.4f})")
        env = self.envelope
        if self.fixed_tier2:
            tier2 = f"{vs_torch}; fixed: rate >= {self.min_match_rate or MATCH_RATE_MIN}, mask IoU >= {MASK_IOU_MIN}"
        else:
            tier2 = f"vs float64: {env.figure('matched').text()} points\n{'':21}vs fake quant: {vs_torch}"
        if self.fixed_tier3:
            tier3 = f"{ap}; fixed: |delta| <= {AP_TOLERANCE if self.ap_tolerance is None else self.ap_tolerance}"
        else:
            tier3 = (f"vs float64: {env.figure('bbox_AP').text()}; {env.figure('segm_AP').text()} points"
                     f"\n{'':21}vs fake quant: {ap}")
        rule = ("" if env is None else f"\n  rule               excess = {self.backend}'s distance to float64 minus torch "
                f"float32's, 95% interval over {env.samples} bootstrap resamples of the {env.images} images; FAIL when "
                f"its lower end exceeds the margin ({100 * env.figure('matched').margin:.2f} matched points, "
                f"{100 * env.figure('bbox_AP').margin:.2f} AP points)"
                + ("" if env.judged else f"; NOT JUDGED on {env.images} image(s): the rule needs at least "
                   f"{MIN_IMAGES}"))
        lines = [
            f"parity: fake quant vs {self.backend} on {self.images} images",
            f"  tier 1 codes       {tier1_mark}  {codes}{drift}",
            f"  tier 2 detections  {mark(self.tier2_ok)}  {tier2}",
            f"  tier 3 AP          {mark(self.tier3_ok)}  {tier3}{rule}",
            f"  verdict            {'PASS' if self.ok else 'FAIL'}",
        ]
        return "\n".join(lines)


def probe_codes(qmodel: nn.Module, onnx_path: str | Path, images: list[ImageResult], backend: GraphRunner,
                float_parts: bool = True) -> list[CodeReport]:
    """Tier 1: every quantizer call's codes, fed the graph's own inputs, read from the graph at `onnx_path`
    with probe outputs added, run in a session like `backend`'s (`GraphRunner.with_graph`)."""
    proto = onnx.load(onnx_path)
    probes = find_code_probes(proto, {name for name, _ in named_quantizers(qmodel)})
    probed = backend.with_graph(with_probe_outputs(proto, probes).SerializeToString())
    reports: dict[str, CodeReport] = {}
    for image in images:
        values = probed.run_all({"img": image.prep.tensor.numpy(), "img_hw": image.prep.img_hw_tensor.numpy()})
        compare_codes(qmodel, probes, values, reports)
        inputs = record_quantizer_inputs(qmodel, image.prep.tensor, image.prep.img_hw_tensor)
        compare_drift(qmodel, probes, values, inputs, reports)
        if float_parts:
            compare_float_parts(qmodel, probes, values, image.prep.tensor, image.prep.img_hw_tensor, reports)
    return list(reports.values())


def check_parity(qmodel: nn.Module, ref: Runner, backend: Runner, dataset: CocoDataset,
                 settings: PreprocessSettings, options: ParityOptions = ParityOptions(),
                 onnx_path: str | Path | None = None,
                 ideal: Runner | None = None) -> tuple[ParityReport, DatasetRun, DatasetRun]:
    """All three tiers; tier 1 only where the backend runs the ONNX graph `onnx_path` (a `GraphRunner`), probed in
    a session like the backend's (reported as near-tie flips, not judged, where its codes are not exact); tiers 2
    and 3 against the float64 run where ``ideal`` runs it (`envelope.py`), else (or where given) by the fixed
    tolerances."""
    probed = onnx_path is not None and options.code_images > 0
    if probed and not hasattr(backend, "with_graph"):
        raise ValueError(f"{backend.name}: tier 1 needs a runner of the ONNX graph (onnxruntime or OpenVINO)")
    runners = [ref, backend] + ([ideal] if ideal is not None else [])
    runs = run_together(runners, dataset, settings, options.max_images, progress=options.progress, desc="parity")
    ref_run, backend_run = runs[:2]
    count = len(ref_run.images)
    exact = getattr(backend, "codes_exact", True)
    report = ParityReport(backend.name, count, 0, ap_tolerance=options.ap_tolerance,
                          min_match_rate=options.min_match_rate, tier1_rule=TIER1_EXACT if exact else TIER1_REPORTED)
    for ref_image, backend_image in zip(ref_run.images, backend_run.images):
        report.detections.add(match_detections(ref_image.net, backend_image.net))
    if probed:
        report.code_images = min(options.code_images, count)
        report.codes = probe_codes(qmodel, onnx_path, backend_run.images[: report.code_images], backend,
                                   options.float_parts)
    report.ap_ref = score_run(ref_run, dataset)
    report.ap_backend = score_run(backend_run, dataset)
    if ideal is not None:
        report.envelope = judge_envelope(runs[2], ref_run, backend_run, dataset, options.match_margin,
                                         options.ap_margin, options.samples)
    return report, ref_run, backend_run
