"""Read image files (NIfTI, NRRD, MHA via SimpleITK; PNG/JPEG/BMP/TIFF via Pillow) into Volumes."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..core.volume import MAX_SLICE_SIDE, Volume, check_image_size
from .dicom import LPS_TO_RAS, read_dicom_series

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def itk_geometry_to_ras(spacing, direction, origin, dim: int = 3) -> np.ndarray:
    """IJK->RAS from ITK's LPS spacing/direction/origin (2D images get a unit k axis)."""
    d = np.eye(3)
    d[:dim, :dim] = np.asarray(direction, float).reshape(dim, dim)
    s = np.ones(3)
    s[:dim] = np.asarray(spacing, float)
    o = np.zeros(3)
    o[:dim] = np.asarray(origin, float)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = d * s  # scales column n (axis n) by spacing n
    ijk_to_lps[:3, 3] = o
    return LPS_TO_RAS @ ijk_to_lps


def _read_itk(path: Path) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()  # the header only: sizes are checked before any voxel is allocated
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read the image ({str(exc).strip().splitlines()[-1]})") from exc
    size, dim, comps = reader.GetSize(), reader.GetDimension(), reader.GetNumberOfComponents()
    if dim == 3 and size[2] > 1 and comps == 3:
        raise InputError(f"{path}: a colour (RGB) volume of {size[2]} slices is not supported; only single colour "
                         "pictures are; convert it to grey scale or extract one slice first")
    if dim == 4 or (dim == 3 and size[2] > 1 and comps > 1):
        raise InputError(f"{path}: 4D / multi-component volume (size {size}, {comps} components) is not "
                         "supported; extract a single 3D frame first")
    if dim not in (2, 3):
        raise InputError(f"{path}: {dim}D image is not supported")
    if comps not in (1, 3):
        raise InputError(f"{path}: {comps}-component pixels are not supported (expected grayscale or RGB)")
    check_image_size(int(size[1]), int(size[0]), str(path))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read the image ({str(exc).strip().splitlines()[-1]})") from exc
    array = sitk.GetArrayFromImage(image)  # [k, j, i] (+ components), the arrayFromVolume order
    if dim == 2:
        array = array[np.newaxis]
    ijk_to_ras = itk_geometry_to_ras(image.GetSpacing(), image.GetDirection(), image.GetOrigin(), dim)
    if comps == 3:
        array = array.reshape(1, *array.shape[-3:]).astype(np.uint8)
    return Volume(array=array, ijk_to_ras=ijk_to_ras, modality="RGB" if comps == 3 else None,
                  name=path.name.split(".")[0])


def _read_picture(path: Path) -> Volume:
    from PIL import Image

    try:
        with Image.open(path) as img:
            check_image_size(img.height, img.width, str(path))  # from the header: nothing decoded yet
            if getattr(img, "n_frames", 1) > 1:
                raise InputError(f"{path}: multi-page image ({img.n_frames} pages) is not supported")
            mode = img.mode
            if mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV", "PA"):
                array = np.asarray(img.convert("RGB"), dtype=np.uint8)  # alpha dropped: it is not image content
            elif mode in ("1", "LA"):
                array = np.asarray(img.convert("L"), dtype=np.uint8)
            else:  # L, I;16, I, F keep their depth
                array = np.asarray(img)
    except Image.DecompressionBombError as exc:  # PIL refuses huge headers itself, before we see the size
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        raise InputError(f"{path}: the image is too large ({pixels.group(1) if pixels else 'too many'} pixels; at most "
                         f"{MAX_SLICE_SIDE} per side); downsample or crop it first") from None
    except (OSError, SyntaxError) as exc:
        raise InputError(f"{path}: cannot read the image ({exc})") from exc
    # Slicer loads a picture through ITK: spacing 1, origin 0, identity LPS direction, i.e. RAS diag(-1,-1,1).
    return Volume(array=array[np.newaxis], ijk_to_ras=LPS_TO_RAS.copy(),
                  modality="RGB" if array.ndim == 3 else None, name=path.stem)


def read_image(path: str | os.PathLike) -> Volume:
    """A NIfTI/NRRD/MHA volume or a 2D picture as a Volume ([K, J, I] or 1 x H x W x 3 for RGB)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image file not found: {p}")
    suffix = _suffix(p)
    if suffix in PICTURE_SUFFIXES:
        return _read_picture(p)
    if suffix in VOLUME_SUFFIXES:
        return _read_itk(p)
    raise InputError(f"{p}: unsupported file type '{suffix}'; expected a DICOM folder, "
                     f"{', '.join(VOLUME_SUFFIXES + PICTURE_SUFFIXES)}")


def _is_dicom_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def read_any(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """A DICOM folder (or one file of a series), or an image file, as a Volume."""
    p = Path(path)
    if p.is_dir():
        return read_dicom_series(p, series_uid)
    if p.is_file() and _suffix(p) not in VOLUME_SUFFIXES + PICTURE_SUFFIXES and _is_dicom_file(p):
        # One file stands for its series: read the series it belongs to from its folder.
        import pydicom

        uid = series_uid or str(pydicom.dcmread(p, stop_before_pixels=True).get("SeriesInstanceUID", "") or "")
        return read_dicom_series(p.parent, uid or None)
    return read_image(p)
