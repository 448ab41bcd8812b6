"""The one catalogue: which model runs for an input, for the CLI, the Slicer Logic and the web app alike.

Shipped SAM-SP checkpoints live beside this file, each with a JSON summary naming the
modality it was trained for and its role: "auto" (the prompt-free default) or "clicks"
(click-trained, used for corrections). With no model named, every host asks
``choose_model`` and gets the same shipped SAM-SP model for the input, and
``open_model`` pairs it with its click-trained partner for corrections.

Each shipped prompt-free model is a *target* (``targets.py``): a structure with its terminology,
the input kinds it was trained for, its data's terms and its val metrics. The guard lives here:
with nothing named, an input gets the default target for its kind; when no target fits the kind
(``NoTargetError``), nothing is painted and the message names the targets and Adapt. A named
target that does not fit the input's kind is refused unless the user forces it.

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
from ..errors import CheckpointError, InputError
from ..modeling.backbones import DEFAULT_MODEL, MODEL_SPECS, build_model
from .checkpoint import load_samsp, read_samsp
from .targets import TARGETS, Structure, TargetSpec, input_kind as kind_of_input


class NoTargetError(InputError):
    """No shipped target fits the input: the guard's refusal (exit code 2 in the CLI)."""

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

    @property
    def target(self) -> "Target | None":
        """The target this prompt-free model is (None for click partners)."""
        if self.role != "auto":
            return None
        return Target.from_summary(self.name, self.path, self.summary)


@dataclass(frozen=True)
class Target:
    """A prompt-free model a host can offer: what it segments, for which inputs, how well, on what terms."""

    name: str
    title: str
    kinds: tuple[str, ...]
    structures: tuple[Structure, ...]
    path: Path
    terms: str = ""
    noncommercial: bool = False
    default_for: tuple[str, ...] = ()
    val_metrics: tuple[tuple[str, float], ...] = ()
    user: bool = False  # adapted by a user (not shipped)

    @classmethod
    def from_summary(cls, stem: str, path: Path, summary: dict) -> "Target":
        spec = summary.get("target") or _spec_for_file(path.name)
        if isinstance(spec, TargetSpec):
            spec = spec.to_dict()
        if not spec:  # an old summary without target metadata: one structure named after the file
            kind = str(summary.get("modality", "")).upper()
            spec = {"name": stem, "title": summary.get("description", stem), "kinds": [kind],
                    "structures": [{"name": stem}]}
        metrics = summary.get("val_metrics") or {}
        return cls(str(spec["name"]), str(spec.get("title", spec["name"])), tuple(spec.get("kinds", ())),
                   tuple(Structure.from_dict(d) for d in spec.get("structures", ())), path,
                   str(spec.get("terms", "")), bool(spec.get("noncommercial", False)),
                   tuple(spec.get("default_for", ())),
                   tuple((k, float(v)) for k, v in metrics.items() if isinstance(v, (int, float))),
                   bool(spec.get("user", False)))

    def fits(self, kind: str) -> bool:
        return kind in self.kinds

    def describe(self) -> str:
        """One line for a model menu or tooltip: title, structures, kinds, val Dice, terms."""
        metrics = dict(self.val_metrics)
        score = metrics.get("samsp", metrics.get("promise"))
        dice = f", val Dice {score:.3f}" if score is not None else ""
        terms = " NON-COMMERCIAL USE ONLY." if self.noncommercial else ""
        names = ", ".join(s.name for s in self.structures)
        return f"{self.title} [{self.name}]: {names}; for {'/'.join(self.kinds)} input{dice}.{terms} Terms: {self.terms}"


def _spec_for_file(filename: str) -> TargetSpec | None:
    return next((t for t in TARGETS if t.checkpoint == filename), None)


def shipped_targets() -> tuple[Target, ...]:
    """Every prompt-free model shipped beside this file, as a target."""
    return tuple(t for t in (m.target for m in shipped_models()) if t is not None)


def targets_for(kind: str, extra: tuple[Target, ...] = ()) -> list[Target]:
    """The targets that fit an input kind, the default first."""
    fitting = [t for t in (*shipped_targets(), *extra) if t.fits(kind)]
    return sorted(fitting, key=lambda t: (kind not in t.default_for, t.user, t.name))


