"""The simulated user (clicks.next_click) and the click metrics (evaluate_clicks)."""
from __future__ import annotations

import numpy as np
import torch

from SAMSelfPromptLib.core.clicks import NOT_A_POINT, Click, clicks_to_prompt, next_click
from SAMSelfPromptLib.evaluation.clicks import noc, summarize


def disk(shape, cy, cx, r):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_perfect_prediction_needs_no_click():
    gt = disk((40, 40), 20, 20, 8)
    assert next_click(gt, gt) is None
    assert next_click(np.zeros((8, 8), bool), np.zeros((8, 8), bool)) is None


def test_missed_region_gets_positive_click_at_its_centre():
    gt = disk((64, 64), 32, 32, 12)
    c = next_click(np.zeros_like(gt), gt)
    assert c == Click(32.0, 32.0, True)


def test_false_positive_blob_gets_negative_click_inside_it():
    gt = disk((64, 64), 20, 20, 6)
    blob = disk((64, 64), 45, 45, 10)
    c = next_click(gt | blob, gt)
    assert c is not None and not c.positive
    assert blob[int(c.y), int(c.x)] and not gt[int(c.y), int(c.x)]


def test_larger_error_wins_and_image_border_counts_as_border():
    gt = np.zeros((30, 30), bool)
    gt[:, :12] = True  # a band along the left edge, entirely missed
    pred = np.zeros_like(gt)
    pred[25:28, 25:28] = True  # a small false positive
    c = next_click(pred, gt)
    assert c.positive
    # The farthest point from the band's border is its middle column, not the image edge.
    assert 4 <= c.x <= 7


def test_clicks_to_prompt_pads_with_not_a_point_and_scales():
    coords, labels = clicks_to_prompt([[Click(1, 2, True), Click(3, 4, False)], []], 4.0, torch.device("cpu"))
    assert coords.shape == (2, 2, 2) and labels.tolist() == [[1, 0], [NOT_A_POINT, NOT_A_POINT]]
    assert coords[0, 0].tolist() == [6.0, 10.0]  # pixel centre (1.5, 2.5) times 4


def test_noc_and_summary():
    curve = [0.5, 0.8, 0.86, 0.91] + [0.91] * 17
    assert noc(curve, 0.85, 20) == 2 and noc(curve, 0.90, 20) == 3 and noc(curve, 0.95, 20) == 20
    s = summarize([curve, [0.95] * 21], 20)
    assert s["noc90"] == (3 + 0) / 2
    assert abs(s["dice_after"]["1"] - (0.8 + 0.95) / 2) < 1e-9
    assert abs(s["dice_after"]["5"] - (0.91 + 0.95) / 2) < 1e-9
