"""Issue 13's engine pieces on real data: the CPU precision choice, slice skipping, memory bounds.

Slice skipping must change no slice where the target is present: on the shared CT series (liver,
label 5 of labels.nii.gz, on every one of its 20 slices) the skipping path is compared with the
full path slice by slice. One Segmenter serves both paths, skipping first, so every slice is
encoded once and both paths decode the same cached embeddings. No timing thresholds here:
speed is measured by `samselfprompt bench` (docs/RESULTS.md, Speed).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import shared_path

from SAMSelfPromptLib.core.masks import dice
from SAMSelfPromptLib.core.predictor import (Segmenter, SegmentOptions, SliceEmbeddingCache, segment_volume)
from SAMSelfPromptLib.core.preprocess import Intensity
from SAMSelfPromptLib.core.skipping import coarse, next_wave, outside_body
from SAMSelfPromptLib.core.volume import Volume
from SAMSelfPromptLib.errors import InputError
from SAMSelfPromptLib.modeling.backbones import autocast_for, cpu_has_native_bf16, resolve_precision

LIVER = 5
AIR = -1024
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ct():
    from SAMSelfPromptLib.io import read_any

    volume = read_any(shared_path("ct_totalseg", "dicom"))
    labels = read_any(shared_path("ct_totalseg", "labels.nii.gz")).array == LIVER  # same grid as the series
    assert volume.array.shape == labels.shape
    return volume, labels


@pytest.fixture(scope="module")
def fast():
    """The shipped CT model as every host opens it (default precision), one per module: a shared cache."""
    from SAMSelfPromptLib.weights.catalogue import open_segmenter

    return open_segmenter(device="cpu", modality="CT").segmenter


def padded(volume: Volume, n_air: int) -> Volume:
    """The series with ``n_air`` all-air slices before and after (outside the body: never encoded)."""
    air = np.full((n_air, *volume.array.shape[1:]), AIR, volume.array.dtype)
    ijk_to_ras = volume.ijk_to_ras.copy()
    ijk_to_ras[:3, 3] -= ijk_to_ras[:3, 2] * n_air  # slice 0 moves n_air slices down
    return Volume(np.concatenate([air, volume.array, air]), ijk_to_ras, "CT", "CT series padded with air")


def test_skipping_changes_no_liver_slice_of_the_ct_series(ct, fast):
    volume, liver = ct
    vol = padded(volume, 2)
    liver = np.concatenate([np.zeros((2, *liver.shape[1:]), bool), liver, np.zeros((2, *liver.shape[1:]), bool)])
    start = fast.encoder_calls
    skip_mask, skip_results = segment_volume(fast, vol, SegmentOptions())
    encoded_by_skipping = fast.encoder_calls - start
    full_mask, full_results = segment_volume(fast, vol, SegmentOptions(skip_slices=False))
    assert fast.encoder_calls - start == vol.array.shape[0]  # the full path encoded only what skipping left

    with_liver = [k for k in range(vol.array.shape[0]) if liver[k].any()]
    assert len(with_liver) == 20
    for k in with_liver:
        assert np.array_equal(skip_mask[k], full_mask[k]), f"slice {k} differs between the skipping and full paths"
    skipped = {r.index: r for r in skip_results}
    full = {r.index: r for r in full_results}
    for k in with_liver:  # the same result, not just the same mask
        assert skipped[k].box_source == full[k].box_source
        if full[k].box is not None:
            np.testing.assert_array_equal(skipped[k].box, full[k].box)
    assert encoded_by_skipping <= 20  # the 4 air slices were never encoded
    assert not skip_mask[[0, 1, 22, 23]].any()
    assert sorted(skipped) == list(range(24))  # every slice comes out exactly once
    # The model finds the liver: the comparison above is not between two empty outputs.
    assert dice(full_mask.astype(bool), liver) > 0.7


def test_skipping_schedule():
    """The coarse-to-fine waves and the outside-body test. (On real data the shipped CT model's first
    pass finds "liver" on every slice with body in it, crops and phantom slices without liver included,
    so only the schedule shows the waves stopping; docs/RESULTS.md, Speed.)"""
    body = list(range(10, 30))
    assert coarse(body, 4) == [10, 14, 18, 22, 26, 29]
    assert coarse([3], 4) == [3] and coarse([], 4) == []
    done = set(coarse(body, 4))
    assert next_wave(body, [18], done, 4) == [15, 16, 17, 19, 20, 21]
    assert next_wave(body, [29], done, 4) == [25, 27, 28]
    assert next_wave(body, [], done, 4) == []
    ct = Intensity("CT", -160.0, 240.0)
    air = np.full((64, 64), -1000, np.int16)
    assert outside_body(air, ct)
    body_slice = air.copy()
    body_slice[16:48, 16:48] = 40
    assert not outside_body(body_slice, ct)
    assert outside_body(np.zeros((64, 64)), Intensity("MR", 0.0, 1.0))  # one value everywhere: blank input
    assert not outside_body(np.arange(4096.0).reshape(64, 64), Intensity("MR", 0.0, 1.0))
    with_nan = body_slice.astype(float)
    with_nan[0, 0] = np.nan
    assert not outside_body(with_nan, ct)  # left to the encoder path, which refuses it with its message


def test_the_cpu_encoder_sees_one_slice_at_a_time(lite_model):
    """A batch buys nothing on the CPU and holds its activations once per slice (core/predictor.one_at_a_time):
    the folded copy every CPU Segmenter runs, and the module the bench's naive baseline runs."""
    from SAMSelfPromptLib.cli.bench import naive_segmenter

    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    fast = Segmenter(lite_model, "cpu")
    folded, seen = fast._folded_encoder(), []
    fast._fast_encode = lambda x, *precision: (seen.append(len(x)), folded(x, *precision))[1]
    both = fast._encode(fast._encoder(), images)
    alone = fast._encode(fast._encoder(), images[1:])
    assert seen == [1, 1, 1] and both.shape == (2, 256, 64, 64)
    assert torch.equal(both[1:], alone)  # a slice's embedding does not depend on its batch
    seen.clear()
    hook = lite_model.image_encoder.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        naive = naive_segmenter(lite_model, torch.device("cpu"), {})
        naive._encode(naive._encoder(), images)
    finally:
        hook.remove()
    assert seen == [1, 1]


