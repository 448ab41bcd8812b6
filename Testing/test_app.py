"""The web app without a browser: the command line's guards, the exports' rules, the screenshot,
and a segment written slice by slice drawn in a real (offscreen) trame-slicer slice view.

The browser end to end is Testing/test_app_browser.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "Resources" / "Screenshots" / "WebAppCT.png"


def run_app(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "SAMSelfPromptLib.cli.main", "app", *args],
                          capture_output=True, text=True, timeout=120)


def test_bad_input_stops_the_app_before_it_serves_and_other_hosts_are_warned_about():
    result = run_app(str(REPO / "no-such-series"), "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2, result.stderr
    assert "WARNING: serving on 0.0.0.0" in result.stderr and "no authentication" in result.stderr
    assert "no-such-series: no such file or folder" in result.stderr
    assert "App running" not in result.stdout


def test_local_host_has_no_warning_and_a_bad_port_is_refused():
    result = run_app("--port", "70000")
    assert result.returncode == 2
    assert "--port 70000 is not a port number" in result.stderr and "WARNING" not in result.stderr


def test_app_help_names_the_default_host():
    result = subprocess.run([sys.executable, "-m", "SAMSelfPromptLib.cli.main", "app", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "127.0.0.1" in result.stdout and "no authentication" in result.stdout


@pytest.fixture(scope="module")
def slicer_app():
    """trame-slicer's own application (scene, logics), no server and no view."""
    from trame_slicer.core import SlicerApp

    return SlicerApp()


def sample_node(app):
    from SAMSelfPromptLib.app.inputs import sample_volume
    from SAMSelfPromptLib.slicer.volumes import add_volume

    volume, truth = sample_volume()
    node = add_volume(app.scene, volume)
    assert node.IsA("vtkMRMLVectorVolumeNode") and node.GetName().startswith("Sample dermoscopy")
    return node, truth


# Run in a child process: the offscreen view loads Mesa's LLVM, and importing torch's triton into the
# same process afterwards crashes it (as the rest of the suite would). The app imports torch first.
RENDER_CHECK = """
import json
import numpy as np
from trame_slicer.core import SlicerApp
from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
from vtkmodules.util.numpy_support import vtk_to_numpy
from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter
from SAMSelfPromptLib.app.inputs import sample_volume
from SAMSelfPromptLib.slicer import mrml
from SAMSelfPromptLib.slicer.volumes import add_volume

app = SlicerApp()
app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
view = app.view_manager.create_view(ViewLayoutDefinition.axial_view())
view.render_window().SetSize(256, 192)
volume, truth = sample_volume()
node = add_volume(app.scene, volume)
app.display_manager.show_volume_in_slice_background(node)
app.display_manager.reset_views()

def pixels():
    view.render()
    grab = vtkWindowToImageFilter()
    grab.SetInput(view.render_window())
    grab.Update()
    image = grab.GetOutput()
    w, h, _ = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[..., :3].astype(int)

before = pixels()
seg = mrml.new_segmentation_for(node)
sid = mrml.output_segment(seg, "SAM-SP")
mrml.write_slice(seg, sid, node, 0, 0, truth)
after = pixels()
print(json.dumps({"changed": float((np.abs(after - before).sum(axis=2) > 30).mean()),
                  "picture": float((before.sum(axis=2) > 0).mean()), "lesion": float(truth.mean())}))
"""


def test_a_segment_written_slice_by_slice_is_drawn_in_the_slice_view():
    """``mrml.write_slice`` (the Logic's live write) must make the 2D displayable manager redraw."""
    import json

    result = subprocess.run([sys.executable, "-c", RENDER_CHECK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    # The fill covers the lesion's share of the picture's part of the view.
    assert seen["changed"] > 0.5 * seen["lesion"] * seen["picture"], seen


def test_exports_follow_the_input(slicer_app, tmp_path):
    import SimpleITK as sitk
    import slicerio

    from SAMSelfPromptLib.app import export
    from SAMSelfPromptLib.errors import InputError
    from SAMSelfPromptLib.slicer import mrml

    node, truth = sample_node(slicer_app)
    assert export.formats_for(None) == ["seg.nrrd", "nifti"]
    assert export.formats_for(["a.dcm"]) == ["seg.nrrd", "nifti", "dicom-seg"]
    seg = mrml.new_segmentation_for(node)
    with pytest.raises(InputError, match="has no segment to export"):
        export.export_segmentation(seg, node, "nifti", tmp_path)
    first = mrml.output_segment(seg, "SAM-SP")
    mrml.write_slice(seg, first, node, 0, 0, truth)
    second = mrml.output_segment(seg, "SAM-SP")
    mrml.write_slice(seg, second, node, 0, 0, ~truth)
    with pytest.raises(InputError, match="was not loaded from DICOM"):
        export.export_segmentation(seg, node, "dicom-seg", tmp_path)
    path = export.export_segmentation(seg, node, "nifti", tmp_path, segment_id=first)
    assert path.name == export.file_name(f"{node.GetName()} SAM-SP", "nifti")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert np.array_equal(array[0], truth.astype(np.uint8))  # the one segment asked for, as label 1
    path = export.export_segmentation(seg, node, "nifti", tmp_path)  # default: the last one written
    assert path.name == export.file_name(f"{node.GetName()} SAM-SP (2)", "nifti")
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0], (~truth).astype(np.uint8))
    path = export.export_segmentation(seg, node, "seg.nrrd", tmp_path)
    segmentation = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in segmentation["segments"]] == ["SAM-SP", "SAM-SP (2)"]  # overlapping, both kept


