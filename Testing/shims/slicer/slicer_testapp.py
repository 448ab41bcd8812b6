"""Test shim: what the Slicer application sets up at startup and slicer-core lacks.

Provides ``slicer.mrmlScene``, ``slicer.modules.<name>.logic()`` and a minimal
``slicer.app``, built from slicer-core's real logic classes the way Slicer (and
trame-slicer) wire them: application logic, colours, volumes, segmentations
(which also registers the segmentation converter rules), subject hierarchy,
markups. Loaded by the ``slicer`` meta package from this folder (no __init__.py here).
"""
from types import SimpleNamespace

import slicer_core as _core

mrmlScene = _core.vtkMRMLScene()
_app_logic = _core.vtkSlicerApplicationLogic()
_app_logic.SetMRMLScene(mrmlScene)
_app_logic.GetColorLogic().SetMRMLScene(mrmlScene)
_app_logic.GetColorLogic().AddDefaultColorNodes()


def _register(logic, name):
    logic.SetMRMLScene(mrmlScene)
    logic.SetMRMLApplicationLogic(_app_logic)
    _app_logic.SetModuleLogic(name, logic)
    return SimpleNamespace(logic=lambda: logic)


modules = SimpleNamespace(
    colors=_register(_core.vtkMRMLColorLogic(), "Colors"),
    volumes=_register(_core.vtkSlicerVolumesLogic(), "Volumes"),
    segmentations=_register(_core.vtkSlicerSegmentationsModuleLogic(), "Segmentations"),
    subjecthierarchy=_register(_core.vtkSlicerSubjectHierarchyModuleLogic(), "SubjectHierarchy"),
    markups=_register(_core.vtkSlicerMarkupsLogic(), "Markups"),
)


class _App:
    """The little of slicer.app that scripts touch outside the GUI."""

    def processEvents(self) -> None:
        pass

    def testingEnabled(self) -> bool:
        return True

    def applicationLogic(self):
        return _app_logic


app = _App()