def test_the_next_slice_is_encoded_in_the_heap_the_last_one_freed(ct, fast):
    """A CPU Segmenter fixes glibc's heap thresholds (core/memory.reuse_freed_heap): once warm, encoding a slice
    takes (almost) no fresh pages from the kernel. With glibc's adaptive thresholds it took 17-31 thousand page
    faults a slice."""
    import resource

    from SAMSelfPromptLib.core.memory import _glibc
    from SAMSelfPromptLib.core.orientation import SliceStack

    if _glibc() is None:
        pytest.skip("no glibc mallopt here")
    volume, _ = ct
    stack = SliceStack.of(volume, 0)
    batch, _ = fast._host_batch(stack, [10], fast.intensity_for(volume, SegmentOptions()), volume.name)
    encode = fast._encoder()
    for _ in range(2):
        fast._encode(encode, batch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        fast._encode(encode, batch)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 4 * 2000


def test_precision_choice_and_override(monkeypatch, lite_model):
    monkeypatch.delenv("SAMSELFPROMPT_PRECISION", raising=False)
    native = cpu_has_native_bf16()
    assert resolve_precision(CPU) == ("bf16" if native else "fp32")
    assert Segmenter(lite_model, "cpu").precision == resolve_precision(CPU)
    monkeypatch.setenv("SAMSELFPROMPT_PRECISION", "fp32")
    plain = Segmenter(lite_model, "cpu")
    assert plain.precision == "fp32"
    assert Segmenter(lite_model, "cpu", precision="bf16").precision == "bf16"  # the caller wins over the env
    monkeypatch.setenv("SAMSELFPROMPT_PRECISION", "fast")
    with pytest.raises(InputError, match="SAMSELFPROMPT_PRECISION"):
        Segmenter(lite_model, "cpu")
    monkeypatch.delenv("SAMSELFPROMPT_PRECISION")
    assert not torch.is_autocast_enabled("cpu")
    with autocast_for(CPU, "bf16", training=True):
        assert not torch.is_autocast_enabled("cpu")  # CPU training stays fp32
    with autocast_for(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_fast_path_agrees_with_fp32_on_the_ct_series(ct, fast):
    """The bf16 encoder against the naive fp32 one, on real slices: embeddings and SAM-SP masks."""
    if fast.precision == "fp32":
        pytest.skip("this CPU has no native bf16: the fast path is the fp32 path")
    volume, _ = ct
    vol = padded(volume, 2)  # the volume the first test cached (same content key): no re-encoding
    naive = Segmenter(fast.model, "cpu", fast.metadata, precision="fp32")
    opts = SegmentOptions(slice_range=(8, 14), skip_slices=False)
    fast_mask, _ = segment_volume(fast, vol, opts)
    naive_mask, _ = segment_volume(naive, vol, opts)
    assert dice(fast_mask, naive_mask) >= 0.995
    from SAMSelfPromptLib.core.orientation import SliceStack
    from SAMSelfPromptLib.core.preprocess import normalize_slice, to_model_input

    stack = SliceStack.of(vol, 0)
    x = to_model_input(normalize_slice(stack.pixels[10], fast.intensity_for(vol, opts)), 256)[0][None]
    with torch.no_grad():
        ref = fast.model.encode(x)
        got = fast._encoder()(x)
    assert float((got - ref).norm() / ref.norm()) < 0.03  # bf16 matmuls, fp32 convolutions: about 1%


def test_the_fast_segmenter_projects_the_decoders_image_tokens_in_bf16(ct, fast):
    """The Segmenter every host runs decodes with the decoder's image-token projections in its precision
    (bf16 here), the fp32 one wholly in fp32: a real liver slice's logits are the bf16-projection pass's on
    the cached embedding, and within a small margin of the fp32 pass's."""
    if fast.precision == "fp32":
        pytest.skip("this CPU has no native bf16: the fast path is the fp32 path")
    from SAMSelfPromptLib.core.orientation import SliceStack

    volume, _ = ct
    opts = fast.resolved(SegmentOptions(slice_range=(10, 11), skip_slices=False))
    (result,) = list(fast.segment(volume, opts))
    assert result.box_source == "self" and result.mask.any()
    stack = SliceStack.of(volume, 0)
    (_, embs, frames), = list(fast.embeddings(volume, stack, [10], fast.intensity_for(volume, opts), 1))
    fallback = torch.as_tensor(frames[0].full_box())[None]
    with fast._decoding():
        low = fast._sam_sp(embs, fallback, opts.empty_y0).y1
    with fast._decoding("fp32"):
        exact = fast._sam_sp(embs, fallback, opts.empty_y0).y1
    assert torch.equal(result.logits, low.reshape(result.logits.shape))
    assert not torch.equal(low, exact) and float((low - exact).abs().max()) < 0.5
    assert float(((low > 0) == (exact > 0)).float().mean()) > 0.999


def test_a_checkpoints_fp32_stages_run_in_fp32_on_the_fast_path(ct, fast):
    """A checkpoint whose metadata names ``encoder_fp32_stages`` (left-atrium-mr: stage 2) gets a fast encoder
    that runs those stages in fp32: its embedding of a real slice is closer to the fp32 module's, and the shipped
    left-atrium checkpoint asks for it."""
    if fast.precision == "fp32":
        pytest.skip("this CPU has no native bf16: the fast path is the fp32 path")
    from SAMSelfPromptLib.core.orientation import SliceStack
    from SAMSelfPromptLib.core.preprocess import normalize_slice, to_model_input
    from SAMSelfPromptLib.weights.catalogue import find_target
    from SAMSelfPromptLib.weights.checkpoint import read_samsp

    volume, _ = ct
    stage2 = Segmenter(fast.model, "cpu", {**fast.metadata, "encoder_fp32_stages": [2]})
    stack = SliceStack.of(volume, 0)
    x = to_model_input(normalize_slice(stack.pixels[10], fast.intensity_for(volume, SegmentOptions())), 256)[0][None]
    with torch.no_grad():
        ref = fast.model.encode(x)
        error = {name: float((seg._encoder()(x) - ref).norm() / ref.norm()) for name, seg in
                 (("all bf16", fast), ("stage 2 fp32", stage2))}
    assert error["stage 2 fp32"] < 0.75 * error["all bf16"], error
    assert read_samsp(find_target("left-atrium-mr").path)["metadata"]["encoder_fp32_stages"] == [2]
    with pytest.raises(ValueError, match="stage 7"):
        Segmenter(fast.model, "cpu", {"encoder_fp32_stages": [7]})._folded_encoder()


def test_a_gpu_encodes_with_the_cpu_fast_paths_arithmetic(ct, fast):
    """At reduced precision a CUDA GPU runs the folded copy too, unfused (oneDNN's fused blocks are the CPU's):
    convolutions and a checkpoint's ``encoder_fp32_stages`` in fp32, where autocasting the module would put them
    in bf16. Built here as the GPU builds it (no GPU in CI) and run under the CPU's bf16: the stage sees fp32, and
    the embedding is far closer to fp32 than the autocast module's."""
    from SAMSelfPromptLib.modeling.fast_encoder import runs_folded_copy

    assert runs_folded_copy(torch.device("cuda"), "bf16") and runs_folded_copy(torch.device("cuda"), "fp16")
    assert runs_folded_copy(torch.device("cpu"), "bf16")
    assert not runs_folded_copy(torch.device("cuda"), "fp32") and not runs_folded_copy(torch.device("mps"), "fp16")
    if fast.precision == "fp32":
        pytest.skip("this CPU has no native bf16")
    from SAMSelfPromptLib.core.orientation import SliceStack
    from SAMSelfPromptLib.core.preprocess import normalize_slice, to_model_input
    from SAMSelfPromptLib.modeling.backbones import autocast_for
    from SAMSelfPromptLib.modeling.fast_encoder import Float32, FusedMBConv, fast_encoder

    volume, _ = ct
    x = to_model_input(normalize_slice(SliceStack.of(volume, 0).pixels[10],
                                       fast.intensity_for(volume, SegmentOptions())), 256)[0][None]
    encode = fast_encoder(fast.model, "bf16", [2], fuse=False)
    stage = encode.module.layers[2]
    seen = []
    stage.module.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.no_grad():
        ref = fast.model.encode(x)
        kept = encode(x)
        with autocast_for(torch.device("cpu"), "bf16"):
            module = fast.model.encode(x).float()
    assert isinstance(stage, Float32) and seen == [(torch.float32, torch.float32)]
    assert not any(isinstance(m, FusedMBConv) for m in encode.module.modules())
    assert not isinstance(fast.model.image_encoder.layers[2], Float32)  # the model itself is untouched
    assert float((kept - ref).norm()) < 0.5 * float((module - ref).norm())


def test_borderline_first_passes_are_decided_from_fp32_embeddings(ct, fast, monkeypatch):
    """With every slice counted as borderline, the bf16 Segmenter re-encodes each in fp32 and paints
    exactly what the fp32 one paints; the exact embeddings stay cached, so a re-run encodes nothing."""
    from SAMSelfPromptLib.core import predictor

    check = Segmenter(fast.model, "cpu", fast.metadata)  # the default precision, its own cache
    if check.precision == "fp32":
        pytest.skip("this CPU has no native bf16: the fast path is the fp32 path")
    monkeypatch.setattr(predictor, "BORDERLINE_LOGIT", float("inf"))
    volume, _ = ct
    opts = SegmentOptions(slice_range=(8, 11), skip_slices=False)
    naive_mask, _ = segment_volume(Segmenter(fast.model, "cpu", fast.metadata, precision="fp32"), volume, opts)
    mask, _ = segment_volume(check, volume, opts)
    assert check.exact_encodes == 3 and np.array_equal(mask, naive_mask) and mask[8:11].any()
    again, _ = segment_volume(check, volume, opts)
    assert check.exact_encodes == 3 and check.encoder_calls == 3 and np.array_equal(again, mask)


def test_presence_scores_near_the_threshold_are_decided_from_fp32_embeddings(ct, fast, monkeypatch):
    """With a presence threshold, a slice whose pass 1 found something and whose presence score lies near the
    threshold is re-encoded in fp32 too (bf16 moved left-atrium-mr's slice 68 from 0.052 to under 0.05)."""
    from SAMSelfPromptLib.core import predictor

    metadata = dict(fast.metadata, presence_threshold=0.01)
    check = Segmenter(fast.model, "cpu", metadata)
    if check.precision == "fp32":
        pytest.skip("this CPU has no native bf16: the fast path is the fp32 path")
    monkeypatch.setattr(predictor, "BORDERLINE_LOGIT", 0.0)  # none by their logits: only the presence rule
    monkeypatch.setattr(predictor, "BORDERLINE_PRESENCE", float("inf"))
    volume, _ = ct
    opts = SegmentOptions(slice_range=(8, 11), skip_slices=False)
    naive_mask, _ = segment_volume(Segmenter(fast.model, "cpu", metadata, precision="fp32"), volume, opts)
    mask, _ = segment_volume(check, volume, opts)
    assert mask[8:11].any() and check.exact_encodes == sum(bool(mask[k].any()) for k in range(8, 11))
    assert np.array_equal(mask, naive_mask)


def test_fused_blocks_compute_what_the_blocks_compute(fast):
    """The fused convolution blocks (MBConv, PatchMerging) are the same fp32 arithmetic as TinyViT's,
    block by block, and running them in bands of rows changes no value."""
    import copy

    from SAMSelfPromptLib.modeling.fast_encoder import (FusedMBConv, FusedPatchMerging, can_fuse, fold_conv_bn,
                                                        inference_encoder)

    if not can_fuse():
        pytest.skip("this torch build has no oneDNN fused convolutions: the encoder keeps plain blocks")
    enc = copy.deepcopy(fast.model.image_encoder).eval()
    with torch.no_grad():
        fold_conv_bn(enc)
    blocks = [m for m in enc.modules() if type(m).__name__ == "MBConv"]
    assert blocks, "LiteMedSAM's first stage is MBConv blocks"
    x = torch.randn(1, blocks[0].in_chans, 64, 64).contiguous(memory_format=torch.channels_last)
    for block in blocks:
        with torch.no_grad():
            want = block(x.clone())  # MBConv adds in place into its input's result; keep x intact
            got = FusedMBConv(block)(x)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), float((got - want).abs().max())
        # Bands of rows (uneven ones included) compute exactly the whole map's values.
        whole, banded = FusedMBConv(block, band_rows=10**6), FusedMBConv(block, band_rows=5)
        with torch.no_grad():
            assert torch.equal(banded(x), whole(x))
    mergings = [m for m in enc.modules() if type(m).__name__ == "PatchMerging"]
    assert {m.conv2.stride[0] for m in mergings} == {1, 2}, "LiteMedSAM merges at stride 2 and, last, at stride 1"
    for block in mergings:
        h, w = block.input_resolution
        tokens = torch.randn(1, h * w, block.conv1.in_channels)  # as the stage before hands them over
        with torch.no_grad():
            want = block(tokens)
            whole, banded = FusedPatchMerging(block, band_rows=10**6), FusedPatchMerging(block, band_rows=3)
            got = banded(tokens)
            assert torch.equal(got, whole(tokens))
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), float((got - want).abs().max())
    fused = inference_encoder(fast.model)
    assert sum(isinstance(m, FusedMBConv) for m in fused.modules()) == len(blocks)
    assert sum(isinstance(m, FusedPatchMerging) for m in fused.modules()) == len(mergings)


