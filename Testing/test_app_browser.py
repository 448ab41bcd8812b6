"""The web app end to end, in a real browser: `samselfprompt app` in a subprocess, Debian chromium
driven by playwright, the real model, the real MRML scene of trame-slicer.

What the app's scene holds is read the way a user gets it: through the panel's Export button, as a
downloaded file read back here. Nothing in the app is replaced or mocked.

- The sample: Auto-segment (the button turns into Cancel while it runs), a real Dice against the
  sample's truth, the same voxels as `samselfprompt segment` on the same picture, a click
  correction and its undo, .seg.nrrd and NIfTI exports, and a batch over every loaded volume.
- The CT series of ../shared/data (skipped when absent), uploaded through the page: Cancel mid-run
  writes whole slices only, a click changes the clicked slice only, undo restores it, the app equals
  the CLI on the same slices, and a DICOM-SEG export references the series. Then Adapt to a new
  target from outlines loaded as a labelmap file, with an extent and slices marked empty.

The encoder takes about 2 s per slice on a 2-core CPU, so the runs are kept to a few slices.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from SAMSelfPromptLib.core.masks import dice

pytestmark = pytest.mark.browser
CHROMIUM = Path("/usr/bin/chromium")
VIEWPORT = {"width": 1280, "height": 800}
CT_DICOM = SHARED_DATA / "ct_totalseg" / "dicom"
RUN_TIMEOUT_MS = 180_000


# --- the app and the browser -------------------------------------------------------------------------

def die_with_parent() -> None:
    """In the app's process: get SIGTERM if pytest itself dies, so no server is left behind (Linux)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`samselfprompt app` (no input: the built-in sample) on a free port of 127.0.0.1."""
    if not CHROMIUM.is_file():
        pytest.skip(f"Debian chromium is not installed at {CHROMIUM} (`make test` installs it: .ci/system-deps.sh)")
    port = free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "SAMSelfPromptLib.cli.main", "app", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=die_with_parent if sys.platform == "linux" else None)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer on {url}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        print(f"\n[app log tail]\n{log_path.read_text()[-1500:]}")


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        page = browser.new_page(viewport=VIEWPORT, accept_downloads=True)
        page.set_default_timeout(30_000)
        page.goto(app_url)
        page.wait_for_selector("#ssp-apply")
        page.wait_for_function("document.querySelector('#ssp-choice').innerText.includes('Runs:')")
        yield page
        browser.close()


# --- driving the panel ---------------------------------------------------------------------------------

def text(page, selector: str) -> str:
    return page.inner_text(selector).strip()


def wait_text(page, selector: str, needle: str, timeout: float = RUN_TIMEOUT_MS) -> str:
    page.wait_for_function("([s, t]) => document.querySelector(s).innerText.includes(t)", arg=[selector, needle],
                           timeout=timeout)
    return text(page, selector)


def wait_status(page, needle: str, timeout: float = RUN_TIMEOUT_MS) -> str:
    """The status line once it says ``needle``; fails at once (with the panel's error) if a run failed."""
    page.wait_for_function(
        "t => { const s = document.querySelector('#ssp-status').innerText;"
        " return s.includes(t) || s.includes('failed') || document.querySelector('#ssp-error').innerText.trim(); }",
        arg=needle, timeout=timeout)
    status, error = text(page, "#ssp-status"), text(page, "#ssp-error")
    assert needle in status and not error, f"status {status!r}, error {error!r}"
    return status


def auto_segment(page) -> tuple[str, float]:
    """Press Auto-segment, see it turn into Cancel, wait until it is Auto-segment again: (status, seconds)."""
    t0 = time.monotonic()
    page.click("#ssp-apply")
    wait_text(page, "#ssp-apply", "Cancel")
    wait_text(page, "#ssp-apply", "Auto-segment")
    return text(page, "#ssp-status"), time.monotonic() - t0


