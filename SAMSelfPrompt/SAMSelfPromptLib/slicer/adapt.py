"""Adapt: fine-tune SAM-SP (CPU mode) on the segments the user drew or corrected.

Main thread (``training_pairs``, ``user_segments``): the labelled slices are copied out of
MRML as (image slice, mask slice) arrays, one intensity window per volume. Only segments
the user made are learnt from: a segment SAM-SP wrote (tagged ``mrml.SOURCE_TAG``) would
teach the model its own output, so it is refused unless the user says they corrected it
(``allow_model_output``).

Worker thread (``adapt_job``): the training API in ``training.api`` embeds the slices with
the frozen encoder and trains the prompt encoder and mask decoder, on the device asked for.
Choices made for a worker that runs beside Slicer's UI and on patient data:
- the encoder is inference's own (``training.embedding_cache``): it runs in C++ and never holds the GIL
  against the UI for long;
- the embeddings live in a temporary folder removed when the job ends, however it ends
  (done, failed, cancelled), so no patient-derived data is left in the cache folder;
- Cancel is checked between images while embedding, between steps and between epochs;
  a cancelled run writes no checkpoint.
The result is a SAM-SP checkpoint (in ``out_dir``, default the cache folder's ``adapted/``),
loadable like any other (``checkpoint=`` in ``start_auto_segment``).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from . import mrml
from ..errors import CheckpointError, InputError
from ..runtime.jobs import EventKind, JobContext

TEMP_PREFIX = "samselfprompt-adapt-"  # the job's temporary embedding folder, in the system temp dir


def user_segments(segmentation_node) -> list[str]:
    """Ids of the segments the user made (not tagged as SAM-SP output), in the node's order."""
    if segmentation_node is None:
        return []
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegmentID(n) for n in range(seg.GetNumberOfSegments())
            if mrml.segment_tag(seg.GetNthSegment(n), mrml.SOURCE_TAG) is None]


def training_pairs(pairs: Sequence[tuple[Any, Any, str]], axis: str | int = "auto",
                   allow_model_output: bool = False) -> list[tuple[list, list, Any]]:
    """[(images, masks, intensity)] per volume: every slice where the segment has voxels.

    A segment SAM-SP wrote is refused unless ``allow_model_output`` (the user corrected it).
    """
    from ..core.preprocess import guess_intensity
    from ..core.orientation import SliceOrientation
    from ..core.predictor import resolve_axis, take_slice

    if not pairs:
        raise InputError("choose at least one segment to learn from")
    out = []
    for volume_node, segmentation_node, segment_id in pairs:
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
        if segment is None:
            raise InputError(f"choose the segment to learn from in {segmentation_node.GetName()}")
        if not allow_model_output and mrml.segment_tag(segment, mrml.SOURCE_TAG) is not None:
            raise InputError(
                f"'{segment.GetName()}' in {segmentation_node.GetName()} is SAM-SP's own output: Adapt would "
                "learn its own mistakes back. Choose a segment you drew, or, if you corrected this one, "
                "confirm that you did to learn from it.")
        volume = mrml.volume_from_node(volume_node)
        ax = resolve_axis(volume, axis)
        mask = mrml.segment_array(segmentation_node, segment_id, volume_node)
        labelled = [k for k in range(mask.shape[ax]) if take_slice(mask, ax, k).any()]
        # The view the Segmenter shows the model, so the adapted model meets its training view.
        view = SliceOrientation.for_volume(volume, ax).to_canonical
        if labelled:
            out.append(([view(take_slice(volume.array, ax, k)) for k in labelled],
                        [view(take_slice(mask, ax, k).astype(bool)) for k in labelled],
                        guess_intensity(volume.array, volume.modality)))
    if not out:
        raise InputError("the chosen segment is empty: draw or correct it on a few slices first")
    return out


def adapted_dir() -> Path:
    """Where Adapt saves what it trains (the engine's folder, which the target menus read)."""
    from ..weights.catalogue import adapted_dir as folder

    return folder()


