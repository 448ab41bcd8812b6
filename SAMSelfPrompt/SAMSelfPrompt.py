"""SAMSelfPrompt: prompt-free segmentation with self-prompting SAM (SAM-SP) in 3D Slicer.

This file is Qt wiring only: the Module description, the Widget and the self-test. What
the module decides and shows (idle -> running -> cancelling -> idle, what each state
enables, progress, ETA, status and errors, the click points) is
``SAMSelfPromptLib.slicer.controller.ModuleController``, which has no Qt and is what the
web app binds to as well. The widget binds:

- the parameter node to the widgets (``@parameterNodeWrapper`` + ``connectGui``) and, through
  ``NodeParameters``, to the controller, so the node is the one source of truth;
- each button to a controller action, and a QTimer to ``controller.tick()`` (which drains
  the worker on this main thread and writes finished slices into MRML);
- ``controller.subscribe`` to ``render``, which copies ``controller.view()`` into the widgets.

Keyboard shortcuts (P, N, Ctrl+Z, Escape) exist only while the view says so, i.e. while
this module is entered; they are deleted when it is left, so other modules keep their keys.
Importing this file installs nothing and imports no torch.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from SAMSelfPromptLib.slicer import mrml as logic_mrml
from SAMSelfPromptLib.slicer.controller import (AXIS_CHOICES, LAST_SLICE, NEGATIVE, NEW_SEGMENT, POSITIVE,
                                                RERUN_CHOICES, ModuleController, NodeParameters, Parameters, State)
from SAMSelfPromptLib.slicer.logic import DEVICE_CHOICES, MODEL_CHOICES, SAMSelfPromptLogic as _Logic

POLL_MS = 100  # the timer drains the worker this often; each drain writes only finished slices


class SAMSelfPrompt(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "SAM Self-Prompt"
        parent.categories = ["Segmentation"]
        parent.dependencies = []
        parent.contributors = ["SAMSelfPrompt developers"]
        parent.helpText = ("Press <b>Auto-segment</b> to segment the selected volume slice by slice with "
                           "self-prompting SAM (no prompt needed). Correct a slice with positive (P) and "
                           "negative (N) points; Ctrl+Z undoes the last correction and Escape stops placing "
                           "points (these keys work while this module is shown). <b>Adapt</b> fine-tunes the "
                           "model on the segments you drew.")
        parent.acknowledgementText = ("SAM-SP (arXiv 2408.12364), ProMISe (arXiv 2403.04164), LiteMedSAM "
                                      "(Apache-2.0), Segment Anything (Apache-2.0).")


@parameterNodeWrapper
class SAMSelfPromptParameterNode:
    """The controller's ``Parameters`` (names mapped by ``controller.PARAMETER_NAMES``)."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    batchAllVolumes: bool = False
    model: Annotated[str, Choice(list(MODEL_CHOICES))] = "litemedsam"
    checkpoint: str = ""
    target: str = ""  # "": the default target for the input
    forceTarget: bool = False
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    segmentName: str = "SAM-SP"
    rerun: Annotated[str, Choice(list(RERUN_CHOICES))] = NEW_SEGMENT
    sliceAxis: Annotated[str, Choice(list(AXIS_CHOICES))] = "auto"
    firstSlice: int = 0
    lastSlice: int = LAST_SLICE  # shown as "last": to the end of the volume
    device: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
    adaptEpochs: int = 5


class SAMSelfPromptWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: SAMSelfPromptLogic | None = None
        self.controller: ModuleController | None = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        self._shortcuts: list = []
        self._unsubscribe = None

    # --- setup / teardown ---------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/SAMSelfPrompt.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = SAMSelfPromptLogic()
        self.controller = ModuleController(self.logic, confirm=self._confirm, scene=slicer.mrmlScene)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self.onTimer)
        self.ui.applyButton.clicked.connect(self._action(self.controller.apply))
        self.ui.positiveButton.clicked.connect(self._action(lambda: self._onPointButton(POSITIVE)))
        self.ui.negativeButton.clicked.connect(self._action(lambda: self._onPointButton(NEGATIVE)))
        self.ui.undoButton.clicked.connect(self._action(self.controller.undo))
        self.ui.clearPointsButton.clicked.connect(self._action(self.controller.clear_points))
        self.ui.adaptButton.clicked.connect(self._action(self.controller.adapt))
        self.ui.adaptTargetButton.clicked.connect(self._action(
            lambda: self.controller.adapt_target(self.ui.adaptTargetNameLineEdit.text.strip() or "adapted target",
                                                 empty_slices=self.ui.adaptEmptySlicesLineEdit.text)))
        self._shownTargets = None
        self.ui.targetComboBox.currentIndexChanged.connect(self._onTargetChosen)
        self._unsubscribe = self.controller.subscribe(self.render)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Remove the timer, the shortcuts, every observer and the point lists; stop the worker."""
        if self._timer is not None:
            self._timer.stop()
            self._timer.timeout.disconnect(self.onTimer)
            self._timer = None
        self._setShortcuts(False)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.setParameterNode(None)
        self.removeObservers()
        if self.controller is not None:
            self.controller.close()
        if self.logic is not None:
            self.logic.shutdown()
            self.logic = None

    def enter(self) -> None:
        self.initializeParameterNode()
        self.controller.module_entered()

    def exit(self) -> None:
        self.controller.module_exited()

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.controller.scene_closed()

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
        if self._parameterNode:
            if self._parameterNodeGuiTag:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = node
        if self.controller is None:
            return
        if node:
            self._parameterNodeGuiTag = node.connectGui(self.ui)
            # connectGui widens unannotated int spin boxes to the whole int range: keep the .ui's
            # bounds, so "last" (the special value at LAST_SLICE) shows and no other negative is typed.
            self.ui.firstSliceSpinBox.minimum = 0
            self.ui.lastSliceSpinBox.minimum = LAST_SLICE
            self.ui.adaptEpochsSpinBox.minimum = 1
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.controller.parameters = NodeParameters(node)
        else:
            self.controller.parameters = Parameters()
        self.controller.refresh()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self.controller.refresh()

    def _onTargetChosen(self, index: int) -> None:
        """The menu's first entry is "default": it clears the choice (the catalogue then picks)."""
        if self._shownTargets is None or index < 0:
            return
        name = self.ui.targetComboBox.itemData(index) or ""
        if (self.controller.parameters.target or "") != name:
            self.controller.parameters.target = name
            self.controller.refresh()

    def _renderTargets(self, view) -> None:
        """Refill the target menu only when the fitting targets change (refilling resets the selection)."""
        combo = self.ui.targetComboBox
        if view.target_choices != self._shownTargets:
            self._shownTargets = None  # no _onTargetChosen while refilling
            combo.clear()
            if view.target_choices:
                combo.addItem("default for this input (see below)", "")
                for name, text in view.target_choices:
                    combo.addItem(text, name)
            self._shownTargets = view.target_choices
        wanted = self.controller.parameters.target or ""
        index = combo.findData(wanted) if wanted else 0
        if index >= 0 and combo.currentIndex != index:
            combo.setCurrentIndex(index)
        self.ui.targetDescriptionLabel.text = view.target_description

    # --- controller -> widgets ------------------------------------------------------------------------
    def render(self, view) -> None:
        """Copy the controller's view into the widgets; nothing is decided here."""
        ui = self.ui
        ui.applyButton.text = view.apply_text
        ui.applyButton.enabled = view.apply_enabled
        for button, sign in ((ui.positiveButton, POSITIVE), (ui.negativeButton, NEGATIVE)):
            button.enabled = view.clicks_enabled
            button.checked = view.click_mode == sign
        ui.undoButton.enabled = view.undo_enabled
        ui.clearPointsButton.enabled = view.clear_enabled
        ui.adaptButton.enabled = view.adapt_enabled
        ui.adaptTargetButton.enabled = view.adapt_enabled
        ui.progressBar.format = f"%v / %m {view.progress_unit}"
        ui.progressBar.maximum = max(1, view.progress_total)
        ui.progressBar.value = view.progress_done
        ui.statusLabel.text = f"{view.status_text} ({view.eta_text})" if view.eta_text else view.status_text
        ui.errorLabel.text = view.error_text
        ui.errorLabel.visible = bool(view.error_text)
        ui.targetLabel.text = view.target_text
        self._renderTargets(view)
        self._setShortcuts(view.shortcuts_enabled)
        if self._timer is not None and view.ticks_needed and not self._timer.isActive():
            self._timer.start()
        elif self._timer is not None and not view.ticks_needed and self._timer.isActive():
            self._timer.stop()

    def onTimer(self) -> None:
        with slicer.util.tryWithErrorDisplay("SAMSelfPrompt could not apply the worker's results."):
            self.controller.tick()

    def _setShortcuts(self, enabled: bool) -> None:
        """Create the shortcuts when the view enables them, delete them when it does not."""
        if enabled == bool(self._shortcuts):
            return
        if not enabled:
            for shortcut in self._shortcuts:
                shortcut.activated.disconnect()
                shortcut.setParent(None)
            self._shortcuts.clear()
            return
        for keys, slot in (("p", lambda: self.controller.set_click_mode(POSITIVE)),
                           ("n", lambda: self.controller.set_click_mode(NEGATIVE)),
                           ("Ctrl+z", self.controller.undo),
                           ("Escape", lambda: self.controller.set_click_mode(None))):
            shortcut = qt.QShortcut(qt.QKeySequence(keys), slicer.util.mainWindow())
            shortcut.activated.connect(self._action(slot))
            self._shortcuts.append(shortcut)

    # --- widgets -> controller ------------------------------------------------------------------------
    def _onPointButton(self, sign: str) -> None:
        button = self.ui.positiveButton if sign == POSITIVE else self.ui.negativeButton
        self.controller.set_click_mode(sign if button.checked else None)

    @staticmethod
    def _action(fn):
        """A slot that runs ``fn()``; the controller reports user errors in its view, anything else
        (a bug) is shown in a dialog rather than lost in the console."""
        def slot(*args) -> None:
            with slicer.util.tryWithErrorDisplay("SAMSelfPrompt: unexpected error.", waitCursor=True):
                fn()

        return slot

    @staticmethod
    def _confirm(message: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(message, "SAMSelfPrompt")


class SAMSelfPromptLogic(ScriptedLoadableModuleLogic, _Logic):
    """Slicer's parameter-node plumbing on top of the MRML-only Logic in SAMSelfPromptLib."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        _Logic.__init__(self)

    def getParameterNode(self):
        return ScriptedLoadableModuleLogic.getParameterNode(self)


class SAMSelfPromptTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test through the controller, as the widget drives it: Auto-segment 2 slices,
    a click and Undo, the shortcuts' lifetime, then save and reload the segmentation."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_controller_auto_segment_click_undo_save()

    def loadVolume(self):
        import SampleData

        # An abdominal CT: the default target for CT is the liver (an MR head would be refused by the
        # guard, rightly: no shipped target is trained for brain MR).
        return SampleData.SampleDataLogic().downloadSample("CTAAbdomenPanoramix")

    def test_controller_auto_segment_click_undo_save(self) -> None:
        import numpy as np
        from SAMSelfPromptLib.core.predictor import resolve_axis

        self.delayDisplay("Loading sample data")
        volume_node = self.loadVolume()
        logic = SAMSelfPromptLogic()
        controller = ModuleController(logic, Parameters(input_volume=volume_node), scene=slicer.mrmlScene)
        try:
            volume = logic_mrml.volume_from_node(volume_node)
            axis = resolve_axis(volume, "auto")
            k = volume.shape_kji[axis] // 2
            controller.parameters.first_slice, controller.parameters.last_slice = k, k + 1
            controller.module_entered()
            self.assertTrue(controller.view().shortcuts_enabled)

            self.delayDisplay("Auto-segment (2 slices)")
            run = controller.auto_segment()
            self.assertEqual(controller.view().apply_text, "Cancel")
            view = controller.wait(timeout=600)
            self.assertEqual(run.status, "done", view.error_text)
            self.assertEqual((view.state, view.progress_done, view.progress_total), (State.IDLE, 2, 2))
            seg = controller.parameters.output_segmentation
            array = logic_mrml.segment_array(seg, run.segment_id, volume_node)
            touched = set(np.nonzero(array.any(axis=tuple(a for a in range(3) if a != axis)))[0].tolist())
            self.assertEqual(touched - {k, k + 1}, set())

            self.delayDisplay("Click, then Undo")
            kji = [n // 2 for n in volume.shape_kji]
            kji[axis] = k
            click = (volume.ijk_to_ras @ [*kji[::-1], 1])[:3].tolist()
            self.assertTrue(controller.click(click, True))
            view = controller.wait(timeout=300)
            self.assertEqual(controller.run.status, "done", view.error_text)
            self.assertTrue(view.undo_enabled)
            controller.undo()
            self.assertEqual(logic_mrml.segment_array(seg, run.segment_id, volume_node).tobytes(), array.tobytes())

            self.delayDisplay("Save and reload")
            path = Path(tempfile.mkdtemp()) / "SAMSelfPromptSelfTest.seg.nrrd"
            logic_mrml.save_segmentation(seg, path)
            loaded = slicer.modules.segmentations.logic().LoadSegmentationFromFile(str(path), False)
            self.assertIsNotNone(loaded)
            self.assertTrue(loaded.GetSegmentation().GetSegmentIdBySegmentName("Liver"))  # named by the target
            controller.module_exited()
            self.assertFalse(controller.view().shortcuts_enabled)
            self.delayDisplay("Test passed")
        finally:
            controller.close()
            logic.shutdown()
