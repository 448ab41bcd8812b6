"""Peak resident memory of encoding one slice, above the loaded model, in a fresh process (session 8).

``.venv/bin/python -W ignore docs/repro/encode_peak_probe.py folded-bf16|folded-fp32|module``: the folded, banded
copy (modeling/fast_encoder.py) at the Segmenter's precision or in fp32 (the exact re-encodes since session 8), or
TinyViT's module in fp32 (what the exact re-encodes ran before). Prints the process's VmHWM after each of 3 encodes."""
import sys

import torch

import SAMSelfPromptLib.cli  # noqa: F401  (a CLI process: Triton is not loaded)
from SAMSelfPromptLib.cli.bench import peak_rss_mb
from SAMSelfPromptLib.weights.catalogue import open_segmenter

torch.set_num_threads(2)
which = sys.argv[1]
seg = open_segmenter(device="cpu", modality="CT").segmenter
images = torch.rand(1, 3, seg.model.image_size, seg.model.image_size)
loaded = peak_rss_mb()
with torch.no_grad():
    for i in range(3):
        if which == "module":
            seg.model.encode(images)
        else:
            seg._folded_encoder()(images, "fp32" if which == "folded-fp32" else seg.precision)
        print(f"{which} encode {i + 1}: peak {peak_rss_mb():.0f} MB, {peak_rss_mb() - loaded:+.0f} MB above the loaded model")
