"""Simulated expert clicks and click refinement, shared by training, evaluation and the hosts.

The simulated user follows the protocol of interactive-segmentation work (RITM and
its successors): look at where the prediction is wrong, take the error region whose
interior reaches farthest from its border, and click at that farthest point; a
missed region (false negative) gets a positive click, a spurious one (false
positive) a negative click. Each refinement pass reuses the cached embedding and
feeds back the previous low-resolution logits as SAM's mask prompt, with the
SAM-SP box kept as the box prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..modeling.backbones import LOW_RES, SamBackbone

# SAM's label for "no point here": lets a batch carry samples that need no click this round.
NOT_A_POINT = -1


@dataclass(frozen=True)
class Click:
    x: float  # column, in the pixel grid the masks were given on
    y: float  # row
    positive: bool


def next_click(pred: np.ndarray, gt: np.ndarray) -> Click | None:
    """The simulated user's next click, or None when the prediction is already perfect."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    best: tuple[float, int, int, bool] | None = None
    for region, positive in ((gt & ~pred, True), (pred & ~gt, False)):
        if not region.any():
            continue
        # Pad so the image border counts as the region's border too.
        depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        if best is None or depth[y, x] > best[0]:
            best = (float(depth[y, x]), int(y), int(x), positive)
    if best is None:
        return None
    return Click(float(best[2]), float(best[1]), best[3])


def clicks_to_prompt(clicks: list[list[Click]], scale: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample click lists (grid pixels) -> SAM point coords B x N x 2 (model pixels) and labels B x N.

    Shorter lists are padded with NOT_A_POINT so every sample can sit in one batch.
    """
    n = max(1, max(len(c) for c in clicks))
    coords = torch.zeros(len(clicks), n, 2)
    labels = torch.full((len(clicks), n), NOT_A_POINT, dtype=torch.long)
    for b, row in enumerate(clicks):
        for j, c in enumerate(row):
            coords[b, j, 0] = (c.x + 0.5) * scale
            coords[b, j, 1] = (c.y + 0.5) * scale
            labels[b, j] = 1 if c.positive else 0
    return coords.to(device), labels.to(device)


def simulate_refinement(
    model: SamBackbone,
    embeddings: torch.Tensor,
    boxes: torch.Tensor,
    start_logits: torch.Tensor,
    targets: torch.Tensor,
    rounds: int,
) -> list[torch.Tensor]:
    """Click rounds on the low-resolution grid, for training (differentiable per round).

    embeddings: B x 256 x 64 x 64; boxes: B x 4 (model pixels); start_logits and targets:
    B x 1 x 256 x 256. Clicks are chosen on the detached prediction of the previous round,
    and each round's logits are fed back (detached) as the mask prompt, as at test time.
    Returns the logits of every round.
    """
    scale = model.image_size / LOW_RES
    prev = start_logits.detach().float()  # autocast may hand over bf16; the mask prompt convs are fp32
    clicks: list[list[Click]] = [[] for _ in range(embeddings.shape[0])]
    target_np = targets[:, 0].detach().cpu().numpy() > 0.5
    outputs = []
    for _ in range(rounds):
        pred_np = (prev[:, 0] > 0).cpu().numpy()
        for b in range(len(clicks)):
            c = next_click(pred_np[b], target_np[b])
            if c is not None:
                clicks[b].append(c)
        coords, labels = clicks_to_prompt(clicks, scale, embeddings.device)
        logits, _ = model.decode(embeddings, boxes=boxes, points=(coords, labels), mask_logits=prev)
        outputs.append(logits)
        prev = logits.detach().float()
    return outputs
