"""ProMISe's two small modules (arXiv 2403.04164) on a frozen SAM-family backbone.

* Auto-Prompting Module (APM): a small convolutional head on the image embedding that scores every
  cell of the 64 x 64 embedding grid as object or background. Its point prompts (8 foreground,
  8 background) are read off that map (``core/promise.py``): the head regresses a dense point
  likelihood, and the points are its spread-out peaks, so the points are a function of the image only.
* Incremental Pattern Shifting (IPS): the image embedding, average-pooled to one 256-vector, goes
  through an MLP whose output (4 x 256) is added to the mask decoder's four mask tokens
  (``SamBackbone.decode(mask_token_shift=...)``). Its last layer starts at zero, so an untrained IPS
  is the vanilla decoder.

Both modules read only the 256 x 64 x 64 image embedding that SAM-SP caches (no intermediate ViT
features), so CPU-mode training reuses ``training.embedding_cache.DiskEmbeddingCache`` as it is.
The backbone's own weights never change: the modules hang off the model as ``model.promise`` and a
ProMISe checkpoint stores only their tensors (``promise.*``) and ``metadata["method"] = "promise"``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .backbones import EMBED_DIM, SamBackbone

N_MASK_TOKENS = 4  # SAM's mask decoder: 1 single-mask token + 3 multimask tokens
DEFAULT_CONFIG: dict[str, Any] = {"apm_channels": 64, "ips_hidden": 256, "n_points": 8}


class AutoPromptingModule(nn.Module):
    """256 x 64 x 64 embedding -> 1 x 64 x 64 logits: how likely each grid cell is the object."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(EMBED_DIM, channels, 3, padding=1), nn.GroupNorm(8, channels), nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2), nn.GroupNorm(8, channels), nn.GELU(),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.net(embeddings)


class IncrementalPatternShift(nn.Module):
    """Pooled embedding -> MLP -> B x 4 x 256, added to the decoder's mask tokens."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(EMBED_DIM, hidden), nn.GELU(), nn.Linear(hidden, N_MASK_TOKENS * EMBED_DIM))
        nn.init.zeros_(self.mlp[-1].weight)  # start as the untouched decoder
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        pooled = embeddings.float().mean(dim=(2, 3))
        return self.mlp(pooled).view(-1, N_MASK_TOKENS, EMBED_DIM)


class PromiseHead(nn.Module):
    """APM + IPS, with the settings that rebuild them from a checkpoint's metadata."""

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        self.apm = AutoPromptingModule(int(self.config["apm_channels"]))
        self.ips = IncrementalPatternShift(int(self.config["ips_hidden"]))

    @property
    def n_points(self) -> int:
        return int(self.config["n_points"])


def attach_promise(model: SamBackbone, config: dict[str, Any] | None = None) -> PromiseHead:
    """Add (or replace) ``model.promise``; the backbone's own modules are not touched."""
    head = PromiseHead(config).to(model.device)
    model.promise = head
    return head


def has_promise(model: nn.Module) -> bool:
    return isinstance(getattr(model, "promise", None), PromiseHead)


def promise_state(model: SamBackbone) -> dict[str, torch.Tensor]:
    """The tensors a ProMISe checkpoint stores: only the two modules, never the backbone's."""
    return {k: v for k, v in model.state_dict().items() if k.startswith("promise.")}


def backbone_state(model: SamBackbone) -> dict[str, torch.Tensor]:
    """Everything else: what ProMISe training must leave bit-identical."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("promise.")}