def choose(page, field_id: str, option: str) -> None:
    """Pick ``option`` in a v-select, as a user does: open the field, click the item."""
    page.locator(f"#{field_id}").locator("xpath=ancestor::div[contains(@class, 'v-field')][1]").click()
    page.locator(".v-overlay-container .v-list-item", has_text=option).first.click()
    page.wait_for_function("([s, t]) => document.querySelector(s).value.includes(t)", arg=[f"#{field_id}", option])


def export(page, fmt: str, folder: Path) -> Path:
    """Choose the export format, press the download button, save the browser's download (each in a
    folder of its own under ``folder``)."""
    choose(page, "ssp-format", fmt)
    with page.expect_download(timeout=60_000) as download:
        page.click("#ssp-export")
    target = folder / f"export-{len(list(folder.glob('export-*')))}"
    target.mkdir()
    path = target / download.value.suggested_filename
    download.value.save_as(path)
    return path


def read_nifti(path: Path) -> tuple[np.ndarray, object]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def click_voxel(page, ijk_to_ras: np.ndarray, shape_kji, i: float, j: float, sign: str) -> None:
    """Place a ``sign`` point on voxel (i, j) of the axial slice shown, in the browser's slice view.

    The view fits the volume's axial extent to its size, centred (vtkMRMLSliceLogic::FitSliceToVolumes),
    with patient right on the screen's left and anterior up: this maps the voxel to the screen.
    """
    page.click(f"#ssp-{sign}")
    wait_text(page, f"#ssp-{sign}", sign.capitalize())
    page.wait_for_function(f"document.querySelector('#ssp-{sign}').classList.contains('v-btn--variant-flat')")
    box = page.locator(".remote-controlled-area").first.bounding_box()
    k, nj, ni = shape_kji
    corners = np.array([[a, b, 0, 1] for a in (-0.5, ni - 0.5) for b in (-0.5, nj - 0.5)], float)
    ras = (ijk_to_ras @ corners.T)[:3].T
    r_lo, r_hi = ras[:, 0].min(), ras[:, 0].max()
    a_lo, a_hi = ras[:, 1].min(), ras[:, 1].max()
    mm_per_px = max((r_hi - r_lo) / box["width"], (a_hi - a_lo) / box["height"])
    r, a = (ijk_to_ras @ [i, j, 0, 1])[:2]
    x = box["x"] + box["width"] / 2 + ((r_lo + r_hi) / 2 - r) / mm_per_px
    y = box["y"] + box["height"] / 2 + ((a_lo + a_hi) / 2 - a) / mm_per_px
    page.mouse.click(x, y)


# --- the sample ------------------------------------------------------------------------------------------

