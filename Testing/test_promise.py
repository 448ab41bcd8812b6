"""ProMISe mode: APM + IPS on the frozen LiteMedSAM backbone (real weights, real encoder, no mocks).

Lean on purpose: small synthetic pictures (a few real cached embeddings) for the trainer, the
checkpoint and the CLI; one PH2 image for the Segmenter path (skipped without the shared data).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_path
from SAMSelfPromptLib.core.clicks import next_click
from SAMSelfPromptLib.core.masks import dice
from SAMSelfPromptLib.core.preprocess import Intensity
from SAMSelfPromptLib.core.promise import promise_decode, promise_prompt, select_points
from SAMSelfPromptLib.errors import CheckpointError
from SAMSelfPromptLib.modeling.promise import attach_promise, backbone_state, has_promise, promise_state
from SAMSelfPromptLib.training.data import array_samples
from SAMSelfPromptLib.training.embedding_cache import DiskEmbeddingCache
from SAMSelfPromptLib.training.promise_trainer import PromiseConfig, train_promise
from SAMSelfPromptLib.weights.checkpoint import load_samsp, read_samsp, save_samsp


def _disk_pictures(n: int, size: int = 64, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Bright disks on a dark noisy background (the last one without a disk: a negative image)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for i in range(n):
        cy, cx, r = rng.uniform(20, size - 20), rng.uniform(20, size - 20), rng.uniform(9, 13)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) & (i < n - 1)
        images.append(np.clip(rng.normal(40, 10, (size, size)) + 150 * mask, 0, 255).astype(np.uint8))
        masks.append(mask)
    return images, masks


@pytest.fixture(scope="module")
def trained(lite_model, tmp_path_factory):
    """ProMISe trained for a few steps on 5 small pictures; the backbone's state before and after."""
    imgs, masks = _disk_pictures(5)
    samples = array_samples(imgs, masks, Intensity("generic"))
    model = copy.deepcopy(lite_model)
    before = {k: v.clone() for k, v in backbone_state(model).items()}
    cache = DiskEmbeddingCache(tmp_path_factory.mktemp("cache"))
    cfg = PromiseConfig(epochs=6, batch_size=5, lr=3e-3, warmup_steps=1, val_from=1)
    res = train_promise(model, samples, samples, cfg, cache=cache, progress=False, log=lambda _: None)
    return model, before, res, samples, cache


def test_untrained_ips_is_the_vanilla_decoder(lite_model):
    model = copy.deepcopy(lite_model)
    attach_promise(model)
    emb = torch.randn(2, 256, 64, 64, generator=torch.Generator().manual_seed(1))
    coords = torch.tensor([[[100.0, 120.0], [30.0, 40.0]]] * 2)
    labels = torch.tensor([[1, 0]] * 2)
    with torch.no_grad():
        shifted, _ = promise_decode(model, emb, coords, labels)
        plain, _ = model.decode(emb, points=(coords, labels))
    assert torch.equal(shifted, plain)


def test_points_are_spread_inside_and_around_the_object():
    prob = np.zeros((64, 64), np.float32)
    prob[20:36, 10:30] = 0.9  # the object; the valid (unpadded) grid is 48 x 40
    coords, labels = select_points(prob, (48, 40), 8, 256)
    assert (labels == 1).sum() == 8 and (labels == 0).sum() == 8
    cells = (coords / 4 - 0.5).round().astype(int)  # (x, y) model pixels -> grid (col, row)
    fg, bg = cells[labels == 1], cells[labels == 0]
    assert all(prob[r, c] > 0.5 for c, r in fg) and all(prob[r, c] < 0.5 for c, r in bg)
    assert (bg[:, 0] < 40).all() and (bg[:, 1] < 48).all()  # never in the padding
    assert len({tuple(p) for p in fg}) == 8  # distinct, spread points
    assert np.ptp(fg[:, 0]) >= 10 and np.ptp(fg[:, 1]) >= 8
    assert select_points(np.zeros((64, 64), np.float32), (64, 64), 8, 256) is None  # nothing: no object


def test_training_leaves_the_backbone_bit_identical(trained):
    model, before, res, _, _ = trained
    after = backbone_state(model)
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before), "a backbone tensor changed"
    assert all(not p.requires_grad for p in model.parameters())
    assert has_promise(model) and any(v.abs().sum() > 0 for k, v in promise_state(model).items() if "ips.mlp.2" in k)


def test_training_learns_prompt_free_and_presence(trained):
    _, _, res, _, cache = trained
    assert cache.misses == 5  # each picture encoded once; every epoch read the cache
    assert res.history[-1]["loss"] < 0.6 * res.history[0]["loss"]
    assert res.best_val["promise"] > 0.8
    assert res.best_val["negative_empty_rate"] == 1.0  # the picture without a disk comes out empty


