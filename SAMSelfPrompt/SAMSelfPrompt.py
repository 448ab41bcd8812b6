"""SAMSelfPrompt: prompt-free segmentation with self-prompting SAM (SAM-SP) in 3D Slicer.

This file is Qt wiring only: the Module description, the Widget (a small state
machine: Auto-segment becomes Cancel while a run is going) and the self-test.
Everything else lives in SAMSelfPromptLib: ``logic.SAMSelfPromptLogic`` (MRML only,
one persistent worker thread) and ``slicer_deps`` (consented installs). Importing
this file installs nothing and imports no torch.

Threading: the worker never touches MRML or Qt. A QTimer on the main thread calls
``logic.poll()``, which drains the worker's events and writes each finished slice
into its segment, then this widget only refreshes the progress bar and status line.
"""
from __future__ import annotations

import os
from typing import Annotated

import qt
import slicer
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from SAMSelfPromptLib.slicer import mrml as logic_mrml
from SAMSelfPromptLib.slicer.logic import DEVICE_CHOICES, MODEL_CHOICES, SAMSelfPromptLogic as _Logic

POLL_MS = 100  # the main thread drains the worker this often; each drain writes only finished slices


class SAMSelfPrompt(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "SAM Self-Prompt"
        parent.categories = ["Segmentation"]
        parent.dependencies = []
        parent.contributors = ["SAMSelfPrompt developers"]
        parent.helpText = ("Press <b>Auto-segment</b> to segment the selected volume slice by slice with "
                           "self-prompting SAM (no prompt needed). Correct a slice with positive (P) and "
                           "negative (N) points; Ctrl+Z undoes the last correction. <b>Adapt</b> fine-tunes "
                           "the model on the segments you drew.")
        parent.acknowledgementText = ("SAM-SP (arXiv 2408.12364), ProMISe (arXiv 2403.04164), LiteMedSAM "
                                      "(Apache-2.0), Segment Anything (Apache-2.0).")


@parameterNodeWrapper
class SAMSelfPromptParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    batchAllVolumes: bool = False
    model: Annotated[str, Choice(list(MODEL_CHOICES))] = "litemedsam"
    checkpoint: str = ""
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    segmentName: str = "SAM-SP"
    sliceAxis: Annotated[str, Choice(["auto", "axial", "coronal", "sagittal"])] = "auto"
    firstSlice: int = 0
    lastSlice: int = 0  # 0: to the end of the volume
    device: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
    adaptEpochs: int = 5


class SAMSelfPromptWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: _Logic | None = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._shortcuts: list = []
        self._markups: dict[str, object] = {}
        self._timer = None
        self._output: tuple[str | None, str | None] = (None, None)  # (segmentation id, segment id) last written

    # --- setup / teardown ---------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/SAMSelfPrompt.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = SAMSelfPromptLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self.onTimer)
        self.ui.applyButton.clicked.connect(self.onApplyOrCancel)
        self.ui.positiveButton.toggled.connect(lambda on: self.onPlace("positive", on))
        self.ui.negativeButton.toggled.connect(lambda on: self.onPlace("negative", on))
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.ui.clearPointsButton.clicked.connect(self.onClearPoints)
        self.ui.adaptButton.clicked.connect(self.onAdapt)
        for keys, slot in (("p", lambda: self.ui.positiveButton.setChecked(True)),
                           ("n", lambda: self.ui.negativeButton.setChecked(True)),
                           ("Ctrl+z", self.onUndo), ("Escape", self.onEscape)):
            shortcut = qt.QShortcut(qt.QKeySequence(keys), slicer.util.mainWindow())
            shortcut.activated.connect(slot)
            self._shortcuts.append(shortcut)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Remove every observer, the timer and the shortcuts; stop the worker."""
        if self._timer is not None:
            self._timer.stop()
            self._timer.timeout.disconnect(self.onTimer)
            self._timer = None
        for shortcut in self._shortcuts:
            shortcut.activated.disconnect()
            shortcut.setParent(None)
        self._shortcuts.clear()
        self._removeMarkups()
        self.removeObservers()
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        if self.logic is not None:
            self.logic.shutdown()
            self.logic = None

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.onEscape()

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic:
            self.logic.cancel()
        self._removeMarkups()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node -----------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(SAMSelfPromptParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if node:
                self._parameterNode.inputVolume = node

    def setParameterNode(self, node) -> None:
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = node
        if node:
            self._parameterNodeGuiTag = node.connectGui(self.ui)

    # --- auto-segment: Apply <-> Cancel --------------------------------------------------------------
    def onApplyOrCancel(self) -> None:
        if self._run is not None and not self._run.finished:
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelling after the current slice..."
            return
        p = self._parameterNode
        if not self._ensureReady(p.model):
            return
        volumes = (list(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")) if p.batchAllVolumes
                   else [p.inputVolume])
        volumes = [v for v in volumes if v is not None and not v.IsA("vtkMRMLLabelMapVolumeNode")]
        args = dict(model=p.model, checkpoint=p.checkpoint or None, device=p.device, axis=p.sliceAxis,
                    slice_range=self._sliceRange(), segment_name=p.segmentName or "SAM-SP",
                    allow_download=True)
        with slicer.util.tryWithErrorDisplay("Auto-segment could not start.", waitCursor=True):
            if len(volumes) > 1:
                self._run = self.logic.start_batch(volumes, **args)
            else:
                self._run = self.logic.start_auto_segment(volumes[0] if volumes else None,
                                                          segmentation_node=p.outputSegmentation, **args)
                if not p.outputSegmentation:
                    p.outputSegmentation = slicer.mrmlScene.GetNodeByID(self._run.segmentation_id)
                self._output = (self._run.segmentation_id, self._run.segment_id)
            self._setRunning(True)

    def _sliceRange(self):
        p = self._parameterNode
        return (p.firstSlice, p.lastSlice + 1) if p.lastSlice else None

    def _ensureReady(self, model: str) -> bool:
        """Dependencies and downloads, each with the user's consent, on the main thread."""
        from SAMSelfPromptLib.slicer import deps as slicer_deps

        try:
            slicer_deps.ensure_dependencies(
                lambda message: slicer.util.confirmOkCancelDisplay(message, "SAMSelfPrompt: install packages"))
        except slicer_deps.DependencyError as exc:
            slicer.util.errorDisplay(str(exc))
            return False
        spec = self.logic.download_needed(model) if not self._parameterNode.checkpoint else None
        if spec is not None:
            text = (f"{model} weights ({spec.size / 1e6:.0f} MB) will be downloaded from {spec.url}, "
                    "checked against their sha256 and kept in the cache folder. Download now?")
            return slicer.util.confirmOkCancelDisplay(text, "SAMSelfPrompt: download model")
        return True

    def _setRunning(self, running: bool) -> None:
        self.ui.applyButton.text = "Cancel" if running else "Auto-segment"
        self.ui.adaptButton.enabled = not running
        if running:
            self._timer.start()
        else:
            self._timer.stop()

    def onTimer(self) -> None:
        """Main thread: apply the worker's events to MRML, then refresh progress and status."""
        self.logic.poll()
        run = self._run
        if run is None:
            return
        self.ui.progressBar.maximum = max(1, run.total)
        self.ui.progressBar.value = run.done
        current = next((r for r in getattr(run, "runs", [run]) if not r.finished), None)
        self.ui.statusLabel.text = (current.message + " " + current.progress_text()) if current else self.ui.statusLabel.text
        if run.finished:
            self._setRunning(False)
            self.ui.statusLabel.text = _summary_text(run)
            if getattr(run, "kind", None) == "adapt":
                self._afterAdapt(run)

    # --- click correction -----------------------------------------------------------------------------
    def onPlace(self, sign: str, on: bool) -> None:
        if not on:
            return
        other = self.ui.negativeButton if sign == "positive" else self.ui.positiveButton
        other.setChecked(False)
        node = self._markupsNode(sign)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
        selection.SetActivePlaceNodeID(node.GetID())
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetCurrentInteractionMode(interaction.Place)

    def _markupsNode(self, sign: str):
        node = self._markups.get(sign)
        if node is None or slicer.mrmlScene.GetNodeByID(node.GetID()) is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"SAM-SP {sign}")
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetSelectedColor((0.2, 0.9, 0.2) if sign == "positive" else (0.9, 0.2, 0.2))
            self.addObserver(node, node.PointPositionDefinedEvent, self.onPointPlaced)
            self._markups[sign] = node
        return node

    def onPointPlaced(self, caller, event) -> None:
        p = self._parameterNode
        seg = p.outputSegmentation
        if not (p.inputVolume and seg):
            self.ui.statusLabel.text = "Run Auto-segment first (or choose an output segmentation) before clicking."
            return
        segment_id = self._targetSegment(seg)
        positive = logic_mrml.markup_points(self._markups.get("positive"))
        negative = logic_mrml.markup_points(self._markups.get("negative"))
        with slicer.util.tryWithErrorDisplay("The correction could not start.", waitCursor=True):
            try:
                self._run = self.logic.start_correction(p.inputVolume, seg, segment_id, positive, negative,
                                                        axis=p.sliceAxis, model=p.model,
                                                        checkpoint=p.checkpoint or None, device=p.device)
            except Exception:
                self.onClearPoints()  # clicks on another slice: start over from this click next time
                raise
            self._setRunning(True)

    def _targetSegment(self, seg) -> str:
        """The segment the last Auto-segment wrote (it may be "SAM-SP (2)"), else the named one."""
        if self._output[0] == seg.GetID() and seg.GetSegmentation().GetSegment(self._output[1]):
            return self._output[1]
        return seg.GetSegmentation().GetSegmentIdBySegmentName(self._parameterNode.segmentName)

    def onUndo(self) -> None:
        state = self.logic.undo()
        self.ui.statusLabel.text = (f"Restored slice {state.index}." if state else "Nothing to undo.")

    def onClearPoints(self) -> None:
        for node in self._markups.values():
            node.RemoveAllControlPoints()

    def onEscape(self) -> None:
        self.ui.positiveButton.setChecked(False)
        self.ui.negativeButton.setChecked(False)
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetCurrentInteractionMode(interaction.ViewTransform)

    def _removeMarkups(self) -> None:
        for node in self._markups.values():
            self.removeObserver(node, node.PointPositionDefinedEvent, self.onPointPlaced)
            if slicer.mrmlScene.GetNodeByID(node.GetID()) is not None:
                slicer.mrmlScene.RemoveNode(node)
        self._markups.clear()

    # --- adapt ---------------------------------------------------------------------------------------------
    def onAdapt(self) -> None:
        p = self._parameterNode
        seg = p.outputSegmentation
        if not (p.inputVolume and seg) or not self._ensureReady(p.model):
            self.ui.statusLabel.text = "Choose the input volume and the segmentation holding your segments."
            return
        segment_id = seg.GetSegmentation().GetSegmentIdBySegmentName(p.segmentName)
        with slicer.util.tryWithErrorDisplay("Adapt could not start.", waitCursor=True):
            self._run = self.logic.start_adapt([(p.inputVolume, seg, segment_id)], model=p.model,
                                               checkpoint=p.checkpoint or None, epochs=p.adaptEpochs,
                                               axis=p.sliceAxis)
            self._setRunning(True)

    def _afterAdapt(self, run) -> None:
        if run.status == "done" and run.result:
            self._parameterNode.checkpoint = str(run.result["checkpoint"])
            if slicer.util.confirmYesNoDisplay("The adapted model is saved and selected. Re-run Auto-segment now?"):
                self.onApplyOrCancel()


