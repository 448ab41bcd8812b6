"""Evaluation: metrics on hand-made masks, row scoring with FP counts, and the CLI end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from SAMSelfPromptLib.core.masks import dice as dice_score
from SAMSelfPromptLib.evaluation.evaluate import EvalResult, hd95, iou_score, score_rows
from SAMSelfPromptLib.core.preprocess import Frame


def test_metrics_on_hand_made_masks():
    a = np.zeros((20, 20), bool)
    a[5:15, 5:15] = True  # 100 px
    b = np.zeros((20, 20), bool)
    b[5:15, 10:20] = True  # 100 px, 50 overlap
    assert dice_score(a, b) == pytest.approx(0.5)
    assert iou_score(a, b) == pytest.approx(50 / 150)
    assert dice_score(a, a) == 1.0 and hd95(a, a) == 0.0
    # a shifted copy: every surface point is at most 5 px from the other surface
    assert 0 < hd95(a, b) <= 5.0
    assert hd95(a, b, spacing=(2.0, 2.0)) == pytest.approx(2 * hd95(a, b))
    empty = np.zeros_like(a)
    assert dice_score(empty, a) == 0.0 and dice_score(empty, empty) == 1.0
    assert hd95(empty, a) == pytest.approx(np.hypot(20, 20))  # the worst case, finite


def test_score_rows_counts_false_positives_on_unlabelled_slices():
    frames = [Frame(16, 16, 256)] * 3
    masks = [np.ones((16, 16), bool), np.zeros((16, 16), bool), np.zeros((16, 16), bool)]
    everything = torch.full((3, 1, 256, 256), 10.0)
    nothing = torch.full((3, 1, 256, 256), -10.0)
    res = score_rows({"all": everything, "none": nothing, "gt_box": everything}, frames, masks,
                     ["a", "b", "c"], [(1.0, 1.0)] * 3)
    assert res.rows["all"]["dice"] == pytest.approx(1.0) and res.rows["all"]["n"] == 1
    assert res.rows["all"]["fp_slices"] == 2 and res.rows["all"]["n_negative"] == 2
    assert res.rows["none"]["dice"] == 0.0 and res.rows["none"]["fp_slices"] == 0
    assert "fp_slices" not in res.rows["gt_box"]
    assert "FP slices" in res.markdown()
    assert json.loads(json.dumps(res.to_json()))["rows"]["all"]["n"] == 1


def _write_folder(root, n=3, size=40):
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    ids = []
    for i in range(n):
        cy, cx, r = rng.uniform(14, 26, 2).tolist() + [rng.uniform(6, 10)]
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img = np.stack([np.clip(rng.normal(60, 8, (size, size)) + 120 * mask, 0, 255)] * 3, -1).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"C{i}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"C{i}.png")
        ids.append(f"C{i}")
    (root / "splits.json").write_text(json.dumps({"train": ids[:2], "val": ids[2:]}))


def test_cli_train_then_evaluate_end_to_end(tmp_path, monkeypatch):
    from SAMSelfPromptLib.weights.checkpoint import read_samsp
    from SAMSelfPromptLib.cli.training import main

    monkeypatch.setenv("SAMSELFPROMPT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    _write_folder(data)
    ckpt = tmp_path / "m.pt"
    assert main(["train", str(data), "-o", str(ckpt), "--epochs", "2", "--batch-size", "2", "--threads", "1",
                 "--no-progress"]) == 0
    meta = read_samsp(ckpt)["metadata"]
    assert meta["data"]["n_train"] == 2 and meta["data"]["n_val"] == 1 and meta["modality"] == "RGB"
    assert len(meta["history"]) == 2 and "samsp" in meta["val_metrics"]
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(data), "--checkpoint", str(ckpt), "--alpha0-checkpoint", str(ckpt),
                 "--json", str(out), "--threads", "1"]) == 0
    res = json.loads(out.read_text())
    assert set(res["rows"]) == {"no_prompt", "full_box", "self_box", "gt_box", "samsp_y0", "samsp", "samsp_alpha0"}
    assert all(r["n"] == 3 for r in res["rows"].values())
    assert len(res["cases"]) == 7 * 3
    # gt_box is the expert anchor: on clean disks it must find them
    assert res["rows"]["gt_box"]["dice"] > 0.8
    assert res["rows"]["samsp"]["dice"] == pytest.approx(res["rows"]["samsp_alpha0"]["dice"])


SHIPPED = "samsp_ph2_litemedsam.pt"


def _shipped_path():
    from SAMSelfPromptLib.cli.training import DEFAULT_PH2_CHECKPOINT

    return DEFAULT_PH2_CHECKPOINT


def test_shipped_checkpoint_is_small_safe_and_documented():
    from SAMSelfPromptLib.weights.checkpoint import load_samsp

    path = _shipped_path()
    raw = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code
    assert all(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in raw["tensors"])  # trained tensors only
    assert all(v.dtype == torch.float16 for v in raw["tensors"].values())
    meta = raw["metadata"]
    assert meta["modality"] == "RGB" and meta["input_size"] == 256 and meta["mode"] == "cpu"
    assert meta["data"]["n_train"] == 120 and meta["data"]["n_val"] == 40
    assert meta["val_metrics_cpu"]["samsp"]["dice"] >= 0.94 and meta["val_metrics_cpu"]["samsp_y0"]["dice"] >= 0.92
    fp16 = meta["fp16_check"]
    assert abs(fp16["val_dice_fp32_weights"] - fp16["val_dice_fp16_weights_cpu"]) <= fp16["tolerance"]
    model, _ = load_samsp(path)
    assert model.image_size == 256


@pytest.mark.slow
def test_shipped_checkpoint_reproduces_recorded_val_dice(ph2_dir, tmp_path):
    """40 real encoder calls (about a minute on 2 idle cores): the number in the metadata is real."""
    from SAMSelfPromptLib.weights.checkpoint import load_samsp
    from SAMSelfPromptLib.evaluation.evaluate import evaluate_samples
    from SAMSelfPromptLib.modeling.backbones import build_model
    from SAMSelfPromptLib.training.data import load_folder
    from SAMSelfPromptLib.training.embedding_cache import DiskEmbeddingCache

    model, meta = load_samsp(_shipped_path())
    res = evaluate_samples(build_model(), {"samsp": model}, load_folder(ph2_dir, "val"), DiskEmbeddingCache())
    assert res.rows["samsp"]["dice"] == pytest.approx(meta["recorded_val_dice"], abs=0.005)
