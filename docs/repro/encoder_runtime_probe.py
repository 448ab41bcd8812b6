"""The CPU encoder's runtimes, one slice at a time, 2 threads (session 14): the module in fp32 (the bench's naive
baseline), the shipped fast path (the folded copy at this CPU's precision), the folded copy in fp32, a TorchScript
trace of the module, ONNX Runtime fp32 on the exported module, and torch.compile of the fast path. Inputs: 8 real CT
slices of the shared series at the model's input size; errors are relative L2 against the module.

``.venv/bin/python -W ignore docs/repro/encoder_runtime_probe.py naive fast folded32 traced [ort] [compile]``
ONNX Runtime is not a dependency: ``.venv/bin/pip download -d W onnxruntime onnx`` then ``pip install --target D
--no-deps W/*.whl`` (remove numpy from D) and run with ``PYTHONPATH=D``."""
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(2)
from SAMSelfPromptLib.weights.catalogue import open_segmenter
from SAMSelfPromptLib.cli.bench import naive_segmenter
from SAMSelfPromptLib.io import read_image
from SAMSelfPromptLib.modeling.backbones import autocast_for
opened = open_segmenter(device="cpu", modality="CT")
seg = opened.segmenter
model = seg.model.eval()
vol = read_image("../shared/data/ct_totalseg/ct.nii.gz")
a = vol.array[::2][:8].astype(np.float32)
a = np.clip((a + 160) / 400, 0, 1)
x = torch.nn.functional.interpolate(torch.from_numpy(a)[:, None], size=(256, 256), mode="bilinear").repeat(1, 3, 1, 1)
def per_slice(fn, reps=2):
    fn(x[:1])
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(len(x)):
            fn(x[i:i + 1])
        ts.append((time.perf_counter() - t) / len(x))
    return min(ts) * 1000
fast = seg._encoder()
naive = naive_segmenter(model, torch.device("cpu"), seg.metadata)._encoder()
def run_fast(xi):
    with torch.no_grad(), autocast_for(torch.device("cpu"), seg.precision):
        return fast(xi)
def run_naive(xi):
    with torch.no_grad():
        return naive(xi)
ref = torch.cat([run_naive(x[i:i+1]) for i in range(len(x))])
def rel(e): return float((e.float() - ref).norm() / ref.norm())
which = sys.argv[1:] or ["naive", "fast", "folded32", "traced"]
if "naive" in which: print(f"naive fp32: {per_slice(run_naive):.0f} ms/slice", flush=True)
if "fast" in which:
    e = torch.cat([run_fast(x[i:i+1]) for i in range(len(x))])
    print(f"fast path ({seg.precision}): {per_slice(run_fast):.0f} ms/slice, rel. error {rel(e):.4f}", flush=True)
if "ort" in which:
    import tempfile

    import onnxruntime as ort
    onnx_path = str(Path(tempfile.mkdtemp()) / "encoder.onnx")
    enc = model.image_encoder
    xn = model.normalize(x[:1])
    t = time.perf_counter()
    torch.onnx.export(enc, (xn,), onnx_path, opset_version=17, dynamo=False, input_names=["x"], output_names=["e"])
    print(f"ONNX export {time.perf_counter()-t:.0f} s", flush=True)
    so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    def run_ort(xi):
        return torch.from_numpy(sess.run(None, {"x": model.normalize(xi).numpy()})[0])
    e = torch.cat([run_ort(x[i:i+1]) for i in range(len(x))])
    print(f"ONNX Runtime fp32: {per_slice(run_ort):.0f} ms/slice, rel. error {rel(e):.6f}", flush=True)
if "compile" in which:
    t = time.perf_counter()
    cfast = torch.compile(run_fast, dynamic=False)
    cfast(x[:1])
    print(f"torch.compile first call {time.perf_counter()-t:.0f} s", flush=True)
    e = torch.cat([cfast(x[i:i+1]) for i in range(len(x))])
    print(f"torch.compile of the fast path: {per_slice(cfast):.0f} ms/slice, rel. error {rel(e):.4f}", flush=True)
if "folded32" in which:
    def run_f32(xi):
        with torch.no_grad():
            return seg._folded_encoder()(xi, "fp32")
    e = torch.cat([run_f32(x[i:i+1]) for i in range(len(x))])
    print(f"folded copy fp32: {per_slice(run_f32):.0f} ms/slice, rel. error {rel(e):.6f}", flush=True)
if "traced" in which:
    with torch.inference_mode():
        tr = torch.jit.optimize_for_inference(torch.jit.trace(model.image_encoder, model.normalize(x[:1])))
    def run_tr(xi):
        with torch.inference_mode():
            return tr(model.normalize(xi))
    e = torch.cat([run_tr(x[i:i+1]) for i in range(len(x))])
    print(f"traced module fp32: {per_slice(run_tr):.0f} ms/slice, rel. error {rel(e):.6f}", flush=True)
