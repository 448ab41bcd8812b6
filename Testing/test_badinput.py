"""Issue 14: bad and hostile inputs and faults. Each gets a specific message (what is wrong, what to do),
and nothing the user already has, on disk or in the scene, changes.

Every case carries the ``badinput`` marker, so ``pytest -m badinput`` runs (and counts) the matrix alone.
The command-line cases run ``cli.main`` in-process (the same exit codes, no torch start-up per case) and
check: exit 2, exactly one stderr line that starts ``samselfprompt segment: error:``, no traceback, and a
byte-and-mtime snapshot of everything under the case's folder taken before the run equal to the one after
(no partial output, no edited input, no stray file). A few run the real console script as a subprocess.

How each fault is made real here (no mocks of what can run):
- DICOM inputs are copies of the real CT series in ../shared/data/ct_totalseg/dicom (JPEG 2000) edited
  with pydicom: pixel data dropped and an SR / RTSTRUCT class set, a position shifted (gap), duplicated,
  spacings changed, two series mixed, frames merged into one multi-frame file, a file truncated.
- A JPEG 2000 file without a decoder: the console script runs with a sitecustomize that makes
  ``import openjpeg`` / ``pylibjpeg`` / ``SimpleITK`` (GDCM) fail and drops Pillow's OpenJPEG codec,
  as on a machine without those packages; the series is the real one.
- 20000 x 20000 images are headers only (a PNG IHDR, a NIfTI header, DICOM Rows/Columns): a reader that
  decoded or allocated first would fail differently (or run out of memory), so the message shows the
  refusal came from the header.
- Disk full: the real .seg.nrrd writer writing into /dev/full (ENOSPC), and the real console script under
  RLIMIT_FSIZE, where the kernel refuses the write (EFBIG). Both must leave the old file and no temp file.
- Read-only output: the console script runs as ``nobody`` when the tests run as root (root ignores
  permission bits), else the folder is chmod 555.
- Out of memory: a subprocess caps its own address space (RLIMIT_AS) after a warm-up: 50 MB above the
  warm process fails even one slice (a clean OutOfMemoryError with the hint), 300 MB fits one slice but
  not two (measured here: one slice needs ~150-200 MB more, two ~400-450 MB), so a batch of 2 is halved
  to 1 and the masks equal an uncapped run. The allocation failures are torch's own
  (DefaultCPUAllocator). There is no GPU in this environment; on CUDA the same code path catches
  torch.OutOfMemoryError.
- Logic and controller cases run the real Logic on real slicer-core MRML with the real CT model; the
  faults are what a user does: delete the volume, close the scene, resize the volume under a run.
The encoder runs on about a dozen slices in all.
"""
from __future__ import annotations

import hashlib
import os
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from conftest import REPO, shared_path
from SAMSelfPromptLib.cli import main as cli
from SAMSelfPromptLib.errors import DownloadError, SamSelfPromptError
from SAMSelfPromptLib.io.files import OutputWriteError, atomic_write
from SAMSelfPromptLib.modeling.backbones import DownloadSpec, bundled_litemedsam_path
from SAMSelfPromptLib.weights.catalogue import default_checkpoint

SCRIPT = Path(sys.executable).with_name("samselfprompt")
CT_CHECKPOINT = default_checkpoint("CT", False)


# --- helpers ---------------------------------------------------------------------------------------------------

def snapshot(*roots: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``roots``: (sha256, mtime_ns). Equal snapshots: nothing changed, nothing added."""
    out = {}
    for root in roots:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file() or p.is_symlink()):
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "link"
            out[str(path)] = (digest, st.st_mtime_ns)
    return out


def one_line_cause(err: str, command: str = "segment") -> str:
    """The stderr of a refused command: one line, the cause, no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"samselfprompt {command}: error: "), err
    return lines[0]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def script_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def run_script(*argv, env: dict | None = None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "SAMSelfPromptLib.cli.main"]
    return subprocess.run(cmd + [str(a) for a in argv], capture_output=True, text=True,
                          env=env or script_env(), timeout=timeout, **kwargs)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Downloads and caches go to a fresh folder: the user's ~/.cache is never read or written here."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SAMSELFPROMPT_CACHE", str(cache))
    return cache


@lru_cache(maxsize=1)
def ct_files() -> tuple[Path, ...]:
    """The real CT series' files in slice order (by position along z; their names run the other way)."""
    folder = shared_path("ct_totalseg", "dicom")
    files = [p for p in folder.iterdir() if p.is_file()]
    return tuple(sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])))


def ct_copy(dest: Path, n: int = 4, start: int = 8) -> list[Path]:
    """``n`` consecutive slices of the real CT (JPEG 2000) copied into ``dest``, in slice order."""
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(src, dest / src.name)) for src in ct_files()[start:start + n]]


def edit(path: Path, **attrs) -> None:
    """Change header attributes of one DICOM file in place (``None`` deletes the attribute)."""
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    if "SOPClassUID" in attrs:
        ds.file_meta.MediaStorageSOPClassUID = attrs["SOPClassUID"]
    ds.save_as(path)


def z_of(path: Path) -> float:
    return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


def set_z(path: Path, z: float) -> None:
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], z]
    ds.save_as(path)


def write_image(path: Path, array: np.ndarray, vector: bool = False) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path))
    return path


def small_ct(path: Path, slices: int = 1) -> Path:
    """A 64 x 64 CT-like volume (HU): air around a soft-tissue disc with a brighter lesion."""
    yy, xx = np.mgrid[:64, :64]
    img = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 24 ** 2, 40, -1000).astype(np.int16)
    img[(yy - 28) ** 2 + (xx - 36) ** 2 < 8 ** 2] = 120
    return write_image(path, np.repeat(img[None], slices, axis=0))


def png_header(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming width x height (8-bit RGB) and a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def nifti_header_only(path: Path, width: int, height: int) -> Path:
    """A .nii whose header claims width x height x 1 int16 voxels but that holds 4 voxels of data."""
    small = path.with_name("small_" + path.name)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 2, 2), np.int16)), str(small))
    header = bytearray(small.read_bytes())
    small.unlink()
    struct.pack_into("<8h", header, 40, 3, width, height, 1, 1, 1, 1, 1)  # dim[0..7]
    path.write_bytes(bytes(header))
    return path


