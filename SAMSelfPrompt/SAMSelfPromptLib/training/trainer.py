"""The SAM-SP trainer, in two modes that share one loop.

cpu mode:   the image encoder is frozen; embeddings come from the on-disk cache, so an
            epoch costs only decoder passes. Prompt encoder + mask decoder are trained.
            With ``encoder_from_stage`` K the encoder's TinyViT stages K.. and its neck train too, on
            cached inputs of stage K (the earlier stages stay frozen and run once per image).
paper mode: LoRA (rank 4) on the encoder's attention qkv, prompt encoder + mask decoder
            trained, the encoder runs every step (GPU), optionally data-parallel (DDP)
            when launched by torchrun.

Augmentation that fits cached embeddings: the embedding cannot be changed without
re-running the encoder, so we augment the prompt side instead. The self-prompt box fed
to pass 2 is jittered (each side moved by up to ``box_jitter`` of the box size), which
teaches y1 to recover from the imperfect boxes y0 gives at test time. Optionally
(``flip``) embeddings and targets are flipped together inside the valid (unpadded) area;
this is only approximate (the encoder is not flip-equivariant) and is off by default.

All randomness (shuffle, jitter, flips) is drawn per global batch from generators seeded by
(seed, epoch), so a resumed run and a 1- vs 2-process run see the same batches.
"""
from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..core.masks import dice
from ..evaluation.evaluate import full_boxes, samsp_logits, to_masks
from ..modeling.backbones import SamBackbone, autocast_for, tinyvit_top
from ..core.preprocess import Frame, mask_to_low_res
from ..core.selfprompt import box_from_logits
from .data import Sample
from .embedding_cache import DiskEmbeddingCache, check_cancel, model_input, sample_frame
from .losses import absence_loss, balanced_bce, dice_loss, presence_score_loss, samsp_loss


