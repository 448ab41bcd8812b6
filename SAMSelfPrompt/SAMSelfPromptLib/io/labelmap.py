"""Checks and segment lists shared by every labelmap writer (.seg.nrrd, NIfTI, DICOM-SEG)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError


def check_labelmap(labelmap: np.ndarray, ijk_to_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labelmap = np.asarray(labelmap)
    if labelmap.ndim != 3:
        raise InputError(f"labelmap must be 3D [K, J, I], got shape {labelmap.shape}")
    if not (np.issubdtype(labelmap.dtype, np.integer) or labelmap.dtype == bool):
        raise InputError(f"labelmap must hold integer labels, got {labelmap.dtype}")
    if labelmap.size and (labelmap.min() < 0 or labelmap.max() > 65535):
        raise InputError("labelmap values must be in 0..65535")
    m = np.asarray(ijk_to_ras, float)
    if m.shape != (4, 4) or abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise InputError(f"ijk_to_ras must be a non-singular 4x4 matrix, got {m.shape}")
    dtype = np.uint8 if labelmap.size == 0 or labelmap.max() <= 255 else np.uint16
    return labelmap.astype(dtype, copy=False), m


def color01(color: Sequence[float] | None) -> list[float]:
    """Colours may come as 0..1 floats (Slicer) or 0..255 integers; .seg.nrrd stores 0..1."""
    if color is None:
        return [0.5, 0.5, 0.5]
    c = [float(v) for v in color][:3]
    return [v / 255.0 for v in c] if max(c) > 1.0 else c


def complete_segments(labelmap: np.ndarray, segments: Sequence[dict] | None) -> list[dict]:
    """The given segments plus a 'Label N' entry for any label value in the map that has none."""
    result = [dict(s) for s in (segments or [])]
    known = {int(s["label"]) for s in result}
    for value in np.unique(labelmap):
        if value and int(value) not in known:
            result.append({"label": int(value), "name": f"Label {int(value)}"})
    if len({s["label"] for s in result}) != len(result):
        raise InputError("each segment needs its own label value")
    return sorted(result, key=lambda s: s["label"])
