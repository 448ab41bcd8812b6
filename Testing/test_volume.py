"""The volume pipeline: slice-axis choice, the expert-box path, the embedding cache, propagation,
3D clean-up and input validation. The encoder runs on 3 slices of a synthetic phantom."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from SAMSelfPromptLib.errors import InputError
from SAMSelfPromptLib.core.volume import Volume
from SAMSelfPromptLib.core.masks import dice
from SAMSelfPromptLib.core.masks import mask_box
from SAMSelfPromptLib.core.predictor import Segmenter, SegmentOptions, largest_component_3d, resolve_axis, segment_volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _volume(matrix3: np.ndarray, spacing=(1.0, 1.0, 1.0), shape=(4, 5, 6)) -> Volume:
    m = np.eye(4)
    m[:3, :3] = np.asarray(matrix3, float) * np.asarray(spacing, float)  # column n scaled by spacing n
    return Volume(np.zeros(shape, np.int16), m, "CT")


# --- slice axis --------------------------------------------------------------------------------------------------

def test_resolve_axis_identity_direction():
    vol = _volume(LPS_TO_RAS[:3, :3], spacing=(0.7, 0.7, 5.0))  # an ordinary axial DICOM series
    assert resolve_axis(vol) == resolve_axis(vol, "axial") == 0  # slices stacked along K
    assert resolve_axis(vol, "coronal") == 1
    assert resolve_axis(vol, "sagittal") == 2
    assert [resolve_axis(vol, a) for a in ("K", "J", "I", "k", 0, 1, 2, "2")] == [0, 1, 2, 0, 0, 1, 2, 2]


def test_resolve_axis_permuted_direction():
    # A coronal acquisition: i -> R, j -> S, k -> A (columns of the direction matrix), anisotropic.
    d = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], float)
    vol = _volume(d, spacing=(0.5, 0.5, 4.0))
    assert resolve_axis(vol, "axial") == 1  # S is index j: array axis 1
    assert resolve_axis(vol, "coronal") == 0  # A is index k: array axis 0
    assert resolve_axis(vol, "sagittal") == 2
    # A sagittal one with a flipped axis: i -> -A, j -> -S, k -> R.
    d = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float)
    vol = _volume(d, spacing=(0.9, 0.9, 3.0))
    assert (resolve_axis(vol, "axial"), resolve_axis(vol, "coronal"), resolve_axis(vol, "sagittal")) == (1, 2, 0)


def test_resolve_axis_oblique_direction():
    # Axial tilted by 25 degrees about R then 15 about S: still nearest to axial, and the large
    # slice spacing must not bias the choice (the direction is normalised by the spacing).
    rot = Rotation.from_euler("xz", [25, 15], degrees=True).as_matrix()
    vol = _volume(LPS_TO_RAS[:3, :3] @ rot, spacing=(0.6, 0.6, 6.0))
    assert (resolve_axis(vol, "axial"), resolve_axis(vol, "coronal"), resolve_axis(vol, "sagittal")) == (0, 1, 2)
    # The same tilt on a permuted (coronal) grid.
    perm = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], float)
    vol = _volume(rot @ perm, spacing=(0.6, 6.0, 0.6))
    assert (resolve_axis(vol, "axial"), resolve_axis(vol, "coronal"), resolve_axis(vol, "sagittal")) == (1, 0, 2)


def test_resolve_axis_errors_and_rgb():
    vol = _volume(np.eye(3))
    with pytest.raises(InputError, match="unknown slice axis 'oblique'"):
        resolve_axis(vol, "oblique")
    with pytest.raises(InputError, match="must be 0, 1 or 2, got 3"):
        resolve_axis(vol, 3)
    rgb = Volume(np.zeros((1, 8, 9, 3), np.uint8), LPS_TO_RAS, "RGB")
    assert resolve_axis(rgb, "sagittal") == 0  # a 2D colour image has one slice whatever is asked


# --- input validation (image.Volume) -----------------------------------------------------------------------------

@pytest.mark.parametrize("array, message", [
    (np.zeros((0, 8, 8), np.int16), r"the volume is empty \(shape \(0, 8, 8\)\)"),
    (np.zeros((3, 8, 8, 2), np.int16), r"4D data of shape \(3, 8, 8, 2\) .*not supported; pick a single frame"),
    (np.zeros((5, 8, 8, 3), np.uint8), r"RGB volumes are only supported as single 2D images, got shape \(5, 8, 8, 3\)"),
    (np.zeros((8, 8), np.int16), r"expected a 3D array \[K, J, I\] \(or 2D RGB\), got 2D"),
    (np.array([[["a"]]]), "voxel type <U1 is not numeric"),
])
def test_volume_rejects_what_cannot_be_segmented(array, message):
    with pytest.raises(InputError, match=message):
        Volume(array, np.eye(4), name="input")


def test_volume_rejects_bad_geometry():
    with pytest.raises(InputError, match="singular"):
        Volume(np.zeros((2, 3, 4)), np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(InputError, match="must be 4x4"):
        Volume(np.zeros((2, 3, 4)), np.eye(3))


# --- 3D clean-up --------------------------------------------------------------------------------------------------

def test_largest_component_3d_keeps_the_largest():
    m = np.zeros((6, 10, 10), bool)
    m[1:4, 2:6, 2:6] = True  # 48 voxels
    m[0, 8, 8] = True  # stray voxel
    m[4:6, 8:10, 0:2] = True  # 8 voxels, separate
    kept = largest_component_3d(m)
    assert kept.dtype == bool and kept.sum() == 48 and kept[1:4, 2:6, 2:6].all()
    diagonal = np.zeros((3, 3, 3), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = diagonal[2, 2, 2] = True  # corner-touching: 26-connected
    assert largest_component_3d(diagonal).sum() == 3
    assert not largest_component_3d(np.zeros((2, 2, 2), np.uint8)).any()


# --- the model path on a phantom ---------------------------------------------------------------------------------

def _phantom(seed: int = 0, h: int = 96, w: int = 128) -> tuple[Volume, np.ndarray]:
    """Three CT-like slices: an ellipse on 0 and 1 (smaller on 1), air on 2 (past the object's end)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    gt = np.zeros((3, h, w), bool)
    for k, (ry, rx) in enumerate([(22, 34), (18, 28)]):
        gt[k] = ((yy - 44) / ry) ** 2 + ((xx - 60) / rx) ** 2 < 1
    texture = ndimage.gaussian_filter(rng.normal(size=(3, h, w)), (0, 4, 4))
    soft = ndimage.gaussian_filter(gt.astype(float), (0, 1.2, 1.2))
    img = -20 + 6 * texture / texture.std() + 120 * soft + rng.normal(0, 5, (3, h, w))
    img[2] = -1000 + rng.normal(0, 5, (h, w))
    return Volume(img.astype(np.int16), np.diag([-0.7, -0.7, 3.0, 1.0]), "CT", "phantom"), gt


def _box(mask: np.ndarray, pad: int = 2) -> list[float]:
    x0, y0, x1, y1 = mask_box(mask)
    return [x0 - pad, y0 - pad, x1 + pad, y1 + pad]


@pytest.fixture(scope="module")
def phantom():
    return _phantom()


@pytest.fixture(scope="module")
def segmenter(lite_model):
    return Segmenter(lite_model, "cpu")


@pytest.fixture(scope="module")
def expert_run(segmenter, phantom):
    volume, gt = phantom
    options = SegmentOptions(slice_range=(0, 2), boxes={0: _box(gt[0]), 1: _box(gt[1])}, batch_size=2)
    mask, results = segment_volume(segmenter, volume, options)
    return mask, results, segmenter.encoder_calls


def test_expert_box_dice_on_phantom(expert_run, phantom):
    mask, results, calls = expert_run
    volume, gt = phantom
    assert calls == 2 and mask.shape == volume.shape_kji and mask.dtype == np.uint8
    assert [r.index for r in results] == [0, 1] and all(r.box_source == "expert" for r in results)
    for k in (0, 1):
        assert dice(mask[k], gt[k]) >= 0.95, f"slice {k}: Dice {dice(mask[k], gt[k]):.3f}"
    assert not mask[2].any()  # outside slice_range nothing is written


def test_embedding_cache_other_prompts_and_refinement_do_not_reencode(expert_run, segmenter, phantom):
    volume, gt = phantom
    _, results, calls = expert_run
    hits = segmenter.cache.hits
    # Self-prompt on the same slices: vanilla LiteMedSAM's y0 is empty, so "full_box" prompts the whole slice.
    _, again = segment_volume(segmenter, volume, SegmentOptions(slice_range=(0, 2), empty_y0="full_box"))
    assert [r.box_source for r in again] == ["fallback", "fallback"]
    # A click correction on slice 1: a positive click inside the object, a negative one outside.
    refined = segmenter.refine_slice(volume, 1, positive=[[60, 44]], negative=[[5, 90]], previous=results[1])
    assert segmenter.encoder_calls == calls
    assert segmenter.cache.hits == hits + 3
    assert refined.index == 1 and refined.mask.shape == gt[1].shape and refined.box_source == "expert"
    assert dice(refined.mask, gt[1]) >= 0.9
    with pytest.raises(InputError, match="at least one positive or negative click"):
        segmenter.refine_slice(volume, 1, positive=[], negative=[], previous=results[1])


@pytest.mark.parametrize("rng", [(2, 1), (0, 4), (-1, 2), (1, 1)])
def test_slice_range_is_validated(segmenter, phantom, rng):
    volume, _ = phantom
    calls = segmenter.encoder_calls
    with pytest.raises(InputError, match=rf"slice range \[{rng[0]}, {rng[1]}\) is outside the volume's 3 slices"):
        segment_volume(segmenter, volume, SegmentOptions(slice_range=rng))
    assert segmenter.encoder_calls == calls


def test_propagation_from_an_expert_box(expert_run, segmenter, phantom):
    """Seeded by one expert box on slice 1, the box is carried to slice 0 (the object continues)
    and to slice 2 (past its end); min_area decides where propagation stops."""
    volume, gt = phantom
    boxes = {1: _box(gt[1])}
    _, results = segment_volume(segmenter, volume, SegmentOptions(boxes=boxes, propagate=True, batch_size=3))
    by_k = {r.index: r for r in results}
    assert sorted(by_k) == [0, 1, 2] and results[0].index == 1  # the seed comes first
    assert by_k[1].box_source == "expert" and dice(by_k[1].mask, gt[1]) >= 0.95
    assert by_k[0].box_source == "propagated" and dice(by_k[0].mask, gt[0]) >= 0.6
    np.testing.assert_array_equal(by_k[0].box, mask_box(by_k[1].mask))  # prompted with the previous mask's box
    # Stop rule: a slice whose mask is smaller than min_area ends that direction with an empty slice.
    _, results = segment_volume(segmenter, volume, SegmentOptions(boxes=boxes, propagate=True, min_area=10**6))
    by_k = {r.index: r for r in results}
    assert by_k[1].box_source == "expert"
    for k in (0, 2):
        assert by_k[k].box_source == "none" and not by_k[k].mask.any() and by_k[k].box is None
    assert segmenter.encoder_calls == 3  # slice 2 was encoded once; everything else came from the cache


def test_cleanup_3d_in_segment_volume(expert_run, segmenter, phantom):
    """Expert boxes on slice 0 (the object) and slice 2 (air, far from it): the clean-up drops the
    blob the box forces onto slice 2 when it does not touch the object in 3D."""
    volume, gt = phantom
    boxes = {0: _box(gt[0]), 2: [100, 80, 124, 92]}
    calls = segmenter.encoder_calls
    mask, results = segment_volume(segmenter, volume, SegmentOptions(boxes=boxes, batch_size=3))
    assert segmenter.encoder_calls == calls  # all cached; slice 1 has no box and is not even looked at
    assert sorted(r.index for r in results) == [0, 1, 2] and not mask[1].any()
    if not mask[2].any():
        pytest.skip("the model left the air slice empty; nothing for the clean-up to remove")
    cleaned, _ = segment_volume(segmenter, volume, SegmentOptions(boxes=boxes, cleanup_3d=True, batch_size=3))
    np.testing.assert_array_equal(cleaned[0], mask[0])
    assert not cleaned[1:].any()


def test_an_fp32_cpu_encodes_with_the_folded_copy_within_rounding_of_the_module(lite_model):
    """A CPU without native bf16 (or SAMSELFPROMPT_PRECISION=fp32) runs the folded copy in fp32, as a bf16 CPU runs
    it in bf16 (test_speed.py): faster than the module (docs/RESULTS.md, Speed, session 14) and equal to it within
    rounding, on a real CT slice. The bench's naive baseline is the module itself."""
    import torch
    from conftest import shared_path
    from SAMSelfPromptLib.cli.bench import naive_segmenter
    from SAMSelfPromptLib.core.preprocess import Intensity, normalize_slice, to_model_input
    from SAMSelfPromptLib.io import read_image
    from SAMSelfPromptLib.modeling.backbones import autocast_for

    fp32 = Segmenter(lite_model, "cpu", precision="fp32")
    naive = naive_segmenter(lite_model, torch.device("cpu"), {})
    ct = read_image(shared_path("ct_totalseg", "ct.nii.gz"))
    x = to_model_input(normalize_slice(ct.array[10], Intensity("CT", -160.0, 240.0)), 256)[0][None]
    with torch.no_grad(), autocast_for(fp32.device, "fp32"):
        folded = fp32._encode(fp32._encoder(), x)
        module = naive._encode(naive._encoder(), x)
    assert fp32._fast_encode is not None and naive._fast_encode is None  # which encoder each one built
    assert float((folded - module).norm() / module.norm()) < 1e-4
