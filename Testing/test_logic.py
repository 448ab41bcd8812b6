"""The Slicer module's Logic on real slicer-core MRML, the real DICOM loader and the real LiteMedSAM.

Only what slicer-core lacks is shimmed (slicer.mrmlScene / slicer.modules, see
Testing/shims). The CT series is loaded as Slicer's DICOM plugin does: files sorted
along the slice normal, the vtkITK archetype reader through the Volumes logic, and
patient/study/series items in the subject hierarchy. Each test runs at most 4 slices;
one Segmenter is shared by the session so embeddings are cached across tests.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "shims"))
from install_shims import install  # noqa: E402

install()
import slicer  # noqa: E402
import vtk  # noqa: E402

from SAMSelfPromptLib.slicer import mrml  # noqa: E402
from SAMSelfPromptLib.slicer.logic import SAMSelfPromptLogic  # noqa: E402

RANGE = (8, 11)  # three axial slices through the abdomen


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


@pytest.fixture(scope="module")
def ct_node(ct_dicom_dir):
    return load_dicom_series(ct_dicom_dir, "CT abdomen")


@pytest.fixture(scope="session")
def segmenter(lite_model):
    from SAMSelfPromptLib.core.predictor import Segmenter

    return Segmenter(lite_model, "cpu")


@pytest.fixture(scope="module")
def logic(segmenter):
    lg = SAMSelfPromptLogic()
    lg.add_segmenter(segmenter)
    yield lg
    lg.shutdown()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def streamed(logic, ct_node, indices) -> dict[int, np.ndarray]:
    """The exact SliceResult masks the Logic received from the worker and wrote."""
    return {k: logic._last_results[(ct_node.GetID(), 0, k)].mask for k in indices}


def reference_masks(segmenter, ct_node, slice_range):
    """The engine run again on those slices. Cached embeddings are fp16, the first pass used
    the fresh fp32 ones, so masks may differ by a few boundary pixels (compared by Dice)."""
    from SAMSelfPromptLib.core.predictor import SegmentOptions

    volume = mrml.volume_from_node(ct_node)
    opts = SegmentOptions(slice_range=slice_range, empty_y0="full_box")
    return {r.index: r.mask for r in segmenter.segment(volume, opts)}


def user_segmentation(ct_node):
    """A segmentation the user drew: one segment covering slices 6..12 (shared layer, default editor style)."""
    seg = mrml.new_segmentation_for(ct_node, "My segmentation")
    sid = seg.GetSegmentation().AddEmptySegment("", "my liver", [0.8, 0.2, 0.2])
    mask = np.zeros((512, 512), bool)
    mask[200:320, 120:260] = True
    for k in range(6, 13):
        mrml.write_slice(seg, sid, ct_node, 0, k, mask)
    # write_slice separated it; a second user segment shares its layer as the Segment Editor does
    other = seg.GetSegmentation().AddEmptySegment("", "my spleen", [0.2, 0.2, 0.8])
    return seg, sid, other


def test_volume_from_dicom_node(ct_node):
    volume = mrml.volume_from_node(ct_node)
    assert volume.array.shape == (20, 512, 512)
    assert np.array_equal(volume.array, slicer.util.arrayFromVolume(ct_node))
    assert volume.modality == "CT"
    assert np.allclose(volume.spacing, [0.9765625, 0.9765625, 2.0])
    m = vtk.vtkMatrix4x4()
    ct_node.GetIJKToRASMatrix(m)
    assert np.allclose(volume.ijk_to_ras, slicer.util.arrayFromVTKMatrix(m))


def test_auto_segment_live_writes(logic, segmenter, ct_node, capsys):
    seg, user_id, other_id = user_segmentation(ct_node)
    user_before = mrml.segment_array(seg, user_id, ct_node)
    from SAMSelfPromptLib.core.predictor import SegmentOptions

    run = logic.start_auto_segment(ct_node, segmentation_node=seg, slice_range=RANGE,
                                   options=SegmentOptions(empty_y0="full_box", batch_size=1))
    sizes, starts, poll_times = [], [], []
    seen = 0
    while not run.finished:  # what the widget's QTimer does, every 50 ms
        t0 = time.perf_counter()
        starts.append(t0)
        logic.poll()
        poll_times.append(time.perf_counter() - t0)
        if len(run.written) != seen:  # read the segment back from MRML after each drain that wrote
            seen = len(run.written)
            sizes.append(int(mrml.segment_array(seg, run.segment_id, ct_node).sum()))
            starts.append(None)  # the read-back is the test's own work, not a drain gap
        time.sleep(0.05)
    gaps = [b - a for a, b in zip(starts, starts[1:]) if a is not None and b is not None]
    assert run.status == "done", run.error
    segment = seg.GetSegmentation().GetSegment(run.segment_id)
    assert segment.GetName() == "SAM-SP" and segment.HasTag(mrml.SOURCE_TAG)
    assert "SCT^85756007^Tissue" in segment.GetTerminology()
    # reference geometry and subject hierarchy: what DICOM-SEG export needs
    assert seg.GetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole()) == ct_node.GetID()
    geometry = seg.GetSegmentation().GetConversionParameter("Reference image geometry")
    assert geometry.endswith("0;511;0;511;0;19;")
    sh = mrml.subject_hierarchy(slicer.mrmlScene)
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == sh.GetItemParent(sh.GetItemByDataNode(ct_node))
    assert sh.GetItemLevel(sh.GetItemParent(sh.GetItemByDataNode(seg))) == "Study"
    # voxels exactly the engine's masks, on the range's slices only
    written = mrml.segment_array(seg, run.segment_id, ct_node)
    assert sorted(run.written) == list(range(*RANGE))
    results = streamed(logic, ct_node, run.written)
    again = reference_masks(segmenter, ct_node, RANGE)
    for k in range(written.shape[0]):
        if k in results:
            assert np.array_equal(written[k].astype(bool), results[k]), f"slice {k} is not what the worker sent"
            assert written[k].any(), f"slice {k} is empty"
            assert dice(written[k].astype(bool), again[k]) > 0.97, f"slice {k} is not the model's answer"
        else:
            assert not written[k].any(), f"slice {k} outside the range was written"
    # the user's segments: unchanged byte for byte
    assert np.array_equal(mrml.segment_array(seg, user_id, ct_node), user_before)
    assert not mrml.segment_array(seg, other_id, ct_node).any()
    # live: the segment grew across successive drains, one slice at a time
    assert len(sizes) >= 2 and sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes
    with capsys.disabled():
        print(f"\n[main-thread] {len(poll_times)} drains, timer 50 ms: longest gap between drain starts "
              f"{max(gaps) * 1e3:.1f} ms (median {np.median(gaps) * 1e3:.1f}), longest drain+apply "
              f"{max(poll_times) * 1e3:.1f} ms; segment voxels after each writing drain {sizes}")


def test_cancel_leaves_whole_slices(logic, ct_node):
    from SAMSelfPromptLib.core.predictor import SegmentOptions

    cancel_range = (12, 16)  # not encoded yet: about 2-4 s per slice, so cancel lands mid-run
    run = logic.start_auto_segment(ct_node, slice_range=cancel_range, segment_name="cancel me",
                                   options=SegmentOptions(empty_y0="full_box", batch_size=1))
    while not run.written and not run.finished:
        logic.poll()
        time.sleep(0.02)
    logic.cancel()
    logic.wait(run, timeout=120)
    assert run.status == "cancelled"
    assert 1 <= len(run.written) < 4
    seg = slicer.mrmlScene.GetNodeByID(run.segmentation_id)
    written = mrml.segment_array(seg, run.segment_id, ct_node)
    assert sorted(run.written) == list(range(cancel_range[0], cancel_range[0] + len(run.written)))
    results = streamed(logic, ct_node, run.written)
    for k in range(written.shape[0]):
        if k in run.written:
            assert np.array_equal(written[k].astype(bool), results[k])  # the whole slice, as sent
        else:
            assert not written[k].any()


def test_click_changes_only_that_slice_and_undo_restores(logic, ct_node):
    from SAMSelfPromptLib.core.predictor import SegmentOptions

    run = logic.wait(logic.start_auto_segment(ct_node, slice_range=RANGE, segment_name="clicked",
                                              options=SegmentOptions(empty_y0="full_box")))
    seg = slicer.mrmlScene.GetNodeByID(run.segmentation_id)
    before = mrml.segment_array(seg, run.segment_id, ct_node)
    k = 9
    ys, xs = np.nonzero(before[k])
    inside = (int(xs.mean()), int(ys.mean()))  # a negative click inside the current mask
    ijk_to_ras = mrml.volume_from_node(ct_node).ijk_to_ras
    ras = lambda i, j: (ijk_to_ras @ [i, j, k, 1])[:3].tolist()  # noqa: E731
    markups = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "negative")
    markups.AddControlPointWorld(vtk.vtkVector3d(*ras(*inside)))
    corr = logic.wait(logic.start_correction(ct_node, seg, run.segment_id, [ras(60, 60)],
                                             mrml.markup_points(markups)))
    assert corr.status == "done", corr.error
    assert corr.written == [k] and len(logic.undo_stack) == 1
    after = mrml.segment_array(seg, run.segment_id, ct_node)
    changed = {int(z) for z in np.nonzero((after != before).any(axis=(1, 2)))[0]}
    assert changed <= {k}, f"slices other than the clicked one changed: {changed}"
    assert logic.undo() is not None
    assert mrml.segment_array(seg, run.segment_id, ct_node).tobytes() == before.tobytes()
    assert logic.undo() is None


def test_clicks_on_two_slices_are_refused(logic, ct_node):
    seg, user_id, _ = user_segmentation(ct_node)
    ijk_to_ras = mrml.volume_from_node(ct_node).ijk_to_ras
    points = [(ijk_to_ras @ [100, 100, k, 1])[:3].tolist() for k in (8, 9)]
    from SAMSelfPromptLib.errors import InputError

    with pytest.raises(InputError, match="different slices"):
        logic.start_correction(ct_node, seg, user_id, points)


def test_save_seg_nrrd_and_read_back(logic, ct_node, tmp_path):
    import slicerio
    from SAMSelfPromptLib.core.predictor import SegmentOptions

    seg, user_id, _ = user_segmentation(ct_node)
    run = logic.wait(logic.start_auto_segment(ct_node, segmentation_node=seg, slice_range=RANGE,
                                              options=SegmentOptions(empty_y0="full_box")))
    path = mrml.save_segmentation(seg, tmp_path / "out.seg.nrrd")
    data = slicerio.read_segmentation(str(path))
    names = {s["name"]: s for s in data["segments"]}
    assert {"my liver", "my spleen", "SAM-SP"} <= set(names)
    voxels = data["voxels"]
    offset = data.get("ijkToLPS")
    assert offset is not None
    for name, sid in (("SAM-SP", run.segment_id), ("my liver", user_id)):
        info = names[name]
        layer = voxels[info.get("layer", 0)] if voxels.ndim == 4 else voxels
        on_disk = (layer == info["labelValue"]).transpose(2, 1, 0)  # nrrd is i, j, k
        assert np.array_equal(on_disk.astype(np.uint8), mrml.segment_array(seg, sid, ct_node)), name


def test_batch_two_volumes(logic, ct_node, ct_dicom_dir):
    from SAMSelfPromptLib.core.predictor import SegmentOptions

    second = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT shifted")
    image = vtk.vtkImageData()
    image.DeepCopy(ct_node.GetImageData())
    second.SetAndObserveImageData(image)
    m = vtk.vtkMatrix4x4()
    ct_node.GetIJKToRASMatrix(m)
    second.SetIJKToRASMatrix(m)
    second.SetOrigin(0.0, 0.0, 100.0)
    batch = logic.start_batch([ct_node, second], slice_range=(9, 11), options=SegmentOptions(empty_y0="full_box"))
    logic.wait(batch)
    summary = batch.summary()
    assert [s["status"] for s in summary] == ["done", "done"]
    assert [s["volume"] for s in summary] == ["CT abdomen", "CT shifted"]
    assert all(s["slices"] == 2 and s["voxels"] > 0 for s in summary)
    segs = [slicer.mrmlScene.GetNodeByID(s["segmentation_id"]) for s in summary]
    assert segs[0] is not segs[1]
    for seg, vol in zip(segs, (ct_node, second)):
        assert seg.GetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole()) == vol.GetID()
    g0, g1 = (s.GetSegmentation().GetConversionParameter("Reference image geometry") for s in segs)
    assert g0 != g1  # the shifted origin is in the second one's geometry
    arrays = [mrml.segment_array(s, r.segment_id, v) for s, r, v in zip(segs, batch.runs, (ct_node, second))]
    assert np.array_equal(arrays[0], arrays[1])  # same voxels, same masks


def test_bad_range_is_reported_not_raised(logic, ct_node):
    run = logic.wait(logic.start_auto_segment(ct_node, slice_range=(15, 40), segment_name="bad"))
    assert run.status == "failed" and "outside the volume" in run.error


def test_user_segment_with_our_name_is_not_reused(ct_node):
    seg = mrml.new_segmentation_for(ct_node, "named")
    mine = seg.GetSegmentation().AddEmptySegment("", "SAM-SP", [1, 0, 0])
    sid = mrml.output_segment(seg, "SAM-SP")
    assert sid != mine and seg.GetSegmentation().GetSegment(sid).GetName() == "SAM-SP (2)"
    assert mrml.output_segment(seg, "SAM-SP") == sid  # ours (tagged) is reused next time
    assert mrml.output_segment(seg, "ignored", segment_id=mine) == mine  # the user's explicit choice


def test_adapt_then_auto_segment_with_adapted_model(logic, ct_node, tmp_path, monkeypatch):
    """Adapt (1 epoch, CPU mode) on a user's segment on 3 slices, then run with the saved checkpoint."""
    monkeypatch.setenv("SAMSELFPROMPT_CACHE", str(tmp_path / "cache"))
    from SAMSelfPromptLib.weights.checkpoint import read_samsp

    seg = mrml.new_segmentation_for(ct_node, "to learn from")
    user_id = seg.GetSegmentation().AddEmptySegment("", "my organ", [0.8, 0.2, 0.2])
    mask = np.zeros((512, 512), bool)
    mask[200:320, 120:260] = True
    for k in RANGE[0], RANGE[0] + 1, RANGE[0] + 2:
        mrml.write_slice(seg, user_id, ct_node, 0, k, mask)
    adapt = logic.wait(logic.start_adapt([(ct_node, seg, user_id)], epochs=1, out_dir=tmp_path), timeout=900)
    assert adapt.status == "done", adapt.error + adapt.traceback
    path = Path(adapt.result["checkpoint"])
    assert path.parent == tmp_path and path in logic.adapted_checkpoints
    assert adapt.result["slices"] == 3  # the slices the user drew
    assert read_samsp(path)["base_model"] == "litemedsam"
    run = logic.wait(logic.start_auto_segment(ct_node, checkpoint=path, slice_range=(9, 10), segment_name="adapted"))
    assert run.status == "done", run.error
    assert run.written == [9]
