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
    """CLI: samselfprompt train --image V --label L --label-id N --fewshot-slices k1 k2 ... [--extent F L]
    [--empty-slices ...] [-o OUT] [--segment-out SEG]: Adapt (training/adapt.py) on those slices of the
    label map, then the rest grown from them (never outside --extent); scored on the other slices."""
    import json
    from pathlib import Path

    from ..core.preprocess import ct_window, guess_intensity
    from ..weights.targets import input_kind
    from .adapt import (AdaptConfig, SliceEmbeddings, adapt_model, adapted_metadata, save_adapted, segment_adapted,
                        start_checkpoint)
    from .api import base_model
    from .data import read_volume

    image, spacing = read_volume(args.image)
    labels, _ = read_volume(args.label)
    truth = np.isin(labels, args.label_id)
    intensity = ct_window(args.ct_window) if float(image.min()) < -500 else guess_intensity(image)
    kind = input_kind(None, False, image)
    start, path = ("init", args.init) if args.init else start_checkpoint(kind)
    model = base_model(path, device=args.device)
    cfg = AdaptConfig(seed=config.seed)
    annotations = {int(k): truth[int(k)] for k in args.fewshot_slices}
    emb = SliceEmbeddings(model, image, intensity, DiskEmbeddingCache(args.cache))
    extent = tuple(args.extent) if args.extent else None
    outcome = adapt_model(model, image, annotations, intensity, extent, args.empty_slices, float(spacing[0]), cfg,
                          embeddings=emb)
    pred, grown = segment_adapted(outcome.model, emb, annotations, outcome.presence_threshold, outcome.extent,
                                  cfg.patience)
    scores = score_fewshot(pred, truth, outcome.annotated, spacing)
    print(scores.markdown())
    print(f"adapted from {start} on slices {outcome.annotated} (negatives {outcome.negatives}) in "
          f"{outcome.seconds:.1f} s; grown over {len(grown.visited)} slices")
    if args.out:
        name = args.name or Path(args.out).stem
        meta = adapted_metadata(name, kind, outcome, intensity, start, cfg, source=str(args.image))
        meta["fewshot_metrics"] = scores.rows
        save_adapted(args.out, outcome, meta)
    if args.segment_out:
        write_like(args.image, pred.astype(np.uint8), args.segment_out)
    print(json.dumps({"rows": scores.rows, "adapt_seconds": outcome.seconds, "start": start}))
    return 0


def write_like(reference: str, array: np.ndarray, path: str, reorient: str = "LPS") -> None:
    """Write a K x J x I array given on ``reference``'s ``reorient``-ed grid (``data.read_volume``) back
    on the reference's own grid: same size, spacing, origin and direction as the input file."""
    import SimpleITK as sitk

    ref = sitk.ReadImage(str(reference))
    oriented = sitk.DICOMOrient(ref, reorient)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(oriented)
    own = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(ref.GetDirection())
    back = sitk.DICOMOrient(out, own)
    result = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(back))  # exact copy of the input's geometry
    result.CopyInformation(ref)
    sitk.WriteImage(result, str(path))
