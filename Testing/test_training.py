"""SAM-SP training: loss values, KL direction/detach, boxes, cache keys, overfit, resume, DDP, checkpoints."""
from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch

from SAMSelfPromptLib.core.preprocess import Intensity
from SAMSelfPromptLib.core.selfprompt import box_from_logits
from SAMSelfPromptLib.training.data import Sample, array_samples
from SAMSelfPromptLib.training.embedding_cache import DiskEmbeddingCache, cache_key
from SAMSelfPromptLib.training.losses import dice_loss, kl_logits, samsp_loss
from SAMSelfPromptLib.training.trainer import TrainConfig, jitter_boxes, train


# --- loss --------------------------------------------------------------------------------------

def test_dice_loss_hand_values():
    target = torch.zeros(1, 1, 2, 2)
    target[0, 0, 0] = 1.0  # two foreground pixels
    half = torch.zeros(1, 1, 2, 2)  # sigmoid = 0.5 everywhere: inter 1, sum p 2, sum y 2
    assert dice_loss(half, target).item() == pytest.approx(1 - (2 * 1 + 1) / (2 + 2 + 1))
    perfect = (target * 2 - 1) * 50
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-perfect, target).item() == pytest.approx(1 - 1 / 5, abs=1e-6)  # inverted: smooth 1 over 2 + 2 + 1


def test_kl_is_bernoulli_kl_teacher_to_student():
    y0 = torch.tensor([[-3.0, 0.5, 2.0, -20.0]])
    y1 = torch.tensor([[1.0, -1.0, 2.0, 4.0]])
    p, q = torch.sigmoid(y1).double(), torch.sigmoid(y0).double()
    kl_pq = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).mean()
    kl_qp = (q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))).mean()
    got = kl_logits(y0, y1).item()
    assert got == pytest.approx(kl_pq.item(), rel=1e-5)
    assert abs(got - kl_qp.item()) > 0.1  # the other direction is a different number
    assert kl_logits(y1, y1).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_gradient_is_q_minus_p_and_teacher_detached():
    y0 = torch.tensor([[-20.0, -2.0, 0.0, 3.0]], requires_grad=True)
    y1 = torch.tensor([[5.0, 1.0, -1.0, 3.0]], requires_grad=True)
    kl_logits(y0, y1).backward()
    expected = (torch.sigmoid(y0) - torch.sigmoid(y1)).detach() / y0.numel()
    assert torch.allclose(y0.grad, expected, atol=1e-7)
    assert y0.grad[0, 0].abs() > 0.2 / 4  # saturated-empty y0 still gets a strong pull (the trap)
    assert y1.grad is None


def test_samsp_loss_combines_dice_and_alpha_kl():
    y0, y1 = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    tgt = (torch.rand(2, 1, 8, 8) > 0.5).float()
    loss0, _ = samsp_loss(y0, y1, tgt, 0.0)
    loss2, parts = samsp_loss(y0, y1, tgt, 2.0)
    assert loss0.item() == pytest.approx(dice_loss(y1, tgt).item())
    assert loss2.item() == pytest.approx(parts["dice_loss"] + 2.0 * parts["kl"], rel=1e-6)


# --- self-prompt box ----------------------------------------------------------------------------

def test_box_from_logits_edge_cases():
    lg = torch.full((3, 1, 256, 256), -20.0)
    lg[1, 0, 10, 20] = 5.0  # one pixel at row 10, col 20
    lg[2] = 5.0  # whole image
    fallback = torch.tensor([[0.0, 0.0, 255.0, 191.0]]).expand(3, 4)
    boxes, empty = box_from_logits(lg, fallback, 256)
    assert empty.tolist() == [True, False, False]
    assert boxes[0].tolist() == [0.0, 0.0, 255.0, 191.0]  # empty y0 -> the fallback box
    assert boxes[1].tolist() == [20.0, 10.0, 20.0, 10.0]  # 1 low-res px = 1 model px at 256
    assert boxes[2].tolist() == [0.0, 0.0, 255.0, 255.0]
    boxes4, _ = box_from_logits(lg, fallback, 1024)  # SAM's 1024 input: a low-res px spans 4
    assert boxes4[1].tolist() == [80.0, 40.0, 83.0, 43.0]


