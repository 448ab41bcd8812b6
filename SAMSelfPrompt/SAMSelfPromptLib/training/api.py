"""The Python API hosts call to train: from a folder, a volume, or arrays (Slicer nodes).

``train_samples`` is the one entry point; the others build samples and call it. It trains,
picks the best epoch on val Dice, decides fp16 vs fp32 storage (fp16 only when val Dice moves
by at most ``HALF_TOLERANCE``), and writes a SAM-SP checkpoint whose metadata records what
was trained on, how, and how well.
"""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..weights.checkpoint import load_samsp, save_samsp
from ..modeling.backbones import SamBackbone, build_model, pick_device
from ..core.preprocess import Intensity
from .data import Sample, array_samples
from .embedding_cache import DiskEmbeddingCache
from .trainer import TrainConfig, TrainResult, evaluate_val
from .trainer import train as run_training

HALF_TOLERANCE = 0.002


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def base_model(checkpoint: str | Path | None, model_id: str = "litemedsam", device: str | None = None) -> SamBackbone:
    """Vanilla backbone, or a SAM-SP checkpoint to continue from (few-shot, fine-tuning)."""
    model = load_samsp(checkpoint)[0] if checkpoint else build_model(model_id)
    return model.to(pick_device(device))


def _val_dice_with(model: SamBackbone, state: dict[str, torch.Tensor], val: Sequence[Sample],
                   cache: DiskEmbeddingCache,
                   cancel: threading.Event | None = None) -> dict[str, float]:
    keep = {k: v.clone() for k, v in model.trainable_state().items()}
    model.load_state_dict(state, strict=False)
    emb, frames = cache.embed(model, val, cancel=cancel)
    out = evaluate_val(model, val, emb, frames)
    model.load_state_dict(keep, strict=False)
    return out


