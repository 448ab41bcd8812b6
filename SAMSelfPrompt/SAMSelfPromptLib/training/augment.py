"""Augmented copies of training images that survive cached embeddings (issue 11, item 5).

CPU mode trains on cached image embeddings, so an augmentation cannot be drawn afresh at every
step: it has to exist as an image before the encoder sees it. Each training sample therefore gets
``copies`` fixed, seeded variants (image and mask transformed together), each encoded once and
cached like any other image. The embedding cache grows by that factor (2 MB per copy in fp16).

What a copy varies, per kind of image:

- **colour pictures** (dermoscopy): flips and quarter turns (a lesion has no up or left), a crop of
  75-100% of each side (scale and position), and per-channel gain, brightness and gamma (camera
  and lighting);
- **grey images** (ultrasound, MR, CT slices): a left-right flip only (anatomy has an up and
  down, and CT/MR slices a left and right that the model sees in one canonical view, but a flip
  stays a plausible image), the crop, and contrast and gamma (scanner settings).

Validation samples are never augmented: val stays the images as they are, for selection only.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from .data import Sample


def augmented_copies(samples: Sequence[Sample], copies: int, seed: int = 0) -> list[Sample]:
    """``samples`` followed by ``copies`` augmented variants of each (the same for the same seed)."""
    if copies < 0:
        raise ValueError(f"augmented copies must be 0 or more, got {copies}")
    rng = np.random.default_rng(seed)
    out = list(samples)
    for n in range(1, copies + 1):
        for s in samples:
            image, mask = augment(s.image, s.mask, rng)
            out.append(replace(s, case_id=f"{s.case_id}#aug{n}", image=image, mask=mask, window=None))
    return out


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random variant of (image, mask): geometry applied to both, intensity to the image only."""
    colour = image.ndim == 3
    image, mask = _crop(image, mask, rng)
    if colour:
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if rng.random() < 0.5:
            image, mask = image[::-1], mask[::-1]
        turns = int(rng.integers(0, 4))
        image, mask = np.rot90(image, turns, axes=(0, 1)), np.rot90(mask, turns, axes=(0, 1))
        return _colour_jitter(image, rng), np.ascontiguousarray(mask)
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return _contrast_jitter(image, rng), np.ascontiguousarray(mask)


def _crop(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random 75-100% of each side, anywhere in the image (the model input's resize rescales it)."""
    h, w = mask.shape
    ch, cw = max(1, int(h * rng.uniform(0.75, 1.0))), max(1, int(w * rng.uniform(0.75, 1.0)))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return image[top:top + ch, left:left + cw], mask[top:top + ch, left:left + cw]


def _colour_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-channel gain, brightness and gamma, back in the image's own range and dtype."""
    lo, hi = _range(image)
    x = (image.astype(np.float32) - lo) / max(hi - lo, 1e-6)
    x = x * rng.uniform(0.85, 1.15, size=(1, 1, image.shape[2])) + rng.uniform(-0.08, 0.08)
    x = np.clip(x, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    return _back(x, image, lo, hi)


def _contrast_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast and gamma about the image's own range (an intensity window is applied later)."""
    lo, hi = _range(image)
    x = (image.astype(np.float32) - lo) / max(hi - lo, 1e-6)
    x = np.clip((x - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.05, 0.05), 0.0, 1.0)
    x = x ** rng.uniform(0.8, 1.25)
    return _back(x, image, lo, hi)


def _range(image: np.ndarray) -> tuple[float, float]:
    """8-bit pictures span 0-255; anything else (HU, MR values) spans its own minimum to maximum."""
    if image.dtype == np.uint8:
        return 0.0, 255.0
    return float(image.min()), float(image.max())


def _back(x: np.ndarray, like: np.ndarray, lo: float, hi: float) -> np.ndarray:
    y = x * (hi - lo) + lo
    if np.issubdtype(like.dtype, np.integer):
        y = np.rint(y)
    return np.ascontiguousarray(y.astype(like.dtype))