def test_jitter_stays_inside_the_image_and_valid():
    boxes = torch.tensor([[0.0, 0.0, 255.0, 191.0], [100.0, 50.0, 101.0, 51.0]])
    limit = torch.tensor([[256.0, 192.0], [256.0, 192.0]])
    for _ in range(20):
        out = jitter_boxes(boxes, (torch.rand(2, 4) * 2 - 1) * 0.5, limit)
        assert (out[:, 0] >= 0).all() and (out[:, 1] >= 0).all()
        assert (out[:, 2] <= 256).all() and (out[:, 3] <= 192).all()
        assert (out[:, 2] > out[:, 0]).all() and (out[:, 3] > out[:, 1]).all()


# --- embedding cache -----------------------------------------------------------------------------

def _disk_images(n: int, size: int = 64, seed: int = 0, radius: tuple[float, float] = (4, 7)
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Small bright disks on a dark noisy background. Vanilla LiteMedSAM given the whole-image
    box (the fallback when y0 is empty) segments far more than the disk, so Dice starts low."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(12, size - 12), rng.uniform(12, size - 12), rng.uniform(*radius)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img = rng.normal(40, 10, (size, size)) + 150 * mask
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        masks.append(mask)
    return images, masks


def test_cache_key_tracks_content_and_preprocessing(lite_model):
    imgs, masks = _disk_images(2)
    a = Sample("a", imgs[0], masks[0], Intensity("generic"))
    key = cache_key(a, lite_model)
    assert cache_key(Sample("renamed", imgs[0].copy(), masks[1], Intensity("generic")), lite_model) == key
    assert cache_key(Sample("a", imgs[1], masks[0], Intensity("generic")), lite_model) != key
    assert cache_key(Sample("a", imgs[0], masks[0], Intensity("CT", -160, 240)), lite_model) != key
    assert cache_key(Sample("a", imgs[0].astype(np.int16), masks[0], Intensity("generic")), lite_model) != key


def test_cache_recomputes_when_preprocessing_changes(lite_model, tmp_path):
    imgs, masks = _disk_images(1)
    cache = DiskEmbeddingCache(tmp_path)
    s = Sample("a", imgs[0], masks[0], Intensity("generic"))
    first, _ = cache.embed(lite_model, [s])
    again, _ = cache.embed(lite_model, [s])
    assert (cache.misses, cache.hits) == (1, 1)
    assert torch.equal(first, again) and first.dtype == torch.float16
    windowed = Sample("a", imgs[0], masks[0], Intensity("generic", 60.0, 120.0))
    other, _ = cache.embed(lite_model, [windowed])
    assert cache.misses == 2
    assert not torch.allclose(other.float(), first.float())
    (next(tmp_path.rglob("*.pt"))).write_bytes(b"truncated")  # a broken entry is recomputed
    cache.embed(lite_model, [s, windowed])
    assert cache.misses == 3


# --- training ---------------------------------------------------------------------------------------

def _synthetic_cache(model, samples, tmp_path, seed=0) -> DiskEmbeddingCache:
    """Store random embeddings under the real keys: trainer plumbing without encoder time."""
    cache = DiskEmbeddingCache(tmp_path / "cache")
    g = torch.Generator().manual_seed(seed)
    for s in samples:
        cache.store(cache_key(s, model), torch.randn(256, 64, 64, generator=g) * 0.5)
    return cache


def test_tiny_overfit_really_learns(lite_model, tmp_path):
    imgs, masks = _disk_images(4)
    samples = array_samples(imgs, masks, Intensity("generic"))
    model = copy.deepcopy(lite_model)
    cache = DiskEmbeddingCache(tmp_path)
    cfg = TrainConfig(epochs=6, batch_size=4, lr=1e-3, warmup_steps=1, box_jitter=0.0, val_from=1)
    res = train(model, samples, samples, cfg, cache=cache, progress=False, log=lambda _: None)
    assert cache.misses == 4  # the encoder ran once per image; every later pass read the cache
    # Val scores as Auto-segment runs: where pass 1 finds nothing the output is empty (not the
    # fallback box's mask), so one step in nothing is found.
    assert res.history[0]["val"]["samsp"] == 0.0 and res.history[0]["val"]["fallback_rate"] == 1.0
    assert res.history[-1]["dice_loss"] < 0.3  # six steps later the box pass outlines the disks
    assert res.history[-1]["loss"] < res.history[0]["loss"] / 5


def test_resume_continues_exactly(lite_model, tmp_path):
    imgs, masks = _disk_images(2, size=32, seed=1, radius=(5, 9))
    samples = array_samples(imgs, masks, Intensity("generic"))
    cache = _synthetic_cache(lite_model, samples, tmp_path)
    cfg = TrainConfig(epochs=2, batch_size=2, warmup_steps=1)
    straight = train(copy.deepcopy(lite_model), samples, None, cfg, cache=cache, progress=False, log=lambda _: None)
    work = tmp_path / "work"
    _train_epochs(copy.deepcopy(lite_model), samples, cfg, work, cache, stop_after=1)  # "crash" after epoch 1
    resumed = train(copy.deepcopy(lite_model), samples, None, cfg, out_dir=work, resume=True, cache=cache,
                    progress=False, log=lambda _: None)
    a, b = straight.model.trainable_state(), resumed.model.trainable_state()
    assert len(resumed.history) == 2
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_model_selection_scores_the_second_half_by_default(lite_model, tmp_path):
    imgs, masks = _disk_images(2, size=32, seed=2, radius=(5, 9))
    samples = array_samples(imgs, masks, Intensity("generic"))
    cache = _synthetic_cache(lite_model, samples, tmp_path)
    scored = {}
    for val_from in (0, 1, 9):
        cfg = TrainConfig(epochs=4, batch_size=2, warmup_steps=1, val_from=val_from)
        res = train(copy.deepcopy(lite_model), samples, samples, cfg, cache=cache, progress=False, log=lambda _: None)
        scored[val_from] = [h["epoch"] for h in res.history if "val" in h]
        assert res.best_epoch in scored[val_from]
    assert scored == {0: [3, 4], 1: [1, 2, 3, 4], 9: [4]}  # a late start still scores the last epoch


def _train_epochs(model, samples, cfg, work, cache, stop_after: int) -> None:
    """Run ``cfg`` but abort after ``stop_after`` epochs, as a crash would (last.pt stays)."""

    class Stop(Exception):
        pass

    seen = []

    def log(line: str) -> None:
        seen.append(line)
        if len(seen) >= stop_after:
            raise Stop

    with pytest.raises(Stop):
        train(model, samples, None, cfg, out_dir=work, cache=cache, progress=False, log=log)
    assert (work / "last.pt").is_file()


# --- the encoder's top stages trained with the decoder (cpu mode) ---------------------------------------

def test_tinyvit_split_in_two_is_the_encoders_forward(lite_model):
    from SAMSelfPromptLib.modeling.backbones import tinyvit_tokens, tinyvit_top

    x = lite_model.normalize(torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(3)))
    enc = lite_model.image_encoder
    with torch.no_grad():
        tokens = tinyvit_tokens(enc, x, 3)
        assert tokens.shape == (1, 4096, 320)
        torch.testing.assert_close(tinyvit_top(enc, tokens, 3), enc(x), atol=1e-5, rtol=1e-5)


