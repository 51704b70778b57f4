"""Quantiles of each row of a tensor, bit-exact with ``torch.quantile`` (linear interpolation).

The reference search calls ``torch.quantile(x, q)`` once per candidate (and per channel).
``torch.quantile`` sorts the whole input; here only the two order statistics around each rank
are extracted, with ``torch.topk`` on the tail that holds them, for all rows at once. The
rounding is the one of ``torch.quantile`` in the pinned torch (2.14): ``q`` is rounded to
float32, the rank ``q * (M - 1)`` is exact, its fraction is rounded to float32 and the two
neighbours are combined with ``torch.lerp``. The tests compare the results bit for bit.

(torch 2.14 accepts any size; torch 1.x refused inputs above 2^24 elements, and the reference
then fell back to ``numpy.percentile``, whose float64 rank can differ in the last bits.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def reference_quantiles(x: Tensor, qs: Sequence[float]) -> Tensor:
    """(len(qs), R) quantiles of each row of ``x`` (R, M), equal to ``torch.quantile(x[r], q)``."""
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"reference_quantiles: need a non-empty (rows, M) tensor, got {tuple(x.shape)}")
    m = x.shape[1]
    plans = [_rank_plan(q, m) for q in qs]
    stats = _order_statistics(x, sorted({i for lo, hi, _ in plans for i in (lo, hi)}))
    return torch.stack([torch.lerp(stats[lo], stats[hi], torch.full_like(stats[lo], w)) for lo, hi, w in plans])


def _rank_plan(q: float, m: int) -> tuple[int, int, float]:
    """(index below, index above, float32 weight) of ``torch.quantile(x, q)`` on M elements."""
    rank = float(np.float32(q)) * (m - 1)  # exact in float64 while M < 2^29
    lo, hi = math.floor(rank), math.ceil(rank)
    return lo, hi, float(np.float32(rank - lo))


def _order_statistics(x: Tensor, indices: list[int]) -> dict[int, Tensor]:
    """{i: (R,) i-th smallest value of each row} via topk on the lower or the upper tail."""
    m = x.shape[1]
    low = [i for i in indices if i < m // 2]
    high = [i for i in indices if i >= m // 2]
    stats: dict[int, Tensor] = {}
    if low:
        smallest = torch.topk(x, max(low) + 1, dim=1, largest=False, sorted=True).values
        stats.update({i: smallest[:, i] for i in low})
    if high:
        largest = torch.topk(x, m - min(high), dim=1, largest=True, sorted=True).values
        stats.update({i: largest[:, m - 1 - i] for i in high})
    return stats
