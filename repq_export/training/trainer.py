"""The training loop: AdamW with linear warm-up and cosine decay per iteration, gradient clipping,
shuffled epochs of aspect-grouped batches with random flips, all drawn from one seeded generator so that a run is
reproducible given its seed and thread count.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from repq_export.models.detector import Detector
from repq_export.training.data import TrainSet
from repq_export.training.detector_losses import detector_losses
from repq_export.training.settings import TrainCfg


def seed_everything(seed: int, threads: int) -> torch.Generator:
    """Seed torch / numpy / random, fix the thread count, and return the generator that drives
    data order, flips and RoI sampling."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(threads)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def param_groups(model: nn.Module, weight_decay: float, no_decay_keys: tuple[str, ...]) -> list[dict]:
    """Two AdamW groups: parameters whose name contains a ``no_decay_keys`` entry get no weight
    decay (mmcv ``paramwise_cfg.custom_keys`` with ``decay_mult=0``)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if any(k in name for k in no_decay_keys) else decay).append(param)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def lr_at(it: int, cfg: TrainCfg, max_iters: int) -> float:
    """mmcv ``CosineAnnealing`` (by iteration, down to ``lr * min_lr_ratio``) with a linear
    warm-up that starts from ``warmup_ratio`` of the scheduled rate."""
    target = cfg.lr * cfg.min_lr_ratio
    lr = target + 0.5 * (cfg.lr - target) * (1 + math.cos(math.pi * it / max_iters))
    if it < cfg.warmup_iters:
        lr *= 1 - (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return lr


def batch_schedule(
    groups: list[bool], batch_size: int, flip_ratio: float, generator: torch.Generator
) -> Iterator[tuple[list[int], list[bool]]]:
    """Endless (image indices, flips) batches, each from one aspect group (``groups[i]``): every
    epoch each group is shuffled and cut into batches (a group's last partial batch is dropped),
    and the batches of both groups are shuffled together."""
    members = [[i for i, g in enumerate(groups) if g == flag] for flag in (False, True)]
    while True:
        flips = (torch.rand(len(groups), generator=generator) < flip_ratio).tolist()
        batches = []
        for group in members:
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            batches += [order[k : k + batch_size] for k in range(0, len(order) - batch_size + 1, batch_size)]
        if not batches:
            raise ValueError(f"no aspect group holds a whole batch of {batch_size} images")
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b], [flips[i] for i in batches[b]]


@dataclass
class TrainLog:
    """Per-iteration total loss and the last iteration's loss terms."""

    losses: list[float] = field(default_factory=list)
    last_terms: dict[str, float] = field(default_factory=dict)


def train(
    detector: Detector,
    train_set: TrainSet,
    cfg: TrainCfg,
    iters: int,
    generator: torch.Generator,
    progress: bool = True,
    callback: Callable[[int, TrainLog], None] | None = None,
) -> TrainLog:
    """Train ``detector`` in place for ``iters`` iterations of ``cfg.batch_size`` images;
    ``callback(iteration, log)`` runs after each iteration (e.g. to evaluate on the way)."""
    optimizer = torch.optim.AdamW(param_groups(detector, cfg.weight_decay, cfg.no_decay_keys),
                                  lr=cfg.lr, betas=cfg.betas)
    groups = train_set.landscape()
    batch_size = min(cfg.batch_size, max(groups.count(True), groups.count(False)))
    batches = batch_schedule(groups, batch_size, cfg.flip_ratio, generator)
    log = TrainLog()
    detector.train()
    bar = tqdm(range(iters), desc="train", disable=not progress, dynamic_ncols=True)
    for it in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, cfg, iters)
        indices, flips = next(batches)
        terms = detector_losses(detector, train_set.batch(indices, flips), cfg, generator)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(detector.parameters(), cfg.grad_clip)
        optimizer.step()
        log.losses.append(loss.item())
        log.last_terms = {k: v.item() for k, v in terms.items()}
        recent = log.losses[-20:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if callback is not None:
            callback(it + 1, log)
            detector.train()
    detector.eval()
    return log