def test_encoder_fingerprint_follows_in_place_changes(lite_model):
    from SAMSelfPromptLib.training.embedding_cache import encoder_fingerprint

    model = copy.deepcopy(lite_model)
    before = encoder_fingerprint(model)
    assert encoder_fingerprint(model) == before  # cached while nothing changes
    with torch.no_grad():
        model.image_encoder.neck[0].weight.add_(1e-3)  # what an optimizer step does to a tuned stage
    assert encoder_fingerprint(model) != before


def test_training_the_encoders_top_stage_saves_loads_and_runs_it(lite_model, tmp_path):
    """encoder_from_stage=3: stage 3 and the neck train on cached stage-3 inputs, the earlier stages stay the
    base model's, the checkpoint carries the tuned tensors, and a loaded model encodes with them."""
    from SAMSelfPromptLib.training.api import train_samples
    from SAMSelfPromptLib.weights.checkpoint import load_samsp

    imgs, masks = _disk_images(4)
    samples = array_samples(imgs, masks, Intensity("generic"))
    cache = DiskEmbeddingCache(tmp_path / "cache")
    cfg = TrainConfig(epochs=2, batch_size=2, lr=1e-3, warmup_steps=1, val_from=1, encoder_from_stage=3,
                      encoder_lr=1e-3)
    with pytest.raises(ValueError, match="cpu mode"):
        train(copy.deepcopy(lite_model), samples, None, TrainConfig(mode="paper", encoder_from_stage=3),
              cache=cache, progress=False, log=lambda _: None)
    result, meta = train_samples(samples, samples[:2], tmp_path / "m.pt", cfg, copy.deepcopy(lite_model),
                                 cache=cache, progress=False, log=lambda _: None)
    shapes = [tuple(torch.load(f, weights_only=True).shape) for f in (tmp_path / "cache").rglob("*.pt")]
    assert shapes.count((4096, 320)) == 4  # what stage 3 receives, once per image: training's inputs
    assert (256, 64, 64) in shapes  # the inference encoder's embeddings of val, scored after training
    base, tuned = lite_model.state_dict(), result.model.state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert any(k.startswith("image_encoder.layers.3.") for k in changed)
    assert any(k.startswith("image_encoder.neck.") for k in changed)
    assert not any(k.startswith(("image_encoder.patch_embed.", "image_encoder.layers.2.")) for k in changed)
    assert meta["encoder_tuned_from"] == 3
    assert {"score", "presence_threshold"} <= set(meta["val_metrics"]) <= set(meta["val_metrics_training_path"])
    raw = torch.load(tmp_path / "m.pt", weights_only=True)["tensors"]
    assert any(k.startswith("image_encoder.layers.3.") for k in raw)
    assert not any(k.startswith("image_encoder.layers.2.") for k in raw)
    loaded, _ = load_samsp(tmp_path / "m.pt")
    assert set(loaded.trainable_state()) == set(result.model.trainable_state())  # saved again as trained
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got, vanilla = result.model.eval().encode(x), loaded.encode(x), lite_model.encode(x)
    tol = 0.02 if meta["fp16"] else 1e-5
    assert (got - want).norm() <= tol * want.norm()
    assert (got - vanilla).norm() > 10 * (got - want).norm()  # the tuned stages, not the base model's
    assert cache_key(samples[0], loaded) != cache_key(samples[0], lite_model)


