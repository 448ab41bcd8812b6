"""Write a labelmap as a binary DICOM-SEG (highdicom) that references the source series instances."""
from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from .. import __version__
from ..errors import InputError
from .dicom import DicomSeries, _check_stackable, _slice_geometry
from .files import atomic_write
from .labelmap import check_labelmap, complete_segments

ALGORITHM_NAME = "SAMSelfPrompt"
ALGORITHM_VERSION = f"SAM-SP {__version__}"
# Type 2 patient/study attributes (empty allowed) that highdicom copies from the source into the SEG.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate",
                "StudyTime", "ReferringPhysicianName", "AccessionNumber")


def _derived_uid(kind: str, instance_uids: Sequence[str]) -> str:
    """A UID that is the same every time for the same set of source instances."""
    return pydicom.uid.generate_uid(entropy_srcs=[kind, *sorted(instance_uids)])


def _source_datasets(source_files: Sequence[str]) -> tuple[list[Dataset], list[int]]:
    """Headers of the source series with the UIDs highdicom needs, and their slice order.

    Anonymised exports (the sample CT among them) blank SOPClassUID/SOPInstanceUID in the dataset and
    leave Study/SeriesInstanceUID empty. highdicom copies and references these UIDs, and an empty one
    makes an invalid SEG. We fill the instance UIDs from the file meta (which still holds the real ones,
    so the references resolve), and derive stable Study/Series UIDs from the instance UIDs (so several SEGs
    of one series agree). The source files on disk are never modified.
    """
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    instance_uids = [str(h.get("SOPInstanceUID", "") or h.file_meta.get("MediaStorageSOPInstanceUID", ""))
                     for h in headers]
    if not all(instance_uids):
        raise InputError("the source DICOM files carry no SOP Instance UID; a DICOM-SEG cannot reference them")
    study_uid = _derived_uid("study", instance_uids)
    series_uid = _derived_uid("series", instance_uids)
    fixed = []
    for h, uid in zip(headers, instance_uids):
        h = copy.deepcopy(h)
        h.SOPInstanceUID = uid
        h.SOPClassUID = h.get("SOPClassUID", "") or h.file_meta.get("MediaStorageSOPClassUID", "")
        h.StudyInstanceUID = h.get("StudyInstanceUID", "") or study_uid
        h.SeriesInstanceUID = h.get("SeriesInstanceUID", "") or series_uid
        for keyword in TYPE2_COPIED:  # highdicom copies these; minimal exports may lack them
            if keyword not in h:
                setattr(h, keyword, "")
        fixed.append(h)
    series = DicomSeries(id="source", uid=series_uid, modality=str(headers[0].get("Modality", "")), description="",
                         files=list(source_files), headers=fixed)
    _check_stackable(series)
    order, _ = _slice_geometry(series)  # the same k order as read_dicom_series
    return [fixed[i] for i in order], order


def _rgb255(color: Sequence[float]) -> tuple[int, int, int]:
    """Colours come as 0..1 (Slicer) or 0..255; DICOM's CIELab conversion takes 0..255."""
    c = [float(v) for v in color][:3]
    scale = 1.0 if max(c) > 1.0 else 255.0
    return tuple(int(round(min(max(v * scale, 0), 255))) for v in c)  # type: ignore[return-value]


def _description(number: int, seg: dict):
    import highdicom as hd

    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.DCM.ArtificialIntelligence, version=ALGORITHM_VERSION)
    # A target's structure carries its SNOMED CT codes ("codes": scheme, value, meaning); without
    # them a generic anatomy code with the user's name as the label.
    known = seg.get("codes") or {}

    def code(key: str, default):
        c = known.get(key)
        return Code(c[1], c[0], c[2]) if c else seg.get(key, default)

    region = known.get("region")
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=str(seg["name"])[:64],
        segmented_property_category=code("category", codes.SCT.AnatomicalStructure),
        segmented_property_type=code("type", codes.SCT.Organ),
        anatomic_regions=[Code(region[1], region[0], region[2])] if region else None,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if seg.get("automatic", True)
        else hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*_rgb255(seg["color"])) if seg.get("color") is not None else None,
    )


def write_dicom_seg(path: str | os.PathLike, labelmap: np.ndarray, source_files: Sequence[str],
                    segments: Sequence[dict] | None = None, series_description: str = "SAM-SP segmentation",
                    series_number: int = 900, overwrite: bool = False) -> Path:
    """A binary DICOM-SEG of ``labelmap`` [K, J, I] on the grid of the source series.

    ``labelmap`` k runs in the order read_dicom_series gives (slice position along the normal), whatever
    the order of ``source_files``. Each segment {"label", "name", optional "color", "category", "type"}
    becomes one DICOM segment numbered 1..n; empty frames are omitted.
    """
    import highdicom as hd

    labelmap, _ = check_labelmap(labelmap, np.eye(4))
    sources, _ = _source_datasets(source_files)
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if labelmap.shape != (len(sources), rows, cols):
        raise InputError(f"labelmap shape {labelmap.shape} does not match the source series "
                         f"({len(sources)} slices of {rows} x {cols})")
    segs = complete_segments(labelmap, segments)
    if not segs:
        raise InputError("the labelmap is empty: there is no segment to write as DICOM-SEG")
    # highdicom wants [frames, rows, cols, segments] (one binary channel per segment number 1..n).
    masks = np.stack([labelmap == s["label"] for s in segs], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(n, s) for n, s in enumerate(segs, start=1)],
        series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=ALGORITHM_NAME, manufacturer_model_name="SAM-SP", software_versions=__version__,
        device_serial_number="0", series_description=series_description[:64],
    )
    if "PatientOrientation" not in seg and "FrameOfReferenceUID" not in seg:
        # A picture without a patient frame (secondary capture, VL photographic): the General Image
        # module then requires Patient Orientation (Type 2C, empty when unknown); highdicom omits it.
        seg.PatientOrientation = sources[0].get("PatientOrientation", "") or ""
    return atomic_write(path, lambda tmp: seg.save_as(tmp), overwrite)
