"""Evaluation of SAM-SP against vanilla prompting: Dice, IoU and HD95 per case and per row.

Rows (all on the same images and the same cached embeddings):
  no_prompt    vanilla model, no prompt at all
  full_box     vanilla model, the whole-image box
  self_box     vanilla model, box from its own full-box mask (one self-refinement, no training)
  gt_box       vanilla model, the expert box from the ground truth (the upper anchor)
  samsp_y0     trained model, pass 1 (no prompt)
  samsp        trained model, pass 2 on the self-prompt box: the output
  samsp_alpha0 / no_self_prompt   ablation checkpoints, when given
  promise      ProMISe checkpoint (APM + IPS, frozen backbone): prompt-free output, when given
  promise_apm  its APM map alone, upsampled (what the points are read from)
  promise_ips_gt_points   IPS prompted with 8 + 8 points sampled from the ground truth (promptable mode)

Metrics are computed on the original slice grid. HD95 is the 95th percentile of the
symmetric surface distances (in mm where the spacing is known, pixels for photographs);
an empty prediction against a non-empty truth scores the image diagonal, so means stay finite.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from ..modeling.backbones import SamBackbone
from ..core.preprocess import Frame, logits_to_slice
from ..core.selfprompt import box_from_logits, self_prompt
from ..core.masks import dice, mask_box

VANILLA_ROWS = ("no_prompt", "full_box", "self_box", "gt_box")
TRAINED_ROWS = ("samsp_y0", "samsp")


# --- metrics ---------------------------------------------------------------------------------


def iou_score(pred: np.ndarray, gt: np.ndarray) -> float:
    union = int(np.logical_or(pred, gt).sum())
    return 1.0 if union == 0 else int(np.logical_and(pred, gt).sum()) / union


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """95th percentile symmetric surface distance; 0 if both empty, the diagonal if one is."""
    if not pred.any() and not gt.any():
        return 0.0
    if not pred.any() or not gt.any():
        return float(np.hypot(pred.shape[0] * spacing[0], pred.shape[1] * spacing[1]))
    sp, sg = _surface(pred), _surface(gt)
    dist_to_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    dists = np.concatenate([dist_to_gt[sp], dist_to_pred[sg]])
    return float(np.percentile(dists, 95))


def case_metrics(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float]) -> dict[str, float]:
    return {"dice": dice(pred, gt), "iou": iou_score(pred, gt), "hd95": hd95(pred, gt, spacing)}


# --- predictions on cached embeddings ----------------------------------------------------------

def full_boxes(frames: Sequence[Frame]) -> torch.Tensor:
    return torch.from_numpy(np.stack([f.full_box() for f in frames]))


def gt_boxes(masks: Sequence[np.ndarray], frames: Sequence[Frame]) -> torch.Tensor:
    """The expert box: the ground-truth mask's bounding box in model pixels (full box if empty)."""
    out = []
    for mask, frame in zip(masks, frames):
        box = mask_box(mask)
        out.append(frame.full_box() if box is None else frame.box_to_model(box))
    return torch.from_numpy(np.stack(out).astype(np.float32))


def _batched(fn: Callable[[slice], dict[str, torch.Tensor]], n: int, batch: int) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, batch):
        for k, v in fn(slice(start, start + batch)).items():
            parts.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def vanilla_logits(model: SamBackbone, emb: torch.Tensor, frames: Sequence[Frame], masks: Sequence[np.ndarray],
                   batch: int = 8) -> dict[str, torch.Tensor]:
    """Low-res logits of the four vanilla rows for every embedding."""
    fb, gb = full_boxes(frames), gt_boxes(masks, frames)
    dev = model.device

    def run(sl: slice) -> dict[str, torch.Tensor]:
        e = emb[sl].to(dev, torch.float32)
        no, _ = model.decode(e)
        full, _ = model.decode(e, boxes=fb[sl].to(dev))
        sbox, _ = box_from_logits(full, fb[sl].to(dev), model.image_size)
        selfb, _ = model.decode(e, boxes=sbox)
        gt, _ = model.decode(e, boxes=gb[sl].to(dev))
        return {"no_prompt": no, "full_box": full, "self_box": selfb, "gt_box": gt}

    return _batched(run, emb.shape[0], batch)


