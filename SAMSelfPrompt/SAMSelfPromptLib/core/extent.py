"""Adapt's inference: grow the target outward from the slices the user annotated, within its extent.

A model adapted on a few slices knows the structure's look but not where along the axis it
ends. So the volume is never segmented slice by slice in isolation; instead:

1. the annotated slices keep the user's own masks;
2. the slices between two annotated ones are segmented (SAM-SP with the presence rule of
   ``selfprompt.absent``); the structure runs through them, so where pass 1 says "absent" there
   the slice is prompted with its neighbour's box instead (``carry``, LiteMedSAM-style);
3. from the first and the last annotated slice the run goes outward, one slice at a time. With
   an extent the target is on every slice of it (that is what first/last slice means), so the run
   goes to the extent's end, carrying the neighbour's box where pass 1 says "absent". Without one it
   stops in that direction at the first slice where pass 1 says "absent" (``patience`` in a row);
4. at the end only the 3D components (26-connected) that touch an annotated mask are kept.

Nothing is ever written outside ``extent`` (first, last slice, inclusive) when one is given, and
only the slices the run reaches are encoded: after a stop the rest of that side costs nothing.

Everything here is in one slice view (the caller's): ``decode(k)`` returns slice k's mask or None
(absent) in the same view as the annotations.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import Cancelled, InputError
from ..modeling.backbones import SamBackbone
from .preprocess import Frame, logits_to_slice
from .selfprompt import absent, box_from_logits


@dataclass
class ExtentResult:
    masks: dict[int, np.ndarray]  # slice -> bool mask, only slices with something painted
    visited: list[int] = field(default_factory=list)  # slices the model was run on, in order
    stopped: dict[str, int | None] = field(default_factory=dict)  # "down"/"up": first absent slice (None: hit the end)
    removed_voxels: int = 0  # painted by the model but not connected to an annotation (3D cleanup)


def check_extent(extent: tuple[int, int] | None, n_slices: int, annotated: Sequence[int]) -> tuple[int, int]:
    """The inclusive (first, last) slice range, checked against the volume and the annotations."""
    if not annotated:
        raise InputError("Adapt needs at least one annotated slice")
    if extent is None:
        return 0, n_slices - 1
    first, last = int(extent[0]), int(extent[1])
    if first > last:
        first, last = last, first
    if first < 0 or last >= n_slices:
        raise InputError(f"extent {first}..{last} is outside the volume's slices 0..{n_slices - 1}")
    outside = [k for k in annotated if not first <= k <= last]
    if outside:
        raise InputError(f"annotated slice(s) {outside} lie outside the extent {first}..{last}: "
                         "the first/last slice must include every slice you outlined")
    return first, last


@torch.no_grad()
def samsp_slice(model: SamBackbone, embedding: torch.Tensor, frame: Frame, presence_threshold: float,
                structure: int = 0) -> np.ndarray | None:
    """SAM-SP on one slice's embedding (1 x 256 x 64 x 64): the slice-grid mask, or None when pass 1
    says the structure is absent (empty y0, or predicted IoU below ``presence_threshold``)."""
    which = torch.full((1,), structure, dtype=torch.long, device=embedding.device)
    emb = embedding.float()
    y0, presence = model.decode(emb, structure=which)
    fallback = torch.as_tensor(frame.full_box(), device=emb.device)[None]
    boxes, empty = box_from_logits(y0, fallback, model.image_size)
    if bool(absent(empty, presence, presence_threshold)[0]):
        return None
    y1, _ = model.decode(emb, boxes=boxes, structure=which)
    mask = (logits_to_slice(y1[0], frame) > 0).cpu().numpy()
    return mask if mask.any() else None


def grow_from_annotations(
    decode: Callable[[int], np.ndarray | None],
    n_slices: int,
    annotations: Mapping[int, np.ndarray],
    extent: tuple[int, int] | None = None,
    patience: int = 1,
    cleanup: bool = True,
    cancel: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
    carry: Callable[[int, np.ndarray], np.ndarray | None] | None = None,
) -> ExtentResult:
    """Run ``decode`` on the slices the rule above reaches; return the kept masks.

    ``patience``: how many absent slices in a row end a direction (1: the first one), without an extent.
    ``carry(k, neighbour_mask)``: slice k prompted from its neighbour's mask, used where the target is
    known to be (between outlines, inside a given extent) and ``decode`` says absent.
    """
    ks = sorted(int(k) for k in annotations)
    first, last = check_extent(extent, n_slices, ks)
    masks: dict[int, np.ndarray] = {k: np.asarray(annotations[k], bool) for k in ks}
    result = ExtentResult({}, [], {})

    def visit(k: int, known: bool = False, neighbour: int | None = None) -> np.ndarray | None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled by the user")
        m = decode(k)
        if (m is None or not m.any()) and known and carry is not None and neighbour in masks:
            m = carry(k, masks[neighbour])
        result.visited.append(k)
        if progress is not None:
            progress(len(result.visited))
        if m is not None and m.any():
            masks[k] = np.asarray(m, bool)
            return masks[k]
        return None

    for a, b in zip(ks, ks[1:]):  # between annotated slices: the structure runs through
        for k in range(a + 1, b):
            visit(k, True, k - 1)
    for name, start, stop, step in (("down", ks[0] - 1, first - 1, -1), ("up", ks[-1] + 1, last + 1, 1)):
        misses, ended = 0, None
        for k in range(start, stop, step):
            if visit(k, extent is not None, k - step) is None:
                misses += 1
                if extent is None and misses >= max(1, patience):
                    ended = k
                    break
            else:
                misses = 0
        result.stopped[name] = ended
    if cleanup:
        masks, result.removed_voxels = keep_connected(masks, ks)
    result.masks = {k: m for k, m in masks.items() if first <= k <= last and m.any()}
    return result


def keep_connected(masks: Mapping[int, np.ndarray], seeds: Sequence[int]) -> tuple[dict[int, np.ndarray], int]:
    """Keep the 26-connected 3D components that touch a seed slice's mask; (kept masks, voxels removed)."""
    from scipy import ndimage

    if not masks:
        return {}, 0
    lo, hi = min(masks), max(masks)
    shape = next(iter(masks.values())).shape
    block = np.zeros((hi - lo + 1, *shape), bool)
    for k, m in masks.items():
        block[k - lo] = m
    labels, n = ndimage.label(block, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return dict(masks), 0
    keep = np.zeros(n + 1, bool)
    for k in seeds:
        keep[np.unique(labels[k - lo][block[k - lo]])] = True
    keep[0] = False
    kept = keep[labels]
    removed = int(block.sum() - kept.sum())
    return {lo + i: kept[i] for i in range(len(kept)) if kept[i].any()}, removed


@torch.no_grad()
def box_slice(model: SamBackbone, embedding: torch.Tensor, frame: Frame, neighbour: np.ndarray,
              structure: int = 0, grow: float = 0.1) -> np.ndarray | None:
    """Slice k prompted with the box of its neighbour's mask (slice pixels), widened by ``grow`` of its
    size on each side: the carry for slices known to hold the target where pass 1 found nothing."""
    from .masks import mask_box

    box = mask_box(neighbour)
    if box is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = grow * (x1 - x0 + 1), grow * (y1 - y0 + 1)
    box = np.array([max(0.0, x0 - dx), max(0.0, y0 - dy), min(frame.w - 1.0, x1 + dx), min(frame.h - 1.0, y1 + dy)])
    which = torch.full((1,), structure, dtype=torch.long, device=embedding.device)
    mbox = torch.as_tensor(frame.box_to_model(box), device=embedding.device)[None]
    y1_, _ = model.decode(embedding.float(), boxes=mbox, structure=which)
    mask = (logits_to_slice(y1_[0], frame) > 0).cpu().numpy()
    return mask if mask.any() else None

