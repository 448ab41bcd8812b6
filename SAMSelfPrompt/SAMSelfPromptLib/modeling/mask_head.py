"""The mask decoder's output head (upscaling + hypernetwork product), computed channels-last.

segment-anything runs the head as NCHW modules: ConvTranspose2d(k=2, s=2), LayerNorm2d, GELU,
ConvTranspose2d(k=2, s=2), GELU, then a per-image product with the hypernetwork vector. A
ConvTranspose2d whose kernel equals its stride never overlaps: every input pixel maps to its own
2 x 2 output block through one C x (4*O) matrix. So the whole head is two matrix products and
two layer-wise ops on (pixel, channel) rows, taking the transformer's token layout (B x HW x C)
as it comes. Same parameters, same result up to float rounding, and on the CPU its backward
pass is much cheaper than PyTorch's transposed-convolution backward, which dominated a
training step. ``head_matches`` guards the layout; anything else uses the modules as they are.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _is_k2s2(m: nn.Module) -> bool:
    return (isinstance(m, nn.ConvTranspose2d) and tuple(m.kernel_size) == (2, 2) and tuple(m.stride) == (2, 2)
            and tuple(m.padding) == (0, 0) and tuple(m.output_padding) == (0, 0) and m.groups == 1
            and tuple(m.dilation) == (1, 1) and m.bias is not None)


def head_matches(upscaling: nn.Module) -> bool:
    """True for SAM's head: ConvT(2,2), LayerNorm2d, exact GELU, ConvT(2,2), exact GELU."""
    mods = list(upscaling.children()) if isinstance(upscaling, nn.Sequential) else []
    if len(mods) != 5:
        return False
    conv1, norm, act1, conv2, act2 = mods
    return (_is_k2s2(conv1) and _is_k2s2(conv2) and type(norm).__name__ == "LayerNorm2d"
            and all(isinstance(a, nn.GELU) and a.approximate == "none" for a in (act1, act2)))


def _block_matrix(conv: nn.ConvTranspose2d) -> torch.Tensor:
    """C_in x (2 * 2 * C_out) with column order (di, dj, out): weight[c, o, di, dj]."""
    w = conv.weight
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _block_rows(conv: nn.ConvTranspose2d) -> torch.Tensor:
    """``_block_matrix`` transposed, (2 * 2 * C_out) x C_in, as oneDNN's linear takes a weight."""
    return conv.weight.permute(2, 3, 1, 0).reshape(-1, conv.weight.shape[0])


def _onednn_fits(x: torch.Tensor, conv: nn.ConvTranspose2d) -> bool:
    """oneDNN's fused linear can run this product: on the CPU, where no gradient is wanted (it has no
    backward; training takes ``addmm``)."""
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, conv.weight, conv.bias))
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not wants_grad
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _block_product(x: torch.Tensor, conv: nn.ConvTranspose2d, gelu: bool = False) -> torch.Tensor:
    """Rows of ``x`` (... x C_in) -> their 2 x 2 output blocks, one row each (N x 4*C_out), bias added,
    then the exact GELU if ``gelu``.

    One product with the bias repeated per block column (di, dj, out), so the 8 MB product of the second
    level is not read and written again for the bias: against a product and then a broadcast add, the
    values are equal and that level took 2 ms instead of 7 on the 2-core CPU. For inference on the CPU,
    oneDNN's fused linear also applies the GELU to the accumulator, and skips ``addmm``'s copy of the
    bias into the output first: the whole head took 5.7 against 8.7 ms (docs/RESULTS.md, Speed, session 17)."""
    rows = x.reshape(-1, x.shape[-1])
    if _onednn_fits(rows, conv):
        activation, algorithm = ("gelu", "none") if gelu else ("none", "")  # "none": the erf GELU
        return torch.ops.mkldnn._linear_pointwise(rows, _block_rows(conv), conv.bias.repeat(4), activation, [],
                                                  algorithm)
    out = torch.addmm(conv.bias.repeat(4), rows, _block_matrix(conv))
    return F.gelu(out) if gelu else out


def upscaled_logits(upscaling: nn.Sequential, tokens: torch.Tensor, hyper: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """tokens: B x (h*w) x C image tokens (row-major); hyper: B x C2. Returns B x 1 x 4h x 4w logits."""
    conv1, norm, _, conv2, _ = list(upscaling.children())
    b = tokens.shape[0]
    c1, c2 = conv1.out_channels, conv2.out_channels
    # Level 1: each token -> a 2 x 2 block of c1 channels. Rows: (b, i, j, di, dj).
    x = _block_product(tokens, conv1).reshape(b, h * w * 4, c1)
    x = F.gelu(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
    # Level 2: each level-1 pixel -> a 2 x 2 block of c2 channels. Rows: (b, i, j, di, dj, ei, ej).
    x = _block_product(x, conv2, gelu=True).reshape(b, h * w * 16, c2)
    logits = x @ hyper.unsqueeze(2)  # B x (h*w*16) x 1
    # Output row = 4i + 2di + ei, column = 4j + 2dj + ej.
    logits = logits.reshape(b, h, w, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return logits.reshape(b, 1, 4 * h, 4 * w)
