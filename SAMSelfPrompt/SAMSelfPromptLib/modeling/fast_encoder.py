"""The CPU fast path for the image encoder: bf16 matmuls on a folded, channels-last copy.

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
- **The first stage's MBConv blocks fused** (``FusedMBConv``): each convolution and the GELU
  or residual add after it run as one oneDNN call. That stage works on 256 x 256 maps of 256
  channels, where a separate GELU reads and writes 64 MB per call; fused, the encoder took
  260 instead of 319 ms per slice (one interleaved run), with the same fp32 arithmetic.

The mask decoder stays fp32 (it is not under autocast). Nothing needs tracing or compiling:
the copy is built in milliseconds, so it pays from the first slice (the fp32 TorchScript
trace needs 24+).

The copy is a snapshot of the encoder's weights: build it within one inference job (a
``Segmenter`` never trains its model), never across training of the encoder.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import SamBackbone, autocast_for


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
    """Wrap every Conv2d child in ``Float32`` (those inside a ``FusedMBConv`` excepted), in place."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d):
            setattr(module, name, Float32(child))
            n += 1
        elif not isinstance(child, FusedMBConv):  # already fp32, and calls its convolutions' weights itself
            n += keep_convs_fp32(child)
    return n


class FusedMBConv(nn.Module):
    """TinyViT's ``MBConv`` (1x1 conv, GELU, depthwise 3x3, GELU, 1x1 conv, + input, GELU) in fp32,
    each convolution fused by oneDNN with the GELU or the residual add that follows it, and run in
    bands of ``band_rows`` image rows.

    Why bands: the block widens 64 channels to 256 on a 256 x 256 map, so each intermediate is a
    64 MB fp32 tensor that streams through memory three times. A band of rows keeps its
    intermediates a few MB, in cache, and the encoder's peak memory falls by those tensors. Only the
    depthwise 3x3 looks across rows: each band is widened by one row on either side (the halo), and
    the halo's outputs, computed against a zero border that is not the image's, are dropped. Every
    kept value is the same arithmetic as the whole-map block.

    Built from an MBConv whose ``Conv2d_BN`` pairs are already folded into plain convolutions."""

    def __init__(self, block: nn.Module, band_rows: int = 16):
        super().__init__()
        self.expand, self.depthwise, self.project = block.conv1, block.conv2, block.conv3
        for conv in (self.expand, self.depthwise, self.project):
            if not isinstance(conv, nn.Conv2d):
                raise TypeError(f"FusedMBConv needs folded convolutions, got {type(conv).__name__}")
        if tuple(self.depthwise.stride) != (1, 1) or tuple(self.depthwise.padding) != (1, 1):
            raise ValueError("FusedMBConv's bands assume a stride-1, padding-1 depthwise convolution")
        self.band_rows = band_rows

    @staticmethod
    def _geometry(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
        return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups

    def _band(self, x: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
        """The block's output rows [top, bottom) of x (N x C x H x W, fp32)."""
        pointwise = torch.ops.mkldnn._convolution_pointwise
        lo, hi = max(top - 1, 0), min(bottom + 1, x.shape[2])  # one halo row each side, inside the image
        y = pointwise(x[:, :, lo:hi], self.expand.weight, self.expand.bias, *self._geometry(self.expand),
                      "gelu", [], "none")
        y = pointwise(y, self.depthwise.weight, self.depthwise.bias, *self._geometry(self.depthwise),
                      "gelu", [], "none")
        y = y[:, :, top - lo:top - lo + bottom - top].contiguous(memory_format=torch.channels_last)
        # project(y) + x in one call; oneDNN has no GELU after a sum post-op, so that one runs apart.
        y = pointwise.binary(y, x[:, :, top:bottom].contiguous(memory_format=torch.channels_last),
                             self.project.weight, self.project.bias, *self._geometry(self.project),
                             "add", None, None, [], None)
        return F.gelu(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            height = x.shape[2]
            if height <= self.band_rows:
                return self._band(x, 0, height)
            out = torch.empty_like(x, memory_format=torch.channels_last)
            for top in range(0, height, self.band_rows):
                bottom = min(top + self.band_rows, height)
                out[:, :, top:bottom] = self._band(x, top, bottom)
            return out


def can_fuse() -> bool:
    """oneDNN's fused convolutions exist in this torch build (x86 and most ARM CPU builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _exact_gelus(block: nn.Module) -> bool:
    """The block's three activations are erf GELUs, the one oneDNN's "gelu"/"none" post-op computes.
    (Its DropPath is the identity in the eval copy.)"""
    acts = [getattr(block, name, None) for name in ("act1", "act2", "act3")]
    return all(isinstance(a, nn.GELU) and a.approximate == "none" for a in acts)


def fuse_mbconv(module: nn.Module) -> int:
    """Replace each (folded) ``MBConv`` child by a ``FusedMBConv``, in place; the number replaced."""
    n = 0
    for name, child in list(module.named_children()):
        if type(child).__name__ == "MBConv" and _exact_gelus(child):
            setattr(module, name, FusedMBConv(child))
            n += 1
        else:
            n += fuse_mbconv(child)
    return n


def inference_encoder(model: SamBackbone, fp32_convs: bool = True, fuse: bool = True) -> nn.Module:
    """An eval copy of ``model.image_encoder``: Conv+BN folded, MBConv fused, convs kept fp32, channels-last."""
    enc = copy.deepcopy(model.image_encoder).eval()
    with torch.no_grad():
        fold_conv_bn(enc)
    if fuse and fp32_convs and can_fuse():
        fuse_mbconv(enc)  # before keep_convs_fp32, which would wrap the convolutions it takes
    if fp32_convs:
        keep_convs_fp32(enc)
    enc = enc.to(memory_format=torch.channels_last)
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def fast_encoder(model: SamBackbone, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """images B x 3 x S x S in [0, 1] -> B x 256 x 64 x 64 at ``precision`` (its own autocast inside)."""
    enc = inference_encoder(model)
    device = model.device

    def encode(images: torch.Tensor) -> torch.Tensor:
        x = model.normalize(images).contiguous(memory_format=torch.channels_last)
        # no_grad, not inference_mode: the embeddings go on into caches and training code, where
        # inference tensors are refused (and the difference in speed is not measurable here).
        # On the CPU one slice at a time: as fast per slice as a batch, and a batch of 4 would hold
        # about 0.5 GB more activations at its peak.
        with torch.no_grad(), autocast_for(device, precision):
            if device.type == "cpu":
                return torch.cat([enc(x[i:i + 1]).float() for i in range(len(x))]).contiguous()
            return enc(x).float().contiguous()

    return encode
