"""ProMISe training (``samselfprompt train --method promise``): APM + IPS on a frozen backbone.

Only ``model.promise`` (modeling/promise.py) trains; every backbone tensor keeps requires_grad
False and is never handed to the optimizer, so the image encoder, prompt encoder and mask decoder
stay bit-identical (Testing/test_promise.py checks it). As in SAM-SP's cpu mode, the embeddings
come from the on-disk cache (the same bf16 fast-encoder embeddings inference uses), so an epoch
costs one APM pass and one decoder pass per image.

Loss per batch:
  APM:  BCE + Dice of its 64 x 64 map against the ground truth average-pooled to the grid, on every
        image (images without the structure teach it to find nothing: presence);
  IPS:  Dice + BCE of the decoder output against the 256 x 256 target, on images with the structure,
        prompted with points read off the (detached) APM map or, for a ``gt_point_fraction`` of them
        (and wherever APM finds nothing yet), points sampled from the ground truth, so IPS learns
        both the prompt-free and the paper's promptable mode.
AdamW, linear warm-up then cosine to 0; the epoch with the best val Dice of the prompt-free
output is kept (scored from the second half of the run, as SAM-SP).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.masks import dice
from ..core.promise import apm_points, gt_points, promise_decode, promise_prompt
from ..evaluation.evaluate import full_boxes, to_masks
from ..modeling.backbones import EMBED_HW, SamBackbone
from ..modeling.promise import DEFAULT_CONFIG, attach_promise, has_promise
from ..weights.checkpoint import save_samsp
from .data import Sample
from .embedding_cache import DiskEmbeddingCache, check_cancel
from .losses import dice_loss
from .trainer import Batches, TrainResult


@dataclass
class PromiseConfig:
    epochs: int = 8
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    gt_point_fraction: float = 0.25
    apm_weight: float = 1.0
    seed: int = 0
    val_from: int = 0  # first epoch scored on val; 0 = the second half of the run
    apm_channels: int = int(DEFAULT_CONFIG["apm_channels"])
    ips_hidden: int = int(DEFAULT_CONFIG["ips_hidden"])
    n_points: int = int(DEFAULT_CONFIG["n_points"])
    num_threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def head_config(self) -> dict[str, Any]:
        return {"apm_channels": self.apm_channels, "ips_hidden": self.ips_hidden, "n_points": self.n_points}


def _bce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target.float()) + dice_loss(logits, target)


@torch.no_grad()
def promise_val(model: SamBackbone, samples: Sequence[Sample], emb: torch.Tensor, frames, batch: int = 8
                ) -> dict[str, float]:
    """Mean Dice of the prompt-free output on images with the structure; empty rate on those without."""
    outs = []
    fb = full_boxes(frames)
    for s in range(0, len(samples), batch):
        outs.append(promise_prompt(model, emb[s:s + batch].to(model.device, torch.float32),
                                   fb[s:s + batch].to(model.device)).y1.cpu())
    preds = to_masks(torch.cat(outs), frames)
    pos = [dice(p, s.mask) for p, s in zip(preds, samples) if s.mask.any()]
    neg = [not p.any() for p, s in zip(preds, samples) if not s.mask.any()]
    out = {"promise": float(np.mean(pos)) if pos else float("nan")}
    if neg:
        out["negative_empty_rate"] = float(np.mean(neg))
    return out


def train_promise(
    model: SamBackbone,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample] | None,
    config: PromiseConfig,
    cache: DiskEmbeddingCache | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    cancel: threading.Event | None = None,
) -> TrainResult:
    """Attach and train APM + IPS in place on ``model``; returns it with the best-val modules loaded."""
    t_start = time.time()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if not has_promise(model):
        attach_promise(model, config.head_config())
    params = list(model.promise.parameters())
    for p in params:
        p.requires_grad_(True)
    device = model.device
    cache = cache or DiskEmbeddingCache()
    cache.embed(model, [*train_samples, *(val_samples or [])], progress=progress, desc="caching embeddings",
                cancel=cancel)
    data = Batches(train_samples, model, "cpu", cache, False, cancel=cancel)
    val_emb = val_frames = None
    if val_samples:
        val_emb, val_frames = cache.embed(model, val_samples, cancel=cancel)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    n = len(train_samples)
    steps_per_epoch = max(1, n // config.batch_size)
    total = steps_per_epoch * config.epochs
    warm = min(config.warmup_steps, max(1, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    first_val = min(config.val_from or config.epochs // 2 + 1, config.epochs)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": -1, "val": {"promise": -1.0}, "state": None}
    for epoch in range(config.epochs):
        t0 = time.time()
        gen = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        rng = np.random.default_rng(config.seed * 1000 + epoch)
        perm = torch.randperm(n, generator=gen)
        sums: dict[str, float] = {}
        for s in range(steps_per_epoch):
            check_cancel(cancel)
            idx = perm[s * config.batch_size:(s + 1) * config.batch_size].tolist()
            x, y = data.get(idx, torch.zeros(len(idx), 2, dtype=torch.bool))
            x, y = x.to(device), y.to(device)
            fb = data.fallback[idx].to(device)
            apm, a_coords, a_labels, a_empty = apm_points(model, x, fb)
            loss_apm = _bce_dice(apm, F.adaptive_avg_pool2d(y, EMBED_HW))
            loss = config.apm_weight * loss_apm
            parts = {"apm_loss": float(loss_apm.detach())}
            pos = torch.nonzero(y.flatten(1).any(1)).flatten()
            if len(pos):
                g_coords, g_labels, _ = gt_points(model, y[pos], fb[pos], rng)
                use_gt = torch.from_numpy(rng.random(len(pos)) < config.gt_point_fraction).to(device) | a_empty[pos]
                coords = torch.where(use_gt[:, None, None], g_coords, a_coords[pos])
                labels = torch.where(use_gt[:, None], g_labels, a_labels[pos])
                out, _ = promise_decode(model, x[pos], coords, labels)
                loss_ips = _bce_dice(out, y[pos])
                loss = loss + loss_ips
                parts["ips_loss"] = float(loss_ips.detach())
            parts["loss"] = float(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        entry: dict[str, Any] = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()},
                                 "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 1)}
        if val_samples and epoch + 1 >= first_val:
            val = promise_val(model, val_samples, val_emb, val_frames)
            entry["val"] = val
            if val["promise"] > best["val"]["promise"]:
                best = {"epoch": epoch + 1, "val": val,
                        "state": {k: v.detach().cpu().clone() for k, v in model.promise.state_dict().items()}}
        history.append(entry)
        log(str(entry))
    if best["state"] is not None:
        model.promise.load_state_dict(best["state"])
    else:
        best["epoch"] = len(history)
    for p in params:
        p.requires_grad_(False)
    return TrainResult(model, int(best["epoch"]), dict(best["val"]), history, time.time() - t_start)


def train_promise_samples(
    train: Sequence[Sample],
    val: Sequence[Sample] | None,
    out: str | Path | None,
    config: PromiseConfig | None = None,
    model: SamBackbone | None = None,
    data_summary: dict[str, Any] | None = None,
    cache: DiskEmbeddingCache | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[TrainResult, dict[str, Any]]:
    """Train ProMISe and (if ``out``) write a checkpoint in SAM-SP's format with ``"method": "promise"``."""
    from ..modeling.backbones import build_model
    from .api import _intensity_note, _plain, git_commit

    config = config or PromiseConfig()
    if not train:
        raise ValueError("no training samples")
    model = model or build_model()
    result = train_promise(model, train, val, config, cache, progress, log)
    intensity = train[0].intensity
    meta: dict[str, Any] = {
        "method": "promise",
        "promise": result.model.promise.config,
        "modality": intensity.modality,
        "intensity": intensity.to_dict(),
        "intensity_note": _intensity_note(intensity),
        "input_size": result.model.image_size,
        "base_model": result.model.spec.model_id,
        "mode": "cpu",
        "train_config": config.to_dict(),
        "optimizer": {"name": "AdamW", "lr": config.lr, "weight_decay": config.weight_decay,
                      "schedule": f"linear warm-up {config.warmup_steps} steps, cosine to 0"},
        "loss": "APM: BCE + Dice on the 64x64 grid; IPS: Dice + BCE of the decoder output "
                f"(points from APM, or from the ground truth for {config.gt_point_fraction:.0%}); backbone frozen",
        "data": data_summary or {"n_train": len(train), "n_val": len(val or [])},
        "best_epoch": result.best_epoch,
        "val_metrics": result.best_val,
        "history": result.history,
        "train_seconds": round(result.seconds, 1),
        "fp16": False,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "empty_y0_fallback": "APM finds no object cell: empty output, no decoder pass",
    }
    if out:
        save_samsp(out, result.model, _plain(meta))
        log(f"saved {out} (best epoch {result.best_epoch}, val {result.best_val})")
    return result, meta