def find_target(name: str, extra: tuple[Target, ...] = ()) -> Target:
    for t in (*shipped_targets(), *extra):
        if t.name == name:
            return t
    known = ", ".join(t.name for t in (*shipped_targets(), *extra))
    raise InputError(f"unknown target '{name}'; available targets: {known} (samselfprompt models lists them)")


def default_target(kind: str, extra: tuple[Target, ...] = ()) -> Target | None:
    """The target Auto-segment runs for this kind with nothing named: only where the kind implies the
    anatomy well enough (RGB dermoscopy, CT). Ultrasound and MR pictures of different organs look alike
    to the kind rule, so there the user picks the target; a user's own adapted model is never a default."""
    return next((t for t in targets_for(kind, extra) if kind in t.default_for and not t.user), None)


def choose_target_message(kind: str, fitting: list[Target]) -> str:
    """The guard's words when targets fit the kind but none can be assumed."""
    listing = "; ".join(f"{t.name} ({t.title})" for t in fitting)
    return (f"This {kind} input fits targets trained on different anatomy, and the image does not say which it "
            f"shows: {listing}. Nothing was painted. Choose one (command line: --target NAME; Slicer and web "
            "app: the Target menu). For a structure none of them is, outline it on a few slices and use Adapt.")


def no_target_message(kind: str) -> str:
    """The guard's words: what this input is, which targets exist, and what to do instead."""
    listing = "; ".join(f"{t.name} ({'/'.join(t.kinds)})" for t in shipped_targets())
    return (f"No shipped target fits this input: it looks like {kind} (see the rule in weights/targets.py), and "
            f"the targets are {listing}. Nothing was painted. To segment a structure no target knows, outline "
            "it on a few slices and use Adapt (Slicer and web app: the Adapt panel; command line: "
            "samselfprompt train --image VOL --label LAB --label-id N --fewshot-slices K ...), or force a target "
            "with --target NAME --force-target if you know it applies.")


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


def input_kind(modality: str | None, is_rgb: bool, array=None) -> str:
    """The catalogue's key for an input (the rule in targets.py: DICOM modality, colour, HU, 2D)."""
    return kind_of_input(modality, is_rgb, array)


def default_checkpoint(modality: str | None, is_rgb: bool, array=None) -> Path | None:
    """The default target's checkpoint for this kind of input, None when no target fits."""
    chosen = default_target(input_kind(modality, is_rgb, array))
    return chosen.path if chosen is not None else None


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
    target: Target | None = None  # what the checkpoint segments (names, colours, terminology, terms)
    forced: bool = False  # the user ran a target on an input kind it was not trained for

    @property
    def label(self) -> str:
        if self.target is not None:
            return f"target {self.target.name} ({self.checkpoint.name if self.checkpoint else ''})"
        if self.checkpoint is not None:
            return f"SAM-SP checkpoint {self.checkpoint.name}"
        return f"vanilla {MODEL_SPECS[self.model_id].title if self.model_id in MODEL_SPECS else self.model_id}"

    @property
    def structures(self) -> tuple[Structure, ...]:
        return self.target.structures if self.target is not None else ()


def choose_model(model_id: str = DEFAULT_MODEL, weights: str | Path | None = None,
                 checkpoint: str | Path | None = None, modality: str | None = None,
                 is_rgb: bool = False, use_default_checkpoint: bool = True, *, target: str | None = None,
                 array=None, force_target: bool = False, extra_targets: tuple[Target, ...] = ()) -> ModelChoice:
    """The model for this input: what the user named, else the default target for its kind.

    ``target`` names a target (shipped or in ``extra_targets``, e.g. the user's adapted models);
    it must fit the input's kind unless ``force_target``. With nothing named and no target fitting
    the input, ``NoTargetError`` says so (the guard). ``array`` (the voxels) lets the kind rule
    tell a grey picture or an MR volume from a CT without a DICOM modality.
    """
    if model_id not in MODEL_SPECS:
        raise CheckpointError(f"unknown model '{model_id}'; choose one of {', '.join(MODEL_SPECS)}")
    kind = input_kind(modality, is_rgb, array)
    chosen: Target | None = None
    if target:
        if checkpoint is not None:
            raise InputError("name either a target or a checkpoint, not both")
        chosen = find_target(target, extra_targets)
        if not chosen.fits(kind) and not force_target:
            raise NoTargetError(
                f"target {chosen.name} is for {'/'.join(chosen.kinds)} input, and this input looks like {kind}; "
                f"targets for {kind}: {', '.join(t.name for t in targets_for(kind, extra_targets)) or 'none'}. "
                "Use --target NAME --force-target (Slicer: 'Run anyway') to run it regardless, or Adapt.")
        checkpoint = chosen.path
    elif checkpoint is None and use_default_checkpoint and model_id == DEFAULT_MODEL and weights is None:
        fitting = targets_for(kind, extra_targets)
        if not fitting:
            raise NoTargetError(no_target_message(kind))
        chosen = default_target(kind, extra_targets)
        if chosen is None:
            raise NoTargetError(choose_target_message(kind, fitting))
        checkpoint = chosen.path
    elif checkpoint is not None:
        chosen = target_of_checkpoint(Path(checkpoint))
    return ModelChoice(model_id, Path(checkpoint) if checkpoint else None, Path(weights) if weights else None,
                       kind, chosen, bool(target and force_target and chosen and not chosen.fits(kind)))


