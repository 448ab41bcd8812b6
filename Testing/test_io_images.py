"""read_image / read_any for NIfTI, NRRD, MHA and 2D pictures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import shared_path
from SAMSelfPromptLib.errors import InputError
from SAMSelfPromptLib.io import read_any, read_image


def test_nifti_orientations_from_shared_data() -> None:
    # ct_small is stored RAS, mr_small LPS (data README): the RAS diagonal signs must follow.
    ct = read_image(shared_path("ct_totalseg", "ct_small.nii.gz"))
    mr = read_image(shared_path("ct_totalseg", "mr_small.nii.gz"))
    assert ct.array.shape == (30, 101, 122) and mr.array.shape == (20, 91, 117)
    np.testing.assert_allclose(np.diag(ct.ijk_to_ras)[:3], [3.0, 3.0, 3.0], atol=1e-4)
    np.testing.assert_allclose(np.diag(mr.ijk_to_ras)[:3], [-3.0, -3.0, 3.0], atol=1e-4)
    assert ct.array.min() == -1100 and ct.array.max() == 1207  # values as in the README


def test_itk_geometry_and_kji_order(tmp_path: Path) -> None:
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # K=4, J=5, I=6
    image = sitk.GetImageFromArray(array)
    angle = 0.4
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(rot.ravel().tolist())
    image.SetSpacing((0.5, 1.5, 4.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    for name in ("v.nrrd", "v.mha", "v.nii.gz"):
        sitk.WriteImage(image, str(tmp_path / name))
        volume = read_image(tmp_path / name)
        np.testing.assert_array_equal(volume.array, array)
        # Voxel (i, j, k) = (2, 3, 1) through both geometries lands on the same point (RAS = flipped LPS).
        lps = image.TransformContinuousIndexToPhysicalPoint((2.0, 3.0, 1.0))
        ras = volume.ijk_to_ras @ [2, 3, 1, 1]
        np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-4, err_msg=name)
        np.testing.assert_allclose(volume.spacing, [0.5, 1.5, 4.0], atol=1e-5)


def test_4d_image_refused(tmp_path: Path) -> None:
    frames = [sitk.GetImageFromArray(np.full((3, 4, 5), t, np.int16)) for t in range(2)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(tmp_path / "t.nii.gz"))
    with pytest.raises(InputError, match="4D"):
        read_image(tmp_path / "t.nii.gz")


def test_pictures_rgb_and_gray(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (9, 13, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    Image.fromarray(np.dstack([rgb, np.full((9, 13), 7, np.uint8)])).save(tmp_path / "a.png")  # RGBA
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.tif")
    for name in ("c.png", "c.bmp", "a.png"):
        volume = read_image(tmp_path / name)
        assert volume.array.shape == (1, 9, 13, 3) and volume.array.dtype == np.uint8 and volume.is_rgb
        np.testing.assert_array_equal(volume.array[0], rgb)
        assert volume.modality == "RGB"
    gray = read_image(tmp_path / "g.tif")
    assert gray.array.shape == (1, 9, 13) and not gray.is_rgb
    np.testing.assert_array_equal(gray.array[0], rgb[..., 0])
    np.testing.assert_allclose(gray.spacing, [1, 1, 1])
    np.testing.assert_allclose(gray.ijk_to_ras, np.diag([-1.0, -1.0, 1.0, 1.0]))  # as Slicer loads a PNG


def test_ph2_jpeg_and_mask() -> None:
    image = read_any(shared_path("ph2", "images", "IMD003.jpg"))
    mask = read_image(shared_path("ph2", "masks", "IMD003.png"))
    assert image.array.ndim == 4 and image.array.shape[-1] == 3
    assert mask.array.shape == image.array.shape[:3]
    assert set(np.unique(mask.array)) <= {0, 255}


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="unsupported file type"):
        read_any(tmp_path / "x.txt")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read"):
        read_image(tmp_path / "broken.png")
    (tmp_path / "broken.nii.gz").write_bytes(b"not nifti")
    with pytest.raises(InputError, match="cannot read"):
        read_image(tmp_path / "broken.nii.gz")
