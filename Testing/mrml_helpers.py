"""Real-MRML helpers shared by the tests: the shims installed, and a DICOM series loaded like Slicer does.

Only what slicer-core lacks is shimmed (slicer.mrmlScene / slicer.modules, see Testing/shims).
The CT series is loaded as Slicer's DICOMScalarVolumePlugin does: files sorted along the slice
normal, the vtkITK archetype reader through the Volumes logic, and patient/study/series items
in the subject hierarchy (with the series' modality, which the catalogue reads).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "shims"))
from install_shims import install  # noqa: E402

install()
import slicer  # noqa: E402
import vtk  # noqa: E402


def load_dicom_series(folder: Path, name: str):
    """Load a CT series into a scalar volume node the way Slicer's DICOMScalarVolumePlugin does."""
    import pydicom

    headers = [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in sorted(folder.iterdir()) if p.is_file()]
    first = headers[0][1]
    row, col = np.array(first.ImageOrientationPatient[:3], float), np.array(first.ImageOrientationPatient[3:], float)
    normal = np.cross(row, col)
    headers.sort(key=lambda ph: float(np.dot(normal, np.array(ph[1].ImagePositionPatient, float))))
    files = vtk.vtkStringArray()
    for path, _ in headers:
        files.InsertNextValue(str(path))
    node = slicer.modules.volumes.logic().AddArchetypeScalarVolume(str(headers[0][0]), name, 0, files)
    assert node is not None, "the archetype reader did not load the series"
    node.SetName(name)  # a second load in one session would otherwise be "<name>_1" (the scene's unique names)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), str(first.get("PatientName", "Anonymous")))
    sh.SetItemUID(patient, "DICOM", str(first.PatientID))
    study = sh.CreateStudyItem(patient, str(first.get("StudyDescription", "Study")))
    sh.SetItemUID(study, "DICOM", str(first.StudyInstanceUID))
    series = sh.CreateItem(study, node)
    sh.SetItemUID(series, "DICOM", str(first.SeriesInstanceUID))
    sh.SetItemAttribute(series, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName(),
                        str(first.Modality))
    node.SetAttribute("DICOM.instanceUIDs", " ".join(str(h.SOPInstanceUID) for _, h in headers))
    return node
