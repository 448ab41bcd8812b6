"""The two measurements every part of the project takes of a 2D/3D mask: its box and its Dice.

One convention for boxes everywhere: x0, y0, x1, y1 are inclusive pixel indices of the
first and last foreground column and row (SAM's box prompts use the same corners).
"""
from __future__ import annotations

import numpy as np


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """The tight box (x0, y0, x1, y1, inclusive) of a 2D mask's foreground, None if it is empty."""
    ys, xs = np.nonzero(np.asarray(mask))
    if ys.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks of any dimension; two empty masks agree perfectly (1.0)."""
    a, b = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