class CodePayload:
    """Unpickling this would run ``touch <marker>``: weights_only=True must refuse it before that."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- the command-line matrix -------------------------------------------------------------------------------------

@dataclass
class Bad:
    input: Path
    expect: str  # a regex the one-line cause must match
    args: tuple = ()
    output: Path | None = None  # default: <case folder>/out/seg.seg.nrrd
    absent: list[Path] = field(default_factory=list)  # files that must not exist afterwards


CLI_CASES = {}


def case(fn):
    CLI_CASES[fn.__name__] = fn
    return fn


@case
def empty_folder(tmp: Path) -> Bad:
    (tmp / "empty").mkdir()
    return Bad(tmp / "empty", r"empty: no DICOM files found \(empty folder or no readable DICOM\); no image files")


@case
def folder_without_dicom(tmp: Path) -> Bad:
    d = tmp / "notes"
    d.mkdir()
    (d / "README.txt").write_text("scan notes")
    (d / "IM0001.dcm").write_bytes(b"not DICOM at all" * 20)  # a DICOM suffix, no DICM preamble
    (d / "blob.bin").write_bytes(np.random.default_rng(0).bytes(2000))
    return Bad(d, r"notes: no DICOM files found .*; no image files")


def _no_pixels(tmp: Path, name: str, sop: str, modality: str) -> Path:
    for path in ct_copy(tmp / name, 3):
        edit(path, PixelData=None, SOPClassUID=sop, Modality=modality)
    return tmp / name


@case
def sr_without_pixel_data(tmp: Path) -> Bad:
    d = _no_pixels(tmp, "sr", "1.2.840.10008.5.1.4.1.1.88.33", "SR")
    return Bad(d, r"only non-image DICOM \(3 files: SR Comprehensive SR Storage\); select a folder with an image series")


@case
def rtstruct_without_pixel_data(tmp: Path) -> Bad:
    d = _no_pixels(tmp, "rt", "1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT")
    return Bad(d, r"only non-image DICOM \(3 files: RTSTRUCT RT Structure Set\); select a folder with an image series")


@case
def mixed_series_in_one_series(tmp: Path) -> Bad:
    """A reformat filed under the same (here: empty) series UID as the axial slices."""
    ct_copy(tmp / "mixed", 4)
    for path in ct_copy(tmp / "reformat", 3, start=14):
        edit(path, ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
        shutil.move(path, tmp / "mixed" / f"R{path.name}")
    (tmp / "reformat").rmdir()
    return Bad(tmp / "mixed", r"mixed ImageOrientationPatient within one series .*put each series in its own folder")


@case
def two_series_to_one_file(tmp: Path) -> Bad:
    for sub, uid in (("a", "1.2.826.0.1.3680043.8.498.11"), ("b", "1.2.826.0.1.3680043.8.498.12")):
        for path in ct_copy(tmp / "study" / sub, 3, start=4 if sub == "a" else 12):
            edit(path, SeriesInstanceUID=uid)
    return Bad(tmp / "study", r"study holds 2 cases \(1\.2\.826.*11, 1\.2\.826.*12\) but .*seg\.seg\.nrrd names one "
                              r"file; give an output folder, or pick one series with --series ID")


@case
def missing_slice_gap(tmp: Path) -> Bad:
    files = ct_copy(tmp / "gap", 5)
    set_z(files[-1], z_of(files[-1]) + 4.0)  # the last slice two steps further: slices are missing
    return Bad(tmp / "gap", r"missing slices: the usual step is 2 mm but there are gaps at .*re-export the complete series")


@case
def duplicate_position(tmp: Path) -> Bad:
    files = ct_copy(tmp / "dup", 4)
    set_z(files[2], z_of(files[1]))
    return Bad(tmp / "dup", r"two images share the slice position .* mm \(.*\); remove the duplicate file")


@case
def mixed_pixel_spacing(tmp: Path) -> Bad:
    files = ct_copy(tmp / "spacing", 4)
    edit(files[2], PixelSpacing=[0.8, 0.8])
    return Bad(tmp / "spacing", r"mixed PixelSpacing within one series \(2 different values\); the images cannot be stacked")


@case
def irregular_slice_spacing(tmp: Path) -> Bad:
    files = ct_copy(tmp / "irregular", 5)
    z0 = z_of(files[0])
    for path, z in zip(files, np.cumsum([0.0, 2.0, 2.0, 2.6, 2.0])):
        set_z(path, z0 + float(z))
    return Bad(tmp / "irregular", r"irregular slice spacing \(2\.\.2\.6 mm\); the images cannot be stacked on a regular grid")


@case
def multiframe(tmp: Path) -> Bad:
    frames = [pydicom.dcmread(p) for p in ct_files()[8:11]]
    ds = frames[0]
    pixels = np.stack([f.pixel_array for f in frames])
    ds.decompress()
    ds.NumberOfFrames, ds.PixelData = 3, pixels.tobytes()
    (tmp / "mf").mkdir()
    ds.save_as(tmp / "mf" / "enhanced.dcm")
    return Bad(tmp / "mf", r"multi-frame DICOM \(3 frames per file.*\) is not supported; export it as single-frame slices")


@case
def truncated_slice(tmp: Path) -> Bad:
    """The last slice cut inside its pixel data (pydicom reads it as an empty dataset): not a short volume."""
    files = ct_copy(tmp / "cut", 4)
    data = files[-1].read_bytes()
    files[-1].write_bytes(data[: len(data) // 2])
    return Bad(tmp / "cut", rf"1 DICOM file\(s\) are truncated or corrupt \(e\.g\. .*{files[-1].name}\); "
                            r"re-export or copy the series again")


@case
def huge_dicom_header(tmp: Path) -> Bad:
    (path,) = ct_copy(tmp / "huge", 1)
    edit(path, Rows=20000, Columns=20000)
    return Bad(tmp / "huge", r"the image is 20000 x 20000 pixels, larger than the 16384-pixel limit per side; "
                             r"downsample or crop it first")


@case
def four_d_nifti(tmp: Path) -> Bad:
    frames = [sitk.GetImageFromArray(np.full((3, 16, 16), t, np.int16)) for t in range(2)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(tmp / "t4d.nii.gz"))
    return Bad(tmp / "t4d.nii.gz", r"t4d\.nii\.gz: 4D / multi-component volume .* not supported; extract a single 3D frame")


@case
def rgb_volume(tmp: Path) -> Bad:
    rgb = np.random.default_rng(1).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    path = write_image(tmp / "colour.nrrd", rgb, vector=True)
    return Bad(path, r"colour\.nrrd: a colour \(RGB\) volume of 3 slices is not supported; only single colour pictures")


@case
def constant_volume(tmp: Path) -> Bad:
    path = write_image(tmp / "flat.nii.gz", np.full((3, 64, 64), 7, np.int16))
    return Bad(path, r"flat: every voxel has the same value \(7\), so there is nothing to segment; check that the right")


@case
def nan_and_inf_in_float_volume(tmp: Path) -> Bad:
    """NIfTI readers zero NaN on the way in, so this one is NRRD: the NaN and the Inf reach the engine."""
    img = np.random.default_rng(2).normal(100, 10, (1, 64, 64)).astype(np.float32)
    img[0, :4] = -1000  # air: a CT by the kind rule, so the guard lets it through to the NaN check
    img[0, 5, 5], img[0, 9, 9] = np.nan, np.inf
    path = write_image(tmp / "float.nrrd", img)
    return Bad(path, r"float: slice 0 has 2 NaN or infinite voxel\(s\), which cannot be windowed; replace them",
               args=("--device", "cpu"))


@case
def one_pixel_volume(tmp: Path) -> Bad:
    path = write_image(tmp / "dot.nii.gz", np.full((1, 1, 1), 5, np.int16))
    return Bad(path, r"dot: its slices along axis K .* are 1 x 1 pixels, fewer than the 8 x 8 SAM-SP needs")


@case
def one_slice_volume_across(tmp: Path) -> Bad:
    """One slice is a 2D image: fine along K; across it (sagittal) every slice is a 1-pixel line."""
    path = small_ct(tmp / "single.nii.gz", slices=1)
    return Bad(path, r"single: its slices along axis I are 1 x 64 pixels, fewer than the 8 x 8 SAM-SP needs; "
                     r"segment along axis K \(axial for most scans\) instead", args=("--axis", "sagittal"))


@case
def huge_png_header(tmp: Path) -> Bad:
    (tmp / "huge.png").write_bytes(png_header(20000, 20000))
    return Bad(tmp / "huge.png", r"huge\.png: the image is too large \(400000000 pixels; at most 16384 per side\); "
                                 r"downsample or crop it first")


@case
def wide_png_header(tmp: Path) -> Bad:
    """2 M pixels pass Pillow's own bomb check; the side limit refuses it from the header."""
    (tmp / "wide.png").write_bytes(png_header(20000, 100))
    return Bad(tmp / "wide.png", r"wide\.png: the image is 20000 x 100 pixels, larger than the 16384-pixel limit")