def train_samples(
    train: Sequence[Sample],
    val: Sequence[Sample] | None,
    out: str | Path | None,
    config: TrainConfig | None = None,
    model: SamBackbone | None = None,
    data_summary: dict[str, Any] | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    half: str = "auto",
    cache: DiskEmbeddingCache | None = None,
    progress: bool = True,
    extra_metadata: dict[str, Any] | None = None,
    log=print,
    cancel: threading.Event | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Train SAM-SP and (if ``out``) save the checkpoint; returns the result and its metadata.

    ``cancel`` (checked between images and steps; raises ``errors.Cancelled`` before anything is saved)
    goes to the trainer.
    """
    config = config or TrainConfig()
    cache = cache or DiskEmbeddingCache()
    model = model or build_model()
    if not train:
        raise ValueError("no training samples")
    intensity = train[0].intensity
    result = run_training(model, train, val, config, out_dir=work_dir, resume=resume, cache=cache,
                          progress=progress, log=log, cancel=cancel)
    use_half = half == "yes"
    half_check = None
    val_metrics = result.best_val
    if val and config.mode == "cpu" and config.encoder_from_stage:
        # Selection scored the training step's top stages (module under autocast) on cached tokens; what
        # Auto-segment runs is the inference encoder's folded copy of the tuned weights. Score that, and keep
        # its presence threshold.
        val_metrics = _val_dice_with(result.model, result.model.trainable_state(), val, cache, cancel)
    if half == "auto" and val and config.mode == "cpu":
        state16 = {k: v.half().float() for k, v in result.model.trainable_state().items()}
        half_check = _val_dice_with(result.model, state16, val, cache, cancel)
        use_half = abs(half_check["score"] - val_metrics["score"]) <= HALF_TOLERANCE
    meta: dict[str, Any] = {
        "modality": intensity.modality,
        "intensity": intensity.to_dict(),
        "intensity_note": _intensity_note(intensity),
        "input_size": result.model.image_size,
        "base_model": result.model.spec.model_id,
        "mode": config.mode,
        "train_config": config.to_dict(),
        "optimizer": {"name": "AdamW" if config.optimizer == "adamw" else "SGD (momentum 0.9)", "lr": config.lr, "weight_decay": config.weight_decay,
                      "schedule": f"linear warm-up {config.warmup_steps} steps, cosine to 0"},
        "loss": f"Dice(y1, y) + {config.alpha} * KL(y0 || y1), teacher y1 detached, KL in logit space"
        if config.objective == "samsp" else "Dice(y0, y) only (no self-prompt ablation)",
        "data": data_summary or {"n_train": len(train), "n_val": len(val or [])},
        "best_epoch": result.best_epoch,
        "val_metrics": val_metrics,
        "history": result.history,
        "train_seconds": round(result.seconds, 1),
        "fp16": use_half,
        "fp16_val_metrics": half_check,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "empty_y0_fallback": "whole-image box",
        # Pass 1's predicted IoU below this means "structure absent" (selfprompt.absent), chosen on val.
        "presence_threshold": float(val_metrics.get("presence_threshold", 0.0)),
        "negatives": {"n_train": sum(not s.has_label for s in train),
                      "loss": f"{config.negative_weight} * BCE toward 0 of the top 2% pass-1 logits",
                      "presence": f"{config.presence_weight} * MSE of pass 1's IoU head to its mask's IoU (0 if absent)"},
    }
    if result.model.n_structures > 1:
        meta["n_structures"] = result.model.n_structures
    if result.model.encoder_tuned_from is not None:
        meta["encoder_tuned_from"] = result.model.encoder_tuned_from
        meta["val_metrics_training_path"] = result.best_val
    if config.mode == "paper":
        meta["lora"] = {"rank": config.lora_rank, "alpha": config.lora_alpha, "target": "image_encoder qkv"}
    meta.update(extra_metadata or {})
    if out:
        save_samsp(out, result.model, _plain(meta), half=use_half)
        log(f"saved {out} (fp16={use_half}, best epoch {result.best_epoch}, val {result.best_val})")
    return result, meta


def _intensity_note(intensity: Intensity) -> str:
    if intensity.modality == "RGB":
        return "RGB used as is, per-image min-max to [0, 1]"
    if intensity.low is not None:
        return f"clip to [{intensity.low}, {intensity.high}] then per-slice min-max to [0, 1]"
    return "per-slice min-max to [0, 1]"


def _plain(value: Any) -> Any:
    """Metadata must load with weights_only=True: only str/number/bool/None/list/dict."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def train_from_arrays(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    intensity: Intensity,
    out: str | Path | None = None,
    config: TrainConfig | None = None,
    val_fraction: float = 0.2,
    checkpoint: str | Path | None = None,
    device: str | None = None,
    progress: bool = False,
) -> tuple[TrainResult, dict[str, Any]]:
    """Train from 2D arrays (e.g. the labelled slices of a user's segmentation node).

    A seeded ``val_fraction`` of the slices is held out for model selection when there are
    at least 5; fewer slices train on all and keep the last epoch.
    """
    samples = array_samples(images, masks, intensity)
    config = config or TrainConfig()
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(samples))
    n_val = int(round(len(samples) * val_fraction)) if len(samples) >= 5 else 0
    val = [samples[i] for i in order[:n_val]]
    tr = [samples[i] for i in order[n_val:]]
    return train_samples(tr, val or None, out, config, base_model(checkpoint, device=device),
                         {"source": "arrays", "n_train": len(tr), "n_val": len(val)}, progress=progress)


# The checkpoint metadata a summary repeats, for readers that must not load the checkpoint (`models`, the hosts' menus).
SUMMARY_METADATA_KEYS = (
    "modality", "intensity", "intensity_note", "input_size", "base_model", "mode", "train_config", "optimizer", "loss",
    "best_epoch", "val_metrics", "train_seconds", "fp16", "git_commit", "created", "empty_y0_fallback",
    "presence_threshold", "negatives", "n_structures", "target", "method", "encoder_tuned_from",
    "val_metrics_training_path")


def write_summary(checkpoint: str | Path, json_path: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The small human-readable JSON shipped beside a checkpoint: what it is and how well it did."""
    import json

    from ..io.files import sha256_of, write_text_atomic
    from ..weights.checkpoint import read_samsp

    meta = read_samsp(checkpoint)["metadata"]
    summary = {k: meta[k] for k in SUMMARY_METADATA_KEYS if meta.get(k) is not None}  # absent stays absent
    data = dict(meta.get("data", {}))
    data.pop("train_ids", None)
    summary["data"] = data
    summary["file"] = Path(checkpoint).name
    summary["sha256"] = sha256_of(checkpoint)
    summary.update(extra or {})
    write_text_atomic(json_path, json.dumps(_plain(summary), indent=1) + "\n")
    return summary
