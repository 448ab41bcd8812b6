"""SAM-SP on one image embedding: no-prompt pass, self-prompt box, box pass.

    y0 = M(E(x), P(empty))          pass 1, SAM's learned "no prompt" embeddings
    box = bbox(sigmoid(y0) > 0.5)   the self-prompt: no learnable parameters
    y1 = M(E(x), P(box))            pass 2 on the same embedding; y1 is the output

The paper does not say what to do when y0 is empty. Untrained y0 is empty on every
image, so we fall back to the whole (unpadded) image box: it lets training start
and is what a user would draw with no other information. ``box_source`` records
which box was used so hosts and evaluation can report it.

Everything here works on batches of cached embeddings and is differentiable, so
training uses the same functions as inference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modeling.backbones import SamBackbone


def box_from_logits(logits: torch.Tensor, fallback: torch.Tensor, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes around sigmoid(logits) > 0.5, in model input pixels.

    logits: B x 1 x 256 x 256 low-res; fallback: B x 4 boxes used where the mask is empty.
    Returns (boxes B x 4 as x0, y0, x1, y1, empty B bool). No gradient flows through
    the box, as in the paper (it has no learnable parameters).
    """
    with torch.no_grad():
        fg = logits[:, 0] > 0  # sigmoid(l) > 0.5  <=>  l > 0
        b, h, w = fg.shape
        scale = image_size / w
        rows = fg.any(dim=2)  # B x H
        cols = fg.any(dim=1)  # B x W
        empty = ~rows.any(dim=1)
        idx_h = torch.arange(h, device=logits.device)
        idx_w = torch.arange(w, device=logits.device)
        big = torch.tensor(1 << 30, device=logits.device)
        y0 = torch.where(rows, idx_h, big).amin(dim=1)
        y1 = torch.where(rows, idx_h, -big).amax(dim=1)
        x0 = torch.where(cols, idx_w, big).amin(dim=1)
        x1 = torch.where(cols, idx_w, -big).amax(dim=1)
        # A low-res pixel i covers model pixels [i*scale, (i+1)*scale): span the covered area.
        boxes = torch.stack([x0 * scale, y0 * scale, (x1 + 1) * scale - 1, (y1 + 1) * scale - 1], dim=1).float()
        boxes = torch.where(empty[:, None], fallback.to(boxes), boxes)
    return boxes, empty


@dataclass
class SelfPromptOutput:
    y0: torch.Tensor  # B x 1 x 256 x 256 logits of the no-prompt pass
    boxes: torch.Tensor  # B x 4 self-prompt boxes (model input pixels)
    fallback_used: torch.Tensor  # B bool: pass 1 found nothing (see ``absent``), the fallback box was used
    y1: torch.Tensor  # B x 1 x 256 x 256 logits of the box pass (the output)
    iou: torch.Tensor  # B x 1 predicted IoU of y1
    presence: torch.Tensor | None = None  # B x 1 predicted IoU of y0: the presence score


def absent(empty: torch.Tensor, presence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pass 1 says "no object": its mask is empty, or its predicted IoU is below ``threshold``.

    Presence-trained checkpoints (negatives in training) learn both: an empty y0 and a predicted
    IoU near 0 where the structure is absent. The threshold comes from the checkpoint's
    metadata ("presence_threshold", chosen on val); 0 keeps the plain SAM-SP rule.
    """
    if threshold <= 0:  # the IoU head's output is not bounded below: 0 means "no presence check"
        return empty
    return empty | (presence[:, 0] < threshold)


def self_prompt(model: SamBackbone, embeddings: torch.Tensor, fallback_boxes: torch.Tensor,
                presence_threshold: float = 0.0, structure: torch.Tensor | None = None) -> SelfPromptOutput:
    """Both SAM-SP passes on a batch of embeddings (differentiable except the box)."""
    y0, presence = model.decode(embeddings, structure=structure)
    boxes, empty = box_from_logits(y0, fallback_boxes, model.image_size)
    gone = absent(empty, presence, presence_threshold)
    boxes = torch.where(gone[:, None], fallback_boxes.to(boxes), boxes)
    y1, iou = model.decode(embeddings, boxes=boxes, structure=structure)
    return SelfPromptOutput(y0, boxes, gone, y1, iou, presence)


def box_prompt(model: SamBackbone, embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert path: one decoder pass with a given box (model input pixels)."""
    return model.decode(embeddings, boxes=boxes)


def refine(
    model: SamBackbone,
    embedding: torch.Tensor,
    box: torch.Tensor | None,
    prev_logits: torch.Tensor | None,
    points: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Click correction on a cached embedding: box + previous logits as mask prompt + clicks.

    embedding: 1 x 256 x 64 x 64; box: 1 x 4 or None; prev_logits: 1 x 1 x 256 x 256 or None;
    points: 1 x N x 2 (model input pixels); labels: 1 x N (1 positive, 0 negative).
    """
    return model.decode(
        embedding,
        boxes=box,
        points=(points, labels),
        mask_logits=prev_logits,
    )
