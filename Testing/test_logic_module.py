"""The module file: importing it installs and imports nothing heavy; its .ui matches its wiring.

The Qt part cannot run here (no Slicer application); these tests pin the wiring that
can silently break: parameter names in the .ui vs the parameter node, widget names
the code uses vs the .ui, and the consented dependency installer.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "SAMSelfPrompt"
SHIMS = REPO / "Testing" / "shims"


def test_import_installs_nothing_and_needs_no_torch():
    code = (
        "import sys; sys.path[:0] = [%r, %r]\n"
        "import slicer, slicer.util\n"
        "def refuse(*a, **k): raise AssertionError('pip_install called at import')\n"
        "slicer.util.pip_install = refuse\n"
        "import SAMSelfPrompt\n"
        "print('torch' in sys.modules, 'segment_anything' in sys.modules)\n"
    ) % (str(SHIMS), str(MODULE))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False False"


def ui_tree():
    return ElementTree.parse(MODULE / "Resources" / "UI" / "SAMSelfPrompt.ui")


def test_ui_parameters_match_the_parameter_node():
    sys.path[:0] = [str(SHIMS), str(MODULE)]
    from install_shims import install

    install()
    import SAMSelfPrompt

    names = {p.findtext("string") for p in ui_tree().iter("property") if p.get("name") == "SlicerParameterName"}
    # "target" is wired in code: its menu lists the targets that fit the volume (item data = target name).
    wired_in_code = {"target"}
    assert names | wired_in_code == set(SAMSelfPrompt.SAMSelfPromptParameterNode.declared)
    source = (MODULE / "SAMSelfPrompt.py").read_text()
    assert "targetComboBox.currentIndexChanged.connect(self._onTargetChosen)" in source
    assert "self.controller.parameters.target = name" in source


def test_parameter_node_mirrors_the_controller_parameters():
    """The parameter node and the controller's Parameters are one list of fields, and
    NodeParameters reads and writes the node (the controller writes back the output it made)."""
    import dataclasses

    sys.path[:0] = [str(SHIMS), str(MODULE)]
    from install_shims import install

    install()
    import SAMSelfPrompt
    from SAMSelfPromptLib.slicer.controller import LAST_SLICE, PARAMETER_NAMES, NodeParameters, Parameters

    declared = SAMSelfPrompt.SAMSelfPromptParameterNode.declared
    assert [f.name for f in dataclasses.fields(Parameters)] == list(PARAMETER_NAMES)
    assert set(PARAMETER_NAMES.values()) == set(declared)
    node = SAMSelfPrompt.SAMSelfPromptParameterNode()
    for field in dataclasses.fields(Parameters):  # same defaults (nodes default to None)
        assert getattr(node, PARAMETER_NAMES[field.name]) == field.default, field.name
    params = NodeParameters(node)
    assert params.last_slice == LAST_SLICE and params.rerun == "new segment"
    params.checkpoint = "/adapted.pt"
    assert node.checkpoint == "/adapted.pt"
    with pytest.raises(AttributeError):
        params.no_such_field  # noqa: B018


def test_last_slice_special_value_is_the_controllers():
    """Defect g: the .ui shows "last" at the value the controller reads as "to the end"."""
    from SAMSelfPromptLib.slicer.controller import LAST_SLICE

    spin = next(w for w in ui_tree().iter("widget") if w.get("name") == "lastSliceSpinBox")
    props = {p.get("name"): p for p in spin.iter("property")}
    assert props["specialValueText"].findtext("string") == "last"
    assert int(props["minimum"].findtext("number")) == LAST_SLICE == int(props["value"].findtext("number"))


def test_module_file_creates_shortcuts_only_from_the_view():
    """Defect c: no shortcut is bound in setup(); they follow view().shortcuts_enabled."""
    source = (MODULE / "SAMSelfPrompt.py").read_text()
    setup = source[source.index("    def setup("):source.index("    def cleanup(")]
    assert "QShortcut" not in setup
    assert "self._setShortcuts(view.shortcuts_enabled)" in source


def test_self_test_drives_the_controller(ct_dicom_dir):
    """Slicer's self-test class, run here on the CT series instead of SampleData (not available)."""
    sys.path[:0] = [str(SHIMS), str(MODULE), str(REPO / "Testing")]
    from install_shims import install

    install()
    import SAMSelfPrompt
    from mrml_helpers import load_dicom_series

    class OnTheCtSeries(SAMSelfPrompt.SAMSelfPromptTest):
        def loadVolume(self):
            return load_dicom_series(ct_dicom_dir, "CT self-test")

    result = OnTheCtSeries("runTest").run()
    assert result.wasSuccessful(), "\n".join(text for _, text in result.errors + result.failures)


def test_widget_names_used_in_code_exist_in_ui():
    defined = {w.get("name") for w in ui_tree().iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "SAMSelfPrompt.py").read_text()))
    assert used and used <= defined, used - defined


def test_model_choices_match_the_registry():
    from SAMSelfPromptLib.slicer.logic import MODEL_CHOICES
    from SAMSelfPromptLib.modeling.backbones import MODEL_SPECS

    assert list(MODEL_CHOICES) == list(MODEL_SPECS)
    combo = next(w for w in ui_tree().iter("widget") if w.get("name") == "modelComboBox")
    assert [i.findtext("property/string") for i in combo.iter("item")] == list(MODEL_CHOICES)


def test_dependencies_plan_and_consent():
    from SAMSelfPromptLib.slicer import deps as slicer_deps

    assert slicer_deps.plan().empty  # this venv has everything, torch in range
    missing = slicer_deps.plan(("no-such-package-samsp-test>=1",))
    assert missing.packages == ["no-such-package-samsp-test>=1"]
    calls, asked = [], []
    req = ("no-such-package-samsp-test>=1",)
    with pytest.raises(slicer_deps.DependencyError, match="nothing was installed"):
        slicer_deps.ensure_dependencies(lambda m: asked.append(m) or False, pip_install=calls.append, requirements=req)
    assert calls == [] and "no-such-package-samsp-test>=1" in asked[0]
    slicer_deps.ensure_dependencies(lambda m: True, pip_install=calls.append, requirements=req)
    assert calls == [["no-such-package-samsp-test>=1"]]  # a list: pip_install quotes each item
    assert slicer_deps.ensure_dependencies(lambda m: pytest.fail("asked although nothing is missing")).empty
