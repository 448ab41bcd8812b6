"""MRML in and out for the Slicer module: volume nodes to ``Volume``, slices into segments.

Everything here runs on the main thread (MRML is not thread safe) and imports no
Qt and no torch, so the module can load before its dependencies are installed.

Writing choices:
- A slice is written with ``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment``
  in MODE_REPLACE restricted to that slice's extent, the call the Segment Editor's
  effects use: it only touches voxels inside the extent, grows the labelmap when
  needed, fires the segmentation's modified events (views update live), and moves
  a segment to its own layer rather than overwrite another segment's voxels.
- Our output segment is given its own labelmap layer when created, so writing it
  can never change a voxel of a segment the user drew.
- Slice masks are indexed exactly like ``SliceResult.mask``: ``np.take(array, k, axis)``
  of the [K, J, I] volume array.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import InputError
from ..io.files import atomic_write
from ..core.volume import Volume

SOURCE_TAG = "SAMSelfPrompt.Source"  # segment tag marking segments this module created
DEFAULT_COLOR = (0.95, 0.75, 0.2)
# SNOMED CT "Tissue": Slicer's own default terminology for a segment of unknown anatomy.
DEFAULT_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list",
                       "85756007", "SCT", "Tissue", "85756007", "SCT", "Tissue")


# --- volume node -> Volume -------------------------------------------------------------------

def ijk_to_world(volume_node) -> np.ndarray:
    """IJK->RAS of the node, composed with its parent transform when that is linear."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(m)
    parent = volume_node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"{volume_node.GetName()}: it is under a non-linear transform; harden it first")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = slicer.util.arrayFromVTKMatrix(to_world) @ ijk_to_ras
    return ijk_to_ras


def series_modality(volume_node) -> str | None:
    """DICOM modality from the subject hierarchy (set by Slicer's DICOM loader), else None."""
    scene = volume_node.GetScene()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene) if scene else None
    if sh is None:
        return None
    item = sh.GetItemByDataNode(volume_node)
    name = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
    value = sh.GetItemAttribute(item, name) if item else ""
    return value or None


