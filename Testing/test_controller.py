"""The module controller (no Qt) on real slicer-core MRML, the real CT series and the real shipped model.

What the Qt widget and the web app show comes from ``ModuleController.view()``; these tests
drive the controller as a host would (actions, then ``tick()`` from a "timer") and check the
view and the segment in MRML. The CT model is the catalogue's choice, never injected. Each
run segments at most 2 slices (about 2 s per slice on the 2-core machine).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import mrml_helpers  # noqa: F401  (installs the shims before slicer is imported)

import slicer
from SAMSelfPromptLib.core.masks import dice
from SAMSelfPromptLib.errors import InputError
from SAMSelfPromptLib.slicer import mrml
from SAMSelfPromptLib.slicer.controller import (LAST_SLICE, NEGATIVE, OVERWRITE, POSITIVE, ModuleController,
                                                Parameters, State, slice_range)

N_SLICES = 20  # the CT series' axial slices


@pytest.fixture
def controller(logic, ct_node):
    c = ModuleController(logic, Parameters(input_volume=ct_node, first_slice=9, last_slice=10))
    views = []
    c.subscribe(views.append)
    c.views = views
    yield c
    if c.state is not State.IDLE:
        c.cancel()
        c.wait(120)
    c.close()


def ras_on_slice(ct_node, k: int):
    ijk_to_ras = mrml.volume_from_node(ct_node).ijk_to_ras
    return lambda i, j: tuple((ijk_to_ras @ [i, j, k, 1])[:3].tolist())


def control_points(node) -> list[tuple[float, ...]]:
    out = []
    for n in range(node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(n, p)
        out.append(tuple(p))
    return out


# --- rules without a run -----------------------------------------------------------------------------

def test_slice_range_rule():
    """Defect g: "First slice" is honoured when "Last slice" is "last"; bad values say why."""
    assert slice_range(5, LAST_SLICE, N_SLICES) == (5, N_SLICES)
    assert slice_range(0, LAST_SLICE, N_SLICES) is None  # the whole volume
    assert slice_range(8, 10, N_SLICES) == (8, 11)  # last is inclusive
    assert slice_range(0, 0, N_SLICES) == (0, 1)  # 0 is a slice, not "last"
    assert slice_range(19, 19, N_SLICES) == (19, 20)
    for first, last, match in ((20, LAST_SLICE, "first slice 20 is past the volume's last slice \\(19\\)"),
                               (0, 20, "last slice 20 is past"), (12, 10, "first slice 12 is after last slice 10"),
                               (-1, LAST_SLICE, "negative"), (0, -2, "not valid")):
        with pytest.raises(InputError, match=match):
            slice_range(first, last, N_SLICES)


def test_shortcuts_only_while_the_module_is_entered(controller):
    """Defect c: P, N, Ctrl+Z and Escape belong to the module only while it is shown."""
    assert not controller.view().shortcuts_enabled
    controller.module_entered()
    assert controller.view().shortcuts_enabled and controller.views[-1].shortcuts_enabled
    controller.module_exited()
    assert not controller.view().shortcuts_enabled and not controller.views[-1].shortcuts_enabled


def test_what_idle_enables(controller, ct_node):
    view = controller.view()
    assert (view.state, view.apply_text, view.apply_enabled) == (State.IDLE, "Auto-segment", True)
    assert not view.clicks_enabled and not view.adapt_enabled and not view.undo_enabled  # nothing to correct yet
    controller.set_click_mode(POSITIVE)
    assert controller.view().click_mode is None and "Run Auto-segment first" in controller.view().status_text
    controller.parameters.input_volume = None
    assert not controller.refresh().apply_enabled
    controller.parameters.batch_all = True
    assert controller.refresh().apply_enabled  # every loaded volume


def test_bad_slice_range_is_refused_before_anything_starts(controller, logic):
    controller.parameters.first_slice, controller.parameters.last_slice = 15, 40
    assert controller.auto_segment() is None
    view = controller.view()
    assert view.state is State.IDLE and not logic.busy
    assert view.error_text == "CT abdomen: last slice 40 is past the volume's last slice (19)"


# --- runs ---------------------------------------------------------------------------------------------

def test_auto_segment_runs_to_idle_with_progress(controller, logic, ct_node):
    """idle -> running (Apply is Cancel, clicks off) -> idle with every slice done; the first slice is
    honoured with "Last slice" = last (defect g); a click while running is refused (defect k)."""
    controller.module_entered()
    controller.parameters.first_slice, controller.parameters.last_slice = 18, LAST_SLICE
    run = controller.auto_segment()
    view = controller.view()
    assert view.state is State.RUNNING and view.apply_text == "Cancel" and view.apply_enabled
    assert not view.clicks_enabled and not view.adapt_enabled and not view.undo_enabled
    assert view.progress_total == 2 and view.ticks_needed
    seg = controller.parameters.output_segmentation
    assert seg is not None and seg.GetID() == run.segmentation_id  # the first run made the output
    assert not controller.click(ras_on_slice(ct_node, 18)(250, 250), True)
    assert controller.view().status_text.startswith("Click ignored: clicks are off while a run is in progress")
    assert controller.points == [] and logic.runs[run.job.id] is run and not logic.undo_stack
    seen = set()
    while controller.state is not State.IDLE:
        view = controller.tick()
        seen.add((view.apply_text, view.clicks_enabled))
        time.sleep(0.05)
    view = controller.view()
    assert run.status == "done", run.error
    assert seen <= {("Cancel", False), ("Auto-segment", True)}
    assert (view.apply_text, view.progress_done, view.progress_total) == ("Auto-segment", 2, 2)
    assert view.status_text.startswith("Done: 2 slices written") and view.error_text == ""
    assert view.clicks_enabled and view.adapt_enabled and view.eta_text == ""
    assert sorted(run.written) == [18, 19]
    written = mrml.segment_array(seg, run.segment_id, ct_node)
    assert not written[:18].any()
    assert controller.target_segment_id() == run.segment_id
    assert "'Liver'" in view.target_text  # the liver-ct target names its segment
    assert [v.apply_text for v in controller.views].count("Cancel") >= 1  # subscribers saw the running state


def test_cancel_says_what_finishes_first(controller, logic):
    """Defect e: the status names the batch the encoder finishes before it stops."""
    controller.parameters.first_slice, controller.parameters.last_slice = 12, 13
    run = controller.auto_segment()
    controller.apply()  # the Apply button is Cancel now
    view = controller.view()
    assert view.state is State.CANCELLING and view.apply_text == "Cancelling…" and not view.apply_enabled
    assert view.status_text == (f"Cancelling: the slices being encoded (a batch of up to {run.batch_size}) "
                                "finish first.")
    assert run.batch_size == 1  # the CPU encodes one slice at a time (core/predictor.default_batch_size)
    assert not view.clicks_enabled
    view = controller.wait(timeout=120)
    assert view.state is State.IDLE and view.apply_text == "Auto-segment" and view.apply_enabled
    assert run.status == "cancelled"
    assert view.status_text == f"Cancelled: {len(run.written)} of 2 slices were written."


def test_click_correction_refuses_clicks_in_flight_then_undo(controller, logic, ct_node):
    """Defect k: a click while a correction is computed is refused (not queued) with a message;
    an accepted click changes only its slice and Undo restores it byte for byte."""
    controller.parameters.rerun = OVERWRITE
    controller.auto_segment()
    controller.wait(timeout=300)
    assert controller.run.status == "done", controller.run.error
    seg, sid = controller.parameters.output_segmentation, controller.target_segment_id()
    before = mrml.segment_array(seg, sid, ct_node)
    k = 9
    ys, xs = np.nonzero(before[k])
    ras = ras_on_slice(ct_node, k)
    inside = ras(int(xs.mean()), int(ys.mean())) if len(xs) else ras(256, 256)

    controller.module_entered()
    controller.set_click_mode(NEGATIVE)
    assert controller.view().click_mode == NEGATIVE
    assert controller.click(inside, positive=False)
    view = controller.view()
    assert view.state is State.RUNNING and not view.clicks_enabled and view.apply_text == "Cancel"
    assert not controller.click(ras(60, 60), positive=True)  # a rapid second click
    assert controller.view().status_text == ("Click ignored: the last correction is still being computed. "
                                             "Click again when it is written.")
    assert controller.points == [(inside, False)]
    assert control_points(controller.markups_node(NEGATIVE)) == [inside]
    assert control_points(controller.markups_node(POSITIVE)) == []  # the refused point is not shown
    view = controller.wait(timeout=120)
    assert controller.run.status == "done", controller.run.error
    assert view.status_text == f"Corrected slice {k}." and view.undo_enabled and view.clicks_enabled
    assert view.click_mode == NEGATIVE  # still placing points
    after = mrml.segment_array(seg, sid, ct_node)
    changed = {int(z) for z in np.nonzero((after != before).any(axis=(1, 2)))[0]}
    assert changed <= {k}

    # a point placed in a view arrives as a markups event and is handled on the next tick
    controller.markups_node(POSITIVE).AddControlPointWorld(list(ras(300, 300)))
    assert controller.tick().state is State.RUNNING
    controller.wait(timeout=120)
    assert controller.points == [(inside, False), (ras(300, 300), True)]
    assert len(logic.undo_stack) >= 2

    state = controller.undo()
    assert state is not None and state.index == k and controller.view().status_text == f"Restored slice {k}."
    assert controller.points == [(inside, False)]
    assert control_points(controller.markups_node(POSITIVE)) == []
    controller.undo()
    assert mrml.segment_array(seg, sid, ct_node).tobytes() == before.tobytes()
    assert controller.points == [] and control_points(controller.markups_node(NEGATIVE)) == []
    controller.module_exited()
    assert controller.view().click_mode is None


def test_rerun_new_segment_or_overwrite(controller, logic, ct_node):
    """The re-run choice: a new segment by default; "overwrite" replaces the last result, undoably."""
    controller.parameters.first_slice = controller.parameters.last_slice = 9
    first = controller.auto_segment()
    controller.wait(timeout=120)
    again = controller.auto_segment()
    controller.wait(timeout=120)
    seg = controller.parameters.output_segmentation
    assert again.segmentation_id == first.segmentation_id and again.segment_id != first.segment_id
    assert seg.GetSegmentation().GetSegment(again.segment_id).GetName() == "Liver (2)"
    assert controller.target_segment_id() == again.segment_id  # clicks go to the newest result

    before = mrml.segment_array(seg, again.segment_id, ct_node)
    controller.parameters.rerun = OVERWRITE
    controller.parameters.first_slice = controller.parameters.last_slice = 10
    assert "A re-run overwrites 'Liver (2)'" in controller.refresh().target_text
    third = controller.auto_segment()
    view = controller.wait(timeout=120)
    assert third.status == "done", third.error
    assert third.segment_id == again.segment_id and seg.GetSegmentation().GetNumberOfSegments() == 2
    assert view.undo_enabled
    controller.undo()
    assert controller.view().status_text == "Restored the segment as it was before the re-run."
    assert mrml.segment_array(seg, again.segment_id, ct_node).tobytes() == before.tobytes()


def test_failed_write_returns_to_idle_with_the_error(controller, logic):
    """Defect d (UI): a run whose slice write failed ends "failed"; the controller goes back to idle
    and shows why. The failing event is a real SLICE whose mask has the wrong shape."""
    from SAMSelfPromptLib.core.predictor import SliceResult
    from SAMSelfPromptLib.runtime.jobs import EventKind, JobEvent

    controller.parameters.first_slice, controller.parameters.last_slice = 9, 9
    run = controller.auto_segment()
    bad = SliceResult(9, np.zeros((7, 7), bool), None, "self", 0.0)  # a mask of the wrong shape
    logic.apply_events([JobEvent(run.job.id, EventKind.SLICE, bad)])
    assert controller.view().state is State.RUNNING  # the worker's end event is still to come
    view = controller.wait(timeout=120)
    assert run.status == "failed"
    assert view.state is State.IDLE and view.apply_text == "Auto-segment" and view.apply_enabled
    assert "could not write slice 9" in view.error_text and "shape" in view.error_text
    assert view.status_text.startswith("Auto-segment failed")
    controller.parameters.last_slice = LAST_SLICE
    controller.parameters.first_slice = 25
    controller.auto_segment()  # the next action clears the old error, or replaces it
    assert "first slice 25" in controller.view().error_text


def test_adapt_needs_a_segment_the_user_drew(controller, ct_node):
    seg = mrml.new_segmentation_for(ct_node, "only ours")
    mrml.output_segment(seg, "SAM-SP")  # a segment the module wrote, not the user
    controller.parameters.output_segmentation = seg
    assert controller.adapt() is None
    assert controller.view().error_text.startswith("only ours has no segment you drew")
    assert controller.state is State.IDLE


def test_adapt_selects_the_new_checkpoint(controller, ct_node, tmp_path, monkeypatch):
    """Adapt (1 epoch) on a segment the user drew on 2 slices; the saved checkpoint becomes the parameter."""
    monkeypatch.setenv("SAMSELFPROMPT_CACHE", str(tmp_path / "cache"))
    seg = mrml.new_segmentation_for(ct_node, "to learn from")
    user_id = seg.GetSegmentation().AddEmptySegment("", "my organ", [0.8, 0.2, 0.2])
    mask = np.zeros((512, 512), bool)
    mask[200:320, 120:260] = True
    for k in (9, 10):
        mrml.write_slice(seg, user_id, ct_node, 0, k, mask)
    controller.parameters.output_segmentation = seg
    controller.parameters.adapt_epochs = 1
    run = controller.adapt()
    view = controller.view()
    assert view.state is State.RUNNING and view.progress_unit == "epochs" and not view.clicks_enabled
    view = controller.wait(timeout=600)
    assert run.status == "done", run.error + run.traceback
    assert controller.parameters.checkpoint == run.result["checkpoint"]
    assert view.status_text.startswith("Adapted model saved and selected")
    assert (view.progress_done, view.progress_total) == (1, 1)


def test_parse_slice_list_rule():
    from SAMSelfPromptLib.slicer.controller import parse_slice_list

    assert parse_slice_list("", N_SLICES) == [] and parse_slice_list(" 3, 7-9;12 ,", N_SLICES) == [3, 7, 8, 9, 12]
    for text, match in (("3, x", "'x' is not a slice number"), ("9-7", "runs backwards: write it as 7-9"),
                        ("5, 20", "slice 20 in '20' is past the volume's last slice \\(19\\)"),
                        ("-2", "'-2' is not a slice number")):
        with pytest.raises(InputError, match=match):
            parse_slice_list(text, N_SLICES)


def test_load_outlines_makes_a_user_segment_on_the_volume_grid_only(controller, ct_node):
    """Outlines from a labelmap file (the web app's way to outline): one user segment, on the volume's grid."""
    from SAMSelfPromptLib.core.volume import Volume
    from SAMSelfPromptLib.slicer.adapt import user_segments

    volume = controller.logic.volume(ct_node)
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[4, 100:140, 200:260] = 3
    labels[7, 110:150, 210:250] = 1
    assert controller.load_outlines(Volume(labels[:, :256], volume.ijk_to_ras, None, "half"), "half") is None
    assert "half is not a labelmap on the grid of" in controller.view().error_text
    assert controller.load_outlines(Volume(labels * 0, volume.ijk_to_ras, None, "blank"), "blank") is None
    assert "blank has no nonzero voxel" in controller.view().error_text
    assert controller.parameters.output_segmentation is None  # nothing was made for a refused file

    sid = controller.load_outlines(Volume(labels, volume.ijk_to_ras, None, "my outlines"), "my outlines")
    seg = controller.parameters.output_segmentation
    assert sid is not None and user_segments(seg) == [sid] and controller.view().error_text == ""
    assert controller.view().status_text.startswith("Outlines 'my outlines' loaded on 2 slice(s) (4, 7)")
    assert (mrml.segment_array(seg, sid, ct_node) == (labels > 0)).all()
    assert controller.view().adapt_enabled


def test_adapt_target_trains_the_slices_marked_empty(controller, tmp_path, monkeypatch, capsys):
    """The Adapt panel as a host drives it, on a real LGE-MRI crop (left atrium on slices 7-18 of 19):
    outlines on 2 slices, first/last slice as the extent, the "slices without it" text. A typo is refused
    by name; the listed slices are trained as absent, the model is saved and offered as a target (in
    later sessions and on the command line too), and nothing is written outside the extent."""
    import SimpleITK as sitk
    from conftest import shared_path

    from SAMSelfPromptLib.cli.main import main as cli
    from SAMSelfPromptLib.slicer.logic import SAMSelfPromptLogic
    from SAMSelfPromptLib.training.data import read_volume
    from SAMSelfPromptLib.weights.checkpoint import load_samsp

    monkeypatch.setenv("SAMSELFPROMPT_CACHE", str(tmp_path / "cache"))  # the adapted model is saved in there
    crop = (slice(12, 31), slice(40, 136), slice(30, 126))  # as test_adapt.la_crop
    image, _ = read_volume(shared_path("la_mri", "images", "23X6SY44VT9KFHR7S7OC.nii.gz"))
    labels, _ = read_volume(shared_path("la_mri", "labels", "23X6SY44VT9KFHR7S7OC.nii.gz"))
    image, atrium = image[crop].astype(np.float32), labels[crop] == 1
    node = slicer.util.addVolumeFromArray(image, name="LA crop")
    seg = mrml.new_segmentation_for(node, "outlines")
    user_id = seg.GetSegmentation().AddEmptySegment("", "my atrium", [0.8, 0.2, 0.2])
    for k in (10, 15):
        mrml.write_slice(seg, user_id, node, 0, k, atrium[k])
    p = controller.parameters
    p.input_volume, p.output_segmentation, p.first_slice, p.last_slice = node, seg, 5, 18

    assert controller.adapt_target("atrium (mine)", empty_slices="0, 1-x") is None
    assert "'1-x' is not a slice number" in controller.view().error_text and controller.state is State.IDLE

    run = controller.adapt_target("atrium (mine)", empty_slices="0, 1-2")
    assert controller.view().status_text == "Adapt to 'atrium (mine)' (slices 5-18), 3 slice(s) marked empty queued..."
    controller.wait(timeout=900)
    assert run.status == "done", run.error + run.traceback
    _, meta = load_samsp(run.result["checkpoint"])
    assert {0, 1, 2} <= set(meta["adapt"]["negative_slices"]) and meta["adapt"]["extent"] == [5, 18]
    painted = mrml.segment_array(seg, run.segment_id, node)
    assert painted[5:].any() and not painted[:5].any()  # inside the extent only
    assert dice(painted[5:] > 0, atrium[5:]) > 0.5
    assert (mrml.segment_array(seg, user_id, node)[[10, 15]] == atrium[[10, 15]]).all()  # the outlines are untouched

    # The next session (a new Logic, Slicer restarted) still offers it, and so do the command-line tools.
    later = SAMSelfPromptLogic()
    try:
        assert "atrium (mine)" in [t.name for t in later.targets_for(node)]
    finally:
        later.shutdown()
    assert cli(["models"]) == 0
    assert "atrium (mine)" in capsys.readouterr().out
    src, out = tmp_path / "crop.nii.gz", tmp_path / "mine.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(image), str(src))
    assert cli(["segment", str(src), "-o", str(out), "--target", "atrium (mine)", "--slices", "10:13",
                "--quiet"]) == 0
    assert "atrium (mine) (adapted)" in capsys.readouterr().out and sitk.ReadImage(str(out)).GetSize()[2] == 19


def test_scene_closed_resets_the_controller(controller, ct_node):
    controller.parameters.output_segmentation = mrml.new_segmentation_for(ct_node, "closing")
    controller.click(ras_on_slice(ct_node, 9)(10, 10), True)  # refused: nothing to correct there yet
    controller.error = "an old error"
    controller.scene_closed()
    view = controller.view()
    assert view.state is State.IDLE and view.error_text == "" and view.status_text.startswith("Select a volume")
    assert controller.points == [] and controller.output == (None, None)
    assert slicer.mrmlScene.GetNodeByID(ct_node.GetID()) is ct_node
