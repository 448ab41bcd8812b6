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
    """Wrap every Conv2d child in ``Float32``, in place."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d):
            setattr(module, name, Float32(child))
            n += 1
        else:
            n += keep_convs_fp32(child)
    return n


def inference_encoder(model: SamBackbone, fp32_convs: bool = True) -> nn.Module:
    """An eval copy of ``model.image_encoder``: Conv+BN folded, convs kept fp32, channels-last."""
    enc = copy.deepcopy(model.image_encoder).eval()
    with torch.no_grad():
        fold_conv_bn(enc)
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