def volume_from_node(volume_node) -> Volume:
    """A copy of the voxels plus geometry: the worker thread must never read VTK memory."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise InputError("select an input volume that has image data")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"{volume_node.GetName()} is a labelmap; select the image volume instead")
    array = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    rgb = volume_node.IsA("vtkMRMLVectorVolumeNode")
    return Volume(array, ijk_to_world(volume_node), "RGB" if rgb else series_modality(volume_node),
                  volume_node.GetName())


# --- output segment ----------------------------------------------------------------------------

def terminology_string(entry: Sequence[str] = DEFAULT_TERMINOLOGY) -> str:
    ctx, cat_v, cat_s, cat_m, typ_v, typ_s, typ_m = entry
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        ctx, cat_v, cat_s, cat_m, typ_v, typ_s, typ_m, "", "", "", "", "", "", "", "", "", "")


def structure_terminology(structure) -> str:
    """Slicer's terminology string for a target's structure (weights.targets.Structure: SNOMED CT codes)."""
    def parts(code):  # Structure keeps (scheme, value, meaning); Slicer takes value, scheme, meaning
        return (code[1], code[0], code[2]) if code else ("", "", "")

    region_context = "Anatomic codes - DICOM master list" if structure.region else ""
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        "Segmentation category and type - DICOM master list", *parts(structure.category), *parts(structure.type),
        "", "", "", region_context, *parts(structure.region), "", "", "")


def subject_hierarchy(scene):
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def new_segmentation_for(volume_node, name: str | None = None):
    """A segmentation node with the volume's geometry, transform and subject-hierarchy parent.

    The reference geometry (parameter and node reference) and the shared study parent are
    what Slicer's DICOM-SEG exporter looks for to link a segmentation to its image series.
    """
    scene = volume_node.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume_node.GetName()} SAM-SP")
    node.CreateDefaultDisplayNodes()
    link_to_volume(node, volume_node)
    return node


def link_to_volume(segmentation_node, volume_node) -> None:
    """Set reference geometry, parent transform and subject-hierarchy parent from the volume."""
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    sh = subject_hierarchy(volume_node.GetScene())
    vol_item = sh.GetItemByDataNode(volume_node)
    seg_item = sh.GetItemByDataNode(segmentation_node)
    parent = sh.GetItemParent(vol_item) if vol_item else 0
    if not parent:
        return
    if not seg_item:  # Slicer's Qt plugin logic adds items for new nodes; a bare scene has none
        sh.CreateItem(parent, segmentation_node)
    else:
        sh.SetItemParent(seg_item, parent)


def check_same_grid(segmentation_node, volume_node) -> None:
    """Refuse to write into a segmentation that holds segments on another volume's grid.

    Its segments (and Slicer's exports of them) live on the grid in its reference geometry;
    slices written on this volume's grid would not line up with them. An empty segmentation
    has nothing to lose: the caller relinks it to the volume instead.
    """
    segmentation = segmentation_node.GetSegmentation()
    geometry = segmentation.GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    if not geometry or segmentation.GetNumberOfSegments() == 0:
        return
    theirs = slicer.vtkOrientedImageData()
    if not slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, theirs, False):
        return
    ours = lattice(volume_node, full_extent(volume_node))
    if list(theirs.GetExtent()) == list(ours.GetExtent()) and \
            slicer.vtkOrientedImageDataResample.DoGeometriesMatch(theirs, ours):
        return
    i0, i1, j0, j1, k0, k1 = theirs.GetExtent()
    spacing = ", ".join(f"{v:.3g}" for v in theirs.GetSpacing())
    k, j, i = volume_shape(volume_node)
    raise InputError(
        f"{segmentation_node.GetName()} was made for another grid ({i1 - i0 + 1} x {j1 - j0 + 1} x {k1 - k0 + 1} "
        f"voxels of {spacing} mm) than {volume_node.GetName()} ({i} x {j} x {k} voxels); choose a segmentation of "
        "this volume, or let Auto-segment create a new one")


def unique_segment_name(segmentation, name: str) -> str:
    taken = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    if name not in taken:
        return name
    n = 2
    while f"{name} ({n})" in taken:
        n += 1
    return f"{name} ({n})"


def output_segment(segmentation_node, name: str, segment_id: str | None = None,
                   color: Sequence[float] = DEFAULT_COLOR, terminology: str | None = None) -> str:
    """The segment to write into: the one the user chose explicitly, else always a new one.

    A re-run never rewrites an earlier result (or the user's edits of it) by itself: without
    ``segment_id`` a new segment is added with a unique name ("SAM-SP (2)"), tagged as ours.
    Overwriting is the caller's explicit choice of ``segment_id``; the Logic saves an undo
    state of that whole segment first.
    """
    seg = segmentation_node.GetSegmentation()
    if segment_id:
        if seg.GetSegment(segment_id) is None:
            raise InputError(f"segment {segment_id!r} is not in {segmentation_node.GetName()}")
        _own_layer(seg, segment_id)
        return segment_id
    new_id = seg.AddEmptySegment("", unique_segment_name(seg, name), list(color))
    segment = seg.GetSegment(new_id)
    segment.SetTag(SOURCE_TAG, name)
    segment.SetTerminology(terminology or terminology_string())
    _own_layer(seg, new_id)
    return new_id


def segment_tag(segment, tag: str) -> str | None:
    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else None


def _own_layer(segmentation, segment_id: str) -> None:
    shared: list[str] = []
    segmentation.GetSegmentIDsSharingBinaryLabelmapRepresentation(segment_id, shared, False)
    if shared:
        segmentation.SeparateSegmentLabelmap(segment_id)


# --- slices in and out -----------------------------------------------------------------------

def slice_extent(shape_kji: Sequence[int], axis: int, index: int) -> list[int]:
    """VTK extent (i0, i1, j0, j1, k0, k1) of slice ``index`` along array axis ``axis``."""
    k, j, i = shape_kji
    ext = [0, i - 1, 0, j - 1, 0, k - 1]
    pair = {0: 4, 1: 2, 2: 0}[axis]  # array axis 0 is K (VTK z), 2 is I (VTK x)
    ext[pair] = ext[pair + 1] = index
    return ext


def lattice(volume_node, extent: Sequence[int]):
    """A vtkOrientedImageData with the volume's lattice and ``extent`` but no voxels: geometry only."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*extent)
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    image.SetImageToWorldMatrix(m)
    return image


def oriented_image(volume_node, extent: Sequence[int], values: np.ndarray | None = None):
    """A uint8 vtkOrientedImageData on the volume's lattice (node coordinates), filled from ``values``."""
    image = lattice(volume_node, extent)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    scalars[:] = 0 if values is None else np.ascontiguousarray(values, dtype=np.uint8).ravel()
    return image


def volume_shape(volume_node) -> tuple[int, int, int]:
    """[K, J, I] of the volume, from its image data's dimensions (no array view needed)."""
    i, j, k = volume_node.GetImageData().GetDimensions()
    return k, j, i


def full_extent(volume_node) -> list[int]:
    k, j, i = volume_shape(volume_node)
    return [0, i - 1, 0, j - 1, 0, k - 1]


def write_slice(segmentation_node, segment_id: str, volume_node, axis: int, index: int, mask: np.ndarray) -> None:
    """Replace one slice of the segment with ``mask`` (the slice's 2D shape, bool or 0/1), in place.

    The segment's labelmap is kept in its own layer at the volume's full extent, the slice
    is written through a numpy view of it, and the segmentation is told which segment's
    source representation changed, exactly as Slicer's own labelmap modifier signals it,
    so views refresh and derived surfaces are rebuilt. Nothing outside that slice of
    that segment is touched. (``SetBinaryLabelmapToSegment`` in MODE_REPLACE replaces the
    whole labelmap by the modifier, so it cannot write one slice.)
    """
    # Checked before the labelmap is touched: a volume resized under a run must not re-grid the slices
    # written so far (they stay whole) before the write is refused.
    expected = tuple(s for a, s in enumerate(volume_shape(volume_node)) if a != axis)
    if mask.shape != expected:
        raise InputError(f"slice mask has shape {mask.shape}, the volume's slice is {expected} "
                         "(the volume changed size during the run?)")
    view, label = _full_extent_view(segmentation_node, segment_id, volume_node)
    sl: list[slice | int] = [slice(None)] * 3
    sl[axis] = index
    view[tuple(sl)] = np.where(mask, label, 0).astype(view.dtype)
    notify_modified(segmentation_node, segment_id)


def notify_modified(segmentation_node, segment_id: str) -> None:
    """Tell observers the segment's labelmap changed, as ``SetBinaryLabelmapToSegment`` does: the
    source-representation event (storage, derived representations) and RepresentationModified,
    the one the 2D segmentation displayable manager redraws on (without it a segment that was
    empty stays hidden in the slice views)."""
    segmentation = segmentation_node.GetSegmentation()
    segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id).Modified()
    segmentation.InvokeEvent(slicer.vtkSegmentation.SourceRepresentationModified, segment_id)
    segmentation.InvokeEvent(slicer.vtkSegmentation.RepresentationModified, segment_id)


def _full_extent_view(segmentation_node, segment_id: str, volume_node) -> tuple[np.ndarray, int]:
    """A writable [K, J, I] numpy view of the segment's own labelmap on the volume's lattice.

    Separates the segment from a shared layer and pads/resamples its labelmap to the volume's
    full extent the first time (the Segment Editor crops labelmaps to their content). After
    that, every call only compares geometry (no voxels are allocated or copied), so writing a
    slice costs one slice, whatever the volume's size.
    """
    segmentation = segmentation_node.GetSegmentation()
    _own_layer(segmentation, segment_id)
    labelmap = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    shape = volume_shape(volume_node)
    full = full_extent(volume_node)
    if not _on_lattice(labelmap, volume_node, full):
        reference = oriented_image(volume_node, full)
        if not labelmap.IsEmpty():
            padded = slicer.vtkOrientedImageData()
            slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, padded)
            reference.DeepCopy(padded)
        labelmap.DeepCopy(reference)
    label = segmentation.GetSegment(segment_id).GetLabelValue()
    values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
    return values.reshape(shape), label


