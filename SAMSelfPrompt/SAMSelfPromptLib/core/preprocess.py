"""Slice pixels to model input and model output back to the slice grid.

Intensities: CT is clipped to a window preset, MR to volume percentiles, RGB
images are used as they are; every slice is then min-max scaled to [0, 1] as
LiteMedSAM/MedSAM were trained. Geometry: the longest side is resized to the
model's input size and the rest is padded at the bottom and right, so mapping
back is a crop of the padded frame followed by a resize to the slice's shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# (level, width) in HU. "abdomen" is the default soft-tissue window.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "liver": (80.0, 200.0),
    "soft_tissue": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}

MODALITIES = ("CT", "MR", "RGB", "generic")


@dataclass(frozen=True)
class Intensity:
    """How raw values become [0, 1]: clip to (low, high), then per-slice min-max."""

    modality: str = "generic"
    low: float | None = None
    high: float | None = None

    def to_dict(self) -> dict:
        return {"modality": self.modality, "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, d: dict) -> "Intensity":
        return cls(d.get("modality", "generic"), d.get("low"), d.get("high"))


def ct_window(preset: str = "abdomen") -> Intensity:
    if preset not in CT_WINDOWS:
        raise ValueError(f"unknown CT window '{preset}'; choose one of {', '.join(CT_WINDOWS)}")
    level, width = CT_WINDOWS[preset]
    return Intensity("CT", level - width / 2, level + width / 2)


def mr_percentiles(volume: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> Intensity:
    """MR has no absolute scale: clip to percentiles of the non-zero voxels of this volume."""
    values = volume[volume > 0] if np.any(volume > 0) else volume
    lo, hi = np.percentile(values, [lower, upper]) if values.size else (0.0, 1.0)
    return Intensity("MR", float(lo), float(hi))


def guess_intensity(volume: np.ndarray, modality: str | None = None, ct_preset: str = "abdomen") -> Intensity:
    """Pick the intensity handling for a volume: CT window, MR percentiles, or as-is RGB."""
    modality = (modality or "").upper()
    if volume.ndim == 4 and volume.shape[-1] == 3 or modality == "RGB":
        return Intensity("RGB")
    if modality == "CT":
        return ct_window(ct_preset)
    if modality in ("MR", "MRI"):
        return mr_percentiles(volume)
    # No DICOM modality: values below -500 only occur in CT (air is -1000 HU).
    if volume.size and float(volume.min()) < -500:
        return ct_window(ct_preset)
    return mr_percentiles(volume) if volume.size else Intensity()


def normalize_slice(pixels: np.ndarray, intensity: Intensity) -> np.ndarray:
    """H x W or H x W x 3 raw -> H x W x 3 float32 in [0, 1]."""
    img = pixels.astype(np.float32, copy=False)
    if intensity.low is not None and intensity.high is not None:
        img = np.clip(img, intensity.low, intensity.high)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return img


@dataclass(frozen=True)
class Frame:
    """Where a slice of shape (h, w) sits inside the padded square model input.

    With a window (``top``, ``left``, and the whole slice's ``slice_h`` x ``slice_w``), (h, w) is the part
    of the slice the model sees (``scale_window``); slice coordinates in and out are the whole slice's."""

    h: int
    w: int
    size: int
    top: int = 0
    left: int = 0
    slice_h: int | None = None
    slice_w: int | None = None

    @property
    def windowed(self) -> bool:
        return self.slice_h is not None

    @property
    def scale(self) -> float:
        return self.size / max(self.h, self.w)

    @property
    def new_hw(self) -> tuple[int, int]:
        s = self.scale
        return max(1, int(self.h * s + 0.5)), max(1, int(self.w * s + 0.5))

    def _offset(self, n: int) -> np.ndarray:
        return np.array([self.left, self.top] * (n // 2), dtype=np.float32)

    def box_to_model(self, box_xyxy) -> np.ndarray:
        """A box in slice pixel coordinates (x0, y0, x1, y1) -> model input coordinates."""
        return (np.asarray(box_xyxy, dtype=np.float32) - self._offset(4)) * self.scale

    def box_to_slice(self, box_xyxy) -> np.ndarray:
        return np.asarray(box_xyxy, dtype=np.float32) / self.scale + self._offset(4)

    def points_to_model(self, points_xy) -> np.ndarray:
        # Pixel centres: (x + 0.5) in slice pixels -> model pixels.
        return (np.asarray(points_xy, dtype=np.float32) - self._offset(2) + 0.5) * self.scale

    def full_box(self) -> np.ndarray:
        """The box spanning the whole (unpadded) image the model sees, in model coordinates."""
        nh, nw = self.new_hw
        return np.array([0.0, 0.0, nw - 1.0, nh - 1.0], dtype=np.float32)

    def window_of(self, image: np.ndarray) -> np.ndarray:
        """The part of a whole-slice array (H x W or H x W x C) the model sees."""
        return image[self.top:self.top + self.h, self.left:self.left + self.w] if self.windowed else image


def to_model_input(img01: np.ndarray, size: int, window: tuple[int, int, int, int] | None = None
                   ) -> tuple[torch.Tensor, Frame]:
    """H x W x 3 in [0, 1] -> 3 x S x S tensor (resized, zero-padded bottom/right) and its frame.

    ``window`` (top, left, h, w): the model sees only that part of the slice (``scale_window``)."""
    if window is None:
        frame = Frame(img01.shape[0], img01.shape[1], size)
    else:
        top, left, h, w = window
        frame = Frame(h, w, size, top, left, img01.shape[0], img01.shape[1])
    nh, nw = frame.new_hw
    t = torch.from_numpy(np.ascontiguousarray(frame.window_of(img01))).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    t = F.pad(t, (0, size - nw, 0, size - nh))
    return t[0].clamp_(0.0, 1.0), frame


def logits_to_slice(low_res: torch.Tensor, frame: Frame) -> torch.Tensor:
    """1 x 256 x 256 (or 256 x 256) low-res logits -> h x w logits on the slice grid (the whole slice,
    very negative outside a window)."""
    x = low_res.reshape(1, 1, *low_res.shape[-2:]).float()
    x = F.interpolate(x, size=(frame.size, frame.size), mode="bilinear", align_corners=False)
    nh, nw = frame.new_hw
    x = x[..., :nh, :nw]
    x = F.interpolate(x, size=(frame.h, frame.w), mode="bilinear", align_corners=False)
    if not frame.windowed:
        return x[0, 0]
    out = torch.full((frame.slice_h, frame.slice_w), -20.0, dtype=x.dtype, device=x.device)
    out[frame.top:frame.top + frame.h, frame.left:frame.left + frame.w] = x[0, 0]
    return out


def scale_window(slices, spacing_rc: tuple[float, float], field_of_view_mm: float, intensity: Intensity,
                 samples: int = 16) -> tuple[int, int, int, int] | None:
    """The part of every slice to show the model so that it sees the physical scale it was trained at.

    The model input has a fixed size, so a slice's millimetres per model pixel follow from its field
    of view. A model trained on slices about ``field_of_view_mm`` across (the CT liver model: 366 mm)
    segments a 500 mm slice at 0.73x the scale it learnt, and its Dice on the DICOM series drops from
    0.957 to 0.819 (docs/RESULTS.md, CT liver). So a larger slice is cropped to a square window of
    ``field_of_view_mm``, centred on the centroid of the pixels above the window's floor (the body), the
    same window for every slice of the volume; a slice no larger than that is shown whole (None).

    ``slices``: the volume's slices as the model sees them (a sequence of H x W arrays);
    ``spacing_rc``: millimetres per row and per column. Returns (top, left, h, w) in slice pixels."""
    n = len(slices)
    if n == 0 or field_of_view_mm <= 0:
        return None
    rows, cols = slices[0].shape[:2]
    h = min(rows, int(round(field_of_view_mm / spacing_rc[0])))
    w = min(cols, int(round(field_of_view_mm / spacing_rc[1])))
    if h >= rows * 0.95 and w >= cols * 0.95:
        return None  # within 5% of the trained scale already
    floor = intensity.low if intensity.low is not None else None
    weight = np.zeros((rows, cols), np.float64)
    for k in np.unique(np.linspace(0, n - 1, min(samples, n)).round().astype(int)):
        pixels = np.asarray(slices[k], np.float32)
        weight += pixels > (floor if floor is not None else float(np.median(pixels)))
    total = weight.sum()
    if total == 0:
        r, c = rows / 2, cols / 2
    else:
        r = float((weight.sum(axis=1) * np.arange(rows)).sum() / total)
        c = float((weight.sum(axis=0) * np.arange(cols)).sum() / total)
    top = int(np.clip(round(r - h / 2), 0, rows - h))
    left = int(np.clip(round(c - w / 2), 0, cols - w))
    return top, left, h, w


def mask_to_low_res(mask: np.ndarray, frame: Frame, low_res: int = 256) -> torch.Tensor:
    """A slice-grid binary mask -> low_res x low_res target in the model's padded frame."""
    nh, nw = frame.new_hw
    t = torch.from_numpy(frame.window_of(mask).astype(np.float32))[None, None]
    t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False)
    t = F.pad(t, (0, frame.size - nw, 0, frame.size - nh))
    t = F.interpolate(t, size=(low_res, low_res), mode="bilinear", align_corners=False)
    return (t[0] > 0.5).float()