# --- checkpoints ------------------------------------------------------------------------------------

def test_checkpoint_round_trip_with_lora(lite_model, tmp_path):
    from SAMSelfPromptLib.weights.checkpoint import load_samsp, save_samsp
    from SAMSelfPromptLib.modeling.lora import add_lora

    model = add_lora(copy.deepcopy(lite_model), rank=4, alpha=4.0)
    with torch.no_grad():  # make every trained tensor differ from the base model
        for name, p in model.named_parameters():
            if name.startswith(("prompt_encoder.", "mask_decoder.")) or "lora_" in name:
                p.add_(torch.randn_like(p) * 0.01)
    meta = {"lora": {"rank": 4, "alpha": 4.0}, "val_metrics": {"samsp": 0.5}, "modality": "RGB"}
    path = save_samsp(tmp_path / "m.pt", model, meta)
    raw = torch.load(path, weights_only=True)
    assert not any(k.startswith("image_encoder.") and "lora_" not in k for k in raw["tensors"])
    loaded, got_meta = load_samsp(path)
    assert got_meta == meta
    want = model.trainable_state()
    have = loaded.trainable_state()
    assert set(want) == set(have) and any("lora_" in k for k in have)
    assert all(torch.equal(want[k], have[k]) for k in want)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(model.eval().encode(x), loaded.encode(x), atol=1e-5)


