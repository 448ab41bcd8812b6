"""Volumes into a scene: an engine ``Volume`` as the node Slicer's own loaders make for it.

Hosts without Slicer's loaders (the web app, scripts) read files with the engine's readers
(``io.images.read_any``: the same reader ``samselfprompt segment`` uses, so both see the same
voxels and geometry) and add them here:

- a colour picture becomes a vector volume with one slice, as Slicer loads a picture;
- anything else a scalar volume with the Volume's IJK->RAS;
- a DICOM series also gets patient/study/series items in the subject hierarchy with the
  series' modality, as Slicer's DICOM plugin makes them, because the catalogue picks the
  model from that modality (``mrml.series_modality``).

Main thread only, like every MRML call.
"""
from __future__ import annotations

import numpy as np
import slicer
import vtk

from ..core.volume import Volume


def add_volume(scene, volume: Volume, name: str | None = None):
    """A new volume node in ``scene`` holding a copy of ``volume`` (voxels, geometry, modality)."""
    node_class = "vtkMRMLVectorVolumeNode" if volume.is_rgb else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name or volume.name))
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(volume.ijk_to_ras[r, c]))
    node.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array))
    node.CreateDefaultDisplayNodes()
    if not volume.is_rgb and volume.source_files:
        _add_dicom_items(scene, node, volume)
    return node


def _add_dicom_items(scene, node, volume: Volume) -> None:
    """Patient, study and series items with the series' UIDs and modality (Slicer's DICOM plugin does this)."""
    import pydicom

    first = pydicom.dcmread(volume.source_files[0], stop_before_pixels=True)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), str(first.get("PatientName", "") or "Anonymous"))
    sh.SetItemUID(patient, "DICOM", str(first.get("PatientID", "")))
    study = sh.CreateStudyItem(patient, str(first.get("StudyDescription", "") or "Study"))
    sh.SetItemUID(study, "DICOM", str(first.get("StudyInstanceUID", "")))
    series = sh.GetItemByDataNode(node) or sh.CreateItem(study, node)
    sh.SetItemParent(series, study)
    sh.SetItemUID(series, "DICOM", str(first.get("SeriesInstanceUID", "")))
    if volume.modality:
        sh.SetItemAttribute(series, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName(),
                            str(volume.modality))
