"""The Slicer module's Logic: runs on MRML only, never Qt, and is what the tests drive.

Threading: one persistent ``Worker`` thread owns the model (kept warm between runs) and
does every slow step (model loading, downloads, encoding, decoding, training). It
never touches MRML: it only queues events. The host calls ``poll()`` on the main
thread (the widget from a QTimer, tests and scripts from ``wait``); ``poll`` drains
the queue and applies each event to MRML there: one finished slice is written into
its segment at a time, so the segment grows live while the rest keeps running.

Torch and the engine are imported lazily, inside the methods that need them, so the
module (and this file) can be loaded before the user agreed to install torch.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import mrml
from ..errors import InputError
from ..runtime.jobs import EventKind, Job, JobContext, JobEvent, Worker
from .runs import BatchRun, Run, UndoState

# The backbones the widget offers (models.MODEL_SPECS, listed here so that the widget needs no torch).
MODEL_CHOICES = ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
ModelKey = tuple[str, str, str]  # (model id, checkpoint path or "", requested device)


class SAMSelfPromptLogic:
    """Auto-segment, batch, click correction with undo, and Adapt, on MRML nodes."""

    def __init__(self, worker: Worker | None = None):
        self.worker = worker or Worker("samselfprompt-slicer")
        self.runs: dict[int, Run] = {}
        self.undo_stack: list[UndoState] = []
        self.max_undo = 20
        self._segmenters: dict[ModelKey, Any] = {}  # touched only on the worker thread (and by add_segmenter)
        self._last_results: dict[tuple[str, int, int], Any] = {}  # (volume node id, axis, k) -> SliceResult
        self.adapted_checkpoints: list[Path] = []

    # --- models ---------------------------------------------------------------------------------
    def add_segmenter(self, segmenter, model: str = "litemedsam", checkpoint: str | Path | None = None,
                      device: str = "auto") -> None:
        """Register an already warm Segmenter (tests, or a host that built one itself)."""
        self._segmenters[(model, str(checkpoint or ""), device)] = segmenter

    def _segmenter(self, model: str, checkpoint: str | Path | None, device: str, ctx: JobContext | None = None):
        """Build or reuse the Segmenter; runs on the worker thread (loading takes seconds)."""
        key = (model, str(checkpoint or ""), device)
        if key not in self._segmenters:
            from ..core.predictor import Segmenter

            if ctx:
                ctx.emit(EventKind.MESSAGE, f"Loading model {model}...")
            from ..weights.catalogue import click_model_for

            net, meta = load_model(model, checkpoint, ctx)
            # Corrections use the shipped click-trained model of the same modality when there is one.
            modality = str((meta.get("intensity") or {}).get("modality") or meta.get("modality") or "")
            refiner = None if meta.get("role") == "clicks" or not modality else click_model_for(
                net.spec.model_id, meta, modality, modality == "RGB")
            self._segmenters[key] = Segmenter(net, None if device == "auto" else device, meta, refiner)
        return self._segmenters[key]

    @staticmethod
    def download_needed(model: str):
        """The DownloadSpec to show the user when ``model`` needs weights we do not have, else None.

        Only existence and size are checked here (main thread, instant); the sha256 is
        verified on the worker by ``download.ensure_weights`` before the file is used.
        """
        from ..modeling.backbones import MODEL_SPECS

        spec = MODEL_SPECS[model].download if model in MODEL_SPECS else None
        if spec is None:
            return None
        from ..weights.download import cache_dir

        path = cache_dir() / spec.filename
        return None if path.is_file() and path.stat().st_size == spec.size else spec

    # --- auto-segment -----------------------------------------------------------------------------
    def start_auto_segment(
        self, volume_node, *, model: str = "litemedsam", checkpoint: str | Path | None = None,
        device: str = "auto", axis: str | int = "auto", slice_range: tuple[int, int] | None = None,
        segmentation_node=None, segment_name: str = "SAM-SP", segment_id: str | None = None,
        color: Sequence[float] = mrml.DEFAULT_COLOR, allow_download: bool = False, options=None,
    ) -> Run:
        """Prepare the output on the main thread, then queue the run on the worker.

        Returns at once with a ``Run`` handle; slices appear as ``poll()`` applies them.
        A new segmentation node (linked to the volume) is made when none is given; the
        output segment is new unless ``segment_id`` names the user's choice.
        """
        volume = mrml.volume_from_node(volume_node)
        if segmentation_node is None:
            segmentation_node = mrml.new_segmentation_for(volume_node)
        elif not segmentation_node.GetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole()):
            mrml.link_to_volume(segmentation_node, volume_node)
        sid = mrml.output_segment(segmentation_node, segment_name, segment_id, color)
        from ..core.predictor import SegmentOptions, resolve_axis

        opts = options or SegmentOptions()
        opts.axis, opts.slice_range = axis, slice_range
        auto_fallback = options is None
        ax = resolve_axis(volume, axis)
        total = (slice_range[1] - slice_range[0]) if slice_range else volume.shape_kji[ax]
        run = Run("segment", volume_node.GetScene(), volume_node.GetID(), segmentation_node.GetID(), sid, ax, total=total,
                  name=volume_node.GetName())

        def job(ctx: JobContext):
            if allow_download:
                fetch_weights(model, ctx)
            seg = self._segmenter(model, checkpoint, device, ctx)
            if auto_fallback:
                # A plain backbone's no-prompt pass is untrained (its y0 is empty), so the whole
                # slice stands in for the self-prompt box; a SAM-SP checkpoint keeps "skip".
                opts.empty_y0 = "skip" if seg.metadata else "full_box"
            ctx.emit(EventKind.MESSAGE, f"Segmenting {total} slices on {seg.device}...")
            n = nonempty = 0
            for result in seg.segment(volume, opts, cancel=ctx.cancel_event, progress=ctx.progress):
                ctx.emit(EventKind.SLICE, result)
                n += 1
                nonempty += bool(result.mask.any())
                ctx.check_cancel()  # stop between slices, never inside one
            return {"slices": n, "nonempty": nonempty}

        return self._submit(run, job)

    def start_batch(self, volume_nodes: Sequence, **kwargs) -> BatchRun:
        """One run per volume, each into its own new segmentation, queued in order on the worker."""
        if not volume_nodes:
            raise InputError("no volumes to segment: load at least one volume")
        kwargs.pop("segmentation_node", None)
        kwargs.pop("segment_id", None)
        return BatchRun([self.start_auto_segment(node, **kwargs) for node in volume_nodes])

    # --- click correction and undo ----------------------------------------------------------------
    def start_correction(
        self, volume_node, segmentation_node, segment_id: str, positive_ras: Sequence[Sequence[float]],
        negative_ras: Sequence[Sequence[float]] = (), *, axis: str | int = "auto", model: str = "litemedsam",
        checkpoint: str | Path | None = None, device: str = "auto",
    ) -> Run:
        """Refine the one slice the clicks are on; the write (after an undo snapshot) happens in poll()."""
        from ..core.predictor import SegmentOptions, SliceResult, resolve_axis

        volume = mrml.volume_from_node(volume_node)
        ax = resolve_axis(volume, axis)
        index, xy = mrml.ras_to_slice_pixels(volume, ax, [*positive_ras, *negative_ras])
        pos, neg = xy[:len(positive_ras)].tolist(), xy[len(positive_ras):].tolist()
        previous = self._last_results.get((volume_node.GetID(), ax, index))
        if previous is None:  # the user's current slice: its bounding box is the box prompt
            current = mrml.read_slice(segmentation_node, segment_id, volume_node, ax, index)
            previous = SliceResult(index, current, bounding_box(current), "user", 0.0, None)
        run = Run("correct", volume_node.GetScene(), volume_node.GetID(), segmentation_node.GetID(), segment_id, ax, total=1,
                  name=volume_node.GetName())
        opts = SegmentOptions(axis=ax)

        def job(ctx: JobContext):
            seg = self._segmenter(model, checkpoint, device, ctx)
            result = seg.refine_slice(volume, index, pos, neg, previous, opts)
            ctx.emit(EventKind.SLICE, result)
            ctx.progress(1, 1)
            return {"slice": index}

        return self._submit(run, job)

    def undo(self) -> UndoState | None:
        """Restore the slice saved before the last correction, byte for byte; None if nothing to undo."""
        if not self.undo_stack:
            return None
        state = self.undo_stack.pop()
        volume_node = self._node(state.scene, state.volume_id)
        seg_node = self._node(state.scene, state.segmentation_id)
        if volume_node is None or seg_node is None or seg_node.GetSegmentation().GetSegment(state.segment_id) is None:
            return None  # the nodes were deleted since: nothing left to restore
        mrml.write_slice(seg_node, state.segment_id, volume_node, state.axis, state.index, state.mask)
        return state

    # --- adapt ------------------------------------------------------------------------------------
    def start_adapt(self, pairs: Sequence[tuple[Any, Any, str]], *, model: str = "litemedsam",
                    checkpoint: str | Path | None = None, out_dir: str | Path | None = None,
                    epochs: int = 3, axis: str | int = "auto", device: str = "cpu") -> Run:
        """Fine-tune on (volume node, segmentation node, segment id) triples; see ``logic_adapt``."""
        from .adapt import adapt_job, training_pairs

        samples = training_pairs(pairs, axis)
        run = Run("adapt", pairs[0][0].GetScene(), pairs[0][0].GetID(), pairs[0][1].GetID(), pairs[0][2], 0, total=epochs, name="Adapt")
        job = adapt_job(self, samples, model, checkpoint, out_dir, epochs, device)
        return self._submit(run, job)

    # --- event loop (main thread) -----------------------------------------------------------------
    def poll(self, max_events: int | None = None) -> list[Run]:
        """Drain the worker and apply its events to MRML; returns the runs that changed."""
        return self.apply_events(self.worker.drain(max_events, raise_errors=False))

    def apply_events(self, events: Sequence[JobEvent]) -> list[Run]:
        changed: dict[int, Run] = {}
        for event in events:
            run = self.runs.get(event.job_id)
            if run is None:
                continue
            self._apply(run, event)
            changed[id(run)] = run
        return list(changed.values())

    def _apply(self, run: Run, event: JobEvent) -> None:
        kind = event.kind
        if kind is EventKind.STARTED:
            run.status, run.started = "running", time.monotonic()
        elif kind is EventKind.MESSAGE:
            run.message = str(event.payload)
        elif kind is EventKind.PROGRESS:
            run.done, run.total = event.payload
        elif kind is EventKind.SLICE:
            self._write_result(run, event.payload)
        elif kind is EventKind.DONE:
            run.finish("done", event.payload)
            if run.kind == "adapt" and event.payload:
                self.adapted_checkpoints.append(Path(event.payload["checkpoint"]))
        elif kind is EventKind.CANCELLED:
            run.finish("cancelled")
        elif kind is EventKind.ERROR:
            exc, tb = event.payload
            run.finish("failed", error=str(exc), traceback=tb)

    def _write_result(self, run: Run, result) -> None:
        volume_node = self._node(run.scene, run.volume_id)
        seg_node = self._node(run.scene, run.segmentation_id)
        if volume_node is None or seg_node is None or seg_node.GetSegmentation().GetSegment(run.segment_id) is None:
            run.message = "the output was deleted; results are no longer written"
            return
        if run.kind == "correct":
            before = mrml.read_slice(seg_node, run.segment_id, volume_node, run.axis, result.index)
            self.undo_stack.append(UndoState(run.scene, run.volume_id, run.segmentation_id, run.segment_id, run.axis,
                                             result.index, before))
            del self.undo_stack[:-self.max_undo]
        mrml.write_slice(seg_node, run.segment_id, volume_node, run.axis, result.index, result.mask)
        self._last_results[(run.volume_id, run.axis, result.index)] = result
        run.written.append(result.index)
        if run.kind == "segment":
            run.voxels += int(result.mask.sum())

    def _submit(self, run: Run, fn: Callable[[JobContext], Any]) -> Run:
        job: Job = self.worker.submit(fn, name=f"{run.kind}:{run.name}")
        run.job = job
        self.runs[job.id] = run
        return run

    def cancel(self) -> None:
        """Cancel the running job and every queued one (each stops between slices)."""
        for run in self.runs.values():
            if run.job is not None and run.status in ("queued", "running"):
                run.job.cancel()

    def wait(self, run: Run | BatchRun, timeout: float = 600.0, interval: float = 0.05,
             on_poll: Callable[[list[Run]], None] | None = None) -> Run | BatchRun:
        """Poll on this (main) thread until ``run`` ends; for scripts, tests and the self-test."""
        deadline = time.monotonic() + timeout
        while not run.finished:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{run} still running after {timeout} s")
            changed = self.poll()
            if on_poll:
                on_poll(changed)
            time.sleep(interval)
        self.poll()
        return run

    def shutdown(self) -> None:
        self.cancel()
        self.worker.shutdown()

    # --- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _node(scene, node_id: str | None):
        return scene.GetNodeByID(node_id) if scene is not None and node_id else None


def bounding_box(mask: np.ndarray) -> np.ndarray | None:
    """x0, y0, x1, y1 of a 2D mask's foreground in pixel coordinates, None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def load_model(model: str, checkpoint: str | Path | None, ctx: JobContext | None = None):
    """(network, metadata): a SAM-SP checkpoint, a weights file for ``model``, or the cached download."""
    from ..weights.checkpoint import load_samsp, read_samsp
    from ..errors import CheckpointError
    from ..modeling.backbones import build_model

    if checkpoint:
        try:
            read_samsp(checkpoint)
        except CheckpointError:
            return build_model(model, checkpoint), {}
        return load_samsp(checkpoint)
    weights = None
    if model != "litemedsam":
        from ..weights.download import cached_weights

        weights = cached_weights(model)
        if weights is None:
            raise CheckpointError(f"{model} weights are not downloaded yet; allow the download or choose a checkpoint file")
    return build_model(model, weights), {}


def fetch_weights(model: str, ctx: JobContext) -> None:
    """Download (consent was given on the main thread) with progress; sha256 is checked by ensure_weights."""
    from ..weights.download import ensure_weights
    from ..modeling.backbones import MODEL_SPECS

    if model not in MODEL_SPECS or MODEL_SPECS[model].download is None:
        return
    ctx.emit(EventKind.MESSAGE, f"Downloading {model} weights...")
    ensure_weights(model, consent=lambda spec: True, progress=ctx.progress)
