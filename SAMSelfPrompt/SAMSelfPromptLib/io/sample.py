"""Synthetic samples the project makes itself, so the demo needs no outside data.

A dermoscopy-like picture: shaded skin with a vignetted field of view and a brown,
irregular, textured lesion with a soft border. The truth mask is known exactly, so
the demo can print its own Dice.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def dermoscopy_sample(seed: int = 7, height: int = 384, width: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(H x W x 3 uint8 image, H x W bool lesion mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = height * (0.45 + 0.1 * rng.random()), width * (0.45 + 0.1 * rng.random())
    # Irregular outline: an ellipse whose radius wobbles with a few random harmonics.
    theta = np.arctan2(yy - cy, xx - cx)
    base = 0.28 * min(height, width)
    wobble = sum(rng.uniform(0.03, 0.09) * np.cos(n * theta + rng.uniform(0, 2 * np.pi)) for n in (2, 3, 5))
    r = np.hypot((yy - cy) / 1.0, (xx - cx) / 1.25)
    mask = r < base * (1.0 + wobble)
    # Skin: warm pink with slow shading and fine noise.
    shade = 0.9 + 0.1 * np.cos(xx / width * np.pi) * np.cos(yy / height * np.pi)
    skin = np.stack([225 * shade, 170 * shade, 150 * shade], -1)
    skin += ndimage.gaussian_filter(rng.normal(0, 6, (height, width, 3)), (2, 2, 0))
    # Lesion: brown with a darker network-like texture, blended through a soft edge.
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (height, width)), 3)
    lesion = np.stack([120 + 25 * texture, 75 + 18 * texture, 55 + 12 * texture], -1)
    alpha = ndimage.gaussian_filter(mask.astype(np.float32), 4)[..., None]
    img = skin * (1 - alpha) + lesion * alpha
    # Dermoscope vignette: dark corners outside a circular field of view.
    fov = np.hypot((yy - height / 2) / (height * 0.62), (xx - width / 2) / (width * 0.62))
    img *= np.clip(1.25 - fov, 0.15, 1.0)[..., None]
    return np.clip(img, 0, 255).astype(np.uint8), mask
