"""Probe (session 10, not shipped): cardiac-mr with the neighbouring slices in the encoder's three channels.

Each ACDC slice k is shown as (k-1, k, k+1) instead of k three times, hoping the apex and base slices, where
cardiac-mr paints what the labels leave out, become recognisable from their neighbours. Same recipe as the
shipped target (every 2nd train slice, CT SAM-SP start, lr 5e-4, y0 weight 1; val: all 10 val volumes).

``.venv/bin/python -W ignore docs/repro/acdc_slice_context_probe.py runs/acdc25d/ctx.pt``"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from SAMSelfPromptLib.training.api import base_model, train_samples
from SAMSelfPromptLib.training.data import load_volume
from SAMSelfPromptLib.training.targets import split_ids
from SAMSelfPromptLib.training.trainer import TrainConfig
from SAMSelfPromptLib.weights.catalogue import WEIGHTS_DIR
from SAMSelfPromptLib.weights.targets import target_spec

torch.set_num_threads(2)
spec = target_spec("cardiac-mr")
root = Path("../shared/data") / spec.dataset


def context_samples(split: str, step: int) -> list:
    out = []
    for case in split_ids(root, split):
        image, label = root / "images" / f"{case}.nii.gz", root / "labels" / f"{case}.nii.gz"
        for index, structure in enumerate(spec.structures):
            slices = load_volume(image, label, structure.label_ids)
            volume = np.stack([s.image for s in slices])
            for k, s in enumerate(slices):
                if k % step:
                    continue
                s.image = np.stack([volume[max(k - 1, 0)], volume[k], volume[min(k + 1, len(volume) - 1)]], axis=-1)
                s.structure = index
                s.case_id = f"{case}:{k}:{structure.name}"
                out.append(s)
    return out


if __name__ == "__main__":
    out = sys.argv[1]
    train = context_samples("train", int(spec.recipe["train_slice_step"]))
    val = context_samples("val", 1)
    config = TrainConfig(mode="cpu", epochs=int(spec.recipe["epochs"]), lr=float(spec.recipe["lr"]),
                         y0_weight=float(spec.recipe["y0_weight"]))
    model = base_model(str(WEIGHTS_DIR / spec.recipe["init"]), device="cpu")
    model.set_structures(len(spec.structures))
    t0 = time.time()
    result, _ = train_samples(train, val, out, config, model, {"probe": "slice context"}, work_dir=out + "_work",
                              extra_metadata={"target": spec.to_dict(), "role": "auto", "kind": "MR"}, progress=False)
    print(f"trained in {time.time() - t0:.0f} s; best epoch {result.best_epoch}; val {result.best_val}")