@case
def huge_nifti_header(tmp: Path) -> Bad:
    path = nifti_header_only(tmp / "huge.nii", 20000, 20000)
    return Bad(path, r"huge\.nii: the image is 20000 x 20000 pixels, larger than the 16384-pixel limit per side")


@case
def truncated_checkpoint(tmp: Path) -> Bad:
    data = CT_CHECKPOINT.read_bytes()
    (tmp / "cut.pt").write_bytes(data[: len(data) // 2])
    return Bad(small_ct(tmp / "img.nii.gz"), r"cannot read SAM-SP checkpoint .*cut\.pt: the file is truncated or "
                                             r"corrupt .*; download or copy it again", args=("--checkpoint", tmp / "cut.pt"))


@case
def checkpoint_for_another_base(tmp: Path) -> Bad:
    payload = torch.load(CT_CHECKPOINT, map_location="cpu", weights_only=True)
    payload["base_model"] = "sam_vit_b"
    torch.save(payload, tmp / "vitb.pt")
    return Bad(small_ct(tmp / "img.nii.gz"),
               r"vitb\.pt is a SAM-SP checkpoint for base model sam_vit_b: SAM ViT-B .* needs a checkpoint file: "
               r"pass --weights FILE or allow the download \(samselfprompt download sam_vit_b\)",
               args=("--checkpoint", tmp / "vitb.pt"))


@case
def weights_of_another_model(tmp: Path) -> Bad:
    return Bad(small_ct(tmp / "img.nii.gz"), r"lite_medsam\.pth does not match this model: .*; these look like "
                                             r"litemedsam weights: pass the matching --model",
               args=("--model", "sam_vit_b", "--weights", bundled_litemedsam_path()))


@case
def pickle_with_code_as_checkpoint(tmp: Path) -> Bad:
    torch.save({"format": "samselfprompt-checkpoint/1", "x": CodePayload(tmp / "PWNED")}, tmp / "evil.pt")
    return Bad(small_ct(tmp / "img.nii.gz"), r"evil\.pt: the file contains Python objects other than tensors and is "
                                             r"refused for safety \(weights_only=True\)",
               args=("--checkpoint", tmp / "evil.pt"), absent=[tmp / "PWNED"])


@case
def pickle_with_code_as_weights(tmp: Path) -> Bad:
    torch.save({"model": CodePayload(tmp / "PWNED")}, tmp / "evil.pth")
    return Bad(small_ct(tmp / "img.nii.gz"), r"cannot read checkpoint .*evil\.pth: the file contains Python objects "
                                             r"other than tensors and is refused for safety",
               args=("--weights", tmp / "evil.pth"), absent=[tmp / "PWNED"])


@case
def existing_output_without_overwrite(tmp: Path) -> Bad:
    (tmp / "out").mkdir()
    (tmp / "out" / "seg.seg.nrrd").write_bytes(b"the user's earlier result")
    return Bad(small_ct(tmp / "img.nii.gz"), r"seg\.seg\.nrrd already exists; choose another output or pass --overwrite")


@case
def output_under_a_file(tmp: Path) -> Bad:
    (tmp / "afile").write_text("a file, not a folder")
    return Bad(small_ct(tmp / "img.nii.gz"), r"cannot write .*afile/seg\.seg\.nrrd: .*afile is a file, not a folder",
               output=tmp / "afile" / "seg.seg.nrrd")


@case
def dicom_seg_of_a_nifti(tmp: Path) -> Bad:
    return Bad(small_ct(tmp / "img.nii.gz"), r"seg\.dcm: a DICOM-SEG output needs a DICOM series as input .*; save as "
                                             r"\.seg\.nrrd or \.nii\.gz instead", output=tmp / "out" / "seg.dcm")


@case
def slices_past_the_end(tmp: Path) -> Bad:
    return Bad(small_ct(tmp / "img.nii.gz", 2), r"slice range \[3, 5\) is outside the volume's 2 slices along axis 0",
               args=("--slices", "3:5"))


@case
def series_not_in_folder(tmp: Path) -> Bad:
    ct_copy(tmp / "ct", 2)
    return Bad(tmp / "ct", r"series '9\.9' not found; run `samselfprompt series .*` to list them", args=("--series", "9.9"))


@case
def unknown_model(tmp: Path) -> Bad:
    return Bad(small_ct(tmp / "img.nii.gz"), r"unknown model 'sam_vit_z'; choose one of litemedsam, sam_vit_b",
               args=("--model", "sam_vit_z"))


@case
def unknown_device(tmp: Path) -> Bad:
    return Bad(small_ct(tmp / "img.nii.gz"), r"unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps",
               args=("--device", "tpu"))


@case
def absent_cuda_device(tmp: Path) -> Bad:
    return Bad(small_ct(tmp / "img.nii.gz"), r"device 'cuda:99' was requested but .*; use", args=("--device", "cuda:99"))


@case
def unknown_ct_window(tmp: Path) -> Bad:
    return Bad(small_ct(tmp / "img.nii.gz"), r"unknown CT window 'bogus' for --window; choose one of abdomen, liver",
               args=("--window", "bogus"))


@case
def zero_batch_size(tmp: Path) -> Bad:
    return Bad(small_ct(tmp / "img.nii.gz"), r"--batch-size must be at least 1, got 0", args=("--batch-size", "0"))


@case
def zero_threads(tmp: Path) -> Bad:
    return Bad(small_ct(tmp / "img.nii.gz"), r"--threads must be at least 1, got 0", args=("--threads", "0"))


@pytest.mark.badinput
@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_refuses_with_one_line_and_changes_nothing(name, tmp_path, capsys):
    case_dir = tmp_path / name
    case_dir.mkdir()
    bad = CLI_CASES[name](case_dir)
    output = bad.output or case_dir / "out" / "seg.seg.nrrd"
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "segment", bad.input, "-o", output, "--quiet", *bad.args)
    assert code == 2, err
    cause = one_line_cause(err)
    assert re.search(bad.expect, cause), cause
    assert snapshot(tmp_path) == before  # no output, no partial file, the inputs untouched
    for path in bad.absent:
        assert not path.exists(), f"{path} exists: code ran while loading"


# --- the console script as a real process ---------------------------------------------------------------------

SITECUSTOMIZE = '''
"""Simulates a Python without JPEG 2000 decoders: pylibjpeg-openjpeg (and pylibjpeg, GDCM through
SimpleITK) are not importable, and Pillow is a build without OpenJPEG (its codec entry points gone)."""
import importlib.abc
import sys

BLOCKED = {"openjpeg", "pylibjpeg", "libjpeg", "gdcm", "SimpleITK"}


class _NoDecoders(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        if name != "PIL._imaging":
            return None
        spec = next((s for f in sys.meta_path if f is not self and hasattr(f, "find_spec")
                     for s in [f.find_spec(name, path, target)] if s is not None), None)
        if spec is None:
            return None
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            for attr in ("jpeg2k_decoder", "jpeg2k_encoder"):
                if hasattr(module, attr):
                    delattr(module, attr)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _NoDecoders())
'''


@pytest.mark.badinput
def test_jpeg2000_without_a_decoder_names_the_package(tmp_path):
    series = shared_path("ct_totalseg", "dicom")  # the real series, JPEG 2000 lossless
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    before = snapshot(series, tmp_path)
    out = tmp_path / "out.seg.nrrd"
    proc = run_script("segment", series, "-o", out, "--quiet", env=script_env(PYTHONPATH=str(tmp_path / "site")))
    assert proc.returncode == 2, proc.stderr
    cause = one_line_cause(proc.stderr)
    assert re.search(r"no decoder for its JPEG 2000 Image Compression \(Lossless Only\) pixel data is installed; "
                     r"install the Python package pylibjpeg-openjpeg \(pip install pylibjpeg pylibjpeg-openjpeg\)", cause)
    assert snapshot(series, tmp_path) == before


@pytest.mark.badinput
def test_read_only_output_folder(tmp_path):
    """A folder the user cannot write to (chmod 555): refused before the model loads, the folder untouched.
    Root ignores permission bits, so as root the command runs without CAP_DAC_OVERRIDE (setpriv)."""
    src = small_ct(tmp_path / "img.nii.gz")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "old.seg.nrrd").write_bytes(b"an earlier result")
    os.chmod(locked, 0o555)
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permission bits cannot be made to apply")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    try:
        before = snapshot(tmp_path)
        cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "SAMSelfPromptLib.cli.main"]
        proc = subprocess.run(prefix + cmd + ["segment", str(src), "-o", str(locked / "new.seg.nrrd"), "--quiet"],
                              capture_output=True, text=True, env=script_env(), timeout=300)
        assert proc.returncode == 2, proc.stderr
        cause = one_line_cause(proc.stderr)
        assert re.search(r"cannot write .*locked/new\.seg\.nrrd: no permission to write in .*locked; choose a folder "
                         r"you can write to", cause), cause
        assert snapshot(tmp_path) == before
    finally:
        os.chmod(locked, 0o755)