def adapt_job(samples, model: str, checkpoint, out_dir, epochs: int, device: str = "auto"):
    """The worker function: train on ``device`` ("auto": CUDA, MPS, then CPU), save atomically,
    return {"checkpoint": path, "epochs", "slices", "history", "device"}."""

    def run(ctx: JobContext) -> dict[str, Any]:
        from ..training.api import train_samples
        from ..training.data import array_samples
        from ..training.embedding_cache import DiskEmbeddingCache
        from ..training.trainer import TrainConfig

        dev = training_device(device)
        data = []
        for n, (images, masks, intensity) in enumerate(samples):
            data += array_samples(images, masks, intensity, prefix=f"volume{n}")
        ctx.progress(0, epochs)
        ctx.emit(EventKind.MESSAGE, f"Loading {model}...")
        net = _start_model(model, checkpoint).to(dev)
        ctx.check_cancel()

        def log(line: str) -> None:  # called by the trainer after each epoch, on this thread
            try:
                entry = json.loads(line)
            except (TypeError, ValueError):
                ctx.emit(EventKind.MESSAGE, str(line))
                return
            if isinstance(entry, dict) and "epoch" in entry:
                ctx.progress(int(entry["epoch"]), epochs)
                ctx.emit(EventKind.MESSAGE, f"Adapting: epoch {entry['epoch']}/{epochs}, loss {entry.get('loss', 0):.3f}")
                ctx.check_cancel()  # raises Cancelled between epochs (never after the checkpoint is saved)

        out = Path(out_dir or adapted_dir()) / f"samsp-{model}-adapted-{time.strftime('%Y%m%d-%H%M%S')}.pt"
        config = TrainConfig(mode="cpu", epochs=epochs, batch_size=min(4, len(data)), warmup_steps=1)
        tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        try:
            ctx.emit(EventKind.MESSAGE, f"Encoding {len(data)} labelled slices on {dev.type}...")
            _, meta = train_samples(data, None, out, config, net, {"source": "3D Slicer segments", "n_train": len(data)},
                                    cache=DiskEmbeddingCache(tmp / "embeddings"), progress=False, log=log,
                                    cancel=ctx.cancel_event)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        ctx.progress(epochs, epochs)
        return {"checkpoint": str(out), "epochs": epochs, "slices": len(data), "history": meta.get("history"),
                "device": dev.type}

    return run


def training_device(requested: str | None = "auto"):
    """The torch device Adapt trains on: ``modeling.backbones.pick_device``'s choice for "auto"
    (CUDA, MPS, then CPU), else exactly the one asked for; one that this machine lacks (or a
    name torch does not know) is an InputError naming it."""
    from ..modeling.backbones import pick_device

    try:
        return pick_device(None if requested in (None, "", "auto") else requested)
    except ValueError as exc:  # pick_device's message names the device
        raise InputError(f"{exc}; choose 'auto' or 'cpu' for Adapt") from exc
    except RuntimeError as exc:  # torch cannot parse the name
        raise InputError(f"Adapt cannot use device '{requested}': {exc}") from exc


def _start_model(model: str, checkpoint):
    """The network to adapt: a SAM-SP checkpoint to continue from, a plain weights file of
    ``model`` to start from, or (no file) ``model``'s own weights."""
    from ..modeling.backbones import MODEL_SPECS, build_model
    from ..weights.checkpoint import load_samsp, read_samsp

    if not checkpoint:
        weights = None
        if model in MODEL_SPECS and MODEL_SPECS[model].download is not None:
            from ..weights.download import cached_weights  # a file the user already agreed to download

            weights = cached_weights(model)  # None: build_model says which file is needed
        return build_model(model, weights)
    try:
        read_samsp(checkpoint)
    except CheckpointError as exc:
        if "is not a SAM-SP checkpoint" not in str(exc):
            raise  # missing or unreadable: say so rather than silently start from scratch
        return build_model(model, checkpoint)
    return load_samsp(checkpoint)[0]


# --- Adapt to a new target: a few outlined slices of one volume, optional extent, then the rest ---------

def outlined_slices(volume_node, segmentation_node, segment_id: str, axis: str | int = "auto",
                    allow_model_output: bool = False):
    """Main thread: (Volume, array axis, {slice index: mask}) of every slice the segment has voxels on.

    Masks are on the stored slice grid, as ``mrml.write_slice`` takes them."""
    from ..core.predictor import resolve_axis, take_slice

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
    if segment is None:
        raise InputError(f"choose the segment you outlined in {segmentation_node.GetName()}")
    if not allow_model_output and mrml.segment_tag(segment, mrml.SOURCE_TAG) is not None:
        raise InputError(f"'{segment.GetName()}' is SAM-SP's own output: outline the target yourself on a few slices "
                         "(or confirm you corrected this one) before Adapt.")
    volume = mrml.volume_from_node(volume_node)
    ax = resolve_axis(volume, axis)
    mask = mrml.segment_array(segmentation_node, segment_id, volume_node)
    outlines = {k: take_slice(mask, ax, k).astype(bool) for k in range(mask.shape[ax]) if take_slice(mask, ax, k).any()}
    if not outlines:
        raise InputError(f"'{segment.GetName()}' is empty: outline the target on a few slices first")
    return volume, ax, outlines


def safe_name(name: str) -> str:
    """A file stem from a target name: lower case, runs of other characters as one dash."""
    import re

    return re.sub(r"[^a-z0-9_]+", "-", name.strip().lower()).strip("-") or "adapted"


