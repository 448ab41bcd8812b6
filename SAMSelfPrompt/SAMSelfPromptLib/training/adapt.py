"""Adapt: a few annotated slices of one volume in, a model for that target and a clean volume out.

The user outlines the target on k slices and may give its extent (the first and last slice that
contain it) and slices they mark as empty. Adapt then

1. picks **negatives** (``negative_slices``): every slice marked empty, plus slices outside the
   extent. Without an extent a default one is assumed for this purpose only: the annotated span
   widened on each side by one mean gap between the outlined slices (span / (k - 1); with k = 1,
   ``DEFAULT_MARGIN_MM``), at least 2 slices; slices beyond it are taken to be empty. Outlines spread
   over the structure end about half a gap from its ends, so this leaves a half-gap of safety; it is
   still a guess: give the extent (or mark empty slices) when you know it. At most ``max_negatives`` are used, spread from the nearest to the
   farthest on each side (the nearest teach the model where the target ends);
2. **trains** (cpu mode: frozen encoder, cached embeddings, bf16 decoder steps) on the k annotated
   slices and the negatives. A negative is an empty mask, so the trainer's presence training
   applies (absence loss on pass 1 + the IoU head's presence score); the presence threshold is
   chosen on the same slices (there is nothing else to choose it on);
3. **segments** outward from the annotated slices (``core.extent.grow_from_annotations``): stops
   where the presence output says the target ended, keeps the 3D components touching an
   annotation and never writes outside the extent when one was given.

The start model is the nearest shipped target of the input's kind (``start_checkpoint``), else
vanilla LiteMedSAM. The time budget is a fixed number of optimiser steps (``AdaptConfig.steps``),
so it does not grow with k: k <= 5 slices adapt in well under a minute on 2 CPU cores
(docs/RESULTS.md, Adapt).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..core.extent import ExtentResult, box_slice, check_extent, grow_from_annotations, samsp_slice
from ..core.preprocess import Frame, Intensity
from ..errors import InputError
from ..modeling.backbones import SamBackbone
from .data import Sample
from .embedding_cache import DiskEmbeddingCache, cache_key, check_cancel, model_input
from .trainer import TrainConfig, train

DEFAULT_MARGIN_MM = 30.0  # without an extent and with one outline: slices this far beyond it are negatives


@dataclass
class AdaptConfig:
    # Optimiser steps, whatever k is. 96 (batch 2, lr 5e-4) is what LA-MRI needed for pass 1 to come
    # alive from the CT start; 64 and 72 (with lr 8e-4 or a 3x pass-1 weight) left it empty or painting
    # everywhere (docs/RESULTS.md, Adapt).
    steps: int = 96
    batch_size: int = 2
    lr: float = 5e-4
    y0_weight: float = 1.0  # balanced BCE on pass 1 too (trainer.TrainConfig.y0_weight): it must come alive in few steps
    max_negatives: int = 6
    patience: int = 1  # absent slices in a row that end the outward run
    precision: str = "auto"  # bf16 decoder training where the CPU has it (trainer.TrainConfig.precision)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_extent(annotated: Sequence[int], n_slices: int, slice_mm: float = 1.0) -> tuple[int, int]:
    """The extent assumed for picking negatives when the user gives none (the rule in the module doc)."""
    lo, hi = min(annotated), max(annotated)
    k = len(set(annotated))
    gap = (hi - lo) / (k - 1) if k > 1 else DEFAULT_MARGIN_MM / max(float(slice_mm), 1e-6)
    margin = max(math.ceil(gap), 2)
    return max(0, lo - margin), min(n_slices - 1, hi + margin)


def negative_slices(n_slices: int, annotated: Sequence[int], extent: tuple[int, int] | None = None,
                    empty: Sequence[int] = (), max_negatives: int = 6, slice_mm: float = 1.0) -> list[int]:
    """The slices Adapt trains as "target absent", sorted.

    Marked-empty slices come first (all of them up to ``max_negatives``); the rest of the budget is
    split between the two sides outside ``extent`` (or ``default_extent``), each side's picks spread
    from its nearest slice to its farthest. Never an annotated slice, never one inside the extent.
    """
    ann = {int(k) for k in annotated}
    first, last = check_extent(extent, n_slices, sorted(ann)) if extent is not None else \
        default_extent(sorted(ann), n_slices, slice_mm)
    bad = [k for k in empty if int(k) in ann]
    if bad:
        raise InputError(f"slice(s) {bad} are both outlined and marked empty")
    marked = sorted({int(k) for k in empty if 0 <= int(k) < n_slices})
    chosen = _spread(marked, max_negatives) if len(marked) > max_negatives else marked
    budget = max_negatives - len(chosen)
    below = [k for k in range(first - 1, -1, -1) if k not in chosen]  # nearest first
    above = [k for k in range(last + 1, n_slices) if k not in chosen]
    if below and above:  # half the budget each side (a side that runs short gives the rest away)
        n_below = min(len(below), max(1, budget // 2))
        n_above = min(len(above), budget - n_below)
        n_below = min(len(below), budget - n_above)
    else:
        n_below, n_above = min(len(below), budget), min(len(above), budget)
    chosen += _spread(below, max(0, n_below)) + _spread(above, max(0, n_above))
    return sorted(set(chosen))


def _spread(items: Sequence[int], n: int) -> list[int]:
    """n items from ``items`` at evenly spaced positions, the first and the last included."""
    if n <= 0 or not items:
        return []
    if n >= len(items):
        return list(items)
    if n == 1:
        return [items[0]]
    return [items[int(round(i * (len(items) - 1) / (n - 1)))] for i in range(n)]


class SliceEmbeddings:
    """Lazy per-slice embeddings of one volume through the disk cache: only slices asked for are encoded."""

    def __init__(self, model: SamBackbone, image: np.ndarray, intensity: Intensity, cache: DiskEmbeddingCache,
                 cancel: threading.Event | None = None):
        self.model, self.image, self.intensity, self.cache, self.cancel = model, image, intensity, cache, cancel
        self._mem: dict[int, tuple[torch.Tensor, Frame]] = {}
        self._encode: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.encoded = 0
        self.seconds = 0.0

    def sample(self, k: int, mask: np.ndarray | None = None) -> Sample:
        m = np.zeros(self.image.shape[1:3], bool) if mask is None else np.asarray(mask, bool)
        return Sample(f"slice:{k}", self.image[k], m, self.intensity)

    def __call__(self, k: int) -> tuple[torch.Tensor, Frame]:
        if k not in self._mem:
            check_cancel(self.cancel)
            t0 = time.time()
            s = self.sample(k)
            key = cache_key(s, self.model)
            emb = self.cache.load(key)
            h, w = s.image.shape[:2]
            if emb is None:
                if self._encode is None:
                    self._encode = DiskEmbeddingCache._encoder(self.model)
                x = model_input(s, self.model.image_size)[0][None].to(self.model.device)
                with torch.no_grad():
                    emb = self._encode(x)[0].float().cpu()
                self.cache.store(key, emb)
                self.encoded += 1
            self._mem[k] = (emb.to(torch.float16), Frame(h, w, self.model.image_size))
            self.seconds += time.time() - t0
        return self._mem[k]


@dataclass
class AdaptOutcome:
    model: SamBackbone
    presence_threshold: float
    annotated: list[int]
    negatives: list[int]
    extent: tuple[int, int] | None
    seconds: float  # the whole Adapt: embedding of the training slices + training
    embed_seconds: float
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {"annotated_slices": self.annotated, "negative_slices": self.negatives,
                "extent": list(self.extent) if self.extent else None, "adapt_seconds": round(self.seconds, 1),
                "embed_seconds": round(self.embed_seconds, 1), "train_seconds": round(self.train_seconds, 1)}


def adapt_model(
    model: SamBackbone,
    image: np.ndarray,
    annotations: Mapping[int, np.ndarray],
    intensity: Intensity,
    extent: tuple[int, int] | None = None,
    empty: Sequence[int] = (),
    slice_mm: float = 1.0,
    config: AdaptConfig | None = None,
    cache: DiskEmbeddingCache | None = None,
    embeddings: SliceEmbeddings | None = None,
    cancel: threading.Event | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> AdaptOutcome:
    """Train ``model`` in place on the annotated slices of ``image`` (K x J x I) and the negatives."""
    config = config or AdaptConfig()
    t0 = time.time()
    ks = sorted(int(k) for k in annotations)
    n = image.shape[0]
    if extent is not None:
        extent = check_extent(extent, n, ks)
    negs = negative_slices(n, ks, extent, empty, config.max_negatives, slice_mm)
    emb = embeddings or SliceEmbeddings(model, image, intensity, cache or DiskEmbeddingCache(), cancel)
    for k in ks + negs:  # encode (or read) exactly the training slices, cancellable between them
        emb(k)
    embed_seconds = time.time() - t0
    samples = [emb.sample(k, annotations[k]) for k in ks] + [emb.sample(k) for k in negs]
    empty_outlines = [k for k in ks if not np.asarray(annotations[k]).any()]
    if len(empty_outlines) == len(ks):
        raise InputError("every outlined slice is empty: outline the target on at least one slice")
    # Positives repeated to match the negatives, so "absent" cannot win by numbers: with 3 outlines
    # and 6 negatives the model otherwise learns to paint nothing anywhere (measured on LA-MRI).
    positives, negatives = samples[:len(ks)], samples[len(ks):]
    train_set = positives * max(1, math.ceil(len(negatives) / len(positives))) + negatives
    bs = max(1, min(config.batch_size, len(train_set)))
    per_epoch = max(1, len(train_set) // bs)
    epochs = max(2, math.ceil(config.steps / per_epoch))
    tc = TrainConfig(mode="cpu", epochs=epochs, batch_size=bs, lr=config.lr, warmup_steps=2, seed=config.seed,
                     precision=config.precision, val_from=max(1, epochs - 1),
                     y0_weight=config.y0_weight)
    t1 = time.time()
    mem = _MemoryCache(emb, samples)
    result = train(model, train_set, samples, tc, cache=mem, progress=False, log=log, cancel=cancel)
    train_seconds = time.time() - t1
    threshold = float(result.best_val.get("presence_threshold", 0.0))
    return AdaptOutcome(result.model, threshold, ks, negs, extent, time.time() - t0, embed_seconds, train_seconds,
                        result.history, dict(result.best_val))


class _MemoryCache(DiskEmbeddingCache):
    """The trainer's cache interface over embeddings already in memory (no second disk read)."""

    def __init__(self, emb: SliceEmbeddings, samples: Sequence[Sample]):
        super().__init__(emb.cache.root)
        self._by_id = {id(s): int(s.case_id.split(":")[1]) for s in samples}
        self._emb = emb

    def embed(self, model, samples, batch_size=4, progress=False, desc="", cancel=None, stage=None):
        out = [self._emb(self._by_id[id(s)]) if id(s) in self._by_id and stage is None else None for s in samples]
        if any(o is None for o in out):
            return super().embed(model, samples, batch_size, progress, desc, cancel, stage)
        return torch.stack([o[0] for o in out]), [o[1] for o in out]  # type: ignore[index]