def test_every_linear_layer_of_the_fast_copy_is_one_onednn_call_with_its_gelu(fast):
    """The fast copy runs each of TinyViT's linear layers as one oneDNN call, an MLP's first one with its
    GELU: in fp32 the values of ``F.linear`` (and GELU), under bf16 autocast bf16 out, close to fp32, from
    weights cast once; and the whole copy's embedding stays the module's in fp32 and close to it in bf16."""
    import torch.nn as nn
    import torch.nn.functional as F

    from SAMSelfPromptLib.modeling.fast_encoder import FusedLinear, can_fuse, fast_encoder, inference_encoder

    if not can_fuse():
        pytest.skip("this torch build has no oneDNN fused linear layers: the encoder keeps plain ones")
    module = fast.model.image_encoder
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    mlps = [m for m in module.modules() if type(m).__name__ == "Mlp"]
    copy = inference_encoder(fast.model)
    fused = [m for m in copy.modules() if isinstance(m, FusedLinear)]
    assert len(fused) == len(linears) and not any(isinstance(m, nn.Linear) for m in copy.modules())
    copied_mlps = [m for m in copy.modules() if type(m).__name__ == "Mlp"]
    assert len(copied_mlps) == len(mlps) > 0
    for mlp, original in zip(copied_mlps, mlps):
        assert mlp.fc1.activation == "gelu" and isinstance(mlp.act, nn.Identity)
        x = torch.randn(1, 300, original.fc1.in_features)
        with torch.no_grad():
            want = F.gelu(original.fc1(x))
            got = mlp.fc1(x)
            assert got.dtype == torch.float32
            assert float((got - want).norm() / want.norm()) < 1e-5
            with autocast_for(CPU, "bf16"):
                low = mlp.fc1(x)
                assert low.dtype == torch.bfloat16 and float((low.float() - want).norm() / want.norm()) < 1e-2
                cast_once = mlp.fc1._weights(torch.bfloat16)[0]
                mlp.fc1(x)
                assert mlp.fc1._weights(torch.bfloat16)[0] is cast_once
            plain = original.fc2(want)
            assert float((mlp.fc2(want) - plain).norm() / plain.norm()) < 1e-5
    # The whole copy on a real CT slice: fp32 within rounding of the module, bf16 within its usual ~2%.
    image = ct_model_input(10)
    encode = fast_encoder(fast.model, "bf16")
    with torch.no_grad():
        reference = module(fast.model.normalize(image))
        assert float((encode(image, "fp32") - reference).norm() / reference.norm()) < 1e-4
        assert float((encode(image, "bf16") - reference).norm() / reference.norm()) < 0.03