def target_of_checkpoint(checkpoint: Path) -> Target | None:
    """The target a named checkpoint file is, from its metadata (None for a plain or foreign file)."""
    for m in shipped_models():
        if m.path.resolve() == checkpoint.resolve():
            return m.target
    try:
        meta = read_samsp(checkpoint).get("metadata", {})
    except CheckpointError:
        return None
    if meta.get("role", "auto") != "auto" or not meta.get("target"):
        return None
    return Target.from_summary(checkpoint.stem, checkpoint, meta)


def adapted_dir() -> Path:
    """Where Adapt in Slicer and the web app saves the targets users make: <cache>/adapted."""
    from ..io.files import cache_dir

    return cache_dir() / "adapted"


def saved_user_targets(folder: Path | None = None) -> tuple[Target, ...]:
    """The targets Adapt saved in ``folder`` (default ``adapted_dir()``), from this session or any earlier
    one; where two have the same name (the user adapted it again), the newest file."""
    folder = adapted_dir() if folder is None else Path(folder)
    if not folder.is_dir():
        return ()
    files = sorted(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
    newest: dict[str, Target] = {}
    for path in files:
        target = _user_target(str(path), path.stat().st_mtime_ns)
        if target is not None:
            newest.pop(target.name, None)
            newest[target.name] = target
    return tuple(newest.values())


@lru_cache(maxsize=256)
def _user_target(path: str, mtime_ns: int) -> Target | None:
    """One file's target, read once per version of the file (the menus ask on every refresh)."""
    target = target_of_checkpoint(Path(path))
    return target if target is not None and target.user else None


@dataclass
class OpenedModel:
    segmenter: Segmenter
    description: str
    structures: tuple[Structure, ...] = ()  # the target's structures (one output segment each)

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
        # ProMISe stays promptable: its clicks are point prompts in its own pass (untouched decoder weights), no partner.
        promise = meta.get("method") == "promise"
        refiner = (None if meta.get("role") == "clicks" or promise
                   else click_model_for(model.spec.model_id, meta, choice.kind, rgb))
        desc = f"{'ProMISe' if promise else 'SAM-SP'} checkpoint {checkpoint.name} (base {model.spec.model_id})"
        if refiner is not None:
            desc += ", click-trained partner for corrections"
        if choice.target is not None:
            desc = f"{choice.target.describe()} ({desc})"
            if choice.forced:
                desc = f"FORCED on {choice.kind} input, which it was not trained for: " + desc
        return OpenedModel(Segmenter(model, device, meta, refiner), desc, choice.structures)
    return _vanilla(choice.model_id, choice.weights, device)


def open_segmenter(model_id: str = DEFAULT_MODEL, weights: str | Path | None = None,
                   checkpoint: str | Path | None = None, device: str | None = None,
                   modality: str | None = None, is_rgb: bool = False,
                   use_default_checkpoint: bool = True, **target_args) -> OpenedModel:
    """``choose_model`` then ``open_model``: for callers that do both on one thread (CLI, scripts).

    ``target_args``: ``target``, ``array``, ``force_target``, ``extra_targets`` as for ``choose_model``."""
    choice = choose_model(model_id, weights, checkpoint, modality, is_rgb, use_default_checkpoint, **target_args)
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
