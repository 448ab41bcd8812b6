"""LoRA on the image encoder's attention, the way SAM-SP fine-tunes the encoder (paper mode).

peft injects low-rank adapters into every ``qkv`` Linear of the image encoder (TinyViT for
LiteMedSAM, SAM's ViT for the others). The adapter tensors are named ``...lora_A...`` /
``...lora_B...``, which ``SamBackbone.trainable_state`` picks up, so a SAM-SP checkpoint
stores them with the decoder; ``checkpoints.load_samsp`` calls ``add_lora`` again with the
rank and alpha recorded in the metadata before loading them.
"""
from __future__ import annotations

import torch.nn as nn

from .backbones import SamBackbone


def has_lora(model: SamBackbone) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def add_lora(model: SamBackbone, rank: int = 4, alpha: float = 4.0, dropout: float = 0.0) -> SamBackbone:
    """Wrap the encoder's attention qkv projections with rank-``rank`` LoRA, in place.

    peft initialises B to zero, so the wrapped model computes exactly what it did before.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    targets = [name for name, mod in model.image_encoder.named_modules()
               if name.split(".")[-1] == "qkv" and isinstance(mod, nn.Linear)]
    if not targets:
        raise ValueError(f"no attention qkv Linear layers found in the {model.spec.model_id} image encoder")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    model.image_encoder = inject_adapter_in_model(config, model.image_encoder)
    return model