@dataclass
class TrainConfig:
    mode: str = "cpu"  # "cpu" (frozen encoder, cached embeddings) or "paper" (LoRA, encoder runs)
    # 8 epochs keep PH2 CPU-mode training, embedding caching included, inside 20 min on 2 cores
    # (12 epochs scored within seed noise of 8 but took 1.5x as long; see docs/RESULTS.md).
    epochs: int = 8
    batch_size: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9): linear in the gradients, used to compare DDP runs
    warmup_steps: int = 10
    alpha: float = 1.0  # weight of KL(y0 || y1)
    objective: str = "samsp"  # "samsp", or "single": Dice on y0 alone (the no_self_prompt ablation)
    box_jitter: float = 0.1
    flip: bool = False
    seed: int = 0
    lora_rank: int = 4
    lora_alpha: float = 4.0
    num_threads: int | None = None
    # First epoch (1-based) scored on val for model selection; 0 = the second half of the run
    # (epochs // 2 + 1). Under the cosine schedule no early epoch was ever the best in the PH2 runs,
    # and a val pass costs about 11 s of a 93 s CPU epoch. The last epoch is always scored.
    val_from: int = 0
    # Click training (cpu mode): up to this many simulated click rounds per step, each refining the
    # previous round's logits with the SAM-SP box, the clicks so far and the previous logits as mask
    # prompt; their Dice loss is added with click_weight. 0 = plain SAM-SP.
    click_rounds: int = 0
    click_weight: float = 1.0
    # Presence: images without the structure (negatives) train pass 1 to paint nothing
    # (losses.absence_loss, this weight), and the IoU head on pass 1 learns the presence score.
    negative_weight: float = 1.0
    presence_weight: float = 1.0
    # Decoder training precision on the CPU: "auto" runs it under bf16 autocast where the CPU has
    # native bf16 (2x faster per step here: 1.46 vs 2.86 s for a batch-4 two-pass step; the
    # losses stay fp32), else fp32. GPUs always use autocast.
    precision: str = "auto"
    # A class-balanced BCE of y0 against y (losses.balanced_bce) on the images with the structure, with
    # this weight, beside SAM-SP's KL (Adapt: few steps on few slices). The KL is a mean over all
    # pixels, so on a small structure it moves pass 1 off "empty" slowly; 0 keeps the plain SAM-SP loss.
    y0_weight: float = 0.0
    # cpu mode: also train the encoder's TinyViT stages from this one on, and its neck (0: the encoder stays
    # frozen). What the earlier stages hand that stage is cached once, as embeddings are, so an epoch costs
    # those stages' forward and backward on top of the decoder's (BUSI: 3, about 4.5 min an epoch here
    # against about 21 for LoRA on every stage). They train at ``encoder_lr``.
    encoder_from_stage: int = 0
    encoder_lr: float = 5e-5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    model: SamBackbone
    best_epoch: int
    best_val: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class SamSpStep(nn.Module):
    """Both SAM-SP passes as one forward, so DDP can wrap it (it syncs on forward/backward)."""

    def __init__(self, model: SamBackbone, encode: bool, top_from: int = 0):
        super().__init__()
        self.model = model
        self.encode = encode
        self.top_from = top_from  # > 0: the inputs are the tokens TinyViT stage top_from receives

    def forward(self, x: torch.Tensor, fallback: torch.Tensor, jitter: torch.Tensor, limit: torch.Tensor,
                single: bool = False, structure: torch.Tensor | None = None,
                positive: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """y0 and pass 1's presence score for the batch; y1 only for the ``positive`` images (all when
        None): on an image without the structure there is no box to learn from."""
        if self.encode:
            emb = self.model.encode(x)
        elif self.top_from:
            emb = tinyvit_top(self.model.image_encoder, x, self.top_from)
        else:
            emb = x
        y0, presence = self.model.decode(emb, structure=structure)
        if single:
            return y0, None, presence
        boxes, _ = box_from_logits(y0, fallback, self.model.image_size)
        if positive is not None:
            keep = torch.nonzero(positive).flatten()
            if not len(keep):
                return y0, None, presence
            emb, boxes, jitter, limit = emb[keep], boxes[keep], jitter[keep], limit[keep]
            structure = structure[keep] if structure is not None else None
        y1, _ = self.model.decode(emb, boxes=jitter_boxes(boxes, jitter, limit), structure=structure)
        return y0, y1, presence


def training_autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast for CPU training where the CPU has native bf16 (see TrainConfig.precision)."""
    if device.type == "cpu" and precision in ("auto", "bf16"):
        from ..modeling.backbones import cpu_has_native_bf16

        if precision == "bf16" or cpu_has_native_bf16():
            return torch.autocast("cpu", dtype=torch.bfloat16)
    return autocast_for(device, training=True)


def jitter_boxes(boxes: torch.Tensor, jitter: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Move each side by jitter (B x 4 in [-1, 1] x fraction) of the box size, clipped to the image."""
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    out = boxes + jitter.to(boxes) * torch.stack([w, h, w, h], dim=1)
    lim = limit.to(boxes)  # B x 2: (max x, max y) of the unpadded image
    x0 = out[:, 0].clamp(min=0.0).minimum(lim[:, 0] - 1)
    y0 = out[:, 1].clamp(min=0.0).minimum(lim[:, 1] - 1)
    x1 = torch.maximum(out[:, 2].minimum(lim[:, 0]), x0 + 1)
    y1 = torch.maximum(out[:, 3].minimum(lim[:, 1]), y0 + 1)
    return torch.stack([x0, y0, x1, y1], dim=1)


def _add_click_loss(model: SamBackbone, emb: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, y: torch.Tensor,
                    fallback: torch.Tensor, rounds: int, weight: float, loss: torch.Tensor,
                    parts: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """SAM-SP loss + weight * mean Dice loss over simulated click rounds started from y1.

    The refinement keeps the un-jittered self-prompt box, as inference does.
    """
    from ..core.clicks import simulate_refinement

    boxes, _ = box_from_logits(y0.detach(), fallback, model.image_size)
    refined = simulate_refinement(model, emb, boxes, y1, y, rounds)
    click = torch.stack([dice_loss(r, y) for r in refined]).mean()
    total = loss + weight * click
    return total, {**parts, "loss": float(total.detach()), "click_dice_loss": float(click.detach())}


def mark_trainable(model: SamBackbone) -> list[nn.Parameter]:
    """Prompt encoder, mask decoder, LoRA weights and any tuned top stages of the encoder train
    (``SamBackbone.is_trained_tensor``); the rest of the encoder is frozen."""
    params = []
    for name, p in model.named_parameters():
        train = model.is_trained_tensor(name)
        p.requires_grad_(train)
        if train:
            params.append(p)
    return params


def optimizer_groups(model: SamBackbone, config: TrainConfig) -> list[dict[str, Any]]:
    """The trainable tensors (``mark_trainable``): the encoder's tuned top stages at ``encoder_lr``, the
    rest (decoder, prompt encoder, LoRA) at ``lr``."""
    top, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (top if name.startswith("image_encoder.") and "lora_" not in name else rest).append(p)
    groups: list[dict[str, Any]] = [{"params": rest, "lr": config.lr}]
    if top:
        groups.append({"params": top, "lr": config.encoder_lr})
    return groups


def _flip_valid(x: torch.Tensor, frame: Frame, dim: int, full: int) -> torch.Tensor:
    """Flip x (C x H x W) along dim inside the unpadded area only (padding stays bottom/right)."""
    nh, nw = frame.new_hw
    n = math.ceil((nh if dim == 1 else nw) * x.shape[dim] / full)
    idx = torch.arange(x.shape[dim])
    idx[:n] = idx[:n].flip(0)
    return x.index_select(dim, idx)


class Batches:
    """Inputs for the loop: cached embeddings (cpu mode) or model inputs (paper mode), plus targets."""

    def __init__(self, samples: Sequence[Sample], model: SamBackbone, mode: str, cache: DiskEmbeddingCache | None,
                 progress: bool, cancel: threading.Event | None = None, stage: int | None = None):
        """``stage``: cpu mode's inputs are the tokens that TinyViT stage receives, not embeddings."""
        self.frames = [sample_frame(s, model.image_size) for s in samples]
        if mode == "cpu":
            self.inputs, _ = (cache or DiskEmbeddingCache()).embed(model, samples, progress=progress, desc="caching embeddings",
                                                                   cancel=cancel, stage=stage)
        else:
            self.inputs = torch.stack([model_input(s, model.image_size)[0] for s in samples]).to(torch.float16)
        self.targets = torch.stack([mask_to_low_res(s.mask, f) for s, f in zip(samples, self.frames)])
        self.structures = torch.tensor([s.structure for s in samples], dtype=torch.long)
        self.fallback = full_boxes(self.frames)
        self.limit = torch.tensor([[f.new_hw[1], f.new_hw[0]] for f in self.frames], dtype=torch.float32)
        self.full = model.image_size

    def get(self, idx: Sequence[int], flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for i, (fh, fv) in zip(idx, flips.tolist()):
            x, y = self.inputs[i].float(), self.targets[i]
            for flag, dim in ((fh, 2), (fv, 1)):
                if flag:
                    x = _flip_valid(x, self.frames[i], dim, self.full)
                    y = _flip_valid(y, self.frames[i], dim, self.full)
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.stack(ys)


def presence_aware_loss(y0: torch.Tensor, y1: torch.Tensor | None, presence: torch.Tensor, y: torch.Tensor,
                        positive: torch.Tensor, config: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """SAM-SP's loss on the images with the structure, the absence loss on those without, and the
    presence score on all, each part weighted by its share of the batch."""
    n = len(y0)
    n_pos = int(positive.sum())
    loss = y0.new_zeros(())
    parts: dict[str, float] = {}
    if n_pos and y1 is not None:
        pos_loss, parts = samsp_loss(y0[positive], y1, y[positive], config.alpha)
        if config.y0_weight:
            b0 = balanced_bce(y0[positive], y[positive])
            pos_loss = pos_loss + config.y0_weight * b0
            parts["y0_bce"] = float(b0.detach())
        loss = loss + pos_loss * (n_pos / n)
    if n_pos < n and config.negative_weight:
        neg = absence_loss(y0[~positive])
        loss = loss + config.negative_weight * neg * ((n - n_pos) / n)
        parts["absence"] = float(neg.detach())
    if config.presence_weight:
        pres = presence_score_loss(presence, y0, y)
        loss = loss + config.presence_weight * pres
        parts["presence"] = float(pres.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts


# Candidate presence thresholds (pass 1's predicted IoU), chosen on val with the epoch.
PRESENCE_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)


@torch.no_grad()
def evaluate_val(model: SamBackbone, samples: Sequence[Sample], emb: torch.Tensor, frames: Sequence[Frame],
                 thresholds: Sequence[float] = PRESENCE_THRESHOLDS) -> dict[str, float]:
    """The model-selection numbers on the slice grid, at the presence threshold that scores best.

    samsp / samsp_y0: mean Dice on images with the structure; fp_rate: the share of images without
    it where anything is painted; score: the mean over all images of Dice (a negative scores 1 when
    left empty, else 0), which is what selection maximises. Without negatives score == samsp.
    """
    structures = torch.tensor([s.structure for s in samples], dtype=torch.long)
    logits = samsp_logits(model, emb, frames, structures=structures)
    y1 = to_masks(logits["samsp"], frames)
    y0 = to_masks(logits["samsp_y0"], frames)
    presence = logits["presence"][:, 0].numpy()
    has = np.array([s.has_label for s in samples])
    d1 = np.array([dice(p, s.mask) for p, s in zip(y1, samples)])
    d0 = np.array([dice(p, s.mask) for p, s in zip(y0, samples)])
    painted = np.array([p.any() for p in y1])
    y0_found = np.array([p.any() for p in y0])
    best: dict[str, float] | None = None
    for t in thresholds:
        kept = y0_found & ((presence >= t) | (t <= 0))  # the inference rule (selfprompt.absent)
        per = np.where(kept, d1, np.where(has, 0.0, 1.0))
        out = {"samsp": float(per[has].mean()) if has.any() else float("nan"),
               "samsp_y0": float(np.where(kept, d0, 0.0)[has].mean()) if has.any() else float("nan"),
               "fp_rate": float((kept & painted)[~has].mean()) if (~has).any() else 0.0,
               "score": float(per.mean()), "presence_threshold": float(t),
               "n_negative": int((~has).sum())}
        if best is None or out["score"] > best["score"] + 1e-9:
            best = out
    assert best is not None
    best["fallback_rate"] = float(logits["fallback"].mean())
    if int(structures.max()) > 0:  # one Dice per structure of a multi-structure target
        for k in range(int(structures.max()) + 1):
            sel = (structures.numpy() == k) & has
            kept = y0_found & ((presence >= best["presence_threshold"]) | (best["presence_threshold"] <= 0))
            best[f"samsp_structure{k}"] = float(np.where(kept, d1, 0.0)[sel].mean()) if sel.any() else float("nan")
    return best


@torch.no_grad()
def top_embeddings(model: SamBackbone, tokens: torch.Tensor, stage: int, batch: int = 8) -> torch.Tensor:
    """Embeddings from cached stage-``stage`` tokens through the model's (training) top stages and neck, under
    the training step's autocast. Model selection scores these; the saved model is then scored again on the
    inference encoder's own embeddings (training/api.py)."""
    out = []
    for i in range(0, len(tokens), batch):
        with training_autocast(model.device):
            out.append(tinyvit_top(model.image_encoder, tokens[i:i + batch].float().to(model.device), stage).float().cpu())
    return torch.cat(out)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train(
    model: SamBackbone,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample] | None,
    config: TrainConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    cache: DiskEmbeddingCache | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    cancel: threading.Event | None = None,
) -> TrainResult:
    """Train SAM-SP in place on ``model``; returns it with the best-val weights loaded.

    Without val samples the last epoch is kept. ``out_dir`` receives log.jsonl and
    last.pt (everything needed to resume: weights, optimizer, scheduler, epoch, best).
    ``cancel`` goes to the embedding cache (see ``DiskEmbeddingCache.embed``) and is also checked
    before every step, raising ``errors.Cancelled``.
    """
    t_start = time.time()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    rank, world = _dist()
    torch.manual_seed(config.seed)  # before add_lora: the adapters' init must not depend on earlier draws
    if config.mode == "paper":
        from ..modeling.lora import add_lora, has_lora

        if not has_lora(model):
            add_lora(model, rank=config.lora_rank, alpha=config.lora_alpha)
    elif config.mode != "cpu":
        raise ValueError(f"unknown training mode '{config.mode}' (cpu or paper)")
    if config.click_rounds and (config.mode != "cpu" or world > 1 or config.objective != "samsp"):
        raise ValueError("click training runs in single-process cpu mode with the samsp objective")
    top_from = config.encoder_from_stage or None
    if top_from is not None:
        if config.mode != "cpu" or config.click_rounds or config.flip:
            raise ValueError("training the encoder's top stages (encoder_from_stage) runs in cpu mode, "
                             "without click rounds or flipped embeddings")
        model.tune_encoder_from(top_from)
    if config.batch_size % world:
        raise ValueError(f"batch size {config.batch_size} must be divisible by the {world} processes")
    device = model.device
    model.eval()  # BatchNorm in the encoder keeps its statistics (LoRA tunes weights, not stats)
    mark_trainable(model)
    cache = cache or DiskEmbeddingCache()
    if config.mode == "cpu":  # fill the cache in one pass: one encoder copy, one progress bar
        cache.embed(model, [*train_samples, *(val_samples or [])], progress=progress and rank == 0,
                    desc="caching embeddings" if top_from is None else f"caching stage-{top_from} inputs",
                    cancel=cancel, stage=top_from)
    data = Batches(train_samples, model, config.mode, cache, progress and rank == 0, cancel=cancel, stage=top_from)
    val_emb = val_frames = val_tokens = None
    if val_samples and config.mode == "cpu":
        val_emb, val_frames = cache.embed(model, val_samples, cancel=cancel, stage=top_from)
        if top_from is not None:  # the tuned stages change every step: val embeddings are made per val pass
            val_tokens, val_emb = val_emb, None
    step_module: nn.Module = SamSpStep(model, encode=config.mode == "paper", top_from=top_from or 0)
    if world > 1:
        # Unused: point embeddings, the 3 multimask heads, the IoU head. Without this flag their
        # buckets never reduce and the others' gradients stay local (silently wrong).
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    groups = optimizer_groups(model, config)
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    n = len(train_samples)
    steps_per_epoch = max(1, n // config.batch_size)
    total = steps_per_epoch * config.epochs
    warm = min(config.warmup_steps, max(1, total // 10))

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    first_val = min(config.val_from or config.epochs // 2 + 1, config.epochs)
    history: list[dict[str, Any]] = []
    best = {"epoch": -1, "val": {"score": -1.0}, "state": None}
    start_epoch = 0
    out = Path(out_dir) if out_dir else None
    if out and resume and (out / "last.pt").is_file():
        ck = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(ck["trainable"], strict=False)
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start_epoch, history = ck["epoch"] + 1, json.loads(ck["history"])
        best = {"epoch": ck["best_epoch"], "val": json.loads(ck["best_val"]), "state": ck["best_state"] or None}
        log(f"resumed from {out / 'last.pt'} at epoch {start_epoch}")

    for epoch in range(start_epoch, config.epochs):
        t0 = time.time()
        gen = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        perm = torch.randperm(n, generator=gen)
        sums: dict[str, float] = {}
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", leave=False)
        for s in range(steps_per_epoch):
            check_cancel(cancel)
            idx = perm[s * config.batch_size:(s + 1) * config.batch_size]
            jit = (torch.rand(len(idx), 4, generator=gen) * 2 - 1) * config.box_jitter
            flips = (torch.rand(len(idx), 2, generator=gen) < 0.5) & config.flip
            per = len(idx) // world  # this process's share of the global batch
            mine = slice(rank * per, (rank + 1) * per)
            x, y = data.get(idx[mine].tolist(), flips[mine])
            x, y = x.to(device), y.to(device)
            structure = data.structures[idx[mine]].to(device)
            positive = y.flatten(1).any(1)
            # bf16 on the CPU only for cpu mode (the decoder on cached embeddings); paper mode on a CPU stays
            # fp32, as do the 1- vs 2-process DDP runs that must match (test_training).
            with training_autocast(device, config.precision if config.mode == "cpu" else "fp32"):
                y0, y1, presence = step_module(x, data.fallback[idx[mine]].to(device), jit[mine].to(device),
                                               data.limit[idx[mine]].to(device), single=config.objective == "single",
                                               structure=structure, positive=positive)
            if config.objective == "single":
                loss = dice_loss(y0, y)
                parts = {"loss": float(loss.detach()), "dice_loss": float(loss.detach())}
            else:
                loss, parts = presence_aware_loss(y0, y1, presence, y, positive, config)
                if config.click_rounds and y1 is not None:
                    rounds = int(torch.randint(1, config.click_rounds + 1, (1,), generator=gen))
                    loss, parts = _add_click_loss(model, x[positive], y0[positive], y1, y[positive],
                                                  data.fallback[idx[mine]].to(device)[positive],
                                                  rounds, config.click_weight, loss, parts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if bar is not None:
                bar.set_postfix(loss=f"{parts['loss']:.3f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        entry: dict[str, Any] = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()},
                                 "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 1)}
        if val_samples and epoch + 1 >= first_val:
            if config.mode == "paper":  # the encoder changed: embed val afresh (no cache)
                with torch.no_grad(), autocast_for(device, training=True):
                    val_emb = torch.cat([model.encode(torch.stack([model_input(s, model.image_size)[0]
                                                                   for s in val_samples[i:i + 8]]).to(device)).float().cpu()
                                         for i in range(0, len(val_samples), 8)])
                val_frames = [sample_frame(s, model.image_size) for s in val_samples]
            elif val_tokens is not None:
                val_emb = top_embeddings(model, val_tokens, top_from)
            val = evaluate_val(model, val_samples, val_emb, val_frames)
            entry["val"] = val
            if val["score"] > best["val"].get("score", -1.0):
                best = {"epoch": epoch + 1, "val": val,
                        "state": {k: v.detach().cpu().clone() for k, v in model.trainable_state().items()}}
        history.append(entry)
        if rank == 0:
            if out:  # saved before logging, so an interrupt after this line loses nothing
                out.mkdir(parents=True, exist_ok=True)
                with open(out / "log.jsonl", "a") as fh:
                    fh.write(json.dumps(entry) + "\n")
                _save_resume(out, model, opt, sched, epoch, history, best)
            log(json.dumps(entry))
    if best["state"] is not None:
        model.load_state_dict(best["state"], strict=False)
    else:
        best["epoch"] = len(history)
    return TrainResult(model, int(best["epoch"]), dict(best["val"]), history, time.time() - t_start)


def _save_resume(out: Path, model: SamBackbone, opt, sched, epoch: int, history: list, best: dict) -> None:
    from ..io.files import atomic_write

    payload = {
        "trainable": {k: v.detach().cpu() for k, v in model.trainable_state().items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": epoch,
        "history": json.dumps(history),
        "best_epoch": int(best["epoch"]),
        "best_val": json.dumps(best["val"]),
        "best_state": best["state"] if best["state"] is not None else {},
    }
    atomic_write(out / "last.pt", lambda tmp: torch.save(payload, tmp), overwrite=True)
