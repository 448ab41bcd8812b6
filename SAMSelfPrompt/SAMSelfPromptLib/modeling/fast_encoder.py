"""The fast path for the image encoder: bf16 matmuls on a folded, channels-last copy.

Written for the CPU and measured there; a CUDA GPU runs the same copy without the oneDNN fusions, so
both devices keep the convolutions in fp32 (``runs_folded_copy``). A CPU without native bf16 runs the
copy in fp32: the folding, fusions and bands below make it faster than the module there too.

On a CPU with native bf16 (AVX-512 BF16 or AMX), oneDNN runs the LiteMedSAM encoder in bf16
autocast about 2.4x faster than fp32. What is kept, measured on the 2-core CPU
(docs/RESULTS.md, Speed):

- **Linear layers and attention in bf16** (autocast): most of the time, little of the error.
- **Convolutions in fp32.** With every op in bf16 the embedding is 4% off fp32 (relative L2) and
  the CT liver masks agree with the fp32 path's to Dice 0.994, below the 0.995 the project
  asks for; the convolutions carry most of that error (1.1% with them in fp32, Dice 0.998)
  for about a sixth of the time.
- Every ``Conv2d_BN`` (TinyViT's convolution + BatchNorm pair) folded into one convolution,
  and the copy in channels-last, oneDNN's native convolution layout (fewer reorders).
- **The first stage's MBConv blocks and every PatchMerging fused** (``FusedMBConv``,
  ``FusedPatchMerging``): each convolution and the GELU or residual add after it run as one oneDNN
  call, in fp32. That stage works on 256 x 256 maps of up to 256 channels, where a separate GELU
  reads and writes 64 MB per call; fusing the MBConvs took the encoder from 319 to 260 ms per slice
  (one interleaved run), with the same fp32 arithmetic.
- **Those blocks run in bands of rows** (``_Banded``): the same values, with intermediates of a few
  MB instead of 32-64 MB, so less memory traffic and a lower peak (docs/RESULTS.md, Speed).
- **Every linear layer is one oneDNN call** (``FusedLinear``): the bias, and in each MLP the GELU after
  the first layer, applied to the fp32 accumulator, with bf16 weights cast once. In bf16 that took a
  few percent off a slice (the 16384 x 512 GELU of the first attention stage cost more than its
  product); in fp32 (CPUs without native bf16, and the exact re-encodes) about a quarter.
- **Each attention block takes its windows a band at a time** (``FusedViTBlock``): padding, window
  cuts, attention, the way back and the residual add run on a band of window rows while it is in
  cache, the scale sits in the query weights, and the local convolution reads the tokens in place.
  Banding the attention took the encoder's peak of live tensors from 80 to 59 MB a slice (session
  8); doing the rest per band too took about 3% off a slice in bf16 and 10% in fp32 (session 18,
  docs/RESULTS.md, Speed).
- **A checkpoint may keep whole stages in fp32** (``fp32_stages``). Most of the bf16 error builds
  up in stage 2's six blocks: keeping that stage in fp32 took a left-atrium MR slice's embedding
  error from 1.7% to 0.9% (relative L2) for about 13% more time per slice (interleaved runs), and the
  left-atrium masks' agreement with the naive fp32 path from 0.9937 to 0.997 (docs/RESULTS.md, Speed).

The mask decoder is not under autocast: it runs in fp32 except its projections of the image tokens
(``backbones.image_projections_in``, set by the Segmenter). Nothing needs tracing or compiling:
the copy is built in milliseconds, so it pays from the first slice. (A TorchScript trace of the
module, used for long fp32 runs until session 14, cost 14 s to build and was slower than this copy
in fp32; ``torch.compile`` of the copy took 144 s to build for 7% a slice.)

The copy is a snapshot of the encoder's weights: build it within one inference job (a
``Segmenter`` never trains its model), never across training of the encoder.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import SamBackbone, autocast_for, tinyvit_tokens


def fold_conv_bn(module: nn.Module) -> int:
    """Replace each ``Conv2d_BN`` child (anything with TinyViT's ``fuse()``) by its fused conv, in place."""
    n = 0
    for name, child in list(module.named_children()):
        if type(child).__name__ == "Conv2d_BN" and callable(getattr(child, "fuse", None)):
            setattr(module, name, child.fuse())
            n += 1
        else:
            n += fold_conv_bn(child)
    return n


class Float32(nn.Module):
    """Runs the wrapped module in fp32 whatever the surrounding autocast."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.module(x.float())


def keep_convs_fp32(module: nn.Module) -> int:
    """Wrap every Conv2d child in ``Float32`` (those inside a fused block excepted), in place."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d):
            setattr(module, name, Float32(child))
            n += 1
        elif not isinstance(child, _Banded):  # already fp32, and calls its convolutions' weights itself
            n += keep_convs_fp32(child)
    return n


def _geometry(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
    """A convolution's padding, stride, dilation and groups, as oneDNN's fused calls take them."""
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def _conv_gelu(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """GELU(conv(x)) in one oneDNN call (fp32)."""
    return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, *_geometry(conv), "gelu", [], "none")


def _conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, *_geometry(conv), "none", [], "none")


class _Banded(nn.Module):
    """A convolution block with one 3x3, padding-1 depthwise convolution (``self.depthwise``), run in
    bands of ``band_rows`` output rows.

    Why bands: TinyViT's first stage widens its 64 channels to 256 (MBConv) and 128 (the patch
    merging after it) on a 256 x 256 map, so each intermediate is a 32-64 MB fp32 tensor that streams
    through memory two or three times. A band of rows keeps them a few MB, in cache, and the encoder's
    peak memory falls by those tensors. Only the depthwise 3x3 looks across rows: each band's input is
    widened by the rows it reads above and below (the halo), and outputs computed against a zero
    border that is not the image's are dropped. Every kept value is the same arithmetic as the
    whole-map block (``Testing/test_speed.py``)."""

    def __init__(self, block: nn.Module, band_rows: int):
        """``block``: a TinyViT block whose ``Conv2d_BN`` pairs are already folded into plain convolutions
        (conv1 1x1 expand, conv2 3x3 depthwise, conv3 1x1 project)."""
        super().__init__()
        self.expand, self.depthwise, self.project = block.conv1, block.conv2, block.conv3
        name = type(self).__name__
        for conv in (self.expand, self.depthwise, self.project):
            if not isinstance(conv, nn.Conv2d):
                raise TypeError(f"{name} needs folded convolutions, got {type(conv).__name__}")
        if tuple(self.depthwise.kernel_size) != (3, 3) or tuple(self.depthwise.padding) != (1, 1):
            raise ValueError(f"{name}'s bands assume a 3x3, padding-1 depthwise convolution")
        self.band_rows = band_rows

    def _band(self, x: torch.Tensor, top: int, bottom: int, out: torch.Tensor) -> None:
        """Write the block's output rows [top, bottom) into ``out`` (a view of those rows)."""
        raise NotImplementedError

    def _depthwise_rows(self, x: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
        """GELU(depthwise(GELU(expand(x)))) at output rows [top, bottom), from their input rows and halo."""
        lo, hi, drop = self._input_rows(top, bottom, x.shape[2])
        y = _conv_gelu(_conv_gelu(x[:, :, lo:hi], self.expand), self.depthwise)
        return y[:, :, drop:drop + bottom - top].contiguous(memory_format=torch.channels_last)

    def _input_rows(self, top: int, bottom: int, height: int) -> tuple[int, int, int]:
        """Input rows [lo, hi) that output rows [top, bottom) read, and how many leading outputs of the
        band's convolution to drop. Output row o reads input rows s*o-1 .. s*o+1 (stride s); starting the
        band ``s`` rows above s*top keeps the band's output grid aligned with the image's."""
        s = self.depthwise.stride[0]
        if top == 0:
            return 0, min(s * (bottom - 1) + 2, height), 0
        return s * top - s, min(s * (bottom - 1) + 2, height), 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float().contiguous(memory_format=torch.channels_last)
            # output rows and columns of a 3x3, padding-1 conv
            rows, cols = ((n - 1) // s + 1 for n, s in zip(x.shape[2:], self.depthwise.stride))
            out = torch.empty((x.shape[0], self.project.out_channels, rows, cols), dtype=x.dtype,
                              device=x.device, memory_format=torch.channels_last)
            for top in range(0, rows, self.band_rows):
                bottom = min(top + self.band_rows, rows)
                self._band(x, top, bottom, out[:, :, top:bottom])  # rows of a channels-last map: contiguous
            return out


class FusedMBConv(_Banded):
    """TinyViT's ``MBConv`` (1x1 conv, GELU, depthwise 3x3, GELU, 1x1 conv, + input, GELU) in fp32,
    each convolution fused by oneDNN with the GELU or the residual add that follows it, in bands of
    rows (``_Banded``)."""

    def __init__(self, block: nn.Module, band_rows: int = 16):
        super().__init__(block, band_rows)
        if tuple(self.depthwise.stride) != (1, 1):
            raise ValueError("FusedMBConv needs a stride-1 depthwise convolution (its input is added to its output)")

    def _band(self, x: torch.Tensor, top: int, bottom: int, out: torch.Tensor) -> None:
        y = self._depthwise_rows(x, top, bottom)
        # project(y) + x in one call; oneDNN has no GELU after a sum post-op, so that one runs apart,
        # straight into the output rather than into a band that is then copied there.
        y = torch.ops.mkldnn._convolution_pointwise.binary(
            y, x[:, :, top:bottom].contiguous(memory_format=torch.channels_last), self.project.weight,
            self.project.bias, *_geometry(self.project), "add", None, None, [], None)
        torch.ops.aten.gelu.out(_flat(y), out=_flat(out))


def _flat(rows: torch.Tensor) -> torch.Tensor:
    """A channels-last map (or band of rows of one) as the 1-D view of its memory. GELU over a band of
    64 x 16 x 256 took 0.09 ms as a 4-D channels-last tensor and 0.04 ms as this view (hot cache, 2
    threads). ``view`` (never a copy) raises if ``rows`` is not one dense channels-last block."""
    return rows.permute(0, 2, 3, 1).view(-1)


class FusedPatchMerging(_Banded):
    """TinyViT's ``PatchMerging`` (1x1 conv, GELU, depthwise 3x3 at stride 2 or 1, GELU, 1x1 conv) in
    fp32 with each GELU fused into the convolution before it, in bands of rows (``_Banded``). Takes
    tokens (B x H*W x C, as TinyViT's later stages pass them) or maps, and returns tokens as the
    original does."""

    def __init__(self, block: nn.Module, band_rows: int = 8):
        super().__init__(block, band_rows)
        self.input_resolution = tuple(block.input_resolution)

    def _band(self, x: torch.Tensor, top: int, bottom: int, out: torch.Tensor) -> None:
        out.copy_(_conv(self._depthwise_rows(x, top, bottom), self.project))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # tokens from the stage before: B x H*W x C -> B x C x H x W
            h, w = self.input_resolution
            x = x.view(len(x), h, w, -1).permute(0, 3, 1, 2)
        return super().forward(x).flatten(2).transpose(1, 2)


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype of the CPU autocast in force here, or None. (torch 2.4 and later take a device type; the
    Slicer module accepts torch from 2.2, which has CPU-only functions for it.)"""
    try:
        on, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    except (TypeError, AttributeError):
        on, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return dtype if on else None


class FusedLinear(nn.Module):
    """An ``nn.Linear``, and optionally the exact GELU after it, as one oneDNN call (``_linear_pointwise``).

    Under a CPU bf16 autocast it runs on bf16 copies of the weights, cast once (the copy is a snapshot):
    autocast casts a weight on every call when it does not require grad. Either way the bias (and GELU)
    are applied to the fp32 accumulator before the one rounding to the output's dtype. What that saves:
    ``F.linear`` under autocast first writes the bias, broadcast, into the whole output, and a separate
    bf16 GELU over TinyViT's first attention stage (16384 x 512 values a block) cost more than the
    product before it (docs/RESULTS.md, Speed, session 17)."""

    def __init__(self, linear: nn.Linear, activation: str = "none"):
        super().__init__()
        if activation not in ("none", "gelu"):
            raise ValueError(f"FusedLinear fuses no activation or an exact GELU, not {activation!r}")
        self.weight, self.bias = linear.weight, linear.bias
        self.activation = activation
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        if dtype == self.weight.dtype:
            return self.weight, self.bias
        if dtype not in self._cast:
            bias = None if self.bias is None else self.bias.detach().to(dtype)
            self._cast[dtype] = (self.weight.detach().to(dtype), bias)
        return self._cast[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.bfloat16 if _cpu_autocast_dtype() == torch.bfloat16 else torch.float32
        weight, bias = self._weights(dtype)
        algorithm = "none" if self.activation == "gelu" else ""  # "none": the erf GELU, TinyViT's
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, self.activation, [], algorithm)


def fuse_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` child by a ``FusedLinear``, in place, an MLP's first layer fused with its
    exact GELU (TinyViT's ``Mlp``: norm, fc1, act, drop, fc2, drop); the number replaced."""
    n = 0
    for name, child in list(module.named_children()):
        if type(child).__name__ == "Mlp" and isinstance(getattr(child, "act", None), nn.GELU) \
                and child.act.approximate == "none" and isinstance(child.fc1, nn.Linear):
            child.fc1, child.act = FusedLinear(child.fc1, "gelu"), nn.Identity()
            n += 1 + fuse_linears(child)
        elif isinstance(child, nn.Linear):
            setattr(module, name, FusedLinear(child))
            n += 1
        else:
            n += fuse_linears(child)
    return n


def _scaled_queries(attention: nn.Module) -> nn.Linear:
    """A copy of ``attention.qkv`` whose query rows (weights and bias) carry the attention's scale, so
    the scores come out of q @ k^T already scaled: one pass over the largest tensor of the block saved.
    Its output holds each head's query, key and value side by side (TinyViT's layout)."""
    qkv = attention.qkv
    scaled = nn.Linear(qkv.in_features, qkv.out_features, device=qkv.weight.device)
    scale = torch.ones(qkv.out_features, device=qkv.weight.device)
    scale.view(attention.num_heads, -1)[:, :attention.key_dim] = attention.scale
    with torch.no_grad():
        scaled.weight.copy_(qkv.weight * scale[:, None])
        scaled.bias.copy_(qkv.bias * scale)
    return scaled


class FusedViTBlock(nn.Module):
    """TinyViT's ``TinyViTBlock`` (window attention + residual, depthwise 3x3 "local" convolution, MLP +
    residual) for CPU inference, with its windows taken a band of window rows at a time.

    What differs from the block, all of it layout and order (``Testing/test_speed.py``):

    - **Windows a band at a time.** The block pads the whole map, cuts it into windows, attends over
      all of them at once (361 windows of 7 x 7 tokens in the first attention stage), puts them back,
      crops and adds the residual, each a pass over the whole map. Here each band of window rows is
      padded, cut, attended, put back and added into the output while it is in cache; the scores, their
      fp32 copy and the softmax are a few MB instead of 7-18 MB (the encoder's peak of live tensors sat
      there), at most ``max_score_elements`` scores a band.
    - **The scale is in the query weights** (``_scaled_queries``), not a multiply over the scores.
    - **The bias is added and the softmax taken in fp32**, as under autocast in the block (bf16 scores
      plus the fp32 bias promote to fp32), and the weights go back to the value's dtype explicitly.
    - **The local convolution reads the tokens as a channels-last map** (they are one: B x H*W x C is
      the map's NHWC memory) and its output goes back to tokens without either of the block's copies."""

    def __init__(self, block: nn.Module, max_score_elements: int = 1 << 20):
        super().__init__()
        attention = block.attn
        self.height, self.width = block.input_resolution
        self.window = block.window_size
        self.heads, self.key_dim, self.value_dim = attention.num_heads, attention.key_dim, attention.d
        self.norm, self.qkv, self.proj = attention.norm, _scaled_queries(attention), attention.proj
        bias = attention.attention_biases[:, attention.attention_bias_idxs].detach().clone()
        self.register_buffer("bias", bias, persistent=False)  # heads x tokens x tokens, as ``ab`` in eval
        self.local_conv, self.mlp = block.local_conv, block.mlp
        self.window_rows, self.window_cols = -(-self.height // self.window), -(-self.width // self.window)
        scores_per_window_row = self.window_cols * self.heads * bias.shape[-1] ** 2
        self.rows_per_band = max(1, max_score_elements // scores_per_window_row)

    def attend(self, windows: torch.Tensor) -> torch.Tensor:
        """Window attention: windows (n x tokens x C) -> n x tokens x C, in the linear layers' dtype."""
        n, tokens, _ = windows.shape
        qkv = self.qkv(self.norm(windows)).view(n, tokens, self.heads, -1)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=3))
        scores = torch.matmul(q, k.transpose(-2, -1)).float().add_(self.bias)
        weights = torch.softmax(scores, dim=-1).to(v.dtype)
        return self.proj(torch.matmul(weights, v).transpose(1, 2).reshape(n, tokens, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, channels = x.shape
        w, rows, cols = self.window, self.window_rows, self.window_cols
        grid = x.view(b, self.height, self.width, channels)
        out = torch.empty_like(x)
        out_grid = out.view(b, self.height, self.width, channels)
        for first in range(0, rows, self.rows_per_band):
            band_rows = min(rows, first + self.rows_per_band) - first
            top, bottom = first * w, min((first + band_rows) * w, self.height)
            band = grid[:, top:bottom]
            padded = F.pad(band, (0, 0, 0, cols * w - self.width, 0, band_rows * w - (bottom - top)))
            windows = padded.reshape(b, band_rows, w, cols, w, channels).transpose(2, 3)
            windows = windows.reshape(-1, w * w, channels)
            attended = self.attend(windows).view(b, band_rows, cols, w, w, channels).transpose(2, 3)
            attended = attended.reshape(b, band_rows * w, cols * w, channels)[:, :bottom - top, :self.width]
            torch.add(band, attended, out=out_grid[:, top:bottom])  # the residual, fp32 as in the block
        mapped = self.local_conv(out_grid.permute(0, 3, 1, 2))  # a channels-last view: no copy
        x = mapped.permute(0, 2, 3, 1).reshape(b, length, channels)
        return x + self.mlp(x)


def fuse_vit_blocks(module: nn.Module) -> int:
    """Replace each ``TinyViTBlock`` child by a ``FusedViTBlock``, in place; the number replaced."""
    n = 0
    for name, child in list(module.named_children()):
        if type(child).__name__ == "TinyViTBlock":
            setattr(module, name, FusedViTBlock(child))
            n += 1
        else:
            n += fuse_vit_blocks(child)
    return n


def can_fuse() -> bool:
    """oneDNN's fused convolutions exist in this torch build (x86 and most ARM CPU builds)."""
    return torch.backends.mkldnn.is_available() and all(
        hasattr(torch.ops.mkldnn, op) for op in ("_convolution_pointwise", "_linear_pointwise"))


def _exact_gelus(block: nn.Module) -> bool:
    """The block's activations are erf GELUs, the one oneDNN's "gelu"/"none" post-op computes.
    (An MBConv's DropPath is the identity in the eval copy.)"""
    acts = [getattr(block, name, None) for name in ("act1", "act2", "act3")]
    if type(block).__name__ == "PatchMerging":
        acts = [getattr(block, "act", None)]
    return all(isinstance(a, nn.GELU) and a.approximate == "none" for a in acts)


FUSED = {"MBConv": FusedMBConv, "PatchMerging": FusedPatchMerging}


def fuse_blocks(module: nn.Module) -> int:
    """Replace each (folded) ``MBConv`` and ``PatchMerging`` child by its fused, banded copy, in place;
    the number replaced."""
    n = 0
    for name, child in list(module.named_children()):
        fused = FUSED.get(type(child).__name__)
        if fused is not None and _exact_gelus(child):
            setattr(module, name, fused(child))
            n += 1
        else:
            n += fuse_blocks(child)
    return n


def keep_stages_fp32(encoder: nn.Module, stages: Sequence[int]) -> None:
    """Run TinyViT stages ``stages`` (indices into ``encoder.layers``) in fp32 under any autocast, in place."""
    layers = getattr(encoder, "layers", None)
    for i in stages:
        if layers is None or not 0 <= i < len(layers):
            have = 0 if layers is None else len(layers)
            raise ValueError(f"encoder_fp32_stages names stage {i}, but this encoder has {have} stages")
        if not isinstance(layers[i], Float32):
            layers[i] = Float32(layers[i])


def inference_encoder(model: SamBackbone, fp32_convs: bool = True, fuse: bool = True,
                      fp32_stages: Sequence[int] = ()) -> nn.Module:
    """An eval copy of ``model.image_encoder``: Conv+BN folded, convs kept fp32, the stages ``fp32_stages``
    wholly fp32, channels-last; on the CPU also the attention blocks' windows taken in bands (``FusedViTBlock``) and
    MBConv, PatchMerging and the linear layers fused (oneDNN)."""
    enc = copy.deepcopy(model.image_encoder).eval()
    with torch.no_grad():
        fold_conv_bn(enc)
    if model.device.type == "cpu":  # bands of windows: a lower peak of host memory; on a GPU only more launches
        fuse_vit_blocks(enc)  # before fuse_linears, which takes the query-scaled qkv it makes
    if fuse and fp32_convs and model.device.type == "cpu" and can_fuse():
        fuse_blocks(enc)  # before keep_convs_fp32, which would wrap the convolutions it takes
        fuse_linears(enc)
    if fp32_convs:
        keep_convs_fp32(enc)
    keep_stages_fp32(enc, fp32_stages)
    enc = enc.to(memory_format=torch.channels_last)
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def runs_folded_copy(device: torch.device, precision: str) -> bool:
    """Whether inference encodes with ``fast_encoder`` here: on a CPU at every precision, on a CUDA GPU at
    reduced precision.

    A CPU in fp32 too (one without native bf16, or fp32 asked for): the copy's fp32 is the module's within
    rounding (4e-6 relative on CT slices) and took 878 ms a slice against 1208 for the traced module and
    1402-1614 for the module itself, at less than half the module's peak memory (docs/RESULTS.md, Speed,
    session 14). A GPU at reduced precision: autocasting the whole module puts the convolutions in bf16.
    Emulated with the 2-core CPU's bf16, a left-atrium MR slice's embedding was then 6.2% off fp32 against 1.7%
    for this copy, and that volume's masks agreed with fp32 to 0.987 against 0.997 (0.995 is asked;
    docs/RESULTS.md, Speed, session 10). A GPU in fp32 and other devices (MPS) run the module."""
    return device.type == "cpu" or (device.type == "cuda" and precision != "fp32")


def fast_encoder(model: SamBackbone, precision: str, fp32_stages: Sequence[int] = (),
                 fuse: bool = True, stop_before_stage: int | None = None) -> Callable[..., torch.Tensor]:
    """images B x 3 x S x S in [0, 1] -> B x 256 x 64 x 64 at ``precision`` (its own autocast inside).

    On a GPU (or with ``fuse`` False) the same arithmetic without oneDNN's fused blocks (``runs_folded_copy``).

    ``fp32_stages``: TinyViT stages kept in fp32 at every precision, for a checkpoint whose masks need
    more of fp32's accuracy than the all-bf16 stages give (its metadata's ``encoder_fp32_stages``,
    core/predictor.Segmenter).

    ``encode(images, "fp32")`` runs the same folded copy without autocast: fp32 throughout, within
    rounding of the module (folding BatchNorm reorders a few fp32 operations), at the banded blocks'
    peak. The module itself holds its 256 x 256 x 256 fp32 intermediates whole: encoding one slice
    with it peaked 385 MB above the loaded model, against 166 MB for this copy.

    ``stop_before_stage`` k: return what TinyViT stage k receives (B x 4096 x C tokens) instead of the
    embedding, for training stages k.. with the decoder on cached tokens (training/trainer.py)."""
    enc = inference_encoder(model, fuse=fuse, fp32_stages=fp32_stages)
    device = model.device
    run = enc if stop_before_stage is None else (lambda x: tinyvit_tokens(enc, x, stop_before_stage))

    def encode(images: torch.Tensor, precision: str = precision) -> torch.Tensor:
        x = model.normalize(images).contiguous(memory_format=torch.channels_last)
        # no_grad, not inference_mode: the embeddings go on into caches and training code, where
        # inference tensors are refused (and the difference in speed is not measurable here).
        # On the CPU one slice at a time: as fast per slice as a batch, and a batch of 4 would hold
        # about 0.5 GB more activations at its peak.
        with torch.no_grad(), autocast_for(device, precision):
            if device.type == "cpu":
                return torch.cat([run(x[i:i + 1]).float() for i in range(len(x))]).contiguous()
            return run(x).float().contiguous()

    encode.module = enc  # what it runs, for a look inside
    return encode
