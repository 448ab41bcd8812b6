"""The encoder's error against fp32 on three left-atrium MR slices, for each arithmetic a host may run (session 10).

Rows: the whole module under bf16 autocast (what a GPU ran before session 10), the folded copy unfused (what a
GPU runs now), the same with stage 2 in fp32 (left-atrium-mr's metadata), and the CPU's fused fast path. All under
this CPU's bf16. ``.venv/bin/python -W ignore docs/repro/gpu_arithmetic_probe.py``"""
import numpy as np
import torch

from SAMSelfPromptLib.core.preprocess import mr_percentiles, normalize_slice, to_model_input
from SAMSelfPromptLib.modeling.backbones import autocast_for
from SAMSelfPromptLib.modeling.fast_encoder import fast_encoder
from SAMSelfPromptLib.training.data import load_volume
from SAMSelfPromptLib.weights.catalogue import find_target, load_samsp

torch.set_num_threads(2)
model, _ = load_samsp(find_target("left-atrium-mr").path)
case = "../shared/data/la_mri/{}/23X6SY44VT9KFHR7S7OC.nii.gz"
slices = load_volume(case.format("images"), case.format("labels"), (1,))
intensity = mr_percentiles(np.stack([s.image for s in slices]))
copies = {"folded, unfused": fast_encoder(model, "bf16", [], fuse=False),
          "folded, unfused, stage 2 fp32": fast_encoder(model, "bf16", [2], fuse=False),
          "CPU fast path, stage 2 fp32": fast_encoder(model, "bf16", [2])}
for k in (40, 50, 60):
    x = to_model_input(normalize_slice(slices[k].image, intensity), 256)[0][None]
    with torch.no_grad():
        ref = model.encode(x)
        with autocast_for(torch.device("cpu"), "bf16"):
            rows = {"module under autocast": model.encode(x).float()}
        rows.update({name: encode(x) for name, encode in copies.items()})
    print(k, {name: f"{100 * float((e - ref).norm() / ref.norm()):.2f}%" for name, e in rows.items()})