def test_the_screenshot_is_small_and_named_everywhere():
    from PIL import Image

    with Image.open(SCREENSHOT) as image:
        assert image.format == "PNG" and image.size[0] >= 800
    assert SCREENSHOT.stat().st_size < 500_000
    rel = SCREENSHOT.relative_to(REPO).as_posix()
    assert rel in (REPO / "README.md").read_text()
    for f in ("CMakeLists.txt", "SAMSelfPrompt.s4ext"):
        assert f"/main/{rel}" in (REPO / f).read_text(), f


def test_inputs_a_picture_a_volume_and_uploaded_dicom_files(tmp_path):
    """What the app loads is read by the engine's readers: a picture is one RGB slice with the CLI's
    geometry, a volume keeps its grid, DICOM files uploaded together are one series with its files."""
    import SimpleITK as sitk
    from PIL import Image

    from conftest import SHARED_DATA
    from SAMSelfPromptLib.app import inputs
    from SAMSelfPromptLib.errors import InputError
    from SAMSelfPromptLib.io.images import read_any

    volume, truth = inputs.sample_volume()
    png = tmp_path / "sample.png"
    Image.fromarray(volume.array[0]).save(png)
    (picture,) = inputs.read_path(png)
    assert picture.is_rgb and picture.modality == "RGB" and np.array_equal(picture.array, volume.array)
    assert np.allclose(picture.ijk_to_ras, volume.ijk_to_ras)  # the sample is the picture the CLI reads
    grey = sitk.GetImageFromArray(np.arange(3 * 8 * 9, dtype=np.int16).reshape(3, 8, 9))
    grey.SetSpacing((0.5, 0.7, 2.0))
    sitk.WriteImage(grey, str(tmp_path / "grey.nii.gz"))
    (vol,) = inputs.read_path(tmp_path / "grey.nii.gz")
    assert vol.shape_kji == (3, 8, 9) and np.allclose(vol.ijk_to_ras, read_any(tmp_path / "grey.nii.gz").ijk_to_ras)
    with pytest.raises(InputError, match="no such file or folder"):
        inputs.read_path(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM image series"):
        inputs.read_path(tmp_path / "empty")

    series = SHARED_DATA / "ct_totalseg" / "dicom"
    if not series.is_dir():
        pytest.skip(f"shared test data not present: {series}")
    uploads = [{"name": f"../{p.name}", "content": p.read_bytes()} for p in sorted(series.iterdir())]
    uploads.append({"name": "sample.png", "content": png.read_bytes()})
    saved = inputs.save_uploads(uploads, tmp_path / "upload")
    assert all(p.parent == tmp_path / "upload" for p in saved)  # base names only: nothing lands outside
    ct, pic = inputs.read_uploads(saved)
    assert ct.modality == "CT" and ct.shape_kji == (20, 512, 512) and len(ct.source_files) == 20
    assert pic.is_rgb


def test_the_app_loads_torch_before_anything_renders():
    """Triton's LLVM loaded after Mesa's crashes the process: the app imports torch's stack first,
    whatever the command line imported before it."""
    code = ("import sys\nfrom SAMSelfPromptLib.app.server import SAMSelfPromptWebApp\n"
            "assert 'triton' not in sys.modules\napp = SAMSelfPromptWebApp(sample=False)\n"
            "import importlib.util\nassert 'torch' in sys.modules\n"
            "assert 'triton' in sys.modules or importlib.util.find_spec('triton') is None\n"
            "app.close()\nprint('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
