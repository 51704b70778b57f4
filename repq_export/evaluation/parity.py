"""Parity between fake quant and a backend, in three tiers (docs/design.md): codes, detections, AP.

Tier 1 feeds each quantizer's ONNX input (as onnxruntime computed it) to the fake quantizer and
compares integer codes, so it tests the lowering itself; float drift between backends is what
tiers 2 and 3 measure. Where each call's input and codes are is read from the table the
exporter stored in the graph (`quantizer_calls.py`), for either form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from torch import nn
from torchvision.ops import box_iou

from ..errors import UserError
from ..hooks import hooked
from ..quant.kinds import SHIFTED
from ..quant.layers import named_quantizers
from ..quant.log_sqrt2 import LogSqrt2Quantizer, log_sqrt2_codes
from ..boundary import NetOutput
from ..graph_targets import GraphForm
from ..quantizer_calls import QuantizerCall, read_calls

MATCH_IOU = 0.5


# ----------------------------------------------------------------------------- tier 1: codes


@dataclass
class CodeReport:
    """Code mismatches of one quantizer call over all probed images."""

    call: str
    kind: str
    elements: int = 0
    mismatches: int = 0
    tie_mismatches: int = 0
    drift: int | None = None  # codes that differ between the torch run and the backend's own run
    # the call's float input in both runs, every earlier quantizer fed the backend's codes (`compare_float_parts`):
    float_values: int = 0  # values compared
    float_differ: int = 0  # values that differ at all
    float_abs_diff: float = 0.0  # sum of |x_torch - x_backend|
    float_ulp_sum: float = 0.0  # sum of ulp(x_torch)


def code_offset(q: nn.Module, probe: QuantizerCall) -> float:
    """What the graph subtracts from fake quant's code q at this call: zp (tensorrt), 2^(n-1)
    (shifted 8-bit input), nothing (onnxruntime: uint8 carries q itself)."""
    if probe.form == GraphForm.ONNXRUNTIME:
        return 0.0
    return float(2 ** (q.bits - 1)) if probe.kind == SHIFTED else q.zero_point.item()


def _codes(q: nn.Module, x: torch.Tensor, probe: QuantizerCall) -> np.ndarray:
    """Integer codes of `x` under quantizer `q`, as the graph carries them at this call."""
    if isinstance(q, LogSqrt2Quantizer):
        return log_sqrt2_codes(x, q.scale, q.bits).numpy().reshape(-1)
    return (q.codes(x) - code_offset(q, probe)).numpy().astype(np.int64).reshape(-1)


@torch.no_grad()
def record_quantizer_inputs(qmodel: nn.Module, img: torch.Tensor, img_hw: torch.Tensor) -> dict[str, list]:
    """Each quantizer's inputs in the torch fake-quant forward, one entry per call."""
    seen: dict[str, list] = {}
    with hooked((q, lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0]))
                for name, q in named_quantizers(qmodel)):
        qmodel(img, img_hw)
    return seen


def compare_drift(qmodel: nn.Module, probes: list[QuantizerCall], values: dict[str, np.ndarray],
                  torch_inputs: dict[str, list], reports: dict[str, CodeReport]) -> None:
    """Codes of the torch run against the backend's own codes, call by call, while shapes agree.

    Tier 1 proves each lowering exact on the same input; this shows where float differences
    between the two runs (LayerNorm, GELU, softmax, accumulation order) first flip a code, and how
    the flips grow downstream. It covers the backbone, neck and RPN: RoI-head inputs follow the
    proposals, whose order may differ even where their number agrees.
    """
    quantizers = dict(named_quantizers(qmodel))
    calls: dict[str, int] = {}
    for probe in probes:
        index = calls.get(probe.name, 0)
        calls[probe.name] = index + 1
        if probe.name.startswith("roi_head."):
            continue
        x_torch = torch_inputs.get(probe.name, [])[index:index + 1]
        x_backend = np.asarray(values[probe.x], dtype=np.float32)
        if not x_torch or tuple(x_torch[0].shape) != x_backend.shape:
            continue
        q = quantizers[probe.name]
        a = _codes(q, x_torch[0].float().cpu(), probe)
        b = _codes(q, torch.from_numpy(x_backend), probe)
        report = reports.setdefault(probe.call, CodeReport(probe.call, probe.kind))
        report.drift = (report.drift or 0) + int((a != b).sum())


