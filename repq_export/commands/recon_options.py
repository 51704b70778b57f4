"""The ``--recon`` options of `repq-export` and `tools/test.py`, and the step they run after calibration."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from torch import Tensor, nn

from ..quant.recon_settings import DEFAULT_ITERS, GPTQ_METHOD, GptqSettings, ReconSettings

ADAROUND = "adaround"  # --recon's default method: learned rounding and steps, block by block
from .common import non_negative_int, positive_int


def add_recon_options(p: argparse.ArgumentParser) -> None:
    """Add --recon, --recon-iters and --recon-seed to a command's parser."""
    g = p.add_argument_group("weight rounding after RepQ-ViT (opt-in; RepQ-ViT alone is the default)")
    g.add_argument("--recon", nargs="?", const=ADAROUND, choices=(ADAROUND, GPTQ_METHOD), default=None,
                   metavar="{adaround,gptq}",
                   help="after calibration, on the calibration images: 'adaround' (the default of a bare --recon) "
                   "learns the weights' rounding (AdaRound) and the per-tensor activation steps (LSQ, zero points "
                   "kept) block by block, with QDrop, so that each Swin block, patch merging, the FPN, the RPN head "
                   "and the RoI heads reproduce the float model's output; 'gptq' rounds every weight on its "
                   "RepQ-ViT grid by GPTQ (error feedback through the inverse Hessian of the layer's inputs; "
                   "closed form, a few minutes, steps unchanged). Either exports like any other state (use "
                   "several --calib-images)")
    g.add_argument("--recon-iters", type=positive_int, default=DEFAULT_ITERS,
                   help=f"adaround: optimizer steps per block (default {DEFAULT_ITERS})")
    g.add_argument("--recon-seed", type=non_negative_int, default=0, help="seed of the image order and the "
                   "QDrop masks (default 0); the same seed gives the same weights")


def recon_settings(args: argparse.Namespace) -> ReconSettings | GptqSettings | None:
    """The settings of the method --recon asks for, or None without --recon."""
    method = getattr(args, "recon", None)
    if not method:
        return None
    if method == GPTQ_METHOD:
        return GptqSettings()
    return ReconSettings(iters=args.recon_iters, seed=args.recon_seed)


def maybe_reconstruct(qmodel: nn.Module, inputs: Sequence[tuple[Tensor, Tensor]],
                      settings: ReconSettings | GptqSettings | None,
                      progress: bool = True, log=print) -> None:
    """Run the reconstruction ``settings`` name on the calibrated ``qmodel``, if any (reporting as it goes)."""
    if settings is not None:
        from ..quant.reconstruct import reconstruct

        reconstruct(qmodel, inputs, settings, progress, log)
