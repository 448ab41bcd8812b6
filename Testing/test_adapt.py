"""Adapt on real slicer-core MRML, the CT DICOM series and the real LiteMedSAM (issue 9, defects e and f).

What each test guards:
- the user's segments are learnt from, SAM-SP's own output is refused (f1);
- the device asked for is the one trained on, an unavailable one fails with its name (f2);
- Adapt embeds with the encoder Auto-segment runs (f3);
- the embeddings live in a temporary folder that is gone when the job ends (f4);
- Cancel stops the embedding phase between images, writing no checkpoint (e).
Each run uses at most 3 labelled slices and 1 epoch (about 2 s per encoded slice on 2 cores).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mrml_helpers  # noqa: E402, F401  (installs the shims, as Slicer's loader needs)

from SAMSelfPromptLib.errors import InputError  # noqa: E402
from SAMSelfPromptLib.slicer import adapt, mrml  # noqa: E402
from SAMSelfPromptLib.training.data import Sample  # noqa: E402
from SAMSelfPromptLib.training.embedding_cache import DiskEmbeddingCache  # noqa: E402
from SAMSelfPromptLib.core.preprocess import Intensity  # noqa: E402

SLICES = (8, 9, 10)  # three axial slices through the abdomen


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """The cache folder and the system temp folder both point into tmp_path, so leftovers show."""
    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("SAMSELFPROMPT_CACHE", str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return cache, tmp


def user_segment(ct_node, name="my organ", slices=SLICES):
    """A segment the user drew (Segment Editor style: AddEmptySegment, then painted slices)."""
    seg = mrml.new_segmentation_for(ct_node, f"{name} segmentation")
    sid = seg.GetSegmentation().AddEmptySegment("", name, [0.8, 0.2, 0.2])
    mask = np.zeros((512, 512), bool)
    mask[200:320, 120:260] = True
    for k in slices:
        mrml.write_slice(seg, sid, ct_node, 0, k, mask)
    return seg, sid


def leftovers(cache: Path, tmp: Path) -> list[Path]:
    """Embedding files under the cache folder and Adapt temp folders under the system temp folder."""
    return [*cache.rglob("embeddings"), *cache.rglob("*.pt"), *tmp.glob(f"{adapt.TEMP_PREFIX}*")]


def test_learns_from_user_segments_and_refuses_model_output(ct_node):
    """f1: a segment SAM-SP wrote (tagged) is refused unless the user says they corrected it."""
    seg, mine = user_segment(ct_node)
    ours = mrml.output_segment(seg, "SAM-SP")  # tagged as SAM-SP output, as the Logic writes it
    mask = np.zeros((512, 512), bool)
    mask[100:150, 100:150] = True
    mrml.write_slice(seg, ours, ct_node, 0, SLICES[0], mask)

    assert adapt.user_segments(seg) == [mine]
    with pytest.raises(InputError, match="SAM-SP's own output") as refused:
        adapt.training_pairs([(ct_node, seg, ours)], 0)
    assert "'SAM-SP'" in str(refused.value)  # names the segment
    [(images, masks, intensity)] = adapt.training_pairs([(ct_node, seg, mine)], 0)
    assert len(images) == len(masks) == 3 and images[0].shape == masks[0].shape == (512, 512)
    assert intensity.modality == "CT" and all(m.sum() == 120 * 140 for m in masks)
    corrected = adapt.training_pairs([(ct_node, seg, ours)], 0, allow_model_output=True)
    assert len(corrected[0][0]) == 1


def test_the_cache_embeds_with_the_encoder_auto_segment_runs(lite_model, tmp_path):
    """f3: Adapt's and training's embeddings are what a Segmenter on this device feeds the decoder (its folded
    copy at its precision), so a model trained on them sees what Auto-segment gives it."""
    from SAMSelfPromptLib.core.predictor import Segmenter
    from SAMSelfPromptLib.training.embedding_cache import model_input

    sample = Sample("tiny", np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(64, 48), np.zeros((64, 48), bool),
                    Intensity("MR"))
    emb, frames = DiskEmbeddingCache(tmp_path).embed(lite_model, [sample])
    assert emb.shape == (1, 256, 64, 64) and frames[0].new_hw[0] == 256
    seg = Segmenter(lite_model, "cpu")
    hosts = seg._encode(seg._encoder(), model_input(sample, lite_model.image_size)[0][None]).float()
    assert float((emb.float() - hosts).norm() / hosts.norm()) < 2e-3  # the same encoder, stored in fp16


def test_adapt_end_to_end_on_cpu(logic, ct_node, sandbox):
    """One full Adapt: 3 user slices, 1 epoch on the CPU asked for, nothing left behind."""
    from SAMSelfPromptLib.weights.checkpoint import load_samsp, read_samsp

    cache, tmp = sandbox
    seg, user_id = user_segment(ct_node)
    out = cache.parent / "out"
    run = logic.wait(logic.start_adapt([(ct_node, seg, user_id)], epochs=1, out_dir=out, device="cpu"), timeout=900)
    assert run.status == "done", run.error + run.traceback
    result = run.result
    assert result["device"] == "cpu" and result["slices"] == 3 and result["epochs"] == 1
    path = Path(result["checkpoint"])
    assert path.parent == out and path.is_file() and path in logic.adapted_checkpoints
    assert read_samsp(path)["base_model"] == "litemedsam"
    model, meta = load_samsp(path)
    assert model.spec.model_id == "litemedsam" and meta["data"]["n_train"] == 3
    assert leftovers(cache, tmp) == []  # f4: no embeddings in the cache, the temp folder is gone


def test_unavailable_device_fails_with_its_name(logic, ct_node, sandbox):
    """f2: an explicit device is honoured; one this machine lacks fails clearly, naming it."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the unavailable-device case cannot be shown")
    from SAMSelfPromptLib.modeling.backbones import pick_device

    assert adapt.training_device("auto") == pick_device() and adapt.training_device("cpu").type == "cpu"
    with pytest.raises(InputError, match="'cuda'"):
        adapt.training_device("cuda")
    seg, user_id = user_segment(ct_node, "for cuda", slices=SLICES[:1])
    run = logic.wait(logic.start_adapt([(ct_node, seg, user_id)], epochs=1, out_dir=sandbox[1].parent / "out",
                                       device="cuda"), timeout=120)
    assert run.status == "failed"
    assert "device 'cuda'" in run.error and "CUDA is not available" in run.error, run.error
    assert leftovers(*sandbox) == []


