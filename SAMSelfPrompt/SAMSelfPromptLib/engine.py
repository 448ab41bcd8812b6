"""Open a ready-to-run Segmenter from what the user named, or from the shipped defaults.

Shipped SAM-SP checkpoints live in ``weights/`` beside this file, each with a JSON
summary naming the modality it was trained for. Without a SAM-SP checkpoint the
vanilla backbone has no trained "no prompt" output, so the engine falls back to
prompting it with the whole image (``empty_y0 = "full_box"``) and says so.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import load_samsp
from .models import DEFAULT_MODEL, build_model
from .volume import Segmenter

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class ShippedModel:
    name: str
    path: Path
    modality: str  # "RGB", "CT", ...
    summary: dict

    @property
    def role(self) -> str:
        """"auto" (the prompt-free default) or "clicks" (click-trained, used for corrections)."""
        return str(self.summary.get("role", "auto"))


def shipped_models() -> list[ShippedModel]:
    """Every SAM-SP checkpoint shipped in weights/ (a .pt with a .json summary beside it)."""
    out = []
    for summary_path in sorted(WEIGHTS_DIR.glob("*.json")):
        pt = summary_path.with_suffix(".pt")
        if not pt.is_file():
            continue
        summary = json.loads(summary_path.read_text())
        out.append(ShippedModel(summary_path.stem, pt, str(summary.get("modality", "")).upper(), summary))
    return out


def default_checkpoint(modality: str | None, is_rgb: bool) -> Path | None:
    """The shipped SAM-SP model for this kind of image: dermoscopy for RGB, CT for the rest."""
    models = [m for m in shipped_models() if m.role == "auto"]
    want = "RGB" if is_rgb else (modality or "CT").upper()
    for m in models:
        if m.modality == want:
            return m.path
    if not is_rgb:
        for m in models:
            if m.modality == "CT":
                return m.path
    return None


def click_model_for(model_id: str, metadata: dict, modality: str | None, is_rgb: bool):
    """The shipped click-trained model for this kind of image, if it can share the encoder."""
    if metadata.get("lora"):
        return None  # a LoRA-tuned encoder makes different embeddings than the click model's base
    want = "RGB" if is_rgb else (modality or "CT").upper()
    for m in shipped_models():
        if m.role == "clicks" and m.modality == want:
            model, meta = load_samsp(m.path)
            if model.spec.model_id == model_id and not meta.get("lora"):
                return model
    return None


@dataclass
class OpenedModel:
    segmenter: Segmenter
    description: str
    trained: bool  # a SAM-SP checkpoint is loaded (prompt-free output is meaningful)


def open_segmenter(
    model_id: str = DEFAULT_MODEL,
    weights: str | Path | None = None,
    checkpoint: str | Path | None = None,
    device: str | None = None,
    modality: str | None = None,
    is_rgb: bool = False,
    use_default_checkpoint: bool = True,
) -> OpenedModel:
    """Build the model the user asked for; with nothing named, the shipped SAM-SP model."""
    if checkpoint is None and use_default_checkpoint and model_id == DEFAULT_MODEL and weights is None:
        checkpoint = default_checkpoint(modality, is_rgb)
    if checkpoint is not None:
        model, meta = load_samsp(checkpoint, weights)
        desc = f"SAM-SP checkpoint {Path(checkpoint).name} (base {model.spec.model_id})"
        refiner = None if meta.get("role") == "clicks" else click_model_for(model.spec.model_id, meta, modality, is_rgb)
        return OpenedModel(Segmenter(model, device, meta, refiner), desc, True)
    model = build_model(model_id, weights)
    print(f"note: no SAM-SP checkpoint for this input; vanilla {model.spec.title} prompted with the whole image",
          file=sys.stderr)
    return OpenedModel(Segmenter(model, device, {}), f"vanilla {model.spec.title}", False)
