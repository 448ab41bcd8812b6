"""Interactive metrics: Dice after k simulated clicks, and NoC@85 / NoC@90.

Each case starts from a prompt-free result (SAM-SP's y1 with its self-prompt box, or
for the untrained baseline its whole-image-box result), then the simulated user
(clicks.next_click, on the full-resolution slice grid) clicks up to ``max_clicks``
times; every click is one decoder pass on the cached embedding with the box, all
clicks so far, and the previous logits as the mask prompt.
NoC@t is the number of clicks needed to reach Dice t, counted as ``max_clicks`` when
it is never reached (the usual cap is 20).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..core.clicks import next_click
from ..modeling.backbones import SamBackbone
from ..core.masks import dice
from ..core.preprocess import Frame, logits_to_slice


@torch.no_grad()
def click_curve(
    model: SamBackbone, embedding: torch.Tensor, frame: Frame, gt: np.ndarray, start_logits: torch.Tensor,
    box: torch.Tensor, max_clicks: int = 20, stop_at: float = 0.90, min_clicks: int = 5, promptable: bool = False,
) -> list[float]:
    """Dice after 0..max_clicks clicks for one case (length max_clicks + 1).

    Once Dice has reached ``stop_at`` and ``min_clicks`` are done, the remaining entries
    repeat the last value: they no longer change any reported number, and skipping them
    keeps evaluation fast. ``promptable``: a ProMISe model in its promptable mode (``core.promise.promise_refine``)
    instead of box + clicks + previous logits on the plain decoder.
    """
    dev = model.device
    gt = gt.astype(bool)
    prev = start_logits.reshape(1, 1, *start_logits.shape[-2:]).to(dev, torch.float32)
    pred = (logits_to_slice(prev, frame) > 0).cpu().numpy()
    curve = [dice(pred, gt)]
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    emb = embedding.reshape(1, *embedding.shape[-3:]).to(dev, torch.float32)
    box = box.reshape(1, 4).to(dev, torch.float32)
    for k in range(1, max_clicks + 1):
        if curve[-1] >= stop_at and k > min_clicks:
            break
        click = next_click(pred, gt)
        if click is None:
            break
        points.append((click.x, click.y))
        labels.append(1 if click.positive else 0)
        coords = torch.as_tensor(frame.points_to_model(points), device=dev)[None]
        lab = torch.tensor([labels], device=dev)
        if promptable:  # ProMISe: APM points + clicks through the IPS-shifted decoder
            from ..core.promise import promise_refine

            prev, _ = promise_refine(model, emb, torch.as_tensor(frame.full_box(), device=dev)[None], coords, lab)
        else:
            prev, _ = model.decode(emb, boxes=box, points=(coords, lab), mask_logits=prev)
        pred = (logits_to_slice(prev, frame) > 0).cpu().numpy()
        curve.append(dice(pred, gt))
    curve += [curve[-1]] * (max_clicks + 1 - len(curve))
    return curve


PLAIN_DECODER_SUFFIX = "_plain_decoder"


def noc(curve: Sequence[float], threshold: float, cap: int) -> int:
    """Clicks needed to reach ``threshold`` (0 if the start already does), ``cap`` if never."""
    for k, d in enumerate(curve):
        if d >= threshold:
            return k
    return cap


def summarize(curves: Sequence[Sequence[float]], max_clicks: int = 20) -> dict:
    c = np.asarray(curves, dtype=np.float64)
    return {
        "dice_start": float(c[:, 0].mean()),
        "dice_after": {str(k): float(c[:, min(k, max_clicks)].mean()) for k in (1, 3, 5)},
        "noc85": float(np.mean([noc(row, 0.85, max_clicks) for row in c])),
        "noc90": float(np.mean([noc(row, 0.90, max_clicks) for row in c])),
        "n": int(c.shape[0]),
        "max_clicks": max_clicks,
    }


def click_rows(
    rows: dict[str, tuple[SamBackbone, torch.Tensor, torch.Tensor]],
    emb: torch.Tensor, frames: Sequence[Frame], masks: Sequence[np.ndarray], max_clicks: int = 20,
) -> dict[str, dict]:
    """rows: name -> (model, start low-res logits N x 1 x 256 x 256, start boxes N x 4).

    A ProMISe model clicks in its promptable mode, unless its row name ends in PLAIN_DECODER_SUFFIX
    (then: box + clicks + previous logits on its untouched decoder, as every other row)."""
    from ..modeling.promise import has_promise

    out = {}
    for name, (model, start, boxes) in rows.items():
        promptable = has_promise(model) and not name.endswith(PLAIN_DECODER_SUFFIX)
        curves = [click_curve(model, emb[i], frames[i], masks[i], start[i], boxes[i], max_clicks, promptable=promptable)
                  for i in range(len(frames))]
        out[name] = summarize(curves, max_clicks)
        out[name]["per_case"] = [[round(v, 4) for v in cv[:6]] for cv in curves]
    return out


@torch.no_grad()
def prompt_free_starts(model: SamBackbone, emb: torch.Tensor, frames: Sequence[Frame], vanilla: bool,
                       batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the user starts clicking: SAM-SP's y1 and its box, ProMISe's output and its box, or for an
    untrained model its whole-image-box result (its best prompt-free output: its no-prompt pass is empty)."""
    from ..core.promise import promise_prompt
    from ..core.selfprompt import self_prompt
    from ..modeling.promise import has_promise

    dev = model.device
    full = torch.stack([torch.as_tensor(f.full_box()) for f in frames])
    logits, boxes = [], []
    for s in range(0, len(frames), batch):
        e, fb = emb[s:s + batch].to(dev, torch.float32), full[s:s + batch].to(dev)
        if vanilla:
            lg, _ = model.decode(e, boxes=fb)
            logits.append(lg.cpu())
            boxes.append(fb.cpu())
        else:
            out = promise_prompt(model, e, fb) if has_promise(model) else self_prompt(model, e, fb)
            logits.append(out.y1.cpu())
            boxes.append(out.boxes.cpu())
    return torch.cat(logits), torch.cat(boxes)


def clicks_markdown(rows: dict[str, dict]) -> str:
    lines = ["| clicks row | Dice start | after 1 | after 3 | after 5 | NoC@85 | NoC@90 | n |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        d = r["dice_after"]
        lines.append(f"| {name} | {r['dice_start']:.4f} | {d['1']:.4f} | {d['3']:.4f} | {d['5']:.4f} | "
                     f"{r['noc85']:.2f} | {r['noc90']:.2f} | {r['n']} |")
    return "\n".join(lines)