def ct_model_input(k: int) -> torch.Tensor:
    """Slice ``k`` of the CT series as the CT model's input (1 x 3 x 256 x 256, abdomen window)."""
    from SAMSelfPromptLib.core.preprocess import normalize_slice, to_model_input
    from SAMSelfPromptLib.io import read_image

    array = read_image(shared_path("ct_totalseg", "ct.nii.gz")).array
    return to_model_input(normalize_slice(array[k], Intensity("CT", -160.0, 240.0)), 256)[0][None]


def test_attention_blocks_taken_a_band_of_windows_at_a_time_compute_what_tinyvit_blocks_compute(fast):
    """The fast copy's ``FusedViTBlock`` (windows a band at a time, the scale in the query weights, the
    local convolution on the tokens in place) computes each TinyViT block's values: in fp32 within
    rounding, under bf16 autocast close to them and to the block's own bf16; and the band size changes
    no value (one window row a band, or the whole map at once)."""
    import copy

    from SAMSelfPromptLib.modeling.fast_encoder import (FusedViTBlock, fold_conv_bn, inference_encoder,
                                                        keep_convs_fp32)

    module = copy.deepcopy(fast.model.image_encoder).eval()
    with torch.no_grad():
        fold_conv_bn(module)
    keep_convs_fp32(module)  # as in the fast copy: the local convolutions stay fp32 under autocast
    blocks = [m for m in module.modules() if type(m).__name__ == "TinyViTBlock"]
    fused = [m for m in inference_encoder(fast.model).modules() if isinstance(m, FusedViTBlock)]
    assert len(fused) == len(blocks) > 0
    assert {b.window_size for b in blocks} == {7, 14}, "LiteMedSAM's stages attend in 7 x 7 and 14 x 14 windows"
    assert any(b.input_resolution[0] % b.window_size for b in blocks), "some maps need padding to whole windows"
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    torch.manual_seed(0)
    for block in blocks:
        h, w = block.input_resolution
        x = torch.randn(1, h * w, block.dim)
        one_row, whole = FusedViTBlock(block, max_score_elements=1), FusedViTBlock(block, max_score_elements=1 << 40)
        assert one_row.rows_per_band == 1 and whole.rows_per_band >= whole.window_rows > 1
        with torch.no_grad():
            want = block(x)
            got = one_row(x)
            assert rel(got, want) < 1e-5, rel(got, want)
            assert torch.equal(whole(x), got)
            with torch.autocast("cpu", torch.bfloat16):
                low, low_block, low_whole = one_row(x), block(x), whole(x)
            assert low.dtype == torch.float32  # the residual stream stays fp32, as in the block
            assert rel(low, want) < 2e-2 and rel(low, low_block) < 2e-2, (rel(low, want), rel(low, low_block))
            assert torch.equal(low_whole, low)


