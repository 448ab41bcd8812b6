"""Which slices need the encoder: skip air, then encode coarse to fine around the target.

The encoder is most of the time per slice on a CPU, and a trained SAM-SP model says "no
object here" with an empty first pass. So a volume is segmented in waves:

1. **Outside the body.** A CT slice with (almost) nothing inside the intensity window
   (air, the table's surroundings) and any slice of one constant value comes out empty
   without being encoded.
2. **Coarse.** Every ``step``-th remaining slice (and the last) is segmented.
3. **Fine.** Around every slice where the target was found, each slice within ``step``
   that has not been segmented is; repeated until a wave finds nothing new.

A slice where the full path finds the target is therefore segmented exactly as the full
path does (the same embedding, the same decoder passes) whenever it lies within ``step``
slices of another such slice that was reached, which covers every run of ``step`` or more
consecutive slices with the target and every gap shorter than ``step``. What it can miss
is an isolated detection shorter than ``step`` slices with no coarse sample on it.
Testing/test_speed.py checks the guarantee on the shared CT series against the full path.

Only for trained SAM-SP models (an empty first pass means "no object"); a vanilla backbone
is prompted with the whole slice everywhere, and expert boxes already say which slices run.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .preprocess import Intensity

# A CT slice with fewer than this fraction of its pixels above the window's floor is outside the
# body (a liver slice has a body cross-section of ~30% of the slice or more).
MIN_BODY_FRACTION = 0.005
DEFAULT_STEP = 4


def outside_body(pixels: np.ndarray, intensity: Intensity, min_fraction: float = MIN_BODY_FRACTION) -> bool:
    """True for a slice that cannot hold a target: constant, or a CT slice that is (nearly) all air.

    Reads the slice once, without copying the volume (``pixels`` is a view of one slice)."""
    lo, hi = float(np.min(pixels)), float(np.max(pixels))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return False  # NaN/Inf: let the encoder path refuse the slice with its message
    if not hi > lo:
        return True  # one value everywhere: the model input is blank
    if intensity.modality != "CT" or intensity.low is None:
        return False  # MR and pictures have no absolute scale to call "air"
    inside = int(np.count_nonzero(pixels > intensity.low))
    return inside < min_fraction * pixels.size


def coarse(body: Sequence[int], step: int) -> list[int]:
    """Every ``step``-th slice of ``body`` and the last one."""
    picks = list(body[::max(1, step)])
    if body and picks[-1] != body[-1]:
        picks.append(body[-1])
    return picks


def next_wave(body: Sequence[int], found: Iterable[int], done: set[int], step: int) -> list[int]:
    """Slices of ``body`` within ``step`` positions of a slice in ``found`` that are not ``done``."""
    pos = {k: p for p, k in enumerate(body)}
    out: set[int] = set()
    for k in found:
        p = pos[k]
        for q in range(max(0, p - step), min(len(body), p + step + 1)):
            if body[q] not in done:
                out.add(body[q])
    return sorted(out)