@torch.no_grad()
def samsp_logits(model: SamBackbone, emb: torch.Tensor, frames: Sequence[Frame], batch: int = 8,
                 structures: torch.Tensor | None = None, presence_threshold: float | None = None
                 ) -> dict[str, torch.Tensor]:
    """Low-res logits of both SAM-SP passes (y0, y1), whether pass 1 found nothing (the fallback box
    was used) and pass 1's presence score.

    ``presence_threshold`` given: score as inference runs a trained checkpoint: where pass 1 finds
    nothing (``selfprompt.absent``) the output is empty, not the fallback box's mask.
    """
    fb = full_boxes(frames)
    dev = model.device

    def run(sl: slice) -> dict[str, torch.Tensor]:
        which = structures[sl].to(dev) if structures is not None else None
        out = self_prompt(model, emb[sl].to(dev, torch.float32), fb[sl].to(dev),
                          presence_threshold or 0.0, structure=which)
        y1 = out.y1
        if presence_threshold is not None:
            y1 = torch.where(out.fallback_used[:, None, None, None], torch.full_like(y1, -20.0), y1)
        return {"samsp_y0": out.y0, "samsp": y1, "fallback": out.fallback_used.float(), "presence": out.presence}

    return _batched(run, emb.shape[0], batch)


@torch.no_grad()
def promise_logits(model: SamBackbone, emb: torch.Tensor, frames: Sequence[Frame], masks: Sequence[np.ndarray],
                   batch: int = 8) -> dict[str, torch.Tensor]:
    """ProMISe rows: prompt-free output, APM map alone, and IPS with ground-truth points."""
    from ..core.preprocess import mask_to_low_res
    from ..core.promise import EMPTY_LOGIT, gt_points, promise_decode, promise_prompt

    fb = full_boxes(frames)
    targets = torch.stack([mask_to_low_res(np.asarray(m, bool), f) for m, f in zip(masks, frames)])
    dev = model.device

    def run(sl: slice) -> dict[str, torch.Tensor]:
        e, b = emb[sl].to(dev, torch.float32), fb[sl].to(dev)
        out = promise_prompt(model, e, b)
        coords, labels, empty = gt_points(model, targets[sl].to(dev), b)
        gt = torch.full_like(out.y1, EMPTY_LOGIT)
        keep = torch.nonzero(~empty).flatten()
        if len(keep):
            gt[keep] = promise_decode(model, e[keep], coords[keep], labels[keep])[0]
        return {"promise_apm": out.y0, "promise": out.y1, "promise_ips_gt_points": gt}

    return _batched(run, emb.shape[0], batch)


def to_masks(logits: torch.Tensor, frames: Sequence[Frame]) -> list[np.ndarray]:
    return [(logits_to_slice(lg, fr) > 0).numpy() for lg, fr in zip(logits, frames)]


# --- tables -------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    cases: list[dict] = field(default_factory=list)
    predictions: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)  # row -> slice masks

    def to_json(self) -> dict:
        return {"rows": self.rows, "cases": self.cases}

    def volume_metrics(self, case_ids: Sequence[str], masks: Sequence[np.ndarray],
                       structures: Sequence[str]) -> dict[str, dict[str, float]]:
        """3D Dice per row and structure, averaged over volumes, plus the false-positive slice rate.

        ``case_ids`` are "volume:k:structure" (training.targets); ``self.predictions`` holds each row's
        slice masks (score_rows keeps them). A volume's 3D Dice counts every voxel of every slice.
        """
        out: dict[str, dict[str, float]] = {}
        volumes = [c.split(":")[0] for c in case_ids]
        for row, preds in self.predictions.items():
            for structure in sorted(set(structures)):
                dices, fp, neg = [], 0, 0
                for vol in sorted(set(volumes)):
                    idx = [i for i in range(len(case_ids)) if volumes[i] == vol and structures[i] == structure]
                    if not idx:
                        continue
                    # No expert box exists on a slice without the structure: gt_box paints nothing there.
                    pred = np.concatenate([preds[i].ravel() if row != "gt_box" or np.asarray(masks[i]).any()
                                           else np.zeros(preds[i].size, bool) for i in idx])
                    truth = np.concatenate([np.asarray(masks[i], bool).ravel() for i in idx])
                    if truth.any():
                        dices.append(dice(pred, truth))
                    for i in idx:
                        if not np.asarray(masks[i]).any() and row != "gt_box":
                            neg += 1
                            fp += bool(preds[i].any())
                out[f"{row}/{structure}"] = {"dice3d": float(np.mean(dices)) if dices else float("nan"),
                                            "n_volumes": len(dices), "fp_slices": fp, "n_negative": neg,
                                            "fp_rate": fp / neg if neg else 0.0}
        return out

    @staticmethod
    def volume_markdown(volumes: dict[str, dict[str, float]]) -> str:
        lines = ["| row / structure | 3D Dice | volumes | FP slices | FP rate |", "|---|---|---|---|---|"]
        for key, m in volumes.items():
            lines.append(f"| {key} | {m['dice3d']:.4f} | {m['n_volumes']} | {m['fp_slices']}/{m['n_negative']} | "
                         f"{m['fp_rate']:.1%} |")
        return "\n".join(lines)

    def markdown(self) -> str:
        extra = any("fp_slices" in r for r in self.rows.values())
        head = "| row | Dice | IoU | HD95 | n |" + (" FP slices |" if extra else "")
        sep = "|---|---|---|---|---|" + ("---|" if extra else "")
        lines = [head, sep]
        for name, r in self.rows.items():
            line = f"| {name} | {r['dice']:.4f} | {r['iou']:.4f} | {r['hd95']:.2f} | {r['n']} |"
            if extra:
                line += f" {r.get('fp_slices', '')}/{r.get('n_negative', '')} |" if "fp_slices" in r else " – |"
            lines.append(line)
        return "\n".join(lines)


