"""Training/evaluation samples from three sources: 2D folders, 3D volumes with label maps, arrays.

A ``Sample`` is one 2D slice: raw pixels (H x W or H x W x 3), a boolean mask on the same
grid, the intensity handling that turns the pixels into [0, 1], and the pixel spacing (for
HD95 in mm; 1.0 for photographs). Every source produces the same list, so the trainer,
the embedding cache and the evaluator never know where a slice came from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError
from ..core.preprocess import Intensity, guess_intensity

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass
class Sample:
    case_id: str
    image: np.ndarray  # H x W (scalar) or H x W x 3 (RGB), raw values
    mask: np.ndarray  # H x W bool
    intensity: Intensity
    spacing: tuple[float, float] = (1.0, 1.0)  # (row, col) pixel size, mm where known
    structure: int = 0  # which structure of a multi-structure target the mask is (0 for one structure)
    window: tuple[int, int, int, int] | None = None  # the part the model sees (preprocess.scale_window)

    @property
    def has_label(self) -> bool:
        return bool(self.mask.any())


def _read_picture(path: Path) -> np.ndarray:
    """H x W x 3 for colour pictures, H x W for grey ones (ultrasound): as ``io.images`` reads them."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("L", "1", "LA", "I;16", "I", "F"):
            return np.asarray(im.convert("L") if im.mode in ("1", "LA") else im)
        return np.asarray(im.convert("RGB"))


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:  # an RGB mask with identical channels
        arr = arr[..., 0]
    return arr > 0


def folder_ids(root: str | Path, split: str | None = None) -> list[str]:
    """Case ids of a 2D folder (images/, masks/, optional splits.json): all, or one split."""
    root = Path(root)
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise InputError(f"{root}: expected a folder with images/ and masks/ subfolders")
    if split is not None:
        splits_file = root / "splits.json"
        if not splits_file.is_file():
            raise InputError(f"{root}: --split {split} needs a splits.json")
        splits = json.loads(splits_file.read_text())
        if split not in splits:
            raise InputError(f"{splits_file}: no split '{split}' (has {', '.join(splits)})")
        return list(splits[split])
    return sorted(p.stem for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def find_case_file(folder: Path, case_id: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        path = folder / f"{case_id}{suffix}"
        if path.is_file():
            return path
    raise InputError(f"{folder}: no image file for case '{case_id}'")


def load_folder(root: str | Path, split: str | None = None, ids: Iterable[str] | None = None) -> list[Sample]:
    """2D image/mask pairs in the PH2 layout.

    Colour pictures (dermoscopy) are used as they are; grey ones (ultrasound) get the intensity
    handling Auto-segment gives a grey picture (``guess_intensity``: this image's percentiles), so
    a model trained here sees at training what it sees in use.
    """
    root = Path(root)
    ids = list(ids) if ids is not None else folder_ids(root, split)
    samples = []
    for case_id in ids:
        image = _read_picture(find_case_file(root / "images", case_id))
        mask = _read_mask(find_case_file(root / "masks", case_id))
        if mask.shape != image.shape[:2]:
            raise InputError(f"{case_id}: mask shape {mask.shape} differs from image shape {image.shape[:2]}")
        intensity = Intensity("RGB") if image.ndim == 3 else guess_intensity(image[np.newaxis])
        samples.append(Sample(case_id, image, mask, intensity))
    return samples


def read_volume(path: str | Path, reorient: str | None = "LPS") -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI/NRRD/... volume as a [K, J, I] array and its (k, j, i) spacing.

    Reorienting to LPS (the DICOM patient frame) by default means a model trained on
    one file sees the same anatomy layout in another, whatever the file's own axes.
    """
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    if reorient:
        img = sitk.DICOMOrient(img, reorient)
    sx, sy, sz = img.GetSpacing()
    return sitk.GetArrayFromImage(img), (sz, sy, sx)


def volume_samples(
    image: np.ndarray,
    labels: np.ndarray,
    label_ids: Sequence[int],
    intensity: Intensity | None = None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    name: str = "volume",
    slices: Sequence[int] | None = None,
) -> list[Sample]:
    """Axial slices [k] of a K x J x I volume; the mask is the union of ``label_ids``.

    ``slices`` picks slice indices (default: all). The intensity defaults to a guess from the
    whole volume (CT abdomen window when values go below -500 HU), so every slice of one
    volume is handled alike.
    """
    if image.shape != labels.shape:
        raise InputError(f"{name}: image shape {image.shape} differs from label shape {labels.shape}")
    if image.ndim != 3:
        raise InputError(f"{name}: expected a 3D [K, J, I] volume, got shape {image.shape}")
    intensity = intensity or guess_intensity(image)
    mask3d = np.isin(labels, np.asarray(list(label_ids)))
    ks = range(image.shape[0]) if slices is None else slices
    return [
        Sample(f"{name}:{k}", image[k], mask3d[k], intensity, (float(spacing[1]), float(spacing[2])))
        for k in ks
    ]


def load_volume(
    image_path: str | Path,
    label_path: str | Path,
    label_ids: Sequence[int],
    intensity: Intensity | None = None,
    reorient: str | None = "LPS",
) -> list[Sample]:
    image, spacing = read_volume(image_path, reorient)
    labels, _ = read_volume(label_path, reorient)
    return volume_samples(image, labels, label_ids, intensity, spacing, Path(image_path).name.split(".")[0])


def array_samples(
    images: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    intensity: Intensity,
    prefix: str = "array",
) -> list[Sample]:
    """The Python API's form (e.g. a Slicer segmentation node as arrays): 2D images + masks."""
    if len(images) != len(masks):
        raise InputError(f"{len(images)} images but {len(masks)} masks")
    out = []
    for i, (img, msk) in enumerate(zip(images, masks)):
        img = np.asarray(img)
        msk = np.asarray(msk).astype(bool)
        if msk.shape != img.shape[:2]:
            raise InputError(f"{prefix}[{i}]: mask shape {msk.shape} differs from image shape {img.shape[:2]}")
        out.append(Sample(f"{prefix}:{i}", img, msk, intensity))
    return out