def _file_size_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (256, resource.RLIM_INFINITY))


@pytest.mark.badinput
def test_disk_full_while_writing_keeps_the_old_file(tmp_path):
    """The real CLI segments, then its write is refused by the kernel (a 256-byte file-size limit):
    exit 2 with the cause, the earlier result byte-identical, no temporary file left."""
    src = small_ct(tmp_path / "img.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "seg.seg.nrrd").write_bytes(b"the earlier result")
    before = snapshot(tmp_path)
    proc = run_script("segment", src, "-o", out / "seg.seg.nrrd", "--overwrite", "--quiet", "--device", "cpu",
                      preexec_fn=_file_size_limit)
    assert proc.returncode == 2, proc.stderr
    cause = one_line_cause(proc.stderr)
    assert re.search(r"could not write .*seg\.seg\.nrrd: the file is larger than this file system \(or a limit\) "
                     r"allows; choose another folder \(File too large\); nothing was written; the existing file is "
                     r"unchanged", cause), cause
    assert snapshot(tmp_path) == before


@pytest.mark.badinput
def test_disk_full_on_dev_full_leaves_no_partial_file(tmp_path):
    """The real .seg.nrrd writer (slicerio) streams into /dev/full, which answers every write with ENOSPC."""
    import slicerio

    target = tmp_path / "seg.seg.nrrd"
    target.write_bytes(b"precious")
    before = snapshot(tmp_path)
    labelmap = np.zeros((2, 32, 32), np.uint8)
    labelmap[:, 8:20, 8:20] = 1
    segmentation = {"voxels": labelmap.transpose(2, 1, 0), "ijkToLPS": np.eye(4), "containedRepresentationNames":
                    ["Binary labelmap"], "masterRepresentation": "Binary labelmap",
                    "segments": [{"id": "Segment_1", "name": "SAM-SP", "labelValue": 1, "layer": 0}]}

    def write_to_full_disk(tmp: str) -> None:
        os.unlink(tmp)
        os.symlink("/dev/full", tmp)  # the temporary file now sits on a device that is always full
        slicerio.write_segmentation(tmp, segmentation)

    with pytest.raises(OutputWriteError, match=r"could not write .*seg\.seg\.nrrd: the disk is full; free some space or "
                                               r"choose another folder \(No space left on device\); nothing was written"):
        atomic_write(target, write_to_full_disk, overwrite=True)
    assert snapshot(tmp_path) == before


@pytest.mark.badinput
def test_ctrl_c_mid_volume_writes_nothing(tmp_path):
    """SIGINT while slices are being encoded: exit 130 with one line, no traceback, no output."""
    src = small_ct(tmp_path / "img.nii.gz", slices=6)
    out = tmp_path / "seg.seg.nrrd"
    before = snapshot(tmp_path)
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "SAMSelfPromptLib.cli.main"]
    proc = subprocess.Popen(cmd + ["segment", str(src), "-o", str(out), "--batch-size", "1", "--device", "cpu"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=script_env())
    seen = b""
    deadline = time.monotonic() + 120
    while b"1/6" not in seen and time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stderr], [], [], 1.0)[0]:
            seen += os.read(proc.stderr.fileno(), 4096)  # tqdm's progress: at least one slice is done
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(60)
    err = (seen + rest).decode(errors="replace").replace("\r", "\n")
    assert b"1/6" in seen, err
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("samselfprompt")] == ["samselfprompt segment: interrupted"]
    assert snapshot(tmp_path) == before


