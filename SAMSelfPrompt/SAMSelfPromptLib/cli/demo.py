"""`samselfprompt demo`: Auto-segment with the shipped default model, no prompt at all.

Without --input it makes its own sample (sample.py), so a fresh checkout needs no
data; with --input it runs the same path as `segment` on the user's file or folder.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ..weights.catalogue import open_segmenter
from ..core.volume import Volume
from ..io import write_labelmap
from ..core.masks import dice
from ..io.sample import dermoscopy_sample
from ..core.predictor import segment_volume


def run(args: argparse.Namespace) -> int:
    if args.input:
        from . import main as cli, segment as segment_cmd

        argv = ["segment", str(args.input), "-o", str(args.output), "--device", args.device]
        return segment_cmd.run(cli.build_parser().parse_args(argv + (["--overwrite"] if args.overwrite else [])))
    out = Path(args.output)
    image, truth = dermoscopy_sample()
    sample_png = out.with_name("demo_sample.png")
    sample_png.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(image).save(sample_png)
    volume = Volume(image[None], np.diag([-1.0, -1.0, 1.0, 1.0]), "RGB", "demo sample")
    t0 = time.perf_counter()
    opened = open_segmenter(device=args.device, modality="RGB", is_rgb=True)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    mask, results = segment_volume(opened.segmenter, volume)
    t_seg = time.perf_counter() - t1
    r = results[0]
    write_labelmap(out, mask, volume.ijk_to_ras, [{"label": 1, "name": "Lesion", "color": (0.8, 0.3, 0.2)}],
                   overwrite=True)
    print(f"model:   {opened.description} on {opened.segmenter.device}")
    print(f"input:   synthetic dermoscopy sample {image.shape[1]}x{image.shape[0]} (saved to {sample_png})")
    box = "none" if r.box is None else ", ".join(f"{v:.0f}" for v in r.box)
    print(f"prompt:  none; self-prompt box ({r.box_source}) x0,y0,x1,y1 = {box}; predicted IoU {r.iou:.3f}")
    print(f"result:  {int(mask.sum())} lesion pixels ({mask.mean():.1%} of the image); "
          f"Dice vs the sample's known truth {dice(mask[0], truth):.3f}")
    print(f"time:    model load {t_load:.1f} s, segmentation {t_seg:.2f} s")
    print(f"wrote:   {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="Auto-segment a built-in sample (or --input) with the shipped model")
    p.add_argument("--input", help="your own DICOM folder, volume or image instead of the built-in sample")
    p.add_argument("-o", "--output", default="out/demo.seg.nrrd", help="output segmentation file")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)