def _on_lattice(labelmap, volume_node, extent: Sequence[int]) -> bool:
    """The labelmap has exactly the volume's lattice and extent, with voxels allocated."""
    return (list(labelmap.GetExtent()) == list(extent) and labelmap.GetPointData().GetScalars() is not None
            and slicer.vtkOrientedImageDataResample.DoGeometriesMatch(labelmap, lattice(volume_node, extent)))


def write_segment_array(segmentation_node, segment_id: str, volume_node, array: np.ndarray) -> None:
    """Replace the whole segment with a [K, J, I] 0/1 array (undo of a whole-segment overwrite)."""
    view, label = _full_extent_view(segmentation_node, segment_id, volume_node)
    view[...] = np.where(np.asarray(array, bool), label, 0).astype(view.dtype)
    notify_modified(segmentation_node, segment_id)


def segment_array(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a uint8 0/1 array [K, J, I] on the volume's lattice (a copy).

    Reads the segment's internal labelmap (possibly a layer shared with other segments)
    and keeps the voxels equal to the segment's label value.
    """
    return _read_extent(segmentation_node, segment_id, volume_node, full_extent(volume_node))


def read_slice(segmentation_node, segment_id: str, volume_node, axis: int, index: int) -> np.ndarray:
    """One slice of the segment as a bool array; reads (or resamples) only that slice's extent."""
    extent = slice_extent(volume_shape(volume_node), axis, index)
    return np.take(_read_extent(segmentation_node, segment_id, volume_node, extent), 0, axis=axis).astype(bool)


def _read_extent(segmentation_node, segment_id: str, volume_node, extent: Sequence[int]) -> np.ndarray:
    i0, i1, j0, j1, k0, k1 = extent
    shape = (k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
    labelmap = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    if labelmap is None or labelmap.IsEmpty():
        return np.zeros(shape, np.uint8)
    label = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    full = full_extent(volume_node)
    if _on_lattice(labelmap, volume_node, full):  # our own layer: read through a view, no resampling
        values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(volume_shape(volume_node))
        part = values[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1]
    else:  # a layer the Segment Editor cropped or shares: resample just this extent
        out = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, lattice(volume_node, extent), out)
        part = numpy_support.vtk_to_numpy(out.GetPointData().GetScalars()).reshape(shape)
    return (part == label).astype(np.uint8)


# --- clicks --------------------------------------------------------------------------------------

def ras_to_slice_pixels(volume: Volume, axis: int, points_ras: Sequence[Sequence[float]]) -> tuple[int, np.ndarray]:
    """World RAS points -> (slice index along ``axis``, N x 2 pixel coords x, y in that slice).

    A slice from ``np.take(array, k, axis)`` has rows/columns: axis 0 -> (j, i), axis 1 -> (k, i),
    axis 2 -> (k, j); x is the column, y the row. All points must lie on one slice.
    """
    pts = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
    ijk = (np.linalg.inv(volume.ijk_to_ras) @ np.c_[pts, np.ones(len(pts))].T)[:3].T  # columns i, j, k
    kji = ijk[:, ::-1]
    along = np.rint(kji[:, axis]).astype(int)
    if len(set(along.tolist())) != 1:
        raise InputError(f"the clicks are on different slices ({sorted(set(along.tolist()))}); click on one slice")
    index = int(along[0])
    if not 0 <= index < volume.shape_kji[axis]:
        raise InputError(f"the click is outside the volume (slice {index} of {volume.shape_kji[axis]})")
    rows_cols = [a for a in range(3) if a != axis]
    xy = np.stack([kji[:, rows_cols[1]], kji[:, rows_cols[0]]], axis=1)
    return index, xy


def markup_points(markups_node) -> list[list[float]]:
    """World positions of a markups node's control points (empty if the node is None)."""
    if markups_node is None:
        return []
    out = []
    for n in range(markups_node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(n, p)
        out.append(p)
    return out


# --- saving ------------------------------------------------------------------------------------

def save_segmentation(segmentation_node, path: str | Path, overwrite: bool = True) -> Path:
    """Write a .seg.nrrd atomically (temp file in the same folder, then rename)."""

    def write(tmp: str) -> None:
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(tmp)
        if not storage.WriteData(segmentation_node):
            raise InputError(f"could not write {path}")

    return atomic_write(path, write, overwrite)
