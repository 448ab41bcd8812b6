"""Reading images and DICOM series into Volumes, and writing segmentations (.seg.nrrd, NIfTI, DICOM-SEG).

The hosts (CLI, Slicer module, web app) call these; nothing here touches MRML or Qt.
"""
from .dicom import DicomSeries, list_dicom_series, read_dicom_series
from .images import read_any, read_image
from .writers import write_labelmap, write_nifti_labelmap, write_seg_nrrd

__all__ = [
    "DicomSeries", "list_dicom_series", "read_dicom_series", "read_any", "read_image",
    "write_labelmap", "write_nifti_labelmap", "write_seg_nrrd", "write_dicom_seg",
]


def write_dicom_seg(*args, **kwargs):
    """See :func:`.dicomseg.write_dicom_seg` (imported lazily: highdicom is slow to import)."""
    from .dicomseg import write_dicom_seg as _write

    return _write(*args, **kwargs)
