"""ProMISe on image embeddings: APM points, then one decoder pass with the IPS-shifted mask tokens.

    a = APM(E(x))                       1 x 64 x 64 object logits on the embedding grid
    p = points(a)                       8 foreground + 8 background point prompts
    y = M(E(x), P(p); tokens + IPS(E))  the output (SAM's decoder and prompt encoder untouched)

Points: the foreground points are spread over the cells APM scores above 0.5 (farthest-point
sampling from the most confident cell, one cell in from the border when the region allows), the
background points over a band around that region (its width grows with the region). When APM
finds no object cell the image has no object: the output is empty and no decoder pass runs, which
is SAM-SP's "empty y0" rule. Too few cells for 8 points: the rest are SAM's "not a point" (-1).

The same point sampler reads points from a ground-truth mask (``gt_points``): that is the paper's
promptable mode (row ``promise_ips_gt_points``) and half of the IPS training batches.
``promise_prompt`` returns a ``SelfPromptOutput`` so hosts and evaluation treat both methods alike:
``y0`` holds the APM map (upsampled), ``boxes`` the output mask's box, ``fallback_used`` "APM found
nothing". Clicks (``promise_refine``) are more point prompts beside APM's, in the same IPS-shifted pass.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..modeling.backbones import EMBED_HW, LOW_RES, SamBackbone
from ..modeling.promise import has_promise
from .clicks import NOT_A_POINT
from .selfprompt import SelfPromptOutput, box_from_logits

EMPTY_LOGIT = -20.0


def valid_grid(fallback_boxes: torch.Tensor, image_size: int, grid: int = EMBED_HW) -> list[tuple[int, int]]:
    """(rows, cols) of the embedding grid that the unpadded image covers, from its whole-image boxes."""
    cell = image_size / grid
    return [(max(1, math.ceil((float(b[3]) + 1) / cell)), max(1, math.ceil((float(b[2]) + 1) / cell)))
            for b in fallback_boxes.cpu()]


def _farthest(cands: np.ndarray, score: np.ndarray, n: int, rng: np.random.Generator | None) -> np.ndarray:
    """n of the candidate cells (K x 2 rows/cols), spread out; the first is the best-scored (random with rng)."""
    first = int(rng.integers(len(cands))) if rng is not None else int(np.argmax(score))
    picked = [first]
    dist = np.hypot(*(cands - cands[first]).T)
    while len(picked) < min(n, len(cands)):
        nxt = int(np.argmax(dist))
        if dist[nxt] <= 0:
            break
        picked.append(nxt)
        dist = np.minimum(dist, np.hypot(*(cands - cands[nxt]).T))
    return cands[picked]


def select_points(prob: np.ndarray, valid_hw: tuple[int, int], n: int, image_size: int,
                  rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Points from a grid map in [0, 1] (rows x cols): 2n coords (model pixels, x y) and labels, or None."""
    gh, gw = valid_hw
    valid = np.zeros(prob.shape, bool)
    valid[:gh, :gw] = True
    fg = (prob > 0.5) & valid
    if not fg.any():
        return None
    inner = ndimage.binary_erosion(fg)
    fg_c = inner if inner.any() else fg
    width = max(2, int(round(0.3 * math.sqrt(fg.sum()))))
    band = ndimage.binary_dilation(fg, iterations=width) & ~ndimage.binary_dilation(fg) & valid
    if not band.any():
        band = valid & ~fg
    cell = image_size / prob.shape[0]
    coords = np.zeros((2 * n, 2), np.float32)
    labels = np.full(2 * n, NOT_A_POINT, np.int64)
    for offset, region, score, label in ((0, fg_c, prob, 1), (n, band, 1.0 - prob, 0)):
        if not region.any():
            continue
        cands = np.argwhere(region)
        pts = _farthest(cands, score[region], n, rng)
        coords[offset:offset + len(pts)] = (pts[:, ::-1] + 0.5) * cell  # (row, col) -> (x, y) cell centres
        labels[offset:offset + len(pts)] = label
    return coords, labels


