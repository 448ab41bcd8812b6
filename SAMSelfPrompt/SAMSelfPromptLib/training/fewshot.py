"""Few-shot adaptation: k annotated slices of one volume -> fine-tune (cpu mode) -> segment the rest.

The encoder stays frozen, so the volume is embedded once (that cost is inference, which
the user pays anyway) and the fine-tuning is decoder passes on k cached embeddings. The budget is
fixed at ``steps`` single-slice decoder steps whatever k is, so the time does not grow with
k: about 40 s on 2 loaded CPU threads (measured, docs/RESULTS.md).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ..evaluation.evaluate import EvalResult, samsp_logits, to_masks
from ..modeling.backbones import SamBackbone
from ..core.preprocess import Intensity
from .data import volume_samples
from .embedding_cache import DiskEmbeddingCache
from .trainer import TrainConfig, train


@dataclass
class FewShotResult:
    masks: np.ndarray  # K x J x I bool: the annotated slices keep the user's masks
    model: SamBackbone
    train_seconds: float
    annotated: list[int]


def pick_slices(mask3d: np.ndarray, k: int) -> list[int]:
    """k annotated slices spread evenly over the slices that contain the structure."""
    labeled = np.flatnonzero(mask3d.reshape(mask3d.shape[0], -1).any(1))
    if len(labeled) < k:
        raise ValueError(f"only {len(labeled)} slices contain the label; cannot annotate {k}")
    pos = [(i + 0.5) * len(labeled) / k for i in range(k)]
    return [int(labeled[int(p)]) for p in pos]


def fewshot_segment(
    model: SamBackbone,
    image: np.ndarray,
    annotations: dict[int, np.ndarray],
    intensity: Intensity,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    steps: int = 40,
    batch_size: int = 1,
    config: TrainConfig | None = None,
    cache: DiskEmbeddingCache | None = None,
) -> FewShotResult:
    """Fine-tune ``model`` (in place) on ``annotations`` {slice k: J x I mask} and segment every slice."""
    cache = cache or DiskEmbeddingCache()
    ks = sorted(annotations)
    mask3d = np.zeros(image.shape, bool)
    for k in ks:
        mask3d[k] = np.asarray(annotations[k], bool)
    samples = volume_samples(image, mask3d, [True], intensity, spacing, "fewshot")
    emb, frames = cache.embed(model, samples)  # every slice: needed for segmenting anyway
    train_set = [samples[k] for k in ks]
    bs = min(batch_size, len(ks))
    epochs = max(1, math.ceil(steps / max(1, len(ks) // bs)))
    cfg = replace(config or TrainConfig(), mode="cpu", epochs=epochs, batch_size=bs, warmup_steps=2)
    t0 = time.time()
    train(model, train_set, None, cfg, cache=cache, progress=False, log=lambda _: None)
    seconds = time.time() - t0
    pred = np.stack(to_masks(samsp_logits(model, emb, frames)["samsp"], frames))
    for k in ks:
        pred[k] = mask3d[k]
    return FewShotResult(pred, model, seconds, ks)


def score_fewshot(pred: np.ndarray, truth: np.ndarray, annotated: Sequence[int],
                  spacing: tuple[float, float, float]) -> EvalResult:
    """Dice/IoU/HD95 on the labelled slices the user did not annotate, FP count on the others."""
    from ..evaluation.evaluate import case_metrics

    result = EvalResult()
    rest = [k for k in range(truth.shape[0]) if k not in set(annotated)]
    pos = [k for k in rest if truth[k].any()]
    neg = [k for k in rest if not truth[k].any()]
    per = []
    for k in pos:
        m = case_metrics(pred[k], truth[k], (spacing[1], spacing[2]))
        per.append(m)
        result.cases.append({"case": f"slice:{k}", "row": "fewshot", **m})
    row = {m: float(np.mean([p[m] for p in per])) if per else float("nan") for m in ("dice", "iou", "hd95")}
    row.update(n=len(per), fp_slices=int(sum(pred[k].any() for k in neg)), n_negative=len(neg))
    result.rows["fewshot"] = row
    return result


def fewshot_command(args, config: TrainConfig) -> int:
    """CLI: samselfprompt train --image V --label L --label-id N --fewshot-slices k1 k2 ... -o OUT."""
    import json

    from ..core.preprocess import ct_window
    from .api import base_model
    from .data import read_volume

    image, spacing = read_volume(args.image)
    labels, _ = read_volume(args.label)
    truth = np.isin(labels, args.label_id)
    intensity = ct_window(args.ct_window) if float(image.min()) < -500 else None
    from ..core.preprocess import guess_intensity

    intensity = intensity or guess_intensity(image)
    model = base_model(args.init, device=args.device)
    res = fewshot_segment(model, image, {k: truth[k] for k in args.fewshot_slices}, intensity, spacing,
                          config=config, cache=DiskEmbeddingCache(args.cache))
    scores = score_fewshot(res.masks, truth, res.annotated, spacing)
    print(scores.markdown())
    print(f"fine-tuned on slices {res.annotated} in {res.train_seconds:.1f} s")
    if args.out:
        from ..weights.checkpoint import save_samsp

        save_samsp(args.out, res.model, {"modality": intensity.modality, "intensity": intensity.to_dict(),
                                         "input_size": model.image_size, "fewshot_slices": res.annotated,
                                         "fewshot_metrics": scores.rows, "train_seconds": res.train_seconds})
    if args.segment_out:
        _write_like(args.image, res.masks.astype(np.uint8), args.segment_out)
    print(json.dumps({"rows": scores.rows, "train_seconds": res.train_seconds}))
    return 0


def _write_like(reference: str, array: np.ndarray, path: str) -> None:
    """Write a K x J x I array on the LPS-reoriented grid of ``reference`` (same physical space)."""
    import SimpleITK as sitk

    ref = sitk.DICOMOrient(sitk.ReadImage(str(reference)), "LPS")
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(ref)
    sitk.WriteImage(out, str(path))
