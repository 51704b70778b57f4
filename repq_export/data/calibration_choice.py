"""Which images of a set calibrate: evenly spread across it, the first one always among them.

The reference calibrates on the first image of the dataset. One image can misfit the rest of the
set (a small image with two objects gave the bundled Mask R-CNN a W8A8 model 25 box AP worse than
float), and the first N images of a set are often alike (one sequence, one camera). So N > 1 images
are taken at evenly spaced positions: ``floor(i * total / N)`` for i = 0..N-1, which starts at the
first image (N = 1 is exactly the reference's choice) and covers the set to its end.
"""

from __future__ import annotations


def spread_indices(total: int, count: int) -> list[int]:
    """``count`` distinct positions spread evenly over ``range(total)``, starting at 0 (all if count >= total)."""
    if total <= 0:
        return []
    count = min(count, total)
    return [i * total // count for i in range(count)]


def holdout_indices(total: int, taken: list[int], count: int) -> list[int]:
    """``count`` positions spread over ``range(total)`` that are not in ``taken`` (fewer if the set runs out)."""
    rest = [i for i in range(total) if i not in set(taken)]
    return [rest[j] for j in spread_indices(len(rest), count)]