# --- downloads (a server on 127.0.0.1) ---------------------------------------------------------------------------

PAYLOAD = np.random.default_rng(3).integers(0, 256, 200_000, dtype=np.uint8).tobytes()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = self.server.body  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.body = PAYLOAD
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.badinput
def test_download_with_wrong_sha256_keeps_nothing(server, isolated_cache):
    from SAMSelfPromptLib.weights.download import ensure_weights

    (isolated_cache / "sam_vit_l.pth").write_bytes(b"another model the user downloaded")
    before = snapshot(isolated_cache)
    spec = DownloadSpec(f"http://127.0.0.1:{server.server_port}/w.pth", hashlib.sha256(b"other bytes").hexdigest(),
                        len(PAYLOAD), "w.pth")
    with pytest.raises(DownloadError, match=r"w\.pth did not verify: expected sha256 [0-9a-f]{64} \(200000 bytes\), got "
                                            r"[0-9a-f]{64} \(200000 bytes\); the partial file was deleted"):
        ensure_weights("sam_vit_b", lambda s: True, spec=spec)
    assert snapshot(isolated_cache) == before  # no w.pth, no w.pth.part, the other file untouched


@pytest.mark.badinput
def test_cli_download_from_a_short_server(server, isolated_cache, capsys):
    """The mirror sends 200 kB of a 375 MB file: exit 2, the cause on its own line after the progress."""
    url = f"http://127.0.0.1:{server.server_port}/sam_vit_b.pth"
    code, out, err = run_cli(capsys, "download", "sam_vit_b", "--yes", "--url", url)
    assert code == 2, err
    assert "Traceback" not in err
    causes = [line for line in err.splitlines() if "error:" in line]
    assert len(causes) == 1 and causes[0].startswith("samselfprompt download: error: "), err
    assert re.search(r"download of sam_vit_b_01ec64\.pth failed at 200000 of \d+ bytes .*; run it again to resume",
                     causes[0]), causes[0]
    assert not (isolated_cache / "sam_vit_b_01ec64.pth").exists()  # only the resumable .part is kept


# --- out of memory ------------------------------------------------------------------------------------------------

OOM_SCRIPT = r'''
import resource
import numpy as np, torch
torch.set_num_threads(1)
from SAMSelfPromptLib.core.predictor import SegmentOptions, segment_volume
from SAMSelfPromptLib.core.volume import Volume
from SAMSelfPromptLib.errors import OutOfMemoryError
from SAMSelfPromptLib.weights.catalogue import open_segmenter

seg = open_segmenter(modality="CT", device="cpu").segmenter
yy, xx = np.mgrid[:64, :64]
img = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 24 ** 2, 40, -1000).astype(np.int16)
four = Volume(np.stack([np.roll(img, 3 * s, axis=1) for s in range(4)]), np.eye(4), "CT", "four")
size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 20 * 2 ** 20, resource.RLIM_INFINITY))  # 20 MB more, no further
try:  # (full_box: every slice is encoded, in order, four at once)
    segment_volume(seg, four, SegmentOptions(batch_size=4, empty_y0="full_box"))
    print("NO-ERROR")
except OutOfMemoryError as exc:
    print("MESSAGE", exc)
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print("HALVED", seg.max_encode_batch, seg.oom_retries, seg.encoder_calls)
mask, results = segment_volume(seg, four, SegmentOptions(batch_size=4, slice_range=(0, 2)))
print("AFTER", len(results), seg.encoder_calls)
'''