def score_rows(
    logits: dict[str, torch.Tensor],
    frames: Sequence[Frame],
    masks: Sequence[np.ndarray],
    case_ids: Sequence[str],
    spacings: Sequence[tuple[float, float]],
) -> EvalResult:
    """Per-case metrics on slices with a label, false-positive slice counts on those without."""
    result = EvalResult()
    positive = [i for i, m in enumerate(masks) if np.asarray(m).any()]
    negative = [i for i, m in enumerate(masks) if not np.asarray(m).any()]
    for row, lg in logits.items():
        if row == "fallback":
            continue
        preds = to_masks(lg, frames)
        result.predictions[row] = preds
        per = []
        for i in positive:
            m = case_metrics(preds[i], np.asarray(masks[i], bool), spacings[i])
            per.append(m)
            result.cases.append({"case": case_ids[i], "row": row, **m})
        summary = {k: float(np.mean([p[k] for p in per])) if per else float("nan") for k in ("dice", "iou", "hd95")}
        summary["n"] = len(per)
        if negative and row != "gt_box":  # no expert box exists on a slice without the structure
            summary["fp_slices"] = int(sum(preds[i].any() for i in negative))
            summary["n_negative"] = len(negative)
        result.rows[row] = summary
    return result


def evaluate_samples(vanilla: SamBackbone, trained: dict[str, SamBackbone], samples: Sequence, cache,
                     progress: bool = False, presence_thresholds: dict[str, float] | None = None) -> EvalResult:
    """All rows on ``samples`` (training.data.Sample). ``trained`` maps a row prefix to a model:
    "samsp" gives rows samsp_y0 and samsp; "samsp_alpha0" its y1; "no_self_prompt" its y0
    (that ablation is trained and used without the second pass). ``presence_thresholds``: each
    trained row's checkpoint threshold ("presence_threshold" in its metadata); where pass 1 finds
    nothing the row's output is empty, as in Auto-segment."""
    masks = [s.mask for s in samples]
    structures = torch.tensor([getattr(s, "structure", 0) for s in samples], dtype=torch.long)
    emb, frames = cache.embed(vanilla, samples, progress=progress)
    logits = vanilla_logits(vanilla, emb, frames, masks)
    for name, model in trained.items():
        # LoRA checkpoints change the encoder: the cache key (encoder fingerprint) then differs.
        e = emb if encoder_same(vanilla, model) else cache.embed(model, samples, progress=progress)[0]
        if name == "promise":
            logits.update(promise_logits(model, e, frames, masks))
            continue
        sp = samsp_logits(model, e, frames, structures=structures,
                          presence_threshold=(presence_thresholds or {}).get(name, 0.0))
        if name == "samsp":
            logits.update({"samsp_y0": sp["samsp_y0"], "samsp": sp["samsp"]})
        elif name == "no_self_prompt":
            logits[name] = sp["samsp_y0"]
        else:
            logits[name] = sp["samsp"]
    return score_rows(logits, frames, masks, [s.case_id for s in samples], [s.spacing for s in samples])


def encoder_same(a: SamBackbone, b: SamBackbone) -> bool:
    from ..training.embedding_cache import encoder_fingerprint

    return a.spec.model_id == b.spec.model_id and encoder_fingerprint(a) == encoder_fingerprint(b)