def _summary_text(run) -> str:
    runs = getattr(run, "runs", None)
    if runs is None:
        return run.message + (f" ({len(run.written)} slices written in {run.elapsed:.0f} s)" if run.written else "")
    return "; ".join(f"{s['volume']}: {s['status']}, {s['slices']}/{s['total']} slices" for s in run.summary())


class SAMSelfPromptLogic(ScriptedLoadableModuleLogic, _Logic):
    """Slicer's parameter-node plumbing on top of the MRML-only Logic in SAMSelfPromptLib."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        _Logic.__init__(self)

    def getParameterNode(self):
        return ScriptedLoadableModuleLogic.getParameterNode(self)


class SAMSelfPromptTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test on SampleData: auto-segment 2 slices, click + undo, save and reload."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_auto_segment_click_undo_save()

    def test_auto_segment_click_undo_save(self) -> None:
        import numpy as np
        import SampleData

        self.delayDisplay("Loading sample data")
        volume = SampleData.SampleDataLogic().downloadSample("MRHead")
        logic = SAMSelfPromptLogic()
        try:
            k = slicer.util.arrayFromVolume(volume).shape[0] // 2
            self.delayDisplay("Auto-segment (2 slices)")
            run = logic.wait(logic.start_auto_segment(volume, slice_range=(k, k + 2)), timeout=600)
            self.assertEqual(run.status, "done", run.error)
            seg = slicer.mrmlScene.GetNodeByID(run.segmentation_id)
            array = logic_mrml.segment_array(seg, run.segment_id, volume)
            self.assertEqual(set(np.nonzero(array.any(axis=(1, 2)))[0]) - {k, k + 1}, set())
            ijk_to_ras = logic_mrml.volume_from_node(volume).ijk_to_ras
            click = (ijk_to_ras @ [array.shape[2] // 2, array.shape[1] // 2, k, 1])[:3].tolist()
            corr = logic.wait(logic.start_correction(volume, seg, run.segment_id, [click]), timeout=300)
            self.assertEqual(corr.status, "done", corr.error)
            logic.undo()
            self.assertEqual(logic_mrml.segment_array(seg, run.segment_id, volume).tobytes(), array.tobytes())
            path = os.path.join(slicer.app.temporaryPath, "SAMSelfPromptSelfTest.seg.nrrd")
            logic_mrml.save_segmentation(seg, path)
            loaded = slicer.util.loadSegmentation(path)
            self.assertIsNotNone(loaded.GetSegmentation().GetSegmentIdBySegmentName("SAM-SP"))
            self.delayDisplay("Test passed")
        finally:
            logic.shutdown()
