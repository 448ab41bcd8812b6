"""Writers: oblique, anisotropic geometry survives .seg.nrrd and NIfTI; outputs are atomic and never clobbered."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import slicerio

from SAMSelfPromptLib.errors import InputError
from SAMSelfPromptLib.io import read_image, write_labelmap, write_nifti_labelmap, write_seg_nrrd
from SAMSelfPromptLib.io.files import OutputExistsError, atomic_write

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _oblique_ijk_to_ras() -> np.ndarray:
    """A rotation about a tilted axis, spacing 0.7 x 1.3 x 2.9 mm, an off-centre origin."""
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    angle = 0.5
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([0.7, 1.3, 2.9])
    m[:3, 3] = [12.5, -30.25, 45.0]
    return m


@pytest.fixture
def labelmap() -> np.ndarray:
    lab = np.zeros((5, 7, 9), np.uint8)  # K, J, I all different, so a transposition cannot pass
    lab[1:3, 2:5, 3:8] = 1
    lab[4, 0:2, 0:3] = 2
    lab[0, 6, 8] = 7  # a label without a segment entry
    return lab


SEGMENTS = [{"label": 1, "name": "Liver", "color": (0.9, 0.5, 0.4)}, {"label": 2, "name": "Spleen", "color": (157, 108, 162)}]


def test_seg_nrrd_round_trip(tmp_path: Path, labelmap: np.ndarray) -> None:
    m = _oblique_ijk_to_ras()
    out = write_seg_nrrd(tmp_path / "s.seg.nrrd", labelmap, m, SEGMENTS)
    seg = slicerio.read_segmentation(str(out))
    np.testing.assert_array_equal(seg["voxels"], labelmap.transpose(2, 1, 0))  # slicerio is (i, j, k)
    np.testing.assert_allclose(seg["ijkToLPS"], np.diag([-1.0, -1.0, 1.0, 1.0]) @ m, atol=1e-9)
    by_name = {s["name"]: s for s in seg["segments"]}
    assert set(by_name) == {"Liver", "Spleen", "Label 7"}
    assert by_name["Liver"]["labelValue"] == 1 and by_name["Spleen"]["labelValue"] == 2
    np.testing.assert_allclose(by_name["Liver"]["color"], [0.9, 0.5, 0.4])
    np.testing.assert_allclose(by_name["Spleen"]["color"], np.array([157, 108, 162]) / 255)
    # The same file read as a plain volume (ITK) gives the same grid and voxels back.
    volume = read_image(out)
    np.testing.assert_array_equal(volume.array, labelmap)
    np.testing.assert_allclose(volume.ijk_to_ras, m, atol=1e-6)


def _nifti_sform(path: Path) -> np.ndarray:
    """srow_x/y/z straight from the NIfTI-1 header bytes: the IJK->RAS matrix, independent of ITK."""
    header = gzip.open(path).read(348)
    return np.vstack([np.frombuffer(header[280:328], "<f4").reshape(3, 4), [0, 0, 0, 1]])


def test_nifti_round_trip(tmp_path: Path, labelmap: np.ndarray) -> None:
    m = _oblique_ijk_to_ras()
    out = write_nifti_labelmap(tmp_path / "l.nii.gz", labelmap, m)
    np.testing.assert_allclose(_nifti_sform(out), m, atol=1e-4)
    volume = read_image(out)
    np.testing.assert_array_equal(volume.array, labelmap)
    assert volume.array.dtype == np.uint8
    np.testing.assert_allclose(volume.ijk_to_ras, m, atol=1e-5)


def test_write_labelmap_by_suffix(tmp_path: Path, labelmap: np.ndarray) -> None:
    m = _oblique_ijk_to_ras()
    for name in ("a.seg.nrrd", "a.nii", "a.nii.gz", "a.nrrd"):
        out = write_labelmap(tmp_path / name, labelmap, m, SEGMENTS)
        np.testing.assert_array_equal(read_image(out).array, labelmap, err_msg=name)
    assert "Segment0_Name:=Liver" in (tmp_path / "a.seg.nrrd").read_bytes()[:4000].decode("latin-1")
    assert "Segment0_Name" not in (tmp_path / "a.nrrd").read_bytes()[:4000].decode("latin-1")
    with pytest.raises(InputError, match="needs the source DICOM"):
        write_labelmap(tmp_path / "a.dcm", labelmap, m, SEGMENTS)
    with pytest.raises(InputError, match="unknown output type"):
        write_labelmap(tmp_path / "a.png", labelmap, m)


def test_refuses_to_overwrite(tmp_path: Path, labelmap: np.ndarray) -> None:
    m = _oblique_ijk_to_ras()
    out = write_seg_nrrd(tmp_path / "s.seg.nrrd", labelmap, m, SEGMENTS)
    before = out.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists.*overwrite=True"):
        write_seg_nrrd(out, np.zeros_like(labelmap), m, SEGMENTS)
    assert out.read_bytes() == before
    write_seg_nrrd(out, np.zeros_like(labelmap), m, SEGMENTS, overwrite=True)
    assert not slicerio.read_segmentation(str(out))["voxels"].any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.seg.nrrd"]  # no temporary files left


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"precious")

    def crash(tmp: str) -> None:
        Path(tmp).write_bytes(b"half written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, crash, overwrite=True)
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_bad_labelmaps(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="3D"):
        write_nifti_labelmap(tmp_path / "a.nii.gz", np.zeros((3, 4), np.uint8), np.eye(4))
    with pytest.raises(InputError, match="integer"):
        write_nifti_labelmap(tmp_path / "a.nii.gz", np.zeros((2, 3, 4), np.float32), np.eye(4))
    with pytest.raises(InputError, match="non-singular"):
        write_seg_nrrd(tmp_path / "a.seg.nrrd", np.zeros((2, 3, 4), np.uint8), np.zeros((4, 4)))
    assert not list(tmp_path.iterdir())
