"""Read a DICOM image series from a folder into a Volume, with a clear message for each way it can fail.

Grouping uses headers only (pixels are deferred, not decoded); slices are ordered by their position along
the slice normal, never by file name (the sample CT's names run opposite to z).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ..errors import InputError
from ..core.volume import Volume, check_image_size

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# A gap this many times the median slice step means slices are missing.
GAP_FACTOR = 1.5
# Storage classes that carry pixel data but are not images to segment.
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
}


@dataclass
class DicomSeries:
    """One series found in a folder: what ``list_dicom_series`` returns and the CLI prints."""

    id: str  # the SeriesInstanceUID, or "unnamed-N" where the files carry an empty one
    uid: str  # SeriesInstanceUID as stored (may be "")
    modality: str
    description: str
    files: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    headers: list[Dataset] = field(default_factory=list, repr=False)

    @property
    def num_files(self) -> int:
        return len(self.files)

    def summary(self) -> dict:
        return {"id": self.id, "uid": self.uid, "modality": self.modality, "description": self.description,
                "num_files": self.num_files, "folders": self.folders}


def _sop_class(ds: Dataset) -> str:
    # Some anonymisers blank SOPClassUID in the dataset (the sample CT does); the file meta still has it.
    sop = str(ds.get("SOPClassUID", "") or "")
    if not sop and getattr(ds, "file_meta", None) is not None:
        sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return sop


class _Broken(Exception):
    """A file with a DICOM preamble that cannot be read as the image it says it is."""


def _read_header(path: Path) -> Dataset | None:
    """The header, with large values (pixel data) deferred so that we can still see whether it is there.

    None for a file that is not DICOM at all; ``_Broken`` for a DICOM file that is truncated or
    corrupt (pydicom reads a file cut inside its pixel data as an empty dataset, so an image
    storage class in the file meta with no image attributes is treated as broken too).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's notes on a truncated file: we report the file ourselves
            ds = pydicom.dcmread(path, defer_size=1024)
    except InvalidDicomError:
        return None  # no DICM preamble: not DICOM
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file
        raise _Broken(str(path)) from exc
    meta_sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "") if getattr(ds, "file_meta", None) else ""
    if "Image Storage" in (pydicom.uid.UID(meta_sop).name if meta_sop else "") and not (
            "Rows" in ds and any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))):
        raise _Broken(str(path))
    return ds


def _is_image(ds: Dataset) -> bool:
    has_pixels = any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    return has_pixels and _sop_class(ds) not in NON_IMAGE_SOP_CLASSES and "Rows" in ds


