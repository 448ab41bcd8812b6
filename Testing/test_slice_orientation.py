"""Slices reach the model in one canonical view however the volume is stored.

The same physical volume is re-stored with flipped and swapped array axes (and a matching
IJK->RAS, so every voxel keeps its position in the patient). The canonical slice, the pixel
and box mappings, and finally a real segmentation with the shipped CT model must not notice.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_path
from SAMSelfPromptLib.core.volume import Volume
from SAMSelfPromptLib.core.orientation import SliceOrientation, SliceStack
from SAMSelfPromptLib.core.predictor import Segmenter, SegmentOptions, resolve_axis, take_slice

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _lps_volume(array: np.ndarray, spacing=(0.8, 0.7, 2.5), origin=(10.0, -20.0, 30.0)) -> Volume:
    """Stored like an ordinary axial DICOM series: i -> L, j -> P, k -> S."""
    lps = np.eye(4)
    lps[:3, :3] = np.diag(spacing)
    lps[:3, 3] = origin
    return Volume(array, LPS_TO_RAS @ lps, "CT")


def _flip(vol: Volume, array_axis: int) -> Volume:
    """The same voxels in the same places, stored with ``array_axis`` reversed."""
    m = vol.ijk_to_ras.copy()
    col = 2 - array_axis
    n = vol.array.shape[array_axis]
    m[:3, 3] += m[:3, col] * (n - 1)
    m[:3, col] *= -1
    return Volume(np.ascontiguousarray(np.flip(vol.array, array_axis)), m, vol.modality)


def _swap_ij(vol: Volume) -> Volume:
    """Stored with rows and columns exchanged (i <-> j)."""
    m = vol.ijk_to_ras.copy()
    m[:, [0, 1]] = m[:, [1, 0]]
    return Volume(np.ascontiguousarray(vol.array.swapaxes(1, 2)), m, vol.modality)


STORAGES = {
    "lps": lambda v: v,
    "ras (i and j reversed)": lambda v: _flip(_flip(v, 2), 1),
    "i reversed": lambda v: _flip(v, 2),
    "rows/columns swapped": _swap_ij,
    "swapped and reversed": lambda v: _flip(_swap_ij(v), 1),
}


@pytest.fixture(scope="module")
def base() -> Volume:
    rng = np.random.default_rng(0)
    return _lps_volume(rng.integers(-1000, 1000, size=(3, 5, 7)).astype(np.int16))


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_axial_slices_look_like_the_lps_stored_volume(base, storage):
    vol = STORAGES[storage](base)
    axis = resolve_axis(vol, "axial")
    assert axis == 0
    orient = SliceOrientation.for_volume(vol, axis)
    assert orient.is_identity == (storage == "lps")
    for k in range(3):
        stored = take_slice(vol.array, axis, k)
        canonical = orient.to_canonical(stored)
        np.testing.assert_array_equal(canonical, base.array[k])
        np.testing.assert_array_equal(orient.to_stored(canonical), stored)
        assert orient.canonical_shape(stored.shape) == canonical.shape
        assert orient.stored_shape(canonical.shape) == stored.shape


def test_coronal_and_sagittal_slices_of_a_reversed_volume(base):
    vol = _flip(_flip(base, 0), 2)  # stored inferior-first and right-to-left
    for plane, base_axis in (("coronal", 1), ("sagittal", 2)):
        axis = resolve_axis(vol, plane)
        assert axis == base_axis
        orient = SliceOrientation.for_volume(vol, axis)
        n = vol.array.shape[axis]
        for index in range(n):
            # The physical slice at ``index`` is the base's slice at the same index for J (not
            # reversed), and at n-1-index along I (reversed).
            base_index = index if base_axis == 1 else n - 1 - index
            np.testing.assert_array_equal(orient.to_canonical(take_slice(vol.array, axis, index)),
                                          take_slice(base.array, base_axis, base_index))


@pytest.mark.parametrize("storage", sorted(STORAGES))
@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_the_stack_views_the_volume_once_without_copying(base, storage, plane):
    """The canonical stack is a numpy view whose slice k is the mapped stored slice k."""
    vol = STORAGES[storage](base)
    axis = resolve_axis(vol, plane)
    stack = SliceStack.of(vol, axis)
    assert np.shares_memory(stack.pixels, vol.array)
    orient = SliceOrientation.for_volume(vol, axis)
    for k in range(len(stack)):
        stored = take_slice(vol.array, axis, k)
        np.testing.assert_array_equal(stack.pixels[k], orient.to_canonical(stored))
        np.testing.assert_array_equal(stack.mask_out(stack.pixels[k]), stored)
    box = np.array([1, 0, 3, 2], np.float32)
    np.testing.assert_array_equal(stack.box_out(stack.box_in(box)), box)


def test_colour_pictures_are_shown_as_stored():
    rgb = Volume(np.zeros((1, 4, 6, 3), np.uint8), np.diag([-1.0, -1.0, 1.0, 1.0]), "RGB")
    assert SliceOrientation.for_volume(rgb, 0).is_identity


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_points_and_boxes_follow_the_pixels(base, storage):
    vol = STORAGES[storage](base)
    orient = SliceOrientation.for_volume(vol, 0)
    stored = vol.array[1]
    canonical = orient.to_canonical(stored)
    rng = np.random.default_rng(1)
    pts = np.stack([rng.integers(0, stored.shape[1], 20), rng.integers(0, stored.shape[0], 20)], axis=1)
    mapped = orient.points_to_canonical(pts, stored.shape).astype(int)
    for (x, y), (cx, cy) in zip(pts, mapped):
        assert canonical[cy, cx] == stored[y, x]
    np.testing.assert_allclose(orient.points_to_stored(mapped, stored.shape), pts)
    box = np.array([1.0, 0.0, 4.0, 3.0])
    cbox = orient.box_to_canonical(box, stored.shape)
    assert cbox[0] <= cbox[2] and cbox[1] <= cbox[3]
    np.testing.assert_allclose(orient.box_to_stored(cbox, stored.shape), box)
    inside = np.zeros(stored.shape, bool)
    inside[0:4, 1:5] = True  # the box's pixels (inclusive indices)
    c_inside = orient.to_canonical(inside)
    ys, xs = np.nonzero(c_inside)
    np.testing.assert_allclose([xs.min(), ys.min(), xs.max(), ys.max()], cbox)


# --- the regression this fixes: the CT model on a RAS-stored copy of the real series -------------------------

@pytest.fixture(scope="module")
def ct_slices():
    """Two liver slices of ct.nii.gz (stored LPS) and their liver masks."""
    import SimpleITK as sitk

    from SAMSelfPromptLib.io.images import read_any

    path = shared_path("ct_totalseg", "ct.nii.gz")
    vol = read_any(path)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_path("ct_totalseg", "labels.nii.gz"))))
    keep = [6, 12]
    return Volume(np.ascontiguousarray(vol.array[keep]), vol.ijk_to_ras, "CT"), labels[keep] == 5


def test_ct_model_segments_a_ras_stored_copy_identically(ct_slices):
    from SAMSelfPromptLib.weights.catalogue import open_segmenter
    from SAMSelfPromptLib.core.masks import dice

    lps, liver = ct_slices
    seg: Segmenter = open_segmenter(modality="CT").segmenter
    ras = _flip(_flip(lps, 2), 1)  # what a RAS-ordered NIfTI of the same scan holds
    opts = SegmentOptions(axis="axial")
    got = {}
    for name, vol in (("lps", lps), ("ras", ras)):
        results = sorted(seg.segment(vol, opts), key=lambda r: r.index)
        got[name] = np.stack([r.mask for r in results])
        if name == "ras":  # back to the LPS storage to compare voxel for voxel
            got[name] = got[name][:, ::-1, ::-1]
    for k in range(2):
        assert dice(got["lps"][k], liver[k]) > 0.75  # measured 0.82 and 0.83
    # Before the fix the RAS copy scored Dice 0.00 on these slices; now the two agree voxel for voxel.
    np.testing.assert_array_equal(got["lps"], got["ras"])
    # A click lands on the same tissue whichever way the slice is stored.
    first_lps = next(r for r in seg.segment(lps, opts) if r.index == 0)
    first_ras = next(r for r in seg.segment(ras, opts) if r.index == 0)
    h, w = lps.array.shape[1:]
    click = (300.0, 200.0)
    fixed_lps = seg.refine_slice(lps, 0, [click], [], first_lps, opts)
    fixed_ras = seg.refine_slice(ras, 0, [(w - 1 - click[0], h - 1 - click[1])], [], first_ras, opts)
    np.testing.assert_array_equal(fixed_lps.mask, fixed_ras.mask[::-1, ::-1])
    np.testing.assert_allclose(fixed_ras.box, [w - 1 - first_lps.box[2], h - 1 - first_lps.box[3],
                                               w - 1 - first_lps.box[0], h - 1 - first_lps.box[1]], atol=1e-3)
