"""Adapt: fine-tune SAM-SP (CPU mode) on the segments the user drew or corrected.

Main thread (``training_pairs``): the labelled slices are copied out of MRML as
(image slice, mask slice) arrays, one intensity window per volume. Worker thread
(``adapt_job``): the training API in ``training.api`` caches the frozen encoder's
embeddings and trains the prompt encoder and mask decoder; progress is reported per
epoch and cancel is honoured between epochs. The result is a SAM-SP checkpoint in
the cache folder, loadable like any other (``checkpoint=`` in ``start_auto_segment``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from . import mrml
from ..errors import InputError
from ..runtime.jobs import EventKind, JobContext


def training_pairs(pairs: Sequence[tuple[Any, Any, str]], axis: str | int = "auto") -> list[tuple[list, list, Any]]:
    """[(images, masks, intensity)] per volume: every slice where the segment has voxels."""
    from ..core.preprocess import guess_intensity
    from ..core.orientation import SliceOrientation
    from ..core.predictor import resolve_axis, take_slice

    out = []
    for volume_node, segmentation_node, segment_id in pairs:
        if not segment_id or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise InputError(f"choose the segment to learn from in {segmentation_node.GetName()}")
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
    from ..weights.download import cache_dir

    return cache_dir() / "adapted"


def adapt_job(logic, samples, model: str, checkpoint, out_dir, epochs: int, device: str):
    """The worker function: train, save atomically, return {"checkpoint": path, ...}."""

    def run(ctx: JobContext) -> dict[str, Any]:
        from ..training.api import base_model, train_samples
        from ..training.data import array_samples
        from ..training.trainer import TrainConfig

        data = []
        for n, (images, masks, intensity) in enumerate(samples):
            data += array_samples(images, masks, intensity, prefix=f"volume{n}")
        ctx.emit(EventKind.MESSAGE, f"Adapting on {len(data)} labelled slices...")
        ctx.progress(0, epochs)

        def log(line: str) -> None:  # called by the trainer after each epoch, on this thread
            try:
                entry = json.loads(line)
            except (TypeError, ValueError):
                ctx.emit(EventKind.MESSAGE, str(line))
            else:
                if isinstance(entry, dict) and "epoch" in entry:
                    ctx.progress(int(entry["epoch"]), epochs)
            ctx.check_cancel()  # raises Cancelled between epochs

        out = Path(out_dir or adapted_dir()) / f"samsp-{model}-adapted-{time.strftime('%Y%m%d-%H%M%S')}.pt"
        net = base_model(_samsp_or_none(checkpoint), model, None if device == "auto" else device)
        config = TrainConfig(mode="cpu", epochs=epochs, batch_size=min(4, len(data)), warmup_steps=1)
        _, meta = train_samples(data, None, out, config, net, {"source": "3D Slicer segments", "n_train": len(data)},
                                progress=False, log=log)
        ctx.progress(epochs, epochs)
        return {"checkpoint": str(out), "epochs": epochs, "slices": len(data), "history": meta.get("history")}

    return run


def _samsp_or_none(checkpoint) -> str | None:
    """Continue from a SAM-SP checkpoint; a plain weights file is not a starting point here."""
    if not checkpoint:
        return None
    from ..weights.checkpoint import read_samsp
    from ..errors import CheckpointError

    try:
        read_samsp(checkpoint)
    except CheckpointError:
        return None
    return str(checkpoint)

