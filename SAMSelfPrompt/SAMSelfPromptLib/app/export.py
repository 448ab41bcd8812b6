"""The output segmentation as a file to download: .seg.nrrd, NIfTI, or DICOM-SEG (DICOM input only).

No writer lives here: .seg.nrrd is Slicer's own storage node (``mrml.save_segmentation``), NIfTI
and DICOM-SEG go through ``io.writers.write_labelmap`` (the CLI's writer) on the segments read
back from the scene with ``mrml.segment_array`` on the volume's grid.

What each holds: .seg.nrrd every segment of the segmentation (its layers keep overlapping segments,
such as a re-run's "SAM-SP (2)" over "SAM-SP"); NIfTI and DICOM-SEG, which are written from one
labelmap where overlapping segments cannot both be kept, the one segment the panel targets (the one
clicks correct, the last one written) as label / segment 1.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError

# id -> (what the panel shows, file suffix)
FORMATS = {
    "seg.nrrd": ("Slicer segmentation (.seg.nrrd)", ".seg.nrrd"),
    "nifti": ("NIfTI labelmap (.nii.gz), the target segment", ".nii.gz"),
    "dicom-seg": ("DICOM-SEG (.dcm), the target segment", ".dcm"),
}
MIME = {"seg.nrrd": "application/octet-stream", "nifti": "application/gzip", "dicom-seg": "application/dicom"}


def formats_for(source_files: Sequence[str] | None) -> list[str]:
    """The formats a volume can be exported to: DICOM-SEG only when it came from a DICOM series."""
    return [f for f in FORMATS if f != "dicom-seg" or source_files]


def file_name(title: str, fmt: str) -> str:
    """A safe file name for ``title`` (a node or segment name) in ``fmt``."""
    stem = re.sub(r"[^\w\-()]+", "_", title).strip("_") or "segmentation"
    return f"{stem}{FORMATS[fmt][1]}"


def segments_labelmap(segmentation_node, volume_node, segment_ids: Sequence[str] | None = None
                      ) -> tuple[np.ndarray, list[dict]]:
    """The segments (default: all) on the volume's [K, J, I] grid, label n for the n-th of them."""
    from ..slicer import mrml

    segmentation = segmentation_node.GetSegmentation()
    if segment_ids is None:
        segment_ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    labelmap = None
    segments = []
    for n, sid in enumerate(segment_ids):
        array = mrml.segment_array(segmentation_node, sid, volume_node)
        if labelmap is None:
            labelmap = np.zeros(array.shape, np.uint8 if len(segment_ids) < 255 else np.uint16)
        labelmap[array > 0] = n + 1
        segment = segmentation.GetSegment(sid)
        segments.append({"label": n + 1, "name": segment.GetName(), "color": tuple(segment.GetColor())})
    if labelmap is None:
        raise InputError(f"{segmentation_node.GetName()} has no segment to export")
    return labelmap, segments


def export_segmentation(segmentation_node, volume_node, fmt: str, folder: str | Path,
                        source_files: Sequence[str] | None = None, segment_id: str | None = None) -> Path:
    """Write the segmentation of ``volume_node`` in ``fmt`` into ``folder``; returns the file.

    ``segment_id`` is the segment a NIfTI or DICOM-SEG export holds (default: the last segment).
    """
    from ..io.writers import write_labelmap
    from ..slicer import mrml

    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if segmentation_node is None or volume_node is None:
        raise InputError("nothing to export yet: run Auto-segment first")
    if fmt == "dicom-seg" and not source_files:
        raise InputError(f"{volume_node.GetName()} was not loaded from DICOM: export .seg.nrrd or NIfTI instead")
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        raise InputError(f"{segmentation_node.GetName()} has no segment to export")
    if fmt == "seg.nrrd":
        path = Path(folder) / file_name(segmentation_node.GetName(), fmt)
        return mrml.save_segmentation(segmentation_node, path, overwrite=True)
    ids = [segment_id or segmentation.GetNthSegmentID(segmentation.GetNumberOfSegments() - 1)]
    if segmentation.GetSegment(ids[0]) is None:
        raise InputError(f"segment {ids[0]!r} is not in {segmentation_node.GetName()}")
    path = Path(folder) / file_name(f"{volume_node.GetName()} {segmentation.GetSegment(ids[0]).GetName()}", fmt)
    labelmap, segments = segments_labelmap(segmentation_node, volume_node, ids)
    return write_labelmap(path, labelmap, mrml.ijk_to_world(volume_node), segments,
                          source_files=list(source_files or []) if fmt == "dicom-seg" else None, overwrite=True)