@pytest.mark.badinput
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
def test_out_of_memory_halves_the_batch_then_fails_cleanly():
    """The encoder's own allocations really fail (RLIMIT_AS 20 MB above the loaded model): the batch
    of 4 is halved to 2, then 1, then the run stops with one OutOfMemoryError that says what to do,
    not torch's allocator text as a traceback. The same Segmenter then works once memory is back.

    Whether a halved batch fits is the allocator's business: on this CPU one slice and two need about
    the same memory (oneDNN's and the heap's fixed costs dominate), so a cap between them is not
    reproducible; this checks the path that is: every halving, and the clean end of it."""
    proc = subprocess.run([sys.executable, "-c", OOM_SCRIPT], capture_output=True, text=True, timeout=300,
                          env=script_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert re.fullmatch(r"out of memory on cpu encoding even one slice at a time \(--batch-size 1\); free memory "
                        r"\(close other programs\) and run again \(.*can't allocate memory.*\)", lines["MESSAGE"]), proc.stdout
    assert lines["HALVED"] == "1 2 0", proc.stdout  # 4 -> 2 -> 1, then the error; no slice encoded
    assert lines["AFTER"] == "2 2", proc.stdout  # memory back: the same Segmenter encodes again


# --- the Slicer Logic and controller on real MRML ----------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def leave_the_scene_as_found():
    """Everything this module adds to slicer.mrmlScene (the CT node included) is removed at its end,
    so later modules see the scene they expect (names without a _1 suffix, no extra volumes)."""
    import mrml_helpers  # noqa: F401  (installs the shims first)
    import slicer

    scene = slicer.mrmlScene
    before = {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    items_before = set()
    if sh is not None:
        ids = vtk_id_list()
        sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
        items_before = {ids.GetId(n) for n in range(ids.GetNumberOfIds())}
    yield
    added = [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())]
    for node in added:
        if node is not None and node.GetID() not in before and not node.GetSingletonTag() and scene.IsNodePresent(node):
            scene.RemoveNode(node)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is not None:
        ids = vtk_id_list()
        sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
        for item in sorted({ids.GetId(n) for n in range(ids.GetNumberOfIds())} - items_before, reverse=True):
            if sh.GetItemDataNode(item) is None:
                sh.RemoveItem(item, False, False)


def vtk_id_list():
    import vtk

    return vtk.vtkIdList()


@pytest.fixture(scope="module")
def mrml():
    import mrml_helpers  # noqa: F401  (installs the shims first)
    from SAMSelfPromptLib.slicer import mrml as module

    return module


def copy_volume(ct_node, name: str, array: np.ndarray | None = None, scene=None):
    """A new scalar volume node on the CT's grid (the shared ct_node is never modified or deleted)."""
    import slicer
    import vtk

    scene = scene or slicer.mrmlScene
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    m = vtk.vtkMatrix4x4()
    ct_node.GetIJKToRASMatrix(m)
    node.SetIJKToRASMatrix(m)
    slicer.util.updateVolumeFromArray(node, slicer.util.arrayFromVolume(ct_node).copy() if array is None else array)
    return node


def user_segments(mrml, volume_node, k_range=range(8, 12)):
    """A segmentation the user drew: one segment with voxels on ``k_range``, one empty."""
    seg = mrml.new_segmentation_for(volume_node, f"{volume_node.GetName()} mine")
    sid = seg.GetSegmentation().AddEmptySegment("", "my liver", [0.8, 0.2, 0.2])
    mask = np.zeros(mrml.volume_shape(volume_node)[1:], bool)
    mask[200:320, 120:260] = True
    for k in k_range:
        mrml.write_slice(seg, sid, volume_node, 0, k, mask)
    other = seg.GetSegmentation().AddEmptySegment("", "my spleen", [0.2, 0.2, 0.8])
    return seg, sid, other


def labelmap_of(seg_node, segment_id) -> np.ndarray:
    """A segment's voxels straight from its labelmap (works after its volume was deleted)."""
    from vtk.util import numpy_support

    image = seg_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    if image is None or image.IsEmpty():
        return np.zeros((0, 0, 0), np.uint8)
    i0, i1, j0, j1, k0, k1 = image.GetExtent()
    label = seg_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return (values.reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1) == label).astype(np.uint8)


def wait_for_slices(logic, run, n: int, timeout: float = 120) -> None:
    """Apply the worker's events one at a time until ``n`` slices are written: the events after them
    (more slices, DONE) stay queued, so what the test does next happens mid-run, however fast the worker."""
    deadline = time.monotonic() + timeout
    while len(run.written) < n:
        assert time.monotonic() < deadline and not run.finished, run
        if not logic.poll(max_events=1):
            time.sleep(0.02)


def assert_whole_slices(logic, mrml, run, volume_node, ranged) -> None:
    """Each written slice is exactly the mask the worker sent; every other slice is empty."""
    seg = volume_node.GetScene().GetNodeByID(run.segmentation_id)
    written = mrml.segment_array(seg, run.segment_id, volume_node)
    for k in range(written.shape[0]):
        key = (run.volume_id, run.segmentation_id, run.segment_id, run.axis, k)
        if k in run.written:
            assert np.array_equal(written[k].astype(bool), logic._last_results[key].mask), k
        else:
            assert not written[k].any(), k
    assert set(run.written) <= set(ranged)


@pytest.mark.badinput
def test_logic_refuses_a_segmentation_of_another_grid(logic, ct_node, mrml):
    import slicer

    other = slicer.util.addVolumeFromArray(np.zeros((4, 32, 32), np.int16), name="other grid")
    seg = mrml.new_segmentation_for(other, "made for another volume")
    sid = seg.GetSegmentation().AddEmptySegment("", "theirs", [0.1, 0.9, 0.1])
    mrml.write_slice(seg, sid, other, 0, 1, np.ones((32, 32), bool))
    before = labelmap_of(seg, sid).copy()
    n_nodes = slicer.mrmlScene.GetNumberOfNodes()
    with pytest.raises(SamSelfPromptError, match=r"made for another volume was made for another grid \(32 x 32 x 4 "
                                                 r"voxels .*\) than CT abdomen \(512 x 512 x 20 voxels\); choose a "
                                                 r"segmentation of this volume, or let Auto-segment create a new one"):
        logic.start_auto_segment(ct_node, segmentation_node=seg, slice_range=(9, 10))
    assert seg.GetSegmentation().GetNumberOfSegments() == 1 and np.array_equal(labelmap_of(seg, sid), before)
    assert slicer.mrmlScene.GetNumberOfNodes() == n_nodes and not logic.busy