# --- data-parallel paper mode -----------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = _paper_step()
        if rank == 0:
            torch.save(state, out_file)
    finally:
        dist.destroy_process_group()


def _paper_step() -> dict[str, torch.Tensor]:
    """One paper-mode step (LoRA + decoder) on a global batch of 2 tiny images.

    SGD, not Adam: Adam's first step is lr * sign(g), which turns float summation-order noise
    in near-zero gradients into +-lr differences; SGD keeps the comparison about the gradients."""
    from SAMSelfPromptLib.modeling.backbones import build_model

    imgs, masks = _disk_images(2, size=32, seed=3, radius=(5, 9))
    samples = array_samples(imgs, masks, Intensity("generic"))
    model = build_model()
    cfg = TrainConfig(mode="paper", epochs=1, batch_size=2, lr=0.01, warmup_steps=1, seed=5, optimizer="sgd")
    res = train(model, samples, None, cfg, progress=False, log=lambda _: None)
    return {k: v.detach().clone() for k, v in res.model.trainable_state().items()}


def test_ddp_two_gloo_processes_match_one(tmp_path):
    import torch.multiprocessing as mp

    from SAMSelfPromptLib.modeling.backbones import build_model

    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    single = _paper_step()
    base = build_model().state_dict()
    assert set(ddp) == set(single)
    lora_moved = [k for k in single if "lora_B" in k and single[k].abs().max() > 0]
    assert lora_moved, "paper mode must train the LoRA adapters"
    assert any(not torch.equal(single[k], base[k]) for k in single if k in base)
    worst = max((ddp[k] - single[k]).abs().max().item() for k in single)
    assert worst < 1e-5


def test_augmented_copies_move_image_and_mask_together():
    """--augment: seeded copies whose mask follows the image's geometry; val is never passed through it."""
    from SAMSelfPromptLib.core.preprocess import Intensity
    from SAMSelfPromptLib.training.augment import augmented_copies
    from SAMSelfPromptLib.training.data import Sample

    rng = np.random.default_rng(1)
    mask = np.zeros((60, 80), bool)
    mask[10:35, 20:70] = True
    rgb = np.where(mask[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)  # the mask, drawn in the picture
    rgb[..., 1:] = rng.integers(0, 256, (60, 80, 2))
    grey = np.where(mask, 1000, -500).astype(np.int16)
    samples = [Sample("rgb", rgb, mask, Intensity("RGB")), Sample("grey", grey, mask, Intensity())]
    out = augmented_copies(samples, 3, seed=7)
    assert [s.case_id for s in out[:4]] == ["rgb", "grey", "rgb#aug1", "grey#aug1"] and len(out) == 8
    assert all(a.image.dtype == b.image.dtype for a, b in zip(out[2:], samples * 3))
    for s in out[2:]:
        drawn = s.image[..., 0] > 127 if s.image.ndim == 3 else s.image > s.image.min() + (s.image.max() - s.image.min()) / 2
        assert np.array_equal(drawn, s.mask), s.case_id  # the same flips, turns and crop on both
        assert s.mask.shape[0] >= 45 or s.mask.shape[1] >= 45  # a crop keeps 75-100% of each side
    again = augmented_copies(samples, 3, seed=7)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(out, again))
