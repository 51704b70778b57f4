"""The settings of block reconstruction (``--recon``), recorded in quant.pth's and repq.json's manifests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

METHOD = "adaround-qdrop"
DEFAULT_ITERS = 100


@dataclass(frozen=True)
class ReconSettings:
    """How the weights' rounding was learned after RepQ-ViT: AdaRound per block with QDrop."""

    iters: int = DEFAULT_ITERS  # optimizer steps per block (one calibration image each)
    seed: int = 0  # image order and QDrop masks
    drop_prob: float = 0.5  # QDrop: chance that an activation element skips its quantizer
    lr: float = 1e-2  # Adam step on the rounding variables
    round_weight: float = 0.01  # weight of the rounding regularizer
    warmup: float = 0.2  # share of the steps without the regularizer
    beta_start: float = 20.0  # the regularizer's exponent, annealed to beta_end
    beta_end: float = 2.0
    images: int = 0  # reconstruction images (the calibration images)
    method: str = METHOD

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of the manifests' ``reconstruction`` entry."""
        return {"method": self.method, "iters": self.iters, "seed": self.seed, "drop_prob": self.drop_prob,
                "lr": self.lr, "round_weight": self.round_weight, "warmup": self.warmup,
                "beta_start": self.beta_start, "beta_end": self.beta_end, "images": self.images}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ReconSettings:
        """The inverse of ``as_dict``; ValueError naming the first bad field."""
        if not isinstance(raw, Mapping) or raw.get("method") != METHOD:
            method = raw.get("method") if isinstance(raw, Mapping) else raw
            raise ValueError(f"reconstruction: unknown method {method!r}")
        ints = {k: raw[k] for k in ("iters", "seed", "images")}
        floats = {k: raw[k] for k in ("drop_prob", "lr", "round_weight", "warmup", "beta_start", "beta_end")}
        for key, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"reconstruction.{key} must be an integer, got {value!r}")
        for key, value in floats.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"reconstruction.{key} must be a number, got {value!r}")
        return cls(**ints, **{k: float(v) for k, v in floats.items()})