def test_sample_auto_segment_click_undo_export_batch(page, tmp_path, capsys):
    from PIL import Image
    import slicerio

    from SAMSelfPromptLib.cli.main import main as cli
    from SAMSelfPromptLib.io.dicom import LPS_TO_RAS
    from SAMSelfPromptLib.io.sample import dermoscopy_sample

    image, truth = dermoscopy_sample()
    assert page.input_value("#ssp-volume") == "Sample dermoscopy"
    assert "samsp_ph2_litemedsam.pt" in text(page, "#ssp-choice")  # the catalogue's dermoscopy model
    assert "Skin lesion" in text(page, "#ssp-target-description")

    status, seconds = auto_segment(page)
    assert status.startswith("Done: 1 slices written"), status
    assert text(page, "#ssp-progress").startswith("1 / 1 slices")
    nifti = export(page, "NIfTI", tmp_path)
    app_mask, app_image = read_nifti(nifti)
    assert app_mask.shape == (1, *truth.shape)
    app_dice = dice(app_mask[0], truth)
    assert app_dice > 0.9, app_dice

    # The same picture through `samselfprompt segment`: the same answer on the same grid. The bf16 encoder
    # (CPUs with native bf16) sums in an order that depends on the thread count, which differs between the
    # app's process and this one, so a few boundary pixels may flip: agreement is a Dice, not bit equality.
    png = tmp_path / "sample.png"
    Image.fromarray(image).save(png)
    out = tmp_path / "cli.nii.gz"
    assert cli(["segment", str(png), "-o", str(out), "--quiet"]) == 0
    cli_mask, cli_image = read_nifti(out)
    agreement = dice(cli_mask > 0, app_mask > 0)
    assert agreement >= 0.998, f"{(cli_mask > 0).sum()} vs {(app_mask > 0).sum()} voxels, Dice {agreement:.4f}"
    assert np.allclose(cli_image.GetDirection(), app_image.GetDirection())
    assert np.allclose(cli_image.GetOrigin(), app_image.GetOrigin())

    # A positive click on the skin left of the lesion changes the slice; Undo restores it byte for byte.
    rows, cols = np.nonzero(truth)
    click_voxel(page, LPS_TO_RAS, (1, *truth.shape), cols.min() * 0.5, rows.mean(), "positive")
    wait_status(page, "Corrected slice 0")
    clicked, _ = read_nifti(export(page, "NIfTI", tmp_path))
    changed = int(((clicked > 0) != (app_mask > 0)).sum())
    assert changed > 0, "the click changed nothing"
    page.click("#ssp-undo")
    wait_status(page, "Restored slice 0")
    undone, _ = read_nifti(export(page, "NIfTI", tmp_path))
    assert np.array_equal(undone, app_mask)

    # .seg.nrrd holds the same segment, named, with Slicer's geometry.
    seg = slicerio.read_segmentation(str(export(page, ".seg.nrrd", tmp_path)))
    names = [s["name"] for s in seg["segments"]]
    assert names == ["Skin lesion"], names  # the dermoscopy-lesion target names its segment
    label = seg["segments"][0]["labelValue"]
    voxels = np.asarray(seg["voxels"])
    voxels = voxels[..., seg["segments"][0].get("layer", 0)] if voxels.ndim == 4 else voxels
    assert np.array_equal((voxels == label).transpose(2, 1, 0), app_mask > 0)

    # Batch over every loaded volume: a second sample, one new segmentation each.
    page.click("#ssp-sample")
    page.wait_for_function("document.querySelector('#ssp-volume').value.includes('Sample dermoscopy_1')")
    page.check("#ssp-batch")
    status, _ = auto_segment(page)
    page.uncheck("#ssp-batch")
    assert re.fullmatch(r"Sample dermoscopy: done, 1/1 slices; Sample dermoscopy_1: done, 1/1 slices", status), status
    second, _ = read_nifti(export(page, "NIfTI", tmp_path))
    assert np.array_equal(second, app_mask)  # the same picture, the same answer
    with capsys.disabled():
        print(f"\n[app] sample: Dice {app_dice:.4f} (Auto-segment {seconds:.1f} s in the browser), "
              f"equal to the CLI; the click changed {changed} pixels, undo restored them")


# --- a CT series, uploaded ------------------------------------------------------------------------------