def new_checkpoint_path(folder: Path, name: str) -> Path:
    """<folder>/<safe name>.pt, or -2, -3, ... when taken: an earlier model of that name is never
    replaced (a host may hold it open, warm, under its path)."""
    path = folder / f"{safe_name(name)}.pt"
    n = 2
    while path.exists():
        path = folder / f"{safe_name(name)}-{n}.pt"
        n += 1
    return path


def adapt_target_job(volume, axis: int, outlines: dict, name: str, extent: tuple[int, int] | None = None,
                     empty_slices: Sequence[int] = (), out_dir=None, device: str = "auto", segment_rest: bool = True,
                     config=None):
    """The worker function of Adapt to a new target (``training.adapt``): train from the nearest shipped
    target on the outlined slices (+ negatives from ``empty_slices`` and outside ``extent``), save the
    model named ``name`` as a user target, then, with ``segment_rest``, grow the target from the outlines
    (SLICE events on the stored grid, never outside ``extent``). Returns {"checkpoint", "target", ...}.

    The training slices' embeddings go to a temporary folder removed when the job ends (patient data);
    Cancel is checked between slices and steps, and a cancelled job writes no checkpoint."""

    def run(ctx: JobContext) -> dict[str, Any]:
        from ..core.orientation import SliceStack
        from ..core.predictor import SliceResult
        from ..core.preprocess import guess_intensity
        from ..modeling.backbones import build_model
        from ..training.adapt import (AdaptConfig, SliceEmbeddings, adapt_model, adapted_metadata, save_adapted,
                                      segment_adapted, start_checkpoint)
        from ..training.embedding_cache import DiskEmbeddingCache
        from ..weights.checkpoint import load_samsp
        from ..weights.targets import input_kind

        cfg = config or AdaptConfig()
        dev = training_device(device)
        stack = SliceStack.of(volume, axis)
        canonical = {k: stack.mask_in(m) for k, m in outlines.items()}
        intensity = guess_intensity(volume.array, volume.modality)
        kind = input_kind(volume.modality, volume.is_rgb, volume.array)
        start, path = start_checkpoint(kind)
        ctx.emit(EventKind.MESSAGE, f"Adapt: starting from {start}...")
        model = (load_samsp(path)[0] if path else build_model()).to(dev)
        ctx.check_cancel()
        steps = cfg.steps

        def log(line: str) -> None:
            try:
                entry = json.loads(line)
            except (TypeError, ValueError):
                return
            if isinstance(entry, dict) and "epoch" in entry:
                ctx.progress(int(entry["epoch"]), int(entry.get("epochs", 0)) or max(int(entry["epoch"]), 1))
                ctx.emit(EventKind.MESSAGE, f"Adapting {name}: epoch {entry['epoch']}, loss {entry.get('loss', 0):.3f}")
                ctx.check_cancel()

        tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        try:
            emb = SliceEmbeddings(model, stack.pixels, intensity, DiskEmbeddingCache(tmp / "embeddings"), ctx.cancel_event)
            ctx.emit(EventKind.MESSAGE, f"Adapt: encoding {len(canonical)} outlined slices and a few negatives...")
            outcome = adapt_model(model, stack.pixels, canonical, intensity, extent, empty_slices,
                                  float(volume.spacing[2 - axis]), cfg,
                                  embeddings=emb, cancel=ctx.cancel_event, log=log)
            out = new_checkpoint_path(Path(out_dir or adapted_dir()), name)
            meta = adapted_metadata(name, kind, outcome, intensity, start, cfg, source=volume.name)
            save_adapted(out, outcome, meta)
            result: dict[str, Any] = {"checkpoint": str(out), "target": name, "start": start,
                                      "adapt_seconds": round(outcome.seconds, 1), "slices": len(canonical),
                                      "negatives": outcome.negatives, "device": dev.type, "steps": steps}
            if segment_rest:
                t0 = time.time()
                n = len(stack)
                ctx.emit(EventKind.MESSAGE, f"Segmenting {name} outward from the outlined slices...")
                _, grown = segment_adapted(outcome.model, emb, canonical, outcome.presence_threshold, outcome.extent,
                                           cfg.patience, cancel=ctx.cancel_event,
                                           progress=lambda done: ctx.progress(min(done, n), n))
                for k in sorted(grown.masks):
                    mask = stack.mask_out(grown.masks[k])
                    ctx.emit(EventKind.SLICE, SliceResult(k, mask, None, "user" if k in canonical else "self", 0.0))
                result.update(segment_seconds=round(time.time() - t0, 1), painted=sorted(grown.masks),
                              visited=len(grown.visited))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return result

    return run
