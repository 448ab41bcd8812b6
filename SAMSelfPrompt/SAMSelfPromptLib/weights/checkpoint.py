"""Weights on disk: the bundled LiteMedSAM check and the SAM-SP checkpoint format.

A SAM-SP checkpoint stores the id of its base model plus only the tensors SAM-SP
trains (prompt encoder, mask decoder, LoRA, and the encoder's top stages when cpu mode trained them:
metadata ``encoder_tuned_from``), and a metadata dict (modality,
intensity window, input size, training data summary, metrics). Everything in it is
a tensor, str, number, bool, list or dict, so it loads with ``weights_only=True``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..io.files import atomic_write
from ..modeling.backbones import MODEL_SPECS, SamBackbone, build_model, load_failure_reason
from ..modeling.promise import attach_promise, promise_state

FORMAT = "samselfprompt-checkpoint/1"


def save_samsp(path: str | Path, model: SamBackbone, metadata: dict[str, Any], half: bool = False) -> Path:
    """Write a SAM-SP checkpoint atomically: base model id, trained tensors, metadata."""
    # A ProMISe checkpoint (metadata "method": "promise") holds only its two small modules.
    state = promise_state(model) if metadata.get("method") == "promise" else model.trainable_state()
    tensors = {k: (v.detach().to("cpu", torch.float16) if half and v.is_floating_point() else v.detach().cpu())
               for k, v in state.items()}
    payload = {
        "format": FORMAT,
        "base_model": model.spec.model_id,
        "tensors": tensors,
        "metadata": dict(metadata),
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp), overwrite=True)


def read_samsp(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, validated; raises CheckpointError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"SAM-SP checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read SAM-SP checkpoint {path}: {load_failure_reason(exc)}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a SAM-SP checkpoint (expected format '{FORMAT}'); "
            "for plain SAM/MedSAM/LiteMedSAM weights use --weights instead"
        )
    if payload.get("base_model") not in MODEL_SPECS:
        raise CheckpointError(f"{path} names unknown base model {payload.get('base_model')!r}")
    return payload


def load_samsp(path: str | Path, base_weights: str | Path | None = None) -> tuple[SamBackbone, dict[str, Any]]:
    """Build the base model and overlay the trained tensors (strict: every key must fit)."""
    payload = read_samsp(path)
    meta = payload.get("metadata", {})
    if base_weights is None and MODEL_SPECS[payload["base_model"]].download is not None:
        from .download import cached_weights  # a file the user already agreed to download

        base_weights = cached_weights(payload["base_model"])
    try:
        model = build_model(payload["base_model"], base_weights)
    except CheckpointError as exc:  # say which checkpoint needs which base, not only what the base needs
        raise CheckpointError(f"{path} is a SAM-SP checkpoint for base model {payload['base_model']}: {exc}") from None
    lora = meta.get("lora")
    if lora:
        from ..modeling.lora import add_lora

        add_lora(model, rank=int(lora["rank"]), alpha=float(lora.get("alpha", lora["rank"])))
    if meta.get("encoder_tuned_from") is not None:  # TinyViT's top stages trained with the decoder (cpu mode)
        model.tune_encoder_from(int(meta["encoder_tuned_from"]))
    if meta.get("method") == "promise":  # ProMISe: APM + IPS beside the untouched backbone
        attach_promise(model, meta.get("promise"))
    tensors = payload["tensors"]
    if "structure_embed" in tensors:  # a multi-structure checkpoint: one no-prompt embedding each
        model.set_structures(int(tensors["structure_embed"].shape[0]))
    own = model.state_dict()
    missing = sorted(set(promise_state(model)) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: ProMISe checkpoint lacks {len(missing)} module tensors (e.g. {missing[0]})")
    for key, value in tensors.items():
        if key not in own:
            raise CheckpointError(f"{path}: tensor {key} does not exist in base model {payload['base_model']}")
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(value.shape)}, base model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=False)
    return model.eval(), meta