def test_ct_upload_cancel_click_undo_dicom_seg(page, tmp_path, capsys):
    import pydicom

    from SAMSelfPromptLib.cli.main import main as cli
    from SAMSelfPromptLib.io.dicom import read_dicom_series

    if not CT_DICOM.is_dir():
        pytest.skip(f"shared test data not present: {CT_DICOM}")
    files = sorted(str(p) for p in CT_DICOM.iterdir() if p.is_file())
    volume = read_dicom_series(CT_DICOM)  # the engine's reader: the geometry the app shows
    n = volume.shape_kji[0]
    page.set_input_files("#ssp-upload", files)  # every file of the series, as a user picks them
    wait_text(page, "#ssp-choice", "samsp_ctliver_litemedsam.pt", timeout=60_000)  # the catalogue's CT model
    # The target that fits a CT, described with its structure and terms, as the Slicer module shows it.
    wait_text(page, "#ssp-target-description", "Liver (CT) [liver-ct]", timeout=30_000)
    assert "Terms:" in text(page, "#ssp-target-description")
    series = page.input_value("#ssp-volume")

    # Cancel mid-run on slices 8..15, once the first slices are in the scene (they appear while the
    # rest runs): the worker stops after the slices being encoded, and the rest stay empty.
    first, last = 8, 15
    page.fill("#ssp-first", str(first))
    page.fill("#ssp-last", str(last))
    t0 = time.monotonic()
    page.click("#ssp-apply")
    wait_text(page, "#ssp-apply", "Cancel")
    page.wait_for_function("() => parseInt(document.querySelector('#ssp-progress').innerText) >= 1",
                           timeout=RUN_TIMEOUT_MS)
    live = text(page, "#ssp-progress")
    assert re.fullmatch(r"\d+ / 8 slices · about \d+ s left", live), live  # progress and ETA while it runs
    page.click("#ssp-apply")
    wait_text(page, "#ssp-apply", "Auto-segment")
    seconds = time.monotonic() - t0
    status = text(page, "#ssp-status")
    written = int(re.fullmatch(r"Cancelled: (\d+) of 8 slices were written\.", status).group(1))
    assert 1 <= written < 8, status
    cancelled, cancelled_image = read_nifti(export(page, "NIfTI", tmp_path))

    # `samselfprompt segment` on the same series and slices: each slice the app wrote is the CLI's
    # slice (a whole model slice, Dice >= 0.998); every other slice is empty.
    out = tmp_path / "cli.nii.gz"
    assert cli(["segment", str(CT_DICOM), "-o", str(out), "--slices", f"{first}:{last + 1}", "--quiet"]) == 0
    cli_mask, cli_image = read_nifti(out)
    assert all(cli_mask[k].any() for k in range(first, last + 1))  # the liver is on every one of these slices
    assert np.allclose(cli_image.GetOrigin(), cancelled_image.GetOrigin())
    assert np.allclose(cli_image.GetDirection(), cancelled_image.GetDirection())
    done = [int(k) for k in np.nonzero(cancelled.any(axis=(1, 2)))[0]]
    assert len(done) == written and set(done) <= set(range(first, last + 1)), (done, written)
    for k in done:
        agreement = dice(cancelled[k] > 0, cli_mask[k] > 0)  # bf16: see the sample test
        assert agreement >= 0.998, f"slice {k} differs from the CLI's (Dice {agreement:.4f})"

    # Auto-segment again, to the end: a new segment, the one clicks now correct.
    status, _ = auto_segment(page)
    assert status.startswith("Done: 8 slices written"), status
    full, _ = read_nifti(export(page, "NIfTI", tmp_path))
    assert all(full[k].any() for k in range(first, last + 1))

    # A negative click on the liver of the slice shown: only that slice changes; Undo restores it.
    shown = [k for k in (n // 2 - 1, n // 2) if full[k].any()]
    liver = np.logical_and.reduce([full[k] > 0 for k in shown])
    rows, cols = np.nonzero(liver)
    centre = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
    click_voxel(page, volume.ijk_to_ras, volume.shape_kji, cols[centre], rows[centre], "negative")
    corrected = wait_status(page, "Corrected slice")
    k = int(re.search(r"Corrected slice (\d+)", corrected).group(1))
    clicked, _ = read_nifti(export(page, "NIfTI", tmp_path))
    changed = [int(s) for s in np.nonzero((clicked != full).any(axis=(1, 2)))[0]]
    assert changed == [k] and k in shown, (changed, k, shown)
    page.click("#ssp-undo")
    wait_status(page, f"Restored slice {k}")
    undone, _ = read_nifti(export(page, "NIfTI", tmp_path))
    assert np.array_equal(undone, full)

    # DICOM-SEG (offered for DICOM input only) references the series and holds the target segment.
    seg = pydicom.dcmread(export(page, "DICOM-SEG", tmp_path))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    # (This anonymised series keeps its instance UIDs only in the file meta; the writer references those.)
    sources = {str(h.get("SOPInstanceUID", "") or h.file_meta.MediaStorageSOPInstanceUID) for h in headers}
    assert seg.Modality == "SEG"
    referenced = {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == sources
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Liver (2)"]  # named by the liver-ct target
    assert int(np.asarray(seg.pixel_array).sum()) == int((full > 0).sum())
    assert int(seg.NumberOfFrames) == int(full.any(axis=(1, 2)).sum())  # one frame per slice with the segment
    with capsys.disabled():
        print(f"\n[app] {series}: progress {live!r} live, Cancel -> {written} of 8 slices written in {seconds:.1f} s, "
              f"each equal to the CLI's; the click on slice {k} changed only that slice; DICOM-SEG read back")


def test_ct_adapt_to_a_new_target_from_loaded_outlines(page, tmp_path, capsys):
    """The Adapt panel on the CT series the test above loaded: outlines on 2 slices loaded as a labelmap
    file, first/last slice as the extent, slices without the target listed (a typo first, refused by
    name). Adapt trains in the background, saves the target, offers it, and writes the rest of the
    volume inside the extent only; the outlines stay as they were."""
    import SimpleITK as sitk

    if not CT_DICOM.is_dir():
        pytest.skip(f"shared test data not present: {CT_DICOM}")
    labels = sitk.ReadImage(str(SHARED_DATA / "ct_totalseg" / "labels.nii.gz"))  # the series' grid
    liver = sitk.GetArrayFromImage(labels) == 5
    outlined = np.zeros_like(liver)
    outlined[[8, 11]] = liver[[8, 11]]
    path = tmp_path / "liver outlines.nii.gz"
    image = sitk.GetImageFromArray(outlined.astype(np.uint8))
    image.CopyInformation(labels)
    sitk.WriteImage(image, str(path))

    page.set_input_files("#ssp-outlines", str(path))
    loaded = wait_status(page, "Outlines 'liver_outlines' loaded on 2 slice(s) (8, 11)", timeout=60_000)
    page.fill("#ssp-first", "6")
    page.fill("#ssp-last", "13")
    page.fill("#ssp-adapt-name", "liver (web)")
    page.fill("#ssp-adapt-empty", "2, 17-x")
    page.click("#ssp-adapt")
    wait_text(page, "#ssp-error", "'17-x' is not a slice number", timeout=30_000)
    page.fill("#ssp-adapt-empty", "2, 17-18")
    t0 = time.monotonic()
    page.click("#ssp-adapt")
    wait_text(page, "#ssp-apply", "Cancel", timeout=30_000)  # a background run: Cancel is offered
    status = wait_status(page, "Adapted target 'liver (web)' saved", timeout=900_000)
    seconds = time.monotonic() - t0
    assert "It is offered for other volumes and batch too" in status, status
    page.locator("#ssp-target").locator("xpath=ancestor::div[contains(@class, 'v-field')][1]").click()
    assert page.locator(".v-overlay-container .v-list-item", has_text="liver (web)").count() >= 1
    page.keyboard.press("Escape")

    painted, _ = read_nifti(export(page, "NIfTI", tmp_path))  # the target segment: the new one
    assert painted[6:14].any() and not painted[:6].any() and not painted[14:].any(), "written outside 6-13"
    kept = dice(painted[6:14] > 0, liver[6:14])
    assert kept > 0.5, f"Dice {kept:.3f} on slices 6-13"
    with capsys.disabled():
        print(f"\n[app] Adapt from outlines on 2 CT slices: {loaded!r}; trained and wrote slices 6-13 in "
              f"{seconds:.0f} s, Dice {kept:.3f} against the liver label there")