def test_checkpoint_round_trip(trained, lite_model, tmp_path):
    model, _, _, samples, cache = trained
    path = save_samsp(tmp_path / "p.pt", model, {"method": "promise", "promise": model.promise.config})
    payload = read_samsp(path)  # weights_only=True
    assert set(payload["tensors"]) == set(promise_state(model)) and payload["metadata"]["method"] == "promise"
    loaded, meta = load_samsp(path)
    assert has_promise(loaded) and meta["promise"] == model.promise.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    emb, frames = cache.embed(lite_model, samples)
    fb = torch.from_numpy(np.stack([f.full_box() for f in frames]))
    with torch.no_grad():
        a, b = promise_prompt(model, emb.float(), fb), promise_prompt(loaded, emb.float(), fb)
    assert torch.equal(a.y1, b.y1)
    broken = dict(payload, tensors={k: v for k, v in payload["tensors"].items() if "apm" not in k})
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="lacks"):
        load_samsp(tmp_path / "broken.pt")


def test_cli_train_and_evaluate_promise_rows(tmp_path):
    from SAMSelfPromptLib.cli.training import main

    imgs, masks = _disk_pictures(5, seed=3)
    root = tmp_path / "data"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i, (img, m) in enumerate(zip(imgs, masks)):
        Image.fromarray(img).save(root / "images" / f"c{i}.png")
        Image.fromarray((m * 255).astype(np.uint8)).save(root / "masks" / f"c{i}.png")
    ids = [f"c{i}" for i in range(5)]
    (root / "splits.json").write_text(json.dumps({"train": ids, "val": ids}))
    ck, cache = tmp_path / "promise.pt", str(tmp_path / "cache")
    assert main(["train", str(root), "--method", "promise", "--epochs", "6", "--batch-size", "5", "--lr", "3e-3",
                 "--val-from", "1", "--no-progress", "--cache", cache, "-o", str(ck)]) == 0
    meta = read_samsp(ck)["metadata"]
    assert meta["method"] == "promise" and meta["train_seconds"] > 0 and meta["data"]["n_train"] == 5
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(root), "--split", "val", "--checkpoint", "none", "--promise-checkpoint", str(ck),
                 "--clicks", "2", "--cache", cache, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"promise", "promise_apm", "promise_ips_gt_points", "gt_box"} <= set(res["rows"])
    assert res["rows"]["promise"]["fp_slices"] == 0
    assert {"vanilla", "promise"} <= set(res["clicks_rows"])
    assert res["clicks_rows"]["promise"]["dice_after"]["1"] >= res["clicks_rows"]["promise"]["dice_start"] - 0.05


def test_segmenter_runs_promise_and_clicks_refine_on_the_untouched_decoder(lite_model, tmp_path):
    """A ProMISe checkpoint opened through the catalogue (as the CLI, Logic and web app do)."""
    from SAMSelfPromptLib.core.volume import Volume
    from SAMSelfPromptLib.training.data import load_folder
    from SAMSelfPromptLib.weights.catalogue import open_segmenter

    ph2 = shared_path("ph2")
    train = load_folder(ph2, ids=json.loads((ph2 / "splits.json").read_text())["train"][:12])
    model = copy.deepcopy(lite_model)
    train_promise(model, train, None, PromiseConfig(epochs=4, batch_size=4, lr=2e-3, warmup_steps=1),
                  progress=False, log=lambda _: None)  # the default cache: PH2 is usually cached there already
    ck = save_samsp(tmp_path / "promise_ph2.pt", model, {"method": "promise", "promise": model.promise.config})
    opened = open_segmenter(checkpoint=ck, device="cpu", modality="RGB", is_rgb=True)
    seg = opened.segmenter
    assert seg.method == "promise" and seg.trained and seg.refiner is None and "ProMISe" in opened.description
    case = load_folder(ph2, ids=[json.loads((ph2 / "splits.json").read_text())["val"][0]])[0]
    volume = Volume(case.image[None], np.diag([-1.0, -1.0, 1.0, 1.0]), "RGB", case.case_id)
    first = next(seg.segment(volume))
    assert first.box_source == "self" and first.mask.any()
    assert dice(first.mask, case.mask) > 0.6
    # The simulated expert's click (deepest point of the largest error): the untouched decoder answers.
    calls = seg.encoder_calls
    click = next_click(first.mask, case.mask)
    at = [(click.x, click.y)]
    refined = seg.refine_slice(volume, 0, at if click.positive else [], [] if click.positive else at, previous=first)
    assert seg.encoder_calls == calls  # the cached embedding was reused
    assert not torch.equal(refined.logits, first.logits)  # the click changed the answer
    before, after = dice(first.mask, case.mask), dice(refined.mask, case.mask)
    assert after > before - 0.02, (before, after)
    # The promptable-mode pass (APM points + the click, IPS), on the vanilla decoder weights.
    assert torch.equal(seg.model.mask_decoder.mask_tokens.weight, lite_model.mask_decoder.mask_tokens.weight)