def test_embedding_cache_is_bounded_in_bytes(monkeypatch):
    monkeypatch.setenv("SAMSELFPROMPT_CACHE_MB", "5")
    cache = SliceEmbeddingCache()
    assert cache.max_bytes == 5 * 2**20
    for k in range(4):
        cache.put(("v", 0, k), torch.zeros(256, 64, 64), None)  # 2 MB each in fp16
    assert cache.nbytes <= cache.max_bytes and cache.get(("v", 0, 0)) is None and cache.get(("v", 0, 3)) is not None
    assert cache.get(("v", 0, 3))[0].dtype == torch.float16
    # One block of slots: what get() returned stays valid when its slot is reused by later puts.
    held, _ = cache.get(("v", 0, 3))
    for k in range(4, 8):
        cache.put(("v", 0, k), torch.full((256, 64, 64), float(k)), None)
    assert ("v", 0, 3) not in cache and float(held.abs().max()) == 0.0
    assert float(cache.get(("v", 0, 7))[0][0, 0, 0]) == 7.0
    cache.put(("other model", 0, 0), torch.ones(256, 32, 32), None)  # another shape: starts over
    assert ("v", 0, 7) not in cache and cache.get(("other model", 0, 0))[0].shape == (256, 32, 32)
    monkeypatch.setenv("SAMSELFPROMPT_CACHE_MB", "lots")
    with pytest.raises(InputError, match="SAMSELFPROMPT_CACHE_MB"):
        SliceEmbeddingCache()


