"""The SAM-SP loss: Dice(y1, y) + alpha * KL(y0 || y1), with y1 the detached teacher.

The KL is a pixel-wise Bernoulli KL computed in logit space. Untrained LiteMedSAM's
no-prompt logits sit near -20; a KL on clamped probabilities has zero gradient there and
y0 never leaves "empty". With p = sigmoid(y1) (no gradient) and q = sigmoid(y0):

    KL(p || q) = sum p log(p/q) + (1-p) log((1-p)/(1-q))
               = BCE_with_logits(y0, p) - H(p)

and its gradient in y0's logit is q - p, which stays large wherever y0 is wrong.
We write it as KL(y0 || y1) following the paper's notation (y0 is pulled toward y1);
the direction that makes y1 the target is the one above: cross-entropy of y0 against y1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per image, averaged over the batch. logits/target: B x 1 x H x W."""
    prob = torch.sigmoid(logits.float()).flatten(1)
    tgt = target.float().flatten(1)
    inter = (prob * tgt).sum(1)
    denom = prob.sum(1) + tgt.sum(1)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def bernoulli_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -p log p - (1-p) log(1-p), 0 at p in {0, 1}."""
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1.0 - p, 1.0 - p))


def kl_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean pixel-wise KL(teacher || student) with the teacher detached: BCE(student, p) - H(p)."""
    p = torch.sigmoid(teacher_logits.detach().float())
    bce = F.binary_cross_entropy_with_logits(student_logits.float(), p, reduction="none")
    return (bce - bernoulli_entropy(p)).mean()


def samsp_loss(
    y0: torch.Tensor, y1: torch.Tensor, target: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Dice(y1, y) + alpha * KL; returns the loss and its parts for the log."""
    dice = dice_loss(y1, target)
    kl = kl_logits(y0, y1)
    loss = dice + alpha * kl
    return loss, {"loss": float(loss.detach()), "dice_loss": float(dice.detach()), "kl": float(kl.detach())}


def absence_loss(y0: torch.Tensor, top_fraction: float = 0.02) -> torch.Tensor:
    """Pass 1 on an image without the structure must paint nothing.

    BCE toward 0 over the ``top_fraction`` highest logits of each image: the pixels that would be
    painted. A mean over all 65k pixels would let a small confident blob (the false positive that
    matters) cost almost nothing.
    """
    flat = y0.float().flatten(1)
    k = max(1, int(flat.shape[1] * top_fraction))
    top = flat.topk(k, dim=1).values
    return F.binary_cross_entropy_with_logits(top, torch.zeros_like(top))


def presence_score_loss(predicted_iou: torch.Tensor, y0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The decoder's IoU head on pass 1 learns the IoU its own mask will have (0 where the structure is
    absent): the presence score the guard and slice skipping read."""
    with torch.no_grad():
        pred = (y0 > 0).flatten(1)
        tgt = target.bool().flatten(1)
        union = (pred | tgt).sum(1).float()
        iou = torch.where(union > 0, (pred & tgt).sum(1).float() / union.clamp(min=1.0), torch.ones_like(union))
        iou = torch.where(tgt.any(1), iou, torch.zeros_like(iou))  # no structure: presence 0
    return F.mse_loss(predicted_iou.float()[:, 0], iou)


def balanced_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of the BCE over the structure's pixels and the BCE over the rest, per image, in logit space.

    Unlike a soft Dice its gradient does not vanish at untrained pass-1 logits (about -20), and unlike
    a mean over all pixels a small structure weighs as much as the background."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").flatten(1)
    fg = target.bool().flatten(1).float()
    pos = (bce * fg).sum(1) / fg.sum(1).clamp(min=1.0)
    neg = (bce * (1 - fg)).sum(1) / (1 - fg).sum(1).clamp(min=1.0)
    return (0.5 * (pos + neg)).mean()