def test_cancel_while_embedding_stops_at_once_and_cleans_up(logic, ct_node, sandbox, monkeypatch):
    """e + f4: Cancel set after the first encoded slice stops before the second; no checkpoint, no temp folder."""
    cache, tmp = sandbox
    seg, user_id = user_segment(ct_node, "to cancel")
    handle: list = []
    stored: list[str] = []
    seen_temp: list[bool] = []
    real_store = DiskEmbeddingCache.store

    def store_then_cancel(self, key, embedding):
        real_store(self, key, embedding)
        stored.append(key)
        seen_temp.append(self.root.parent.name.startswith(adapt.TEMP_PREFIX) and self.root.parent.parent == tmp)
        handle[0].job.cancel()  # what the Cancel button does, as soon as one slice is encoded

    monkeypatch.setattr(DiskEmbeddingCache, "store", store_then_cancel)
    out = cache.parent / "out"
    handle.append(logic.start_adapt([(ct_node, seg, user_id)], epochs=1, out_dir=out, device="cpu"))
    t0 = time.monotonic()
    run = logic.wait(handle[0], timeout=300)
    assert run.status == "cancelled", run.error + run.traceback
    assert len(stored) == 1, "embedding went on after Cancel"
    assert seen_temp == [True]  # the embeddings were in the job's temp folder ...
    assert leftovers(cache, tmp) == []  # ... which is gone now
    assert not out.exists() or not any(out.iterdir())  # no checkpoint
    assert time.monotonic() - t0 < 60
    assert not logic.adapted_checkpoints or all(p.parent != out for p in logic.adapted_checkpoints)


def test_failed_adapt_removes_its_temp_folder(logic, ct_node, sandbox):
    """f4: a job that fails after embedding (here: the output folder is a file) leaves no temp folder."""
    cache, tmp = sandbox
    seg, user_id = user_segment(ct_node, "to fail", slices=SLICES[:1])
    not_a_folder = cache.parent / "out"
    not_a_folder.write_text("a file where the output folder should be")
    run = logic.wait(logic.start_adapt([(ct_node, seg, user_id)], epochs=1, out_dir=not_a_folder, device="cpu"),
                     timeout=300)
    assert run.status == "failed"
    assert leftovers(cache, tmp) == []


# --- Adapt to a new target (issue 12): negatives, extent, the saved user target -----------------------

LA_CASE = "23X6SY44VT9KFHR7S7OC"  # la_mri val: the atrium is on slices 19..86 of 88 (LPS order)
CROP = (slice(12, 31), slice(40, 136), slice(30, 126))  # 19 slices (atrium on 7..18), 96 x 96 in-plane


