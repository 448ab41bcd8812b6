"""Show every slice to the model the way the training data looked: as an LPS-stored volume's slice.

A volume's array order is a storage detail. The same CT saved as DICOM (rows run anterior to
posterior, columns patient right to left) and as a RAS-ordered NIfTI gives slices rotated by
180 degrees. The shipped CT model learned the liver on one side of the picture, so it found
nothing on the rotated slices of a RAS NIfTI (Dice 0.83 against 0.00 on the same 8 slices).
Training already reads volumes reoriented to LPS (``training/data.read_volume``).

``SliceOrientation`` maps one slice between its stored pixel grid and that canonical view: the
slice a volume stored with identity LPS direction would give. Rows follow the in-plane patient
axis listed later in L, P, S (P for axial slices, S for coronal and sagittal ones), columns the
other, each running toward +L, +P or +S. Only flips and a transpose are used (no resampling),
so every pixel maps to exactly one pixel and back. Colour pictures have no patient frame and
are shown as stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .volume import Volume
from ..io.dicom import LPS_TO_RAS


@dataclass(frozen=True)
class SliceOrientation:
    transpose: bool = False  # applied first: stored rows become columns
    flip_rows: bool = False  # then reverse the row order
    flip_cols: bool = False  # and the column order

    @classmethod
    def for_volume(cls, volume: Volume, axis: int) -> "SliceOrientation":
        """The mapping for slices taken along array ``axis`` (0 = K, 1 = J, 2 = I)."""
        if volume.is_rgb:
            return cls()
        # Column c: the LPS direction of index c (the RAS<->LPS flip is its own inverse).
        lps = LPS_TO_RAS[:3, :3] @ volume.ijk_to_ras[:3, :3]
        rows, cols = [a for a in (0, 1, 2) if a != axis]  # stored slice: rows, then columns
        # Array axis a is IJK index 2 - a.
        comp = {a: int(np.argmax(np.abs(lps[:, 2 - a]))) for a in (rows, cols)}
        if comp[rows] == comp[cols]:  # strongly oblique: no clear patient axis, leave it as stored
            return cls()
        sign = {a: lps[comp[a], 2 - a] for a in (rows, cols)}
        transpose = comp[cols] > comp[rows]
        new_rows, new_cols = (cols, rows) if transpose else (rows, cols)
        return cls(transpose, bool(sign[new_rows] < 0), bool(sign[new_cols] < 0))

    @property
    def is_identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def canonical_shape(self, stored_hw: tuple[int, int]) -> tuple[int, int]:
        h, w = stored_hw
        return (w, h) if self.transpose else (h, w)

    def stored_shape(self, canonical_hw: tuple[int, int]) -> tuple[int, int]:
        h, w = canonical_hw
        return (w, h) if self.transpose else (h, w)

    # --- pixels -------------------------------------------------------------------------------------
    def to_canonical(self, pixels: np.ndarray) -> np.ndarray:
        """A stored slice (H x W, or H x W x C) as the model should see it."""
        out = pixels.swapaxes(0, 1) if self.transpose else pixels
        if self.flip_rows:
            out = out[::-1]
        if self.flip_cols:
            out = out[:, ::-1]
        return out if self.is_identity else np.ascontiguousarray(out)

    def to_stored(self, pixels: np.ndarray) -> np.ndarray:
        """A canonical-view slice (e.g. the predicted mask) back on the stored pixel grid."""
        out = pixels[:, ::-1] if self.flip_cols else pixels
        if self.flip_rows:
            out = out[::-1]
        if self.transpose:
            out = out.swapaxes(0, 1)
        return out if self.is_identity else np.ascontiguousarray(out)

    # --- coordinates (x = column, y = row, in pixel indices) ----------------------------------------
    def points_to_canonical(self, points, stored_hw: tuple[int, int]) -> np.ndarray:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        x, y = (pts[:, 1], pts[:, 0]) if self.transpose else (pts[:, 0], pts[:, 1])
        h, w = self.canonical_shape(stored_hw)
        if self.flip_rows:
            y = (h - 1) - y
        if self.flip_cols:
            x = (w - 1) - x
        return np.stack([x, y], axis=1)

    def points_to_stored(self, points, stored_hw: tuple[int, int]) -> np.ndarray:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        h, w = self.canonical_shape(stored_hw)
        x, y = pts[:, 0], pts[:, 1]
        if self.flip_rows:
            y = (h - 1) - y
        if self.flip_cols:
            x = (w - 1) - x
        return np.stack([y, x], axis=1) if self.transpose else np.stack([x, y], axis=1)

    def box_to_canonical(self, box, stored_hw: tuple[int, int]) -> np.ndarray:
        return _span(self.points_to_canonical(np.asarray(box, np.float64).reshape(2, 2), stored_hw))

    def box_to_stored(self, box, stored_hw: tuple[int, int]) -> np.ndarray:
        return _span(self.points_to_stored(np.asarray(box, np.float64).reshape(2, 2), stored_hw))


def _span(corners: np.ndarray) -> np.ndarray:
    """x0, y0, x1, y1 of two corner points, whichever way round they came out."""
    return np.concatenate([corners.min(axis=0), corners.max(axis=0)]).astype(np.float32)


@dataclass(frozen=True)
class SliceStack:
    """A volume's slices along one array axis, viewed once in the canonical orientation.

    ``pixels[k]`` is slice k as the model must see it: a numpy view (flips and a transpose
    of the stored array, no copy). Everything downstream (encoding, SAM-SP, propagation,
    clicks) works in this one frame; prompts given on the stored grid enter through
    ``box_in``/``points_in`` and results leave through ``mask_out``/``box_out``, once each.
    """

    orient: SliceOrientation
    pixels: np.ndarray  # [n, H, W] (or [1, H, W, 3] for a colour picture), canonical view
    axis: int

    @classmethod
    def of(cls, volume: Volume, axis: int) -> "SliceStack":
        orient = SliceOrientation.for_volume(volume, axis)
        if volume.is_rgb:
            return cls(orient, volume.array, 0)
        view = np.moveaxis(volume.array, axis, 0)  # view[k] == np.take(array, k, axis)
        if orient.transpose:
            view = view.swapaxes(1, 2)
        if orient.flip_rows:
            view = view[:, ::-1]
        if orient.flip_cols:
            view = view[:, :, ::-1]
        return cls(orient, view, axis)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """A canonical slice's (H, W)."""
        return tuple(self.pixels.shape[1:3])  # type: ignore[return-value]

    @property
    def stored_hw(self) -> tuple[int, int]:
        return self.orient.stored_shape(self.shape)

    def box_in(self, box) -> np.ndarray:
        return self.orient.box_to_canonical(box, self.stored_hw)

    def points_in(self, points) -> np.ndarray:
        return self.orient.points_to_canonical(points, self.stored_hw)

    def mask_in(self, mask: np.ndarray) -> np.ndarray:
        return self.orient.to_canonical(mask)

    def mask_out(self, mask: np.ndarray) -> np.ndarray:
        return self.orient.to_stored(mask)

    def box_out(self, box) -> np.ndarray | None:
        return None if box is None else self.orient.box_to_stored(box, self.stored_hw)