def segment_adapted(
    model: SamBackbone,
    embeddings: SliceEmbeddings,
    annotations: Mapping[int, np.ndarray],
    presence_threshold: float,
    extent: tuple[int, int] | None = None,
    patience: int = 1,
    cancel: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, ExtentResult]:
    """The K x J x I mask grown from the annotations (kept as drawn) within ``extent``."""
    model.eval()

    def decode(k: int) -> np.ndarray | None:
        e, frame = embeddings(k)
        return samsp_slice(model, e[None].to(model.device), frame, presence_threshold)

    def carry(k: int, neighbour: np.ndarray) -> np.ndarray | None:
        e, frame = embeddings(k)
        return box_slice(model, e[None].to(model.device), frame, neighbour)

    res = grow_from_annotations(decode, embeddings.image.shape[0], annotations, extent, patience, cancel=cancel,
                                progress=progress, carry=carry)
    out = np.zeros(embeddings.image.shape[:3], bool)
    for k, m in res.masks.items():
        out[k] = m
    return out, res


def start_checkpoint(kind: str) -> tuple[str, Path | None]:
    """The start for Adapt on an input of ``kind`` ("MR", "CT", ...): (name, checkpoint).

    The nearest shipped prompt-free SAM-SP target: one of the same kind, else (a grey image) the CT
    one, else any; vanilla (name "vanilla", None) only when none is shipped. A trained start matters
    more than its modality: its pass 1 already localises *something*, and a few dozen steps move it
    to the new target, while vanilla's pass 1 is empty everywhere and does not come alive in that
    budget (measured, docs/RESULTS.md, Adapt).
    """
    from ..weights.catalogue import shipped_models

    # A multi-structure checkpoint (cardiac-mr) is no start: Adapt learns one structure.
    models = [m for m in shipped_models() if m.role == "auto" and m.summary.get("method", "samsp") == "samsp"
              and not (m.summary.get("target") or {}).get("adapted") and int(m.summary.get("n_structures") or 1) == 1]
    for want in (kind.upper(), "CT" if kind.upper() != "RGB" else "RGB"):
        for m in models:
            if m.modality == want:
                return m.name, m.path
    return (models[0].name, models[0].path) if models else ("vanilla", None)