@pytest.fixture(scope="module")
def la_crop():
    """A small real LGE-MRI crop and its left-atrium mask, in read_volume's (LPS) K x J x I order."""
    from conftest import shared_path
    from SAMSelfPromptLib.training.data import read_volume

    image, spacing = read_volume(shared_path("la_mri", "images", f"{LA_CASE}.nii.gz"))
    labels, _ = read_volume(shared_path("la_mri", "labels", f"{LA_CASE}.nii.gz"))
    image, truth = image[CROP], labels[CROP] == 1
    ks = np.flatnonzero(truth.reshape(len(truth), -1).any(1))
    assert ks[0] == 7 and ks[-1] == 18, ks  # the crop the tests below assume
    return image, truth, spacing


def test_negatives_only_outside_the_extent():
    """Negatives: marked-empty slices and slices outside the extent, never an outline or a slice inside."""
    from SAMSelfPromptLib.training.adapt import default_extent, negative_slices

    for n, outlines, extent, empty in ((88, [30, 53, 75], (19, 86), ()), (19, [9, 14], (7, 18), ()),
                                       (25, [9, 11, 13], (8, 14), (2, 20)), (40, [20], (10, 30), (5,))):
        negs = negative_slices(n, outlines, extent, empty, max_negatives=6)
        assert negs and len(negs) <= 6
        assert all(k in empty or not extent[0] <= k <= extent[1] for k in negs), (negs, extent)
        assert not set(negs) & set(outlines) and set(empty) <= set(negs)
    # 19 slices below, 1 above: both sides are used, nearest and farthest of the long side included.
    assert negative_slices(88, [30, 53, 75], (19, 86), max_negatives=6) == [0, 4, 9, 14, 18, 87]
    # An extent that does not hold an outline, or a slice both outlined and marked empty, is refused.
    with pytest.raises(InputError, match="outside the extent"):
        negative_slices(40, [5, 20], (10, 30))
    with pytest.raises(InputError, match="both outlined and marked empty"):
        negative_slices(40, [20], (10, 30), empty=(20,))
    # No extent: the default widens the outlined span by one mean gap between outlines (documented).
    assert default_extent([30, 53, 75], 88) == (7, 87)
    assert negative_slices(88, [30, 53, 75], None, max_negatives=6) == [0, 1, 2, 4, 5, 6]
    assert negative_slices(88, [53], None, slice_mm=0.625) == [0, 1, 2, 3, 4]  # k = 1: 30 mm


def test_growing_never_writes_outside_the_extent_and_stops_where_absent():
    """The outward run stops at the first absent slice or at the extent, whatever the model paints."""
    from SAMSelfPromptLib.core.extent import grow_from_annotations

    everywhere = np.ones((4, 4), bool)
    seen: list[int] = []

    def always(k):  # a model that paints every slice it is asked about
        seen.append(k)
        return everywhere

    res = grow_from_annotations(always, 30, {10: everywhere, 14: everywhere}, extent=(8, 17))
    assert sorted(res.masks) == list(range(8, 18)) and min(seen) >= 8 and max(seen) <= 17
    present = set(range(5, 21)) - {12}  # absent at 12 (between outlines: skipped, not a stop) and beyond 20

    def model(k):
        return everywhere if k in present else None

    res = grow_from_annotations(model, 30, {10: everywhere, 14: everywhere})
    assert sorted(res.masks) == [k for k in range(5, 21) if k != 12]
    assert res.stopped == {"down": 4, "up": 21} and 0 not in res.visited and 29 not in res.visited
    # With an extent the target is on each of its slices: no stop inside it, the neighbour's box is carried
    # where pass 1 says absent (12 and 21..22 here), and nothing beyond it is asked for or written.
    carried: list[int] = []

    def carry(k, neighbour):
        carried.append(k)
        return neighbour

    res = grow_from_annotations(model, 30, {10: everywhere, 14: everywhere}, extent=(3, 22), carry=carry)
    assert sorted(res.masks) == list(range(3, 23)) and carried == [12, 4, 3, 21, 22]
    assert min(res.visited) == 3 and max(res.visited) == 22
    with pytest.raises(InputError, match="outside the extent"):
        grow_from_annotations(model, 30, {10: everywhere}, extent=(11, 20))


