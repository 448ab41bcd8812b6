"""The one catalogue: which model runs for an input, for the CLI, the Slicer Logic and the web app alike.

Shipped SAM-SP checkpoints live beside this file, each with a JSON summary naming the
modality it was trained for and its role: "auto" (the prompt-free default) or "clicks"
(click-trained, used for corrections). With no model named, every host asks
``choose_model`` and gets the same shipped SAM-SP model for the input, and
``open_model`` pairs it with its click-trained partner for corrections.

Without a SAM-SP checkpoint the vanilla backbone has no trained "no prompt" output, so
the engine prompts it with the whole slice instead (``Segmenter.trained`` is False) and
the description says so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..core.predictor import Segmenter
from ..errors import CheckpointError
from ..modeling.backbones import DEFAULT_MODEL, MODEL_SPECS, build_model
from .checkpoint import load_samsp, read_samsp

WEIGHTS_DIR = Path(__file__).resolve().parent  # the shipped .pt files sit beside this module


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


@lru_cache(maxsize=1)
def shipped_models() -> tuple[ShippedModel, ...]:
    """Every SAM-SP checkpoint shipped beside this file (a .pt with a .json summary)."""
    out = []
    for summary_path in sorted(WEIGHTS_DIR.glob("*.json")):
        pt = summary_path.with_suffix(".pt")
        if not pt.is_file():
            continue
        summary = json.loads(summary_path.read_text())
        out.append(ShippedModel(summary_path.stem, pt, str(summary.get("modality", "")).upper(), summary))
    return tuple(out)


def input_kind(modality: str | None, is_rgb: bool) -> str:
    """The catalogue's key for an input: RGB for colour pictures, else the DICOM modality (CT by default)."""
    return "RGB" if is_rgb else (modality or "CT").upper()


def default_checkpoint(modality: str | None, is_rgb: bool) -> Path | None:
    """The shipped prompt-free SAM-SP model for this kind of image: dermoscopy for RGB, CT for the rest."""
    models = [m for m in shipped_models() if m.role == "auto"]
    want = input_kind(modality, is_rgb)
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
    want = input_kind(modality, is_rgb)
    for m in shipped_models():
        if m.role == "clicks" and m.modality == want:
            model, meta = load_samsp(m.path)
            if model.spec.model_id == model_id and not meta.get("lora"):
                return model
    return None


@dataclass(frozen=True)
class ModelChoice:
    """What to open, decided in an instant on the host's main thread; opening happens on the worker.

    It is hashable, so a host keeps one warm Segmenter per choice and device.
    """

    model_id: str
    checkpoint: Path | None  # a SAM-SP checkpoint (shipped or the user's), or a plain weights file
    weights: Path | None  # the backbone's weights file (None: bundled LiteMedSAM or the cached download)
    kind: str  # the input kind the choice was made for ("RGB", "CT", "MR", ...): picks the click partner

    @property
    def label(self) -> str:
        if self.checkpoint is not None:
            return f"SAM-SP checkpoint {self.checkpoint.name}"
        return f"vanilla {MODEL_SPECS[self.model_id].title if self.model_id in MODEL_SPECS else self.model_id}"


def choose_model(model_id: str = DEFAULT_MODEL, weights: str | Path | None = None,
                 checkpoint: str | Path | None = None, modality: str | None = None,
                 is_rgb: bool = False, use_default_checkpoint: bool = True) -> ModelChoice:
    """The model for this input: what the user named, else the shipped SAM-SP model for its modality."""
    if model_id not in MODEL_SPECS:
        raise CheckpointError(f"unknown model '{model_id}'; choose one of {', '.join(MODEL_SPECS)}")
    if checkpoint is None and use_default_checkpoint and model_id == DEFAULT_MODEL and weights is None:
        checkpoint = default_checkpoint(modality, is_rgb)
    return ModelChoice(model_id, Path(checkpoint) if checkpoint else None, Path(weights) if weights else None,
                       input_kind(modality, is_rgb))


@dataclass
class OpenedModel:
    segmenter: Segmenter
    description: str

    @property
    def trained(self) -> bool:
        """A SAM-SP checkpoint is loaded, so the prompt-free output is meaningful."""
        return self.segmenter.trained


def open_model(choice: ModelChoice, device: str | None = None) -> OpenedModel:
    """Build the chosen model on its device (seconds: call it on a worker thread in a UI)."""
    rgb = choice.kind == "RGB"
    checkpoint = choice.checkpoint
    if checkpoint is not None and not _is_samsp(checkpoint):
        # A plain SAM/MedSAM/LiteMedSAM weights file named as the checkpoint (a Slicer user may pick
        # one there): use it as the backbone when it fits, else say what the file is not.
        try:
            return _vanilla(choice.model_id, checkpoint, device)
        except CheckpointError as exc:
            raise CheckpointError(
                f"{checkpoint} is not a SAM-SP checkpoint, nor {choice.model_id} weights ({exc}); for plain "
                "SAM/MedSAM/LiteMedSAM weights use --weights with the matching --model") from None
    if checkpoint is not None:
        model, meta = load_samsp(checkpoint, choice.weights)
        refiner = None if meta.get("role") == "clicks" else click_model_for(model.spec.model_id, meta, choice.kind, rgb)
        desc = f"SAM-SP checkpoint {checkpoint.name} (base {model.spec.model_id})"
        if refiner is not None:
            desc += ", click-trained partner for corrections"
        return OpenedModel(Segmenter(model, device, meta, refiner), desc)
    return _vanilla(choice.model_id, choice.weights, device)


def open_segmenter(model_id: str = DEFAULT_MODEL, weights: str | Path | None = None,
                   checkpoint: str | Path | None = None, device: str | None = None,
                   modality: str | None = None, is_rgb: bool = False,
                   use_default_checkpoint: bool = True) -> OpenedModel:
    """``choose_model`` then ``open_model``: for callers that do both on one thread (CLI, scripts)."""
    choice = choose_model(model_id, weights, checkpoint, modality, is_rgb, use_default_checkpoint)
    return open_model(choice, device)


def _is_samsp(path: Path) -> bool:
    try:
        read_samsp(path)
    except CheckpointError as exc:
        if "is not a SAM-SP checkpoint" in str(exc):
            return False
        raise
    return True


def _vanilla(model_id: str, weights: Path | None, device: str | None) -> OpenedModel:
    if weights is None and MODEL_SPECS[model_id].download is not None:
        from .download import cached_weights  # a file the user already agreed to download

        weights = cached_weights(model_id)
        if weights is None:
            raise CheckpointError(f"{model_id} weights are not downloaded yet; allow the download "
                                  f"(samselfprompt download {model_id}) or choose a weights file")
    model = build_model(model_id, weights)
    desc = f"vanilla {model.spec.title}, no SAM-SP checkpoint: prompted with the whole slice"
    return OpenedModel(Segmenter(model, device, {}), desc)