def backend_output(q: nn.Module, probe: QuantizerCall, values: dict[str, np.ndarray]) -> torch.Tensor:
    """What quantizer ``q`` outputs in fake quant for the codes the backend computed at this call."""
    got = torch.from_numpy(np.asarray(values[probe.codes]))
    if isinstance(q, LogSqrt2Quantizer):
        return got.float()  # the lowering's output is the table value itself
    offset = code_offset(q, probe) - q.zero_point.item()
    return (got.float() + offset) * q.scale  # (q - zp) * d, as fake quant computes it


@torch.no_grad()
def compare_float_parts(qmodel: nn.Module, probes: list[QuantizerCall], values: dict[str, np.ndarray],
                        img: torch.Tensor, img_hw: torch.Tensor, reports: dict[str, CodeReport]) -> None:
    """How far the two runs' float parts differ, segment by segment: a torch forward in which every
    quantizer call outputs the backend's codes for that call, so that each quantizer's input differs
    between the runs only by the float ops since the previous quantizers (the size a noise floor
    should nudge by). Backbone, neck and RPN, as `compare_drift`.
    """
    quantizers = dict(named_quantizers(qmodel))
    by_call: dict[tuple[str, int], QuantizerCall] = {}
    seen: dict[str, int] = {}
    for probe in probes:  # graph order = call order of each quantizer
        by_call[(probe.name, seen.get(probe.name, 0))] = probe
        seen[probe.name] = seen.get(probe.name, 0) + 1
    counts: dict[str, int] = {}

    def force(name: str):
        def hook(module, args, out):
            index = counts.get(name, 0)
            counts[name] = index + 1
            probe = by_call.get((name, index))
            if probe is None or name.startswith("roi_head."):
                return None
            x_backend = np.asarray(values[probe.x], dtype=np.float32)
            if tuple(args[0].shape) != x_backend.shape:
                return None
            report = reports.setdefault(probe.call, CodeReport(probe.call, probe.kind))
            add_float_difference(report, args[0].float().cpu().numpy(), x_backend)
            return backend_output(module, probe, values).reshape(out.shape).to(out.dtype)
        return hook

    with hooked((q, force(name)) for name, q in quantizers.items() if name in seen):
        qmodel(img, img_hw)


def add_float_difference(report: CodeReport, x_torch: np.ndarray, x_backend: np.ndarray) -> None:
    """Add how far two runs' float inputs of a quantizer differ: count, and |difference| against ulp(x)."""
    x_torch, x_backend = x_torch.reshape(-1), x_backend.reshape(-1)
    diff = np.abs(x_torch.astype(np.float64) - x_backend.astype(np.float64))
    report.float_values += int(diff.size)
    report.float_differ += int((diff > 0).sum())
    report.float_abs_diff += float(diff.sum())
    report.float_ulp_sum += float(np.spacing(np.abs(x_torch)).astype(np.float64).sum())


def find_code_probes(proto: onnx.ModelProto, quantizer_names: set[str]) -> list[QuantizerCall]:
    """Every call of the named quantizers, from the quantizer-call table stored in the graph."""
    calls = read_calls(proto)
    if calls is None:
        raise UserError("the ONNX graph has no quantizer-call table (exported by an older repq-export, or "
                        "not a quantized repq-export graph): export it again for the code check")
    unknown = sorted({c.name for c in calls} - quantizer_names)
    if unknown:
        raise UserError(f"the graph's quantizer-call table names quantizers the model lacks: {unknown[:3]}")
    return calls


def with_probe_outputs(proto: onnx.ModelProto, probes: list[QuantizerCall]) -> onnx.ModelProto:
    """A copy of the graph that also outputs every probe's input and codes."""
    debug = onnx.ModelProto()
    debug.CopyFrom(proto)
    existing = {o.name for o in debug.graph.output}
    for probe in probes:
        for value in (probe.x, probe.codes):
            if value not in existing:
                debug.graph.output.append(onnx.ValueInfoProto(name=value))
                existing.add(value)
    return debug


def _is_tie(ratio: np.ndarray) -> np.ndarray:
    """Where x/d lies within float error of a rounding boundary (k + 0.5)."""
    frac = np.abs(ratio - np.floor(ratio) - 0.5)
    return frac < 1e-5 * np.maximum(1.0, np.abs(ratio))