def _points_batch(maps: torch.Tensor, fallback: torch.Tensor, n: int, image_size: int,
                  rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """maps: B x 1 x 64 x 64 in [0, 1] -> coords B x 2n x 2, labels B x 2n, empty B (bool)."""
    probs = maps[:, 0].detach().float().cpu().numpy()
    coords = torch.zeros(len(probs), 2 * n, 2)
    labels = torch.full((len(probs), 2 * n), NOT_A_POINT, dtype=torch.long)
    empty = torch.ones(len(probs), dtype=torch.bool)
    for b, (prob, hw) in enumerate(zip(probs, valid_grid(fallback, image_size, probs.shape[-1]))):
        picked = select_points(prob, hw, n, image_size, rng)
        if picked is not None:
            coords[b], labels[b] = torch.from_numpy(picked[0]), torch.from_numpy(picked[1])
            empty[b] = False
    dev = maps.device
    return coords.to(dev), labels.to(dev), empty.to(dev)


def apm_points(model: SamBackbone, embeddings: torch.Tensor, fallback: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """APM logits B x 1 x 64 x 64 and the points read off them (coords, labels, empty)."""
    apm = model.promise.apm(embeddings)
    coords, labels, empty = _points_batch(torch.sigmoid(apm), fallback, model.promise.n_points, model.image_size)
    return apm, coords, labels, empty


def gt_points(model: SamBackbone, targets: torch.Tensor, fallback: torch.Tensor,
              rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points sampled from ground-truth low-res masks (B x 1 x 256 x 256) on the embedding grid."""
    grid = F.adaptive_avg_pool2d(targets.float(), EMBED_HW)
    tiny = F.adaptive_max_pool2d(targets.float(), EMBED_HW)  # objects smaller than a cell keep one cell
    grid = torch.where((grid > 0.5).flatten(1).any(1)[:, None, None, None], grid, tiny * 0.75)
    return _points_batch(grid, fallback, model.promise.n_points if has_promise(model) else 8, model.image_size, rng)


def promise_decode(model: SamBackbone, embeddings: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder pass with point prompts and the IPS-shifted mask tokens (differentiable in IPS)."""
    return model.decode(embeddings, points=(coords, labels), mask_token_shift=model.promise.ips(embeddings))


def promise_refine(model: SamBackbone, embedding: torch.Tensor, fallback_box: torch.Tensor,
                   points: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert clicks in ProMISe's promptable mode: APM's points plus the clicks, one IPS-shifted pass.

    embedding: 1 x 256 x 64 x 64; fallback_box: 1 x 4 whole-image box; points: 1 x N x 2 (model pixels);
    labels: 1 x N (1 positive, 0 negative). The decoder's weights are the vanilla ones. LiteMedSAM's
    vanilla protocol (box + clicks + previous logits as mask prompt, what SAM-SP's clicks use) lowers
    Dice with every click on a decoder that never saw clicks (docs/RESULTS.md, ProMISe mode), while
    point prompts are what IPS was trained with.
    """
    _, coords, apm_labels, _ = apm_points(model, embedding, fallback_box)
    keep = apm_labels[0] != -1
    coords = torch.cat([coords[:, keep], points.to(coords)], dim=1)
    labels = torch.cat([apm_labels[:, keep], labels.to(apm_labels)], dim=1)
    return promise_decode(model, embedding, coords, labels)


def promise_prompt(model: SamBackbone, embeddings: torch.Tensor, fallback_boxes: torch.Tensor) -> SelfPromptOutput:
    """Prompt-free ProMISe on a batch of embeddings; images where APM finds nothing come out empty."""
    apm, coords, labels, empty = apm_points(model, embeddings, fallback_boxes)
    batch = embeddings.shape[0]
    y = torch.full((batch, 1, LOW_RES, LOW_RES), EMPTY_LOGIT, device=embeddings.device)
    iou = torch.zeros(batch, 1, device=embeddings.device)
    keep = torch.nonzero(~empty).flatten()
    if len(keep):
        y[keep], iou[keep] = promise_decode(model, embeddings[keep], coords[keep], labels[keep])
    boxes, no_mask = box_from_logits(y, fallback_boxes, model.image_size)
    y0 = F.interpolate(apm.float(), size=(LOW_RES, LOW_RES), mode="bilinear", align_corners=False)
    return SelfPromptOutput(y0, boxes, empty | no_mask, y, iou)
