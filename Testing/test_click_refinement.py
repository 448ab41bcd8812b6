"""Click corrections with the shipped click-trained model, on the project's own sample.

The sample is the synthetic dermoscopy picture (sample.py), so these run without
shared data. Each correction must follow the click and must not re-run the encoder.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from SAMSelfPromptLib.weights.catalogue import open_segmenter, shipped_models
from SAMSelfPromptLib.core.volume import Volume
from SAMSelfPromptLib.core.preprocess import Frame, logits_to_slice
from SAMSelfPromptLib.core.masks import dice
from SAMSelfPromptLib.io.sample import dermoscopy_sample


@pytest.fixture(scope="module")
def session():
    assert any(m.role == "clicks" for m in shipped_models()), "the click-trained model must ship in weights/"
    opened = open_segmenter(device="cpu", modality="RGB", is_rgb=True)
    seg = opened.segmenter
    assert seg.refiner is not None, "the prompt-free default must be paired with the click model"
    image, truth = dermoscopy_sample()
    volume = Volume(image[None], np.diag([-1.0, -1.0, 1.0, 1.0]), "RGB", "sample")
    first = next(seg.segment(volume))
    return seg, volume, truth, first


def _inject(first, frame_hw, centre_xy, radius_px, value):
    """The previous result with a disk of the low-res logits forced to ``value``.

    This is how a wrong state reaches the model in a real correction session: as the
    previous logits fed back through SAM's mask prompt.
    """
    h, w = frame_hw
    scale = 256 / max(h, w)  # slice pixels -> LiteMedSAM's 256 model / low-res pixels
    yy, xx = np.mgrid[0:256, 0:256]
    cx, cy = (centre_xy[0] + 0.5) * scale, (centre_xy[1] + 0.5) * scale
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= (radius_px * scale) ** 2
    logits = first.logits.clone()
    logits[0, 0][torch.from_numpy(disk)] = value
    frame = Frame(h, w, 256)
    return replace(first, logits=logits, mask=(logits_to_slice(logits[0], frame) > 0).numpy())


def test_prompt_free_start_is_good(session):
    _, _, truth, first = session
    assert first.box_source == "self"
    assert dice(first.mask, truth) > 0.85


def test_negative_click_removes_a_false_positive_blob(session):
    seg, volume, truth, first = session
    calls = seg.encoder_calls
    # A false-positive blob on background skin inside the self-prompt box.
    x0, y0, x1, y1 = first.box
    bg = ~ndimage.binary_dilation(truth, iterations=30)
    ys, xs = np.nonzero(bg[int(y0):int(y1), int(x0):int(x1)])
    px, py = int(xs[len(xs) // 2] + x0), int(ys[len(ys) // 2] + y0)
    with_fp = _inject(first, truth.shape, (px, py), 18, 10.0)
    blob = with_fp.mask & ~truth
    assert with_fp.mask[py, px] and blob.sum() > 500
    fixed = seg.refine_slice(volume, 0, positive=[], negative=[(px, py)], previous=with_fp)
    assert not fixed.mask[py, px]
    assert (fixed.mask & blob).sum() < 0.1 * blob.sum()
    assert dice(fixed.mask, truth) > 0.85
    assert seg.encoder_calls == calls, "refinement must reuse the cached embedding"


def test_positive_click_adds_a_missed_region(session):
    seg, volume, truth, first = session
    calls = seg.encoder_calls
    # A missed region deep inside the lesion.
    depth = ndimage.distance_transform_edt(truth)
    py, px = np.unravel_index(int(np.argmax(depth)), depth.shape)
    with_miss = _inject(first, truth.shape, (px, py), 30, -10.0)
    missed = truth & ~with_miss.mask
    assert not with_miss.mask[py, px] and missed.sum() > 1000
    fixed = seg.refine_slice(volume, 0, positive=[(px, py)], negative=[], previous=with_miss)
    assert fixed.mask[py, px]
    assert (fixed.mask & missed).sum() > 0.75 * missed.sum()
    assert dice(fixed.mask, truth) > dice(with_miss.mask, truth)
    assert seg.encoder_calls == calls
