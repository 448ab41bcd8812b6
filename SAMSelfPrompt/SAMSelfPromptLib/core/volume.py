"""The one in-memory form every host hands the engine: an array plus its IJK->RAS matrix."""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError


@dataclass
class Volume:
    """A scalar volume (K x J x I) or an RGB image stack (K x J x I x 3).

    ``array`` is indexed [k, j, i] exactly like ``slicer.util.arrayFromVolume``;
    ``ijk_to_ras`` maps (i, j, k, 1) to RAS millimetres. A 2D image is a volume with K = 1.
    ``modality`` is the DICOM modality when known ("CT", "MR", ...), "RGB" for colour images.
    ``source_files`` are the DICOM instances in slice order (for DICOM-SEG references).
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    modality: str | None = None
    name: str = "volume"
    source_files: list[str] = field(default_factory=list)
    _content_key: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)
        validate_array(self.array, self.name)
        if self.ijk_to_ras.shape != (4, 4):
            raise InputError(f"{self.name}: IJK->RAS must be 4x4, got {self.ijk_to_ras.shape}")
        if abs(np.linalg.det(self.ijk_to_ras[:3, :3])) < 1e-12:
            raise InputError(f"{self.name}: IJK->RAS matrix is singular (zero spacing?)")

    @property
    def is_rgb(self) -> bool:
        return self.array.ndim == 4

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[:3])  # type: ignore[return-value]

    def content_key(self) -> str:
        """A hash of the voxels, computed once per Volume: embedding caches must not confuse two
        volumes that share a name, and a host that keeps its Volume (one per node) hashes it once,
        not on every click. The array is treated as read-only after the first call."""
        if self._content_key is None:
            h = hashlib.sha1(np.ascontiguousarray(self.array).view(np.uint8))
            h.update(str(self.array.shape).encode() + str(self.array.dtype).encode())
            self._content_key = h.hexdigest()
        return self._content_key

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in mm."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)


def validate_array(array: np.ndarray, name: str = "volume") -> None:
    """Reject what the engine cannot segment, with the reason."""
    if not isinstance(array, np.ndarray):
        raise InputError(f"{name}: expected a numpy array, got {type(array).__name__}")
    if array.ndim == 4 and array.shape[-1] != 3:
        raise InputError(
            f"{name}: 4D data of shape {array.shape} (time series or multi-component) is not supported; "
            "pick a single frame or component first"
        )
    if array.ndim == 4 and array.shape[-1] == 3 and array.shape[0] != 1:
        raise InputError(f"{name}: RGB volumes are only supported as single 2D images, got shape {array.shape}")
    if array.ndim not in (3, 4):
        raise InputError(f"{name}: expected a 3D array [K, J, I] (or 2D RGB), got {array.ndim}D shape {array.shape}")
    if array.size == 0 or min(array.shape[:3]) == 0:
        raise InputError(f"{name}: the volume is empty (shape {array.shape})")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InputError(f"{name}: voxel type {array.dtype} is not numeric")


# Slice sides SAM-SP can segment. Below the minimum a slice holds no image to speak of (the model
# would see one pixel blown up to its input size); above the maximum a reader must refuse before
# allocating (a 20000 x 20000 picture is 1.2 GB of RGB, and every model input is 1024 px or less).
MIN_SLICE_SIDE = 8
MAX_SLICE_SIDE = 16384
AXIS_LABELS = ("K (axial for most scans)", "J", "I")


def slice_plane(shape: tuple[int, ...], axis: int, rgb: bool = False) -> tuple[int, int]:
    """(rows, columns) of the slices taken along array ``axis`` of a [K, J, I](, 3) shape."""
    if rgb:
        return int(shape[1]), int(shape[2])
    rows, cols = (int(s) for a, s in enumerate(shape[:3]) if a != axis)
    return rows, cols


def check_image_size(rows: int, cols: int, name: str) -> None:
    """Refuse a slice larger than MAX_SLICE_SIDE; readers call it with header values, before allocating."""
    if max(rows, cols) > MAX_SLICE_SIDE:
        raise InputError(f"{name}: the image is {cols} x {rows} pixels, larger than the {MAX_SLICE_SIDE}-pixel "
                         "limit per side; downsample or crop it first (SAM-SP works at 1024 px or less)")


def check_segmentable(volume: Volume, axis: int, slice_range: tuple[int, int] | None = None) -> None:
    """What makes a valid volume unsegmentable, said before any model work: slices too small or too
    large, or nothing but one value in the slices asked for. (NaN/Inf are refused per slice, as the
    engine reaches them: ``finite_slice``.)"""
    n = 1 if volume.is_rgb else int(volume.array.shape[axis])
    if slice_range is not None and not (0 <= slice_range[0] < slice_range[1] <= n):
        raise InputError(f"slice range [{slice_range[0]}, {slice_range[1]}) is outside the volume's {n} slices "
                         f"along axis {axis}")
    rows, cols = slice_plane(volume.array.shape, axis, volume.is_rgb)
    check_image_size(rows, cols, volume.name)
    if min(rows, cols) < MIN_SLICE_SIDE:
        better = [a for a in range(3) if a != axis and min(slice_plane(volume.array.shape, a)) >= MIN_SLICE_SIDE]
        hint = (f"; segment along axis {AXIS_LABELS[better[0]]} instead" if better and not volume.is_rgb
                else "; it is too small to be an image to segment")
        raise InputError(f"{volume.name}: its slices along axis {AXIS_LABELS[axis]} are {rows} x {cols} pixels, "
                         f"fewer than the {MIN_SLICE_SIDE} x {MIN_SLICE_SIDE} SAM-SP needs{hint}")
    sub = volume.array
    if slice_range is not None and not volume.is_rgb:
        index: list[slice] = [slice(None)] * 3
        index[axis] = slice(*slice_range)
        sub = sub[tuple(index)]  # a view
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: left to finite_slice's message
        lo, hi = float(np.nanmin(sub)), float(np.nanmax(sub))
    if lo == hi:
        where = "every voxel" if slice_range is None else f"every voxel of slices {slice_range[0]}..{slice_range[1] - 1}"
        raise InputError(f"{volume.name}: {where} has the same value ({lo:g}), so there is nothing to segment; "
                         "check that the right volume (or series, or window) is selected")


def finite_slice(pixels: np.ndarray, name: str, k: int) -> np.ndarray:
    """``pixels`` unchanged, or InputError when the slice holds NaN or infinite values."""
    if np.issubdtype(pixels.dtype, np.floating):
        bad = int(np.size(pixels) - np.count_nonzero(np.isfinite(pixels)))
        if bad:
            raise InputError(f"{name}: slice {k} has {bad} NaN or infinite voxel(s), which cannot be windowed; "
                             "replace them (e.g. with the minimum value) and run again")
    return pixels