def test_job_keeps_no_results_of_its_own(fast):
    """The one job path streams results to the host and keeps only counts (and the mask it was asked for)."""
    from SAMSelfPromptLib.runtime.jobs import EventKind, Worker, segmentation_job

    pixels = np.full((3, 64, 64), AIR, np.int16)
    pixels[:, 30:34, 30:34] = 40  # 0.4% of each slice inside the window: outside the body, never encoded
    vol = Volume(pixels, np.diag([-1.0, -1.0, 2.0, 1.0]), "CT", "air")
    worker = Worker()
    try:
        job = worker.submit(segmentation_job(fast, vol, SegmentOptions(), keep_mask=True))
        summary = job.wait(60)
        events = worker.drain()
    finally:
        worker.shutdown()
    assert summary["slices"] == 3 and summary["nonempty"] == 0 and summary["mask"].shape == (3, 64, 64)
    assert sorted(e.payload.index for e in events if e.kind is EventKind.SLICE) == [0, 1, 2]
    _, kept = segment_volume(fast, vol, SegmentOptions(), keep_results=False)
    assert kept == []


def test_prefetched_keeps_order_raises_at_the_item_and_stops_its_thread():
    import threading

    from SAMSelfPromptLib.core.prefetch import prefetched

    seen = []

    def prepare(k):
        seen.append(k)
        if k == 3:
            raise InputError("slice 3 is NaN")
        return k * k

    got = []
    with pytest.raises(InputError, match="slice 3"):
        for k, sq in prefetched(range(6), prepare):
            got.append((k, sq))
    assert got == [(0, 0), (1, 1), (2, 4)]  # everything before the bad item, in order
    assert max(seen) <= 4  # one item ahead at most, never the whole list

    gen = prefetched(range(100), lambda k: k)
    assert next(gen) == (0, 0)
    gen.close()  # a cancelled run: the helper thread is shut down, not left behind
    assert not [t for t in threading.enumerate() if t.name.startswith("samselfprompt-prefetch")]

    # ahead=0: each item prepared on the calling thread when its turn comes, and no helper thread.
    where = []
    for k, sq in prefetched(range(3), lambda k: (where.append(threading.current_thread()), k * k)[1], ahead=0):
        assert sq == k * k and len(where) == k + 1  # nothing prepared ahead of its turn
    assert set(where) == {threading.current_thread()}