@pytest.mark.badinput
def test_logic_refuses_an_rgb_volume_of_several_slices(logic, mrml):
    import slicer

    node = slicer.util.addVolumeFromArray(np.zeros((3, 16, 16, 3), np.uint8), name="colour stack",
                                          nodeClassName="vtkMRMLVectorVolumeNode")
    n_nodes = slicer.mrmlScene.GetNumberOfNodes()
    with pytest.raises(SamSelfPromptError, match=r"colour stack: RGB volumes are only supported as single 2D images"):
        logic.start_auto_segment(node)
    assert slicer.mrmlScene.GetNumberOfNodes() == n_nodes


@pytest.mark.badinput
def test_logic_constant_volume_fails_with_the_reason(logic, ct_node, mrml):
    flat = copy_volume(ct_node, "flat", np.full((3, 64, 64), -1000, np.int16))
    run = logic.wait(logic.start_auto_segment(flat), timeout=120)
    assert run.status == "failed" and run.written == []
    assert re.search(r"flat: every voxel of slices 0\.\.2 has the same value \(-1000\), so there is nothing to segment",
                     run.error), run.error


@pytest.mark.badinput
def test_logic_worker_crash_mid_volume_keeps_whole_slices(logic, ct_node, mrml):
    """Slice 10 of a float copy holds NaN: the engine raises on the worker when it reaches it. The
    exception reaches the host, the run ends failed with the reason, slices 8 and 9 are whole."""
    from SAMSelfPromptLib.core.predictor import SegmentOptions
    import slicer

    array = slicer.util.arrayFromVolume(ct_node).astype(np.float32)
    array[10, 100:110, 100:110] = np.nan
    volume = copy_volume(ct_node, "CT float", array)
    seg, user_id, other_id = user_segments(mrml, volume)
    user_before = mrml.segment_array(seg, user_id, volume)
    run = logic.start_auto_segment(volume, segmentation_node=seg, slice_range=(8, 11),
                                   options=SegmentOptions(batch_size=1))
    logic.wait(run, timeout=180)
    assert run.status == "failed"
    assert "slice 10 has 100 NaN or infinite voxel(s)" in run.error and "replace them" in run.error, run.error
    assert run.written and 10 not in run.written  # it crashed mid-volume, after whole slices were written
    assert_whole_slices(logic, mrml, run, volume, range(8, 11))
    assert np.array_equal(mrml.segment_array(seg, user_id, volume), user_before)
    assert not mrml.segment_array(seg, other_id, volume).any()


@pytest.mark.badinput
def test_logic_cancel_mid_volume_keeps_whole_slices(logic, ct_node, mrml):
    from SAMSelfPromptLib.core.predictor import SegmentOptions

    seg, user_id, _ = user_segments(mrml, ct_node)
    user_before = mrml.segment_array(seg, user_id, ct_node)
    run = logic.start_auto_segment(ct_node, segmentation_node=seg, slice_range=(4, 16), segment_name="cancel me",
                                   options=SegmentOptions(batch_size=1))
    wait_for_slices(logic, run, 1)
    logic.cancel()
    logic.wait(run, timeout=120)
    assert run.status == "cancelled" and 1 <= len(run.written) < 12
    assert_whole_slices(logic, mrml, run, ct_node, range(4, 16))
    assert np.array_equal(mrml.segment_array(seg, user_id, ct_node), user_before)


@pytest.mark.badinput
def test_logic_volume_deleted_mid_run(logic, ct_node, mrml):
    import slicer
    from SAMSelfPromptLib.core.predictor import SegmentOptions

    volume = copy_volume(ct_node, "CT to delete")
    seg, user_id, _ = user_segments(mrml, volume)
    user_before = labelmap_of(seg, user_id).copy()
    run = logic.start_auto_segment(volume, segmentation_node=seg, slice_range=(8, 11),
                                   options=SegmentOptions(batch_size=1))
    wait_for_slices(logic, run, 1)
    first = {k: logic._last_results[(run.volume_id, run.segmentation_id, run.segment_id, 0, k)].mask for k in run.written}
    slicer.mrmlScene.RemoveNode(volume)
    logic.wait(run, timeout=120)
    assert run.status == "failed" and not logic.busy
    assert re.search(rf"the volume 'CT to delete' was removed from the scene during the run; it stopped after "
                     rf"{len(first)} slice\(s\) were written", run.error), run.error
    assert set(run.written) == set(first)  # nothing after the deletion
    ours = labelmap_of(seg, run.segment_id)
    for k in range(ours.shape[0]):
        assert np.array_equal(ours[k].astype(bool), first[k]) if k in first else not ours[k].any(), k
    assert np.array_equal(labelmap_of(seg, user_id), user_before)


@pytest.mark.badinput
def test_logic_scene_closed_mid_run(logic, ct_node, mrml):
    """A second scene closed while its run goes: the run is cancelled with the reason, and nodes that
    later get the closed scene's IDs receive nothing."""
    import slicer

    scene = slicer.vtkMRMLScene()
    part = slicer.util.arrayFromVolume(ct_node)[8:11].copy()
    volume = copy_volume(ct_node, "CT part", part, scene=scene)
    run = logic.start_auto_segment(volume, slice_range=(0, 3))
    logic.poll()
    scene.Clear(0)
    assert run.finished and run.status == "cancelled" and "scene was closed" in run.message
    volume2 = copy_volume(ct_node, "CT part", part, scene=scene)
    seg2 = mrml.new_segmentation_for(volume2, "new scene")
    assert (volume2.GetID(), seg2.GetID()) == (run.volume_id, run.segmentation_id)  # the IDs restarted
    run.job.wait(300)
    logic.poll()
    assert seg2.GetSegmentation().GetNumberOfSegments() == 0


