"""The RepQ-ViT post-training quantization flow: assign, calibrate, reparameterize.

As in the reference: replace the modules, run ONE forward on the calibration image (batch 1)
with every quantizer initialising lazily in forward order (so each sees the outputs of layers
already quantized), then reparameterize the LayerNorm -> linear pairs. The reference then runs
one more forward to re-initialise the three paired weight quantizers; their initialisation
depends only on the weights, so ``reparameterize`` re-initialises them directly and the second
forward is not needed (every other quantizer is already initialised and would not change).

With several calibration images every quantizer initialises from the inputs of all of them, each
produced by already-calibrated upstream quantizers: one forward per image, in lockstep at each
quantizer (quant/lockstep.py). One image takes the plain single-forward path (the reference's).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from repq_export.errors import UserError
from repq_export.hooks import hooked
from repq_export.quant.assign import check_bits
from repq_export.quant.layers import calibration_mode, named_quantizers
from repq_export.quant.lockstep import run_lockstep
from repq_export.quant.recipe import QuantSettings, apply_steps
from repq_export.quant.uniform import MIN_SCALE

QuantDetector = nn.Module  # the Detector itself, with quantized modules and a ``quant_settings`` attribute


def network_input(image: Any) -> tuple[Tensor, Tensor]:
    """(img [1,3,Hp,Wp] float32, img_hw [2] float32) from a ``Preprocessed`` or an ``(img, img_hw)`` pair."""
    if hasattr(image, "tensor") and hasattr(image, "img_hw"):
        img, img_hw = image.tensor, image.img_hw
    elif isinstance(image, (tuple, list)) and len(image) == 2:
        img, img_hw = image
    else:
        raise UserError(f"calibration images: expected Preprocessed or (tensor, img_hw), got {type(image).__name__}")
    if not isinstance(img, Tensor) or img.dim() != 4 or img.shape[0] != 1 or img.shape[1] != 3:
        raise UserError("calibration images: the image tensor must have shape [1, 3, H, W]")
    return img.float(), torch.as_tensor(img_hw, dtype=torch.float32).reshape(2)


def tensor_sha256(t: Tensor) -> str:
    """sha256 of a tensor's float32 bytes (to record which inputs calibrated a model)."""
    return hashlib.sha256(t.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def quantize(
    detector: nn.Module,
    calib_images: Sequence[Any],
    w_bits: int,
    a_bits: int,
    reparam: bool = True,
    integer_zero_point: bool = True,
    exact_padding: bool = True,
    progress: bool = True,
    integer_bias: bool = True,
    fold_bn: bool = True,
) -> QuantDetector:
    """Quantize ``detector`` in place (W``w_bits``/A``a_bits``) and calibrate it on ``calib_images``
    (one in the reference; several see quant/lockstep.py).

    ``reparam=False`` skips the reparameterization; ``integer_zero_point=False`` and
    ``exact_padding=False`` select the reference's fractional zero point and zero padding;
    ``integer_bias`` puts biases on the int32 grid that integer kernels use (quant/integer_bias.py).
    BatchNorm after a quantized conv is folded into it, codes unchanged (quant/bn_fold.py).
    """
    w_bits, a_bits = check_bits("w_bits", w_bits), check_bits("a_bits", a_bits)
    if len(calib_images) == 0:
        raise UserError("calibration images: none given")
    device = next(detector.parameters()).device
    inputs = [tuple(t.to(device) for t in network_input(image)) for image in calib_images]
    settings = QuantSettings(w_bits, a_bits, reparam, reparam and integer_zero_point, reparam and exact_padding,
                             tuple(tensor_sha256(img) for img, _ in inputs), integer_bias, fold_bn)
    detector.eval()
    check_float_detections(detector, inputs)
    apply_steps(detector, settings, after_calibration=False)
    calibrate(detector, inputs, progress)
    apply_steps(detector, settings, after_calibration=True)
    detector.quant_settings = settings
    return detector


@torch.no_grad()
def check_float_detections(detector: nn.Module, inputs: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Refuse calibration images on which the float detector finds nothing: the RoI heads would then
    calibrate on no box at all (or, depending on the CPU's rounding, on a few meaningless ones)."""
    counts = [int(detector(*pair)[0].shape[0]) for pair in inputs]
    if not any(counts):
        raise UserError(
            f"calibration images: the float model detects nothing in {'it' if len(counts) == 1 else 'any of them'}, "
            "so the box and mask heads' quantizers saw no data to calibrate on: use images with objects the "
            "model finds"
        )


def constant_inputs(quantizers: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """Activation quantizers whose calibration data was one constant (scale at the floor MIN_SCALE):
    they would quantize every real input to that value."""
    return [name for name, q in quantizers if not name.endswith("weight_quantizer")
            and bool((q.scale <= MIN_SCALE * 1.001).all())]


@torch.no_grad()
def calibrate(detector: nn.Module, inputs: Sequence[tuple[Tensor, Tensor]], progress: bool = True) -> None:
    """One forward per ``(img, img_hw)`` in calibration mode (in lockstep if several); every
    quantizer must have initialised afterwards."""
    quantizers = list(named_quantizers(detector))
    bar = tqdm(total=len(quantizers), desc="calibrating", unit="quantizer", disable=not progress)
    counted: set[int] = set()

    def count(q: nn.Module, args: Any, out: Any) -> None:
        if bool(q.initialized) and id(q) not in counted:
            counted.add(id(q))
            bar.update(1)

    try:
        with hooked((q, count) for _, q in quantizers), calibration_mode(detector):
            if len(inputs) == 1:
                detector(*inputs[0])
            else:
                run_lockstep(detector, [q for _, q in quantizers], inputs)
    finally:
        bar.close()
    missing = [name for name, q in quantizers if not bool(q.initialized)]
    if missing:
        raise UserError(
            f"calibration images: {len(missing)} quantizers saw no data (first: {missing[0]}); the image(s) "
            "probably give no detection above the score threshold, so the mask head never ran: use other images"
        )
    constant = constant_inputs(quantizers)
    if constant:
        raise UserError(
            f"calibration images: {len(constant)} quantizers saw only one constant value (first: {constant[0]}, "
            "scale at the floor): the image(s) are flat or the model's output there is degenerate: use other images"
        )