def test_on_the_cpu_slices_are_prepared_on_the_segmenting_thread(ct, fast):
    """No helper thread on the CPU: a second thread running torch ops gives OpenMP a second team, and
    libgomp then stops its threads spin-waiting, which slowed every slice (core/prefetch.py)."""
    import threading

    volume, _ = ct
    seg = Segmenter(fast.model, "cpu", fast.metadata)
    assert seg.prefetch_ahead == 0
    prepared_on = []
    host_batch = seg._host_batch

    def recording(*args, **kwargs):
        prepared_on.append(threading.current_thread())
        return host_batch(*args, **kwargs)

    seg._host_batch = recording
    helpers = []
    opts = SegmentOptions(batch_size=1, skip_slices=False, slice_range=(10, 13))
    segment_volume(seg, volume, opts, on_slice=lambda r: helpers.extend(
        t for t in threading.enumerate() if t.name.startswith("samselfprompt-prefetch")))
    assert len(prepared_on) == 3 and set(prepared_on) == {threading.current_thread()}
    assert helpers == []


def test_a_slice_evicted_after_it_was_prepared_is_encoded_again(ct, fast):
    """The prefetch thread skips slices that are cached; one evicted before its turn is prepared then."""
    volume, _ = ct
    seg = Segmenter(fast.model, "cpu", fast.metadata)
    seg.prefetch_ahead = 1  # the GPU's setting: a helper thread prepares the next slice (none on the CPU)
    seg.cache = SliceEmbeddingCache(max_bytes=1)  # holds one slice: the newest
    opts = SegmentOptions(batch_size=1, skip_slices=False)
    first, _ = segment_volume(seg, volume, replace(opts, slice_range=(10, 12)))  # leaves slice 11 cached
    assert seg.encoder_calls == 2
    # Slice 11 is cached when the helper looks at it (so not prepared), then evicted by slice 9.
    again, _ = segment_volume(seg, volume, replace(opts, slice_range=(9, 12)))
    assert seg.encoder_calls == 2 + 3
    assert np.array_equal(again[10:12], first[10:12])
