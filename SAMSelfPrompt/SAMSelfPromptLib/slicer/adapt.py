"""Adapt: fine-tune SAM-SP (CPU mode) on the segments the user drew or corrected.

Main thread (``training_pairs``, ``user_segments``): the labelled slices are copied out of
MRML as (image slice, mask slice) arrays, one intensity window per volume. Only segments
the user made are learnt from: a segment SAM-SP wrote (tagged ``mrml.SOURCE_TAG``) would
teach the model its own output, so it is refused unless the user says they corrected it
(``allow_model_output``).

Worker thread (``adapt_job``): the training API in ``training.api`` embeds the slices with
the frozen encoder and trains the prompt encoder and mask decoder, on the device asked for.
Choices made for a worker that runs beside Slicer's UI and on patient data:
- the encoder is never traced here (``trace=False``): TorchScript tracing is seconds of
  Python-level work that holds the GIL, freezing the UI; the plain encoder runs in C++;
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
    from ..io.files import cache_dir

    return cache_dir() / "adapted"


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
                                    trace=False, cancel=ctx.cancel_event)
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
