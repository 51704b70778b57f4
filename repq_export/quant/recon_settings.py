"""The settings of what runs after RepQ-ViT's calibration (``--recon``: block reconstruction, or GPTQ
rounding with ``--recon gptq``), recorded in quant.pth's and repq.json's manifests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

METHOD = "adaround-qdrop-lsq-v2"  # the same by default; records the options below (held-out judging, loss, bias)
LSQ_METHOD = "adaround-qdrop-lsq"  # learned rounding, QDrop, learned steps, heads; judged on its own images (reads)
WEIGHTS_ONLY_METHOD = "adaround-qdrop"  # the first method: rounding only, backbone and FPN (still reads)
GPTQ_METHOD = "gptq"  # closed-form weight rounding on the RepQ-ViT grid (quant/gptq.py)
DEFAULT_ITERS = 100
DEFAULT_IMAGES = 32  # reconstruction images the study takes by default (the commands reconstruct on --calib-images)
_NEW_KEYS = ("images_per_step", "holdout", "mask_probs", "pooled", "bias_correction")  # recorded from METHOD on
# what the older methods did, in the fields they did not record
_OLD_VALUES = {"images_per_step": 1, "holdout": 0.0, "mask_probs": False, "pooled": False, "bias_correction": False}


@dataclass(frozen=True)
class ReconSettings:
    """How the weights' rounding and the activation steps were learned after RepQ-ViT: per block, with QDrop."""

    iters: int = DEFAULT_ITERS  # optimizer steps per block (one calibration image each)
    seed: int = 0  # image order and QDrop masks
    drop_prob: float = 0.5  # QDrop: chance that an activation element skips its quantizer
    lr: float = 1e-2  # Adam step on the rounding variables
    round_weight: float = 0.01  # weight of the rounding regularizer
    warmup: float = 0.2  # share of the steps without the regularizer
    beta_start: float = 20.0  # the regularizer's exponent, annealed to beta_end
    beta_end: float = 2.0
    images: int = 0  # reconstruction images (the calibration images)
    step_lr: float = 4e-3  # Adam step on the log of each per-tensor activation step (0: steps fixed)
    heads: bool = True  # also the RPN head and the RoI box and mask heads
    images_per_step: int = 1  # images whose losses each optimizer step averages
    holdout: float = 0.0  # share of the images kept out of learning to judge each unit (0: judge on the learning ones)
    mask_probs: bool = False  # the mask head's target in probability (sigmoid) space rather than logits
    pooled: bool = False  # multi-map outputs (FPN levels, RPN maps): one error over all elements, not a mean of maps
    bias_correction: bool = False  # after learning, match each unit output's per-channel mean to float's
    method: str = METHOD

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of the manifests' ``reconstruction`` entry."""
        out = {"method": self.method, "iters": self.iters, "seed": self.seed, "drop_prob": self.drop_prob,
               "lr": self.lr, "round_weight": self.round_weight, "warmup": self.warmup,
               "beta_start": self.beta_start, "beta_end": self.beta_end, "images": self.images}
        if self.method != WEIGHTS_ONLY_METHOD:
            out.update(step_lr=self.step_lr, heads=self.heads)
        if self.method == METHOD:
            out.update({k: getattr(self, k) for k in _NEW_KEYS})
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ReconSettings:
        """The inverse of ``as_dict``; ValueError naming the first bad field."""
        method = raw.get("method") if isinstance(raw, Mapping) else raw
        if method not in (METHOD, LSQ_METHOD, WEIGHTS_ONLY_METHOD):
            raise ValueError(f"reconstruction: unknown method {method!r}")
        new = method == METHOD
        ints = {k: raw[k] for k in ("iters", "seed", "images", *(("images_per_step",) if new else ()))}
        float_keys = ("drop_prob", "lr", "round_weight", "warmup", "beta_start", "beta_end")
        extra_floats = (("step_lr",) if method != WEIGHTS_ONLY_METHOD else ()) + (("holdout",) if new else ())
        floats = {k: raw[k] for k in (*float_keys, *extra_floats)}
        bools = {k: raw[k] for k in (("heads",) if method != WEIGHTS_ONLY_METHOD else ())
                 + (("mask_probs", "pooled", "bias_correction") if new else ())}
        for key, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"reconstruction.{key} must be an integer, got {value!r}")
        for key, value in floats.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"reconstruction.{key} must be a number, got {value!r}")
        for key, value in bools.items():
            if not isinstance(value, bool):
                raise ValueError(f"reconstruction.{key} must be true or false, got {value!r}")
        old = {} if new else dict(_OLD_VALUES)
        if method == WEIGHTS_ONLY_METHOD:
            floats["step_lr"], bools["heads"] = 0.0, False
        return cls(**ints, **{k: float(v) for k, v in floats.items()}, **bools, **old, method=method)


@dataclass(frozen=True)
class GptqSettings:
    """How the weights' codes were chosen by GPTQ after RepQ-ViT (quant/gptq.py); steps stay RepQ-ViT's."""

    damp: float = 0.01  # added to H's diagonal, as a share of its mean: keeps H^-1 finite on few images
    group: int = 8  # layers whose inputs one pass over the images gathers (later groups see earlier ones rounded)
    block: int = 128  # columns rounded before their errors reach the rest at once (speed only)
    images: int = 0  # images the inputs came from (the calibration images)
    method: str = GPTQ_METHOD

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of the manifests' ``reconstruction`` entry."""
        return {"method": self.method, "damp": self.damp, "group": self.group, "block": self.block,
                "images": self.images}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> GptqSettings:
        """The inverse of ``as_dict``; ValueError naming the first bad field."""
        if raw.get("method") != GPTQ_METHOD:
            raise ValueError(f"reconstruction: unknown method {raw.get('method')!r}")
        damp = raw.get("damp")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
            raise ValueError(f"reconstruction.damp must be a number >= 0, got {damp!r}")
        ints = {}
        for key in ("group", "block", "images"):
            value = raw.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "images" else 1):
                raise ValueError(f"reconstruction.{key} must be a positive integer, got {value!r}")
            ints[key] = value
        return cls(damp=float(damp), **ints)


def settings_from_dict(raw: Mapping[str, Any]) -> ReconSettings | GptqSettings:
    """The manifests' ``reconstruction`` entry as the settings of its method; ValueError naming a bad field."""
    if isinstance(raw, Mapping) and raw.get("method") == GPTQ_METHOD:
        return GptqSettings.from_dict(raw)
    return ReconSettings.from_dict(raw)
