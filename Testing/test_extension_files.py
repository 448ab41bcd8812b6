"""The extension's build files name every file that exists, and the metadata agrees everywhere."""
from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "SAMSelfPrompt"


def cmake_sets(text: str) -> dict[str, list[str]]:
    """set(NAME values...) blocks -> {NAME: [values]} (quoted strings kept whole)."""
    out = {}
    for name, body in re.findall(r"set\((\w+)\s+(.*?)\)\s*$", text, flags=re.S | re.M):
        out[name] = [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', body)]
    return out


def s4ext() -> dict[str, str]:
    pairs = {}
    for line in (REPO / "SAMSelfPrompt.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            pairs[key] = value.strip()
    return pairs


def test_extension_metadata_is_consistent():
    sets = cmake_sets((REPO / "CMakeLists.txt").read_text())
    ext = s4ext()
    assert sets["EXTENSION_CATEGORY"] == ["Segmentation"] == [ext["category"]]
    assert sets["EXTENSION_DEPENDS"] == ["PyTorch"] == [ext["depends"]]
    for cmake_key, s4_key in (("EXTENSION_HOMEPAGE", "homepage"), ("EXTENSION_CONTRIBUTORS", "contributors"),
                              ("EXTENSION_DESCRIPTION", "description"), ("EXTENSION_ICONURL", "iconurl"),
                              ("EXTENSION_SCREENSHOTURLS", "screenshoturls")):
        assert " ".join(sets[cmake_key]) == ext[s4_key], cmake_key
    assert ext["scmurl"].startswith(ext["homepage"])
    # the icon URL points at the icon in this repository
    assert ext["iconurl"].split("/main/", 1)[1] == "Resources/Icons/SAMSelfPrompt.png"
    assert "add_subdirectory(SAMSelfPrompt)" in (REPO / "CMakeLists.txt").read_text()


def test_icons_are_128_png():
    for path in (REPO / "Resources/Icons/SAMSelfPrompt.png", MODULE / "Resources/Icons/SAMSelfPrompt.png"):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (128, 128), path


def test_module_lists_every_script_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    sets = cmake_sets(text)
    scripts = {s.replace("${MODULE_NAME}", "SAMSelfPrompt") for s in sets["MODULE_PYTHON_SCRIPTS"]}
    on_disk = {"SAMSelfPrompt.py"} | {p.relative_to(MODULE).as_posix()
                                      for p in (MODULE / "SAMSelfPromptLib").rglob("*.py") if "__pycache__" not in p.parts}
    assert sorted(on_disk - scripts) == [], "scripts missing from SAMSelfPrompt/CMakeLists.txt"
    assert sorted(scripts - on_disk) == [], "CMakeLists.txt lists scripts that do not exist"
    resources = {s.replace("${MODULE_NAME}", "SAMSelfPrompt") for s in sets["MODULE_PYTHON_RESOURCES"]}
    present = {p.relative_to(MODULE).as_posix() for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    assert resources == present
    # weights: a glob, so whatever *.pt / *.json is there at build (and test) time is installed
    globs = re.search(r"file\(GLOB MODULE_WEIGHTS RELATIVE \S+\s+(.*?)\)", text, flags=re.S).group(1).split()
    weights = MODULE / "SAMSelfPromptLib" / "weights"
    matched = {p for g in globs for p in MODULE.glob(g)}
    expected = {p for p in weights.glob("*") if p.suffix in (".pt", ".json")} if weights.is_dir() else set()
    assert matched == expected
    assert "${MODULE_WEIGHTS}" in text and "slicerMacroBuildScriptedModule" in text


def test_self_test_is_registered_with_ctest():
    text = (MODULE / "CMakeLists.txt").read_text()
    assert re.search(r"if\(BUILD_TESTING\)\s+(#.*\n\s*)*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text)
    module = (MODULE / "SAMSelfPrompt.py").read_text()
    assert re.search(r"^class SAMSelfPromptTest\(ScriptedLoadableModuleTest\):", module, flags=re.M)
    assert "def runTest(self)" in module