def test_adapt_on_real_slices_trains_outside_negatives_and_paints_inside_only(la_crop, tmp_path):
    """Real LiteMedSAM (shipped start), real LGE-MRI: 2 outlines, the extent given; few steps (lean)."""
    from SAMSelfPromptLib.core.preprocess import guess_intensity
    from SAMSelfPromptLib.training.adapt import (AdaptConfig, SliceEmbeddings, adapt_model, segment_adapted,
                                                 start_checkpoint)
    from SAMSelfPromptLib.training.api import base_model

    image, truth, spacing = la_crop
    intensity = guess_intensity(image)
    name, path = start_checkpoint("MR")
    assert path is not None, "a shipped target is the start (vanilla only when none is shipped)"
    model = base_model(path, device="cpu")
    emb = SliceEmbeddings(model, image, intensity, DiskEmbeddingCache(tmp_path))
    outlines = {10: truth[10], 15: truth[15]}
    out = adapt_model(model, image, outlines, intensity, (7, 18), config=AdaptConfig(steps=4, max_negatives=2),
                      embeddings=emb, slice_mm=spacing[0])
    assert out.negatives == [0, 6] and out.annotated == [10, 15] and emb.encoded == 4
    pred, grown = segment_adapted(out.model, emb, outlines, out.presence_threshold, (7, 18))
    assert not pred[:7].any() and all(7 <= k <= 18 for k in grown.visited)
    assert (pred[10] == truth[10]).all() and (pred[15] == truth[15]).all()  # the outlines are kept as drawn


def test_write_like_keeps_the_input_grid(tmp_path):
    """train --segment-out writes on the input's own grid (size, spacing, origin, direction), not LPS."""
    import SimpleITK as sitk

    from SAMSelfPromptLib.training.data import read_volume
    from SAMSelfPromptLib.training.fewshot import write_like

    arr = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    img = sitk.GetImageFromArray(arr)
    img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    img.SetSpacing((0.5, 0.7, 2.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    src = tmp_path / "in.nii.gz"
    sitk.WriteImage(img, str(src))
    lps, _ = read_volume(src)
    write_like(str(src), (lps % 7).astype(np.uint8), str(tmp_path / "out.nii.gz"))
    out = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert out.GetSize() == img.GetSize() and np.allclose(out.GetDirection(), img.GetDirection())
    assert np.allclose(out.GetSpacing(), img.GetSpacing()) and np.allclose(out.GetOrigin(), img.GetOrigin())
    assert (sitk.GetArrayFromImage(out) == arr % 7).all()


def test_adapted_target_round_trips_is_listed_and_runs_in_batch(logic, la_crop, sandbox):
    """Slicer path: outline 2 slices, give the extent, Adapt names and saves a user target, writes the rest
    into a new segment inside the extent only; the model loads, is listed, and segments another volume."""
    import slicer

    from SAMSelfPromptLib.training.adapt import AdaptConfig
    from SAMSelfPromptLib.weights.catalogue import target_of_checkpoint
    from SAMSelfPromptLib.weights.checkpoint import load_samsp

    image, truth, _ = la_crop
    node = slicer.util.addVolumeFromArray(image.astype(np.float32), name="LA crop")
    seg = mrml.new_segmentation_for(node, "outlines")
    sid = seg.GetSegmentation().AddEmptySegment("", "atrium", [0.8, 0.3, 0.5])
    for k in (10, 15):
        mrml.write_slice(seg, sid, node, 0, k, truth[k])
    out = sandbox[0].parent / "adapted"
    run = logic.wait(logic.start_adapt_target(node, seg, sid, "atrium (mine)", extent=(7, 18), axis=0, device="cpu",
                                              out_dir=out, config=AdaptConfig(steps=4, max_negatives=2)), timeout=900)
    assert run.status == "done", run.error + run.traceback
    path = Path(run.result["checkpoint"])
    assert path == out / "atrium-mine.pt" and run.segment_id != sid
    painted = mrml.segment_array(seg, run.segment_id, node)
    assert not painted[:7].any() and painted[10].any()  # nothing outside the extent; the outlines are in
    assert (mrml.segment_array(seg, sid, node)[[10, 15]] == truth[[10, 15]]).all()  # the user's segment is untouched
    model, meta = load_samsp(path)  # the checkpoint format round-trips
    assert meta["role"] == "auto" and meta["target"]["name"] == "atrium (mine)" and meta["target"]["user"]
    assert meta["adapt"]["extent"] == [7, 18] and set(meta["adapt"]["negative_slices"]) <= {0, 1, 2, 3, 4, 5, 6}
    target = target_of_checkpoint(path)
    assert target is not None and target.user and target.kinds == ("MR",)
    assert "atrium (mine)" in [t.name for t in logic.targets_for(node)]
    other = slicer.util.addVolumeFromArray(image[5:9].astype(np.float32), name="another volume")
    batch = logic.start_batch([other], target="atrium (mine)", device="cpu")
    for r in batch.runs:
        assert logic.wait(r, timeout=600).status == "done", r.error + r.traceback
    assert leftovers(*sandbox) == []  # the training slices' embeddings lived in a temp folder, now gone