def adapted_metadata(name: str, kind: str, outcome: AdaptOutcome, intensity: Intensity, start: str,
                     config: AdaptConfig, source: str = "", color: Sequence[float] = (0.95, 0.75, 0.2)) -> dict[str, Any]:
    """The checkpoint metadata of an adapted model: role "auto" and a "target" entry, so the catalogue
    offers it like a shipped target (also for batch over other volumes of the same kind)."""
    from ..weights.targets import ANATOMICAL_STRUCTURE, SCT, Structure

    structure = Structure(name, tuple(float(c) for c in color)[:3], ANATOMICAL_STRUCTURE, (SCT, "", name))  # type: ignore[arg-type]
    return {
        "role": "auto",
        "modality": intensity.modality,
        "intensity": intensity.to_dict(),
        "presence_threshold": outcome.presence_threshold,
        "target": {"name": name, "title": f"{name} (adapted)", "kinds": [kind.upper()], "user": True, "adapted": True,
                   "structures": [structure.to_dict()], "terms": "your own outlines (Adapt); not a validated model",
                   "source": source, "start": start},
        "adapt": {**outcome.metadata(), "config": config.to_dict()},
        # Scored on the outlined slices it trained on, so not a validation: kept out of "val_metrics",
        # which menus show as "val Dice".
        "fit_metrics": {k: v for k, v in outcome.best_val.items() if isinstance(v, (int, float))},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_adapted(path: str | Path, outcome: AdaptOutcome, metadata: dict[str, Any]) -> Path:
    from ..weights.checkpoint import save_samsp
    from .api import _plain

    meta = dict(metadata)
    meta.setdefault("input_size", outcome.model.image_size)
    meta.setdefault("base_model", outcome.model.spec.model_id)
    return save_samsp(path, outcome.model, _plain(meta))


def pick_annotated(mask3d: np.ndarray, k: int) -> list[int]:
    """k slices spread evenly over the slices that contain the structure (what a user would outline)."""
    labeled = np.flatnonzero(mask3d.reshape(mask3d.shape[0], -1).any(1))
    if len(labeled) < k:
        raise InputError(f"only {len(labeled)} slices contain the label; cannot annotate {k}")
    return [int(labeled[int((i + 0.5) * len(labeled) / k)]) for i in range(k)]


def true_extent(mask3d: np.ndarray) -> tuple[int, int]:
    labeled = np.flatnonzero(mask3d.reshape(mask3d.shape[0], -1).any(1))
    return int(labeled[0]), int(labeled[-1])