def compare_codes(qmodel: nn.Module, probes: list[QuantizerCall], values: dict[str, np.ndarray],
                  reports: dict[str, CodeReport]) -> None:
    """Add one image's code comparison to `reports` (keyed by call)."""
    quantizers = dict(named_quantizers(qmodel))
    for probe in probes:
        q = quantizers[probe.name]
        x = torch.from_numpy(np.asarray(values[probe.x], dtype=np.float32))
        got = np.asarray(values[probe.codes])
        report = reports.setdefault(probe.call, CodeReport(probe.call, probe.kind))
        if isinstance(q, LogSqrt2Quantizer):
            # the graph carries the table value lut[code]; at 8 bits the smallest entries underflow
            # to equal float32 values, so values (as int32 bit patterns) are what must agree
            lut = q.lut().numpy().astype(np.float32)
            want = lut[log_sqrt2_codes(x, q.scale, q.bits).numpy()].view(np.int32)
            got = got.astype(np.float32).view(np.int32)
            ties = np.zeros(want.shape, dtype=bool)
        else:
            want = (q.codes(x) - code_offset(q, probe)).numpy()
            ties = _is_tie((x / q.scale).numpy())
        bad = want.astype(np.int64).reshape(-1) != got.astype(np.int64).reshape(-1)
        ties = ties.reshape(-1)
        report.elements += int(bad.size)
        report.mismatches += int(bad.sum())
        report.tie_mismatches += int((bad & ties).sum())


# ----------------------------------------------------------------------------- tier 2: detections


@dataclass
class DetectionMatch:
    """Fake-quant detections of one image matched to a backend's (same label, greedy by score)."""

    ref: int
    got: int
    matched: int
    min_iou: float
    max_score_diff: float
    mean_mask_iou: float


def match_detections(ref: NetOutput, got: NetOutput) -> DetectionMatch:
    """Greedy one-to-one matching: each reference detection, by score, takes the unmatched
    backend detection of its label with the highest box IoU (at least 0.5)."""
    n_ref, n_got = len(ref.scores), len(got.scores)
    if n_ref == 0 or n_got == 0:
        return DetectionMatch(n_ref, n_got, 0, 1.0 if n_ref == n_got else 0.0, 0.0, 1.0)
    iou = box_iou(ref.boxes.double(), got.boxes.double())
    iou[ref.labels[:, None] != got.labels[None, :]] = -1
    taken = torch.zeros(n_got, dtype=torch.bool)
    ious, score_diffs, mask_ious = [], [], []
    for i in torch.argsort(ref.scores, descending=True, stable=True).tolist():
        row = iou[i].masked_fill(taken, -1)
        j = int(torch.argmax(row))
        if row[j] < MATCH_IOU:
            continue
        taken[j] = True
        ious.append(float(row[j]))
        score_diffs.append(abs(float(ref.scores[i] - got.scores[j])))
        a, b = ref.masks[i] >= 0.5, got.masks[j] >= 0.5
        union = int((a | b).sum())
        mask_ious.append(1.0 if union == 0 else int((a & b).sum()) / union)
    return DetectionMatch(n_ref, n_got, len(ious), min(ious, default=0.0), max(score_diffs, default=0.0),
                          float(np.mean(mask_ious)) if mask_ious else 0.0)


@dataclass
class DetectionSummary:
    """Tier 2 over a dataset."""

    images: int = 0
    ref: int = 0
    got: int = 0
    matched: int = 0
    min_iou: float = 1.0
    max_score_diff: float = 0.0
    mask_ious: list[float] = field(default_factory=list)

    def add(self, m: DetectionMatch) -> None:
        self.images += 1
        self.ref += m.ref
        self.got += m.got
        self.matched += m.matched
        if m.matched:
            self.min_iou = min(self.min_iou, m.min_iou)
            self.mask_ious.append(m.mean_mask_iou)
        self.max_score_diff = max(self.max_score_diff, m.max_score_diff)

    @property
    def match_rate(self) -> float:
        """Matched pairs over the larger of the two detection counts (1.0 = identical sets)."""
        total = max(self.ref, self.got)
        return 1.0 if total == 0 else self.matched / total

    @property
    def mean_mask_iou(self) -> float:
        return float(np.mean(self.mask_ious)) if self.mask_ious else 1.0
