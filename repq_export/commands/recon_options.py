"""The ``--recon`` options of `repq-export` and `tools/test.py`, and the step they run after calibration."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from torch import Tensor, nn

from ..quant.recon_settings import DEFAULT_ITERS, ReconSettings
from .common import non_negative_int, positive_int


def add_recon_options(p: argparse.ArgumentParser) -> None:
    """Add --recon, --recon-iters and --recon-seed to a command's parser."""
    g = p.add_argument_group("block reconstruction after RepQ-ViT (opt-in; RepQ-ViT alone is the default)")
    g.add_argument("--recon", action="store_true", help="after calibration, learn the weights' rounding (AdaRound) "
                   "and the per-tensor activation steps (LSQ, zero points kept) block by block, with QDrop, on the "
                   "calibration images, so that each Swin block, patch merging, the FPN, the RPN head and the RoI "
                   "box and mask heads reproduce the float model's output; the result exports like any other "
                   "state (use several --calib-images)")
    g.add_argument("--recon-iters", type=positive_int, default=DEFAULT_ITERS,
                   help=f"optimizer steps per block (default {DEFAULT_ITERS})")
    g.add_argument("--recon-seed", type=non_negative_int, default=0, help="seed of the image order and the "
                   "QDrop masks (default 0); the same seed gives the same weights")


def recon_settings(args: argparse.Namespace) -> ReconSettings | None:
    """The ReconSettings the options ask for, or None without --recon."""
    if not getattr(args, "recon", False):
        return None
    return ReconSettings(iters=args.recon_iters, seed=args.recon_seed)


def maybe_reconstruct(qmodel: nn.Module, inputs: Sequence[tuple[Tensor, Tensor]], settings: ReconSettings | None,
                      progress: bool = True, log=print) -> None:
    """Run block reconstruction on the calibrated ``qmodel`` when ``settings`` is given (reporting each block)."""
    if settings is not None:
        from ..quant.reconstruct import reconstruct

        reconstruct(qmodel, inputs, settings, progress, log)
