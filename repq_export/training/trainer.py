"""The training loop: AdamW with linear warm-up and cosine decay per iteration, gradient clipping,
shuffled epochs of aspect-grouped batches with random flips.

A run is reproducible given its seed and thread count: the data order and flips come from one
seeded generator, RoI / anchor sampling from another. With a ``state_path`` the loop saves its
whole state (weights, optimizer, sampling generator, losses) every ``state_every`` iterations and
resumes from it, giving the same result as an uninterrupted run: on a shared machine a long run
may be stopped by others.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from repq_export.errors import UserError
from repq_export.files import write_atomically
from repq_export.models.detector import Detector
from repq_export.training.data import TrainSet
from repq_export.training.detector_losses import detector_losses
from repq_export.training.settings import TrainCfg


SAMPLING_SEED_OFFSET = 1_000_003  # the sampling generator's seed is the run's seed plus this


def seed_everything(seed: int, threads: int) -> None:
    """Seed torch (weight initialisation), numpy and random, and fix the thread count."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(threads)


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
    """Per-iteration total loss, the last iteration's loss terms, and the wall time spent in
    training iterations (summed over resumed segments)."""

    losses: list[float] = field(default_factory=list)
    last_terms: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def save_state(path: Path, tag: str, detector: Detector, optimizer: torch.optim.Optimizer,
               sampling: torch.Generator, log: TrainLog) -> None:
    """Write the loop's state after ``len(log.losses)`` iterations (temporary name, then rename);
    ``tag`` names the run (config, iterations, seed) so that no other run resumes from it."""
    state = dict(tag=tag, iteration=len(log.losses), model=detector.state_dict(), optimizer=optimizer.state_dict(),
                 sampling=sampling.get_state(), losses=log.losses, last_terms=log.last_terms, seconds=log.seconds)
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path, tag: str, detector: Detector, optimizer: torch.optim.Optimizer,
               sampling: torch.Generator) -> TrainLog:
    """Restore what ``save_state`` wrote; returns the log (its length is the iteration reached)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("tag") != tag:
        raise UserError(f"{path}: training state of another run ({state.get('tag')!r}, not {tag!r}); "
                        "delete it to start afresh")
    detector.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    sampling.set_state(state["sampling"])
    return TrainLog(list(state["losses"]), dict(state["last_terms"]), float(state["seconds"]))


def train(
    detector: Detector,
    train_set: TrainSet,
    cfg: TrainCfg,
    iters: int,
    seed: int,
    progress: bool = True,
    callback: Callable[[int, TrainLog], None] | None = None,
    state_path: str | Path | None = None,
    state_every: int = 50,
    state_tag: str = "",
) -> TrainLog:
    """Train ``detector`` in place for ``iters`` iterations of ``cfg.batch_size`` images and hand
    it back in eval mode; ``callback(iteration, log)`` runs after each iteration. With
    ``state_path``, resume from it if it exists and save to it on the way."""
    optimizer = torch.optim.AdamW(param_groups(detector, cfg.weight_decay, cfg.no_decay_keys),
                                  lr=cfg.lr, betas=cfg.betas)
    sampling = torch.Generator().manual_seed(seed + SAMPLING_SEED_OFFSET)
    groups = train_set.landscape()
    batch_size = min(cfg.batch_size, max(groups.count(True), groups.count(False)))
    batches = batch_schedule(groups, batch_size, cfg.flip_ratio, torch.Generator().manual_seed(seed))
    state_path = Path(state_path) if state_path is not None else None
    log = TrainLog()
    if state_path is not None and state_path.is_file():
        log = load_state(state_path, state_tag, detector, optimizer, sampling)
        for _ in range(len(log.losses)):
            next(batches)
    detector.train()
    bar = tqdm(range(len(log.losses), iters), desc="train", disable=not progress, dynamic_ncols=True,
               initial=len(log.losses), total=iters)
    for it in bar:
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, cfg, iters)
        indices, flips = next(batches)
        terms = detector_losses(detector, train_set.batch(indices, flips), cfg, sampling)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(detector.parameters(), cfg.grad_clip)
        optimizer.step()
        log.losses.append(loss.item())
        log.last_terms = {k: v.item() for k, v in terms.items()}
        log.seconds += time.perf_counter() - start
        recent = log.losses[-20:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if state_path is not None and (it + 1) % state_every == 0 and it + 1 < iters:
            save_state(state_path, state_tag, detector, optimizer, sampling, log)
        if callback is not None:
            callback(it + 1, log)
            detector.train()
    detector.eval()
    return log
