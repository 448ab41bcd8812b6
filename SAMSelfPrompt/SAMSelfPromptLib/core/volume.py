"""The one in-memory form every host hands the engine: an array plus its IJK->RAS matrix."""
from __future__ import annotations

import hashlib
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