@pytest.mark.badinput
def test_controller_write_failing_midway_ends_the_run_and_leaves_cancel(logic, ct_node, mrml):
    """The volume is cropped in place while its run goes: the next slice cannot be written. The run
    ends failed with the reason, the Apply button is Auto-segment again (not Cancel), and the slice
    written before the crop is still whole."""
    import slicer
    from SAMSelfPromptLib.slicer.controller import ModuleController, Parameters, State

    volume = copy_volume(ct_node, "CT to crop")
    controller = ModuleController(logic, Parameters(input_volume=volume, first_slice=8, last_slice=10))
    try:
        controller.apply()
        assert controller.view().apply_text == "Cancel"
        run = controller.run
        wait_for_slices(logic, run, 1)
        first = {k: logic._last_results[(run.volume_id, run.segmentation_id, run.segment_id, 0, k)].mask
                 for k in run.written}
        seg = slicer.mrmlScene.GetNodeByID(run.segmentation_id)
        slicer.util.updateVolumeFromArray(volume, slicer.util.arrayFromVolume(volume)[:, :256, :256].copy())
        controller.wait(120)
        view = controller.view()
        assert (view.state, view.apply_text, view.apply_enabled) == (State.IDLE, "Auto-segment", True)
        assert run.status == "failed" and "could not write slice" in run.error
        assert "the volume changed size during the run" in view.error_text, view.error_text
        assert view.status_text.startswith("Auto-segment failed after ")
        ours = labelmap_of(seg, run.segment_id)
        for k, mask in first.items():
            assert np.array_equal(ours[k].astype(bool), mask)  # the slice written before the crop: whole
    finally:
        if controller.state is not State.IDLE:
            controller.cancel()
            controller.wait(120)
        controller.close()


@pytest.mark.badinput
def test_scene_safety_rerun_is_explicit_and_undo_restores(logic, ct_node, mrml):
    """A re-run writes a new segment; overwriting the user's segment needs its id, and one undo
    brings back every voxel of it."""
    seg, user_id, other_id = user_segments(mrml, ct_node)
    user_before = mrml.segment_array(seg, user_id, ct_node)
    first = logic.wait(logic.start_auto_segment(ct_node, segmentation_node=seg, slice_range=(9, 10)))
    again = logic.wait(logic.start_auto_segment(ct_node, segmentation_node=seg, slice_range=(9, 10)))
    assert first.status == again.status == "done" and len({first.segment_id, again.segment_id, user_id}) == 3
    assert seg.GetSegmentation().GetSegment(again.segment_id).GetName() == "Liver (2)"
    assert np.array_equal(mrml.segment_array(seg, user_id, ct_node), user_before)
    over = logic.wait(logic.start_auto_segment(ct_node, segmentation_node=seg, segment_id=user_id, slice_range=(9, 10)))
    assert over.status == "done" and over.segment_id == user_id
    assert not np.array_equal(mrml.segment_array(seg, user_id, ct_node), user_before)
    state = logic.undo()
    assert state is not None and state.index is None
    assert np.array_equal(mrml.segment_array(seg, user_id, ct_node), user_before)
    assert not mrml.segment_array(seg, other_id, ct_node).any()


# --- DICOM-SEG for every supported DICOM input passes dciodvfy ---------------------------------------------------

def _dciodvfy_errors(path: Path) -> list[str]:
    from test_io_dicom import _dciodvfy

    return _dciodvfy(path)


def _colour_picture(folder: Path, sop: str, modality: str) -> None:
    """A colour picture without a patient frame (no position or orientation), as a camera stores it."""
    from test_io_dicom import _dataset

    folder.mkdir(parents=True)
    ds = _dataset(sop, Modality=modality, StudyInstanceUID=pydicom.uid.generate_uid(),
                  SeriesInstanceUID=pydicom.uid.generate_uid(), Rows=48, Columns=64, SamplesPerPixel=3,
                  PhotometricInterpretation="RGB", PlanarConfiguration=0, BitsAllocated=8, BitsStored=8, HighBit=7,
                  PixelRepresentation=0)
    ds.PixelData = np.random.default_rng(4).integers(0, 255, (48, 64, 3), dtype=np.uint8).tobytes()
    ds.save_as(folder / "picture.dcm", enforce_file_format=True)


def _supported_input(kind: str, tmp: Path) -> Path:
    from test_io_dicom import make_series

    if kind == "ct_jpeg2000":
        ct_copy(tmp / kind, 3)
    elif kind == "ct_uncompressed":
        for path in ct_copy(tmp / kind, 3):
            ds = pydicom.dcmread(path)
            ds.decompress()
            ds.save_as(path)
    elif kind == "mr_float_rescale":
        make_series(tmp / kind, n=4, rows=24, cols=32, slope=0.5, intercept=0.25)
        for path in (tmp / kind).iterdir():
            edit(path, Modality="MR", SOPClassUID=pydicom.uid.MRImageStorage)
    elif kind == "oblique":
        make_series(tmp / kind, n=4, rows=24, cols=32, iop=(np.cos(0.3), np.sin(0.3), 0.0, 0.0, 0.0, -1.0))
    elif kind == "single_slice":
        ct_copy(tmp / kind, 1)
    elif kind == "secondary_capture_rgb":
        _colour_picture(tmp / kind, pydicom.uid.SecondaryCaptureImageStorage, "OT")
    elif kind == "vl_photographic_rgb":
        _colour_picture(tmp / kind, "1.2.840.10008.5.1.4.1.1.77.1.4", "XC")
    return tmp / kind


@pytest.mark.parametrize("kind", ["ct_jpeg2000", "ct_uncompressed", "mr_float_rescale", "oblique", "single_slice",
                                  "secondary_capture_rgb", "vl_photographic_rgb"])
def test_dicom_seg_of_every_supported_input_validates(kind, tmp_path):
    from SAMSelfPromptLib.io import read_any, write_dicom_seg

    folder = _supported_input(kind, tmp_path)
    volume = read_any(folder)
    labelmap = np.zeros(volume.shape_kji, np.uint8)
    k, j, i = volume.shape_kji
    labelmap[:, j // 4: j // 2, i // 4: i // 2] = 1
    out = write_dicom_seg(tmp_path / "seg.dcm", labelmap, volume.source_files,
                          [{"label": 1, "name": "SAM-SP", "color": (0.9, 0.6, 0.2)}])
    assert _dciodvfy_errors(out) == []


def test_dicom_seg_from_the_command_line_validates(tmp_path, capsys):
    """End to end: the real series segmented by the CLI (one slice) into a DICOM-SEG."""
    out = tmp_path / "liver.dcm"
    code, stdout, err = run_cli(capsys, "segment", shared_path("ct_totalseg", "dicom"), "-o", out, "--slices", "10",
                                "--quiet")
    assert code == 0, err
    assert _dciodvfy_errors(out) == []