def _scan(folder: str | os.PathLike) -> tuple[list[DicomSeries], list[tuple[str, str]], list[str]]:
    """Image series in ``folder`` (largest first), the non-image DICOM files (path, kind) seen, and
    the DICOM files that are truncated or corrupt."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"DICOM folder not found: {root}")
    groups: dict[str, DicomSeries] = {}
    non_image: list[tuple[str, str]] = []
    broken: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = _read_header(path)
        except _Broken:
            broken.append(str(path))
            continue
        if ds is None or not ("SOPClassUID" in ds or "Modality" in ds or "PixelData" in ds):
            continue  # not DICOM (README, DICOMDIR-less junk, thumbnails)
        if "DirectoryRecordSequence" in ds:
            continue  # a DICOMDIR index, not an instance
        if not _is_image(ds):
            sop = _sop_class(ds)
            kind = NON_IMAGE_SOP_CLASSES.get(sop) or (pydicom.uid.UID(sop).name if sop else "no SOP class")
            non_image.append((str(path), f"{ds.get('Modality', '?')} {kind}"))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        # Empty series UIDs: keep files apart when they obviously belong to different series.
        key = uid or f"|{ds.get('FrameOfReferenceUID', '')}|{ds.get('SeriesNumber', '')}|{ds.get('SeriesDescription', '')}"
        if key not in groups:
            groups[key] = DicomSeries(id=uid, uid=uid, modality=str(ds.get("Modality", "") or ""),
                                      description=str(ds.get("SeriesDescription", "") or ""))
        series = groups[key]
        series.files.append(str(path))
        series.headers.append(ds)
        if str(path.parent) not in series.folders:
            series.folders.append(str(path.parent))
    found = sorted(groups.values(), key=lambda s: (-s.num_files, s.id))
    for n, s in enumerate((s for s in found if not s.uid), start=1):
        s.id = f"unnamed-{n}"
    return found, non_image, broken


def list_dicom_series(folder: str | os.PathLike) -> list[dict]:
    """A summary per image series (id, uid, modality, description, num_files, folders), largest first."""
    return [s.summary() for s in _scan(folder)[0]]


def _broken_error(where: str, broken: list[str]) -> InputError:
    return InputError(f"{where}: {len(broken)} DICOM file(s) are truncated or corrupt (e.g. {broken[0]}); "
                      "re-export or copy the series again")


def _select(folder: str | os.PathLike, series_uid: str | None) -> DicomSeries:
    found, non_image, broken = _scan(folder)
    if not found and broken:
        raise _broken_error(str(folder), broken)
    if not found:
        if non_image:
            kinds = sorted({k for _, k in non_image})
            raise InputError(f"{folder}: contains only non-image DICOM ({len(non_image)} files: {', '.join(kinds)}); "
                             "select a folder with an image series (CT, MR, ...)")
        raise InputError(f"{folder}: no DICOM files found (empty folder or no readable DICOM)")
    series = found[0] if series_uid is None else next((s for s in found if series_uid in (s.id, s.uid)), None)
    if series is None:
        listing = "; ".join(f"{s.id} ({s.modality} '{s.description}', {s.num_files} files)" for s in found)
        raise InputError(f"{folder}: series '{series_uid}' not found. Available series: {listing}")
    # A broken file beside the series may be one of its slices (a truncated file reads as an empty
    # dataset, so its series is unknown): a volume silently one slice short is worse than a refusal.
    mine = [b for b in broken if str(Path(b).parent) in series.folders]
    if mine:
        raise _broken_error(series.id or "series", mine)
    return series


def _check_stackable(series: DicomSeries) -> None:
    """Refuse series whose slices cannot form one grid, naming the attribute that differs."""
    name = series.id or "series"
    frames = {int(h.get("NumberOfFrames", 1) or 1) for h in series.headers}
    if max(frames) > 1:
        raise InputError(f"{name}: multi-frame DICOM ({max(frames)} frames per file, e.g. enhanced CT/MR or cine) "
                         "is not supported; export it as single-frame slices")
    if any(int(h.get("SamplesPerPixel", 1)) != 1 for h in series.headers) and series.num_files > 1:
        raise InputError(f"{name}: colour (RGB) DICOM series with {series.num_files} images are not supported; "
                         "only a single colour image can be segmented")
    for attr in ("Rows", "Columns", "SamplesPerPixel"):
        values = {int(h.get(attr, 1)) for h in series.headers}
        if len(values) > 1:
            raise InputError(f"{name}: mixed {attr} {sorted(values)} within one series; the images cannot be "
                             "stacked into a volume (it mixes several series or scouts); "
                             "put each series in its own folder")
    h0 = series.headers[0]
    check_image_size(int(h0.get("Rows", 0)), int(h0.get("Columns", 0)), name)  # before any pixel is decoded
    if series.num_files > 1 and any("ImagePositionPatient" not in h for h in series.headers):
        raise InputError(f"{name}: {series.num_files} images without ImagePositionPatient (e.g. screenshots or "
                         "secondary captures); their slice order is unknown, so they cannot form a volume")
    for attr in ("ImageOrientationPatient", "PixelSpacing"):
        values = {tuple(np.round(np.asarray(h.get(attr, []), float), 4)) for h in series.headers}
        if len(values) > 1:
            raise InputError(f"{name}: mixed {attr} within one series ({len(values)} different values); "
                             "the images cannot be stacked into a volume (it mixes several series, e.g. a "
                             "reformat); put each series in its own folder")


def _slice_geometry(series: DicomSeries) -> tuple[list[int], np.ndarray]:
    """Slice order (indices into series.files) and the IJK->LPS matrix."""
    name = series.id or "series"
    h0 = series.headers[0]
    iop = np.asarray(h0.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
    row_dir, col_dir = iop[:3], iop[3:]  # row_dir: along a row, i.e. the i (column index) axis
    normal = np.cross(row_dir, col_dir)
    spacing = np.asarray(h0.get("PixelSpacing", [1.0, 1.0]), float)  # [between rows, between columns]
    positions = [np.asarray(h.get("ImagePositionPatient", [0, 0, 0]), float) for h in series.headers]
    depth = np.array([p @ normal for p in positions])
    order = [int(i) for i in np.argsort(depth, kind="stable")]
    depth_sorted = depth[order]
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, 0] = row_dir * spacing[1]
    ijk_to_lps[:3, 1] = col_dir * spacing[0]
    ijk_to_lps[:3, 3] = positions[order[0]]
    if len(order) == 1:
        thickness = float(h0.get("SpacingBetweenSlices", 0) or h0.get("SliceThickness", 0) or 1.0)
        ijk_to_lps[:3, 2] = normal * thickness
        return order, ijk_to_lps
    gaps = np.diff(depth_sorted)
    median = float(np.median(gaps))
    if median < 1e-4 or gaps.min() < 1e-4:
        dupes = sorted({round(float(d), 3) for d, g in zip(depth_sorted[1:], gaps) if g < 1e-4})
        if len(depth) - len(np.unique(np.round(depth, 3))) == 1:  # one extra image: a copied file
            pair = [Path(series.files[i]).name for i in order if abs(depth[i] - dupes[0]) < 1e-3][:2]
            raise InputError(f"{name}: two images share the slice position {dupes[0]} mm ({' and '.join(pair)}); "
                             "remove the duplicate file and run again")
        raise InputError(f"{name}: several images share a slice position (e.g. {dupes[:5]} mm along the normal); "
                         "this looks like a 4D / multi-phase or multi-echo series, which is not supported; "
                         "split it into one series per time point")
    big = np.nonzero(gaps > GAP_FACTOR * median)[0]
    if len(big):
        where = ", ".join(f"{depth_sorted[i]:.2f}->{depth_sorted[i + 1]:.2f} mm" for i in big[:5])
        raise InputError(f"{name}: missing slices: the usual step is {median:.3g} mm but there are gaps at {where} "
                         f"({len(big)} gap(s)); re-export the complete series")
    if gaps.max() - gaps.min() > 0.1 * median:
        raise InputError(f"{name}: irregular slice spacing ({gaps.min():.3g}..{gaps.max():.3g} mm); "
                         "the images cannot be stacked on a regular grid")
    # The measured mean step (not SliceThickness: the sample CT has 3 mm slices 2 mm apart); keeping
    # the full vector keeps a gantry tilt's shear.
    ijk_to_lps[:3, 2] = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    return order, ijk_to_lps


# The Python package that decodes each compressed transfer syntax for pydicom (the message names it).
DECODER_PACKAGES = {
    **dict.fromkeys(("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                     "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"), "pylibjpeg-openjpeg"),
    **dict.fromkeys(("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                     "1.2.840.10008.1.2.4.70"), "pylibjpeg-libjpeg"),
    **dict.fromkeys(("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"), "pyjpegls"),
}

PIP_NAMES = {"pylibjpeg-openjpeg": "pylibjpeg pylibjpeg-openjpeg", "pylibjpeg-libjpeg": "pylibjpeg pylibjpeg-libjpeg"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else exc.__class__.__name__)[:200]


def _pixels(path: str) -> tuple[np.ndarray, bool]:
    """Decoded pixels of one file and whether they are already rescaled.

    pydicom (with pylibjpeg/OpenJPEG, JPEG-LS and Pillow) is the first choice; SimpleITK's GDCM is the
    fallback for transfer syntaxes those plugins miss. GDCM applies Rescale Slope/Intercept itself.
    When neither decodes the file, the message names the package that would (one line).
    """
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - a file that changed or broke after the header scan
        raise InputError(f"{path}: the DICOM file is truncated or corrupt ({_first_line(exc)}); "
                         "re-export or copy the series again") from exc
    try:
        return ds.pixel_array, False
    except Exception as first:  # noqa: BLE001 - any decoder failure falls through to GDCM
        try:
            import SimpleITK as sitk

            return sitk.GetArrayFromImage(sitk.ReadImage(path))[0], True
        except Exception:  # noqa: BLE001
            pass
        syntax = ds.file_meta.get("TransferSyntaxUID", "") if getattr(ds, "file_meta", None) is not None else ""
        package = DECODER_PACKAGES.get(str(syntax))
        if package and "missing" in str(first).lower():
            raise InputError(f"{path}: no decoder for its {pydicom.uid.UID(str(syntax)).name} pixel data is installed; "
                             f"install the Python package {package} (pip install {PIP_NAMES.get(package, package)})") from None
        raise InputError(f"{path}: cannot decode the pixel data ({_first_line(first)}); the file may be corrupt, "
                         "re-export the series") from None


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """The image series in ``folder`` (searched recursively) as a Volume: array [K, J, I], IJK->RAS.

    With several series the largest is read unless ``series_uid`` (a SeriesInstanceUID or an id from
    ``list_dicom_series``) names one. Values are rescaled (HU for CT).
    """
    series = _select(folder, series_uid)
    _check_stackable(series)
    order, ijk_to_lps = _slice_geometry(series)
    files = [series.files[i] for i in order]
    slices = []
    for i in order:
        raw, rescaled = _pixels(series.files[i])
        h = series.headers[i]
        slope = 1.0 if rescaled else float(h.get("RescaleSlope", 1) or 1)
        intercept = 0.0 if rescaled else float(h.get("RescaleIntercept", 0) or 0)
        slices.append(raw.astype(np.float64) * slope + intercept if (slope, intercept) != (1.0, 0.0) else raw)
    if slices[0].ndim == 3:  # a single colour image: K=1 x H x W x 3
        array = np.asarray(slices[0], dtype=np.uint8)[np.newaxis]
    else:
        array = np.stack(slices)
        # Integral results (CT HU with slope 1) stay integers, as Slicer and the NIfTI conversion keep them.
        if np.issubdtype(array.dtype, np.integer) or np.array_equal(array, np.round(array)):
            lo, hi = float(array.min()), float(array.max())
            array = array.astype(np.int16 if -32768 <= lo and hi <= 32767 else np.int32)
        else:
            array = array.astype(np.float32)
    modality = series.modality or None
    if array.ndim == 4:
        modality = "RGB"
    name = series.description or series.id or Path(folder).name
    return Volume(array=array, ijk_to_ras=LPS_TO_RAS @ ijk_to_lps, modality=modality, name=name,
                  source_files=files)
