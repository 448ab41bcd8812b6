"""The Slicer module's Logic: MRML in and out around the engine's one job path; never Qt.

Threading: one persistent ``Worker`` thread owns the models (kept warm between runs) and
does every slow step (model loading, downloads, encoding, decoding, training). It never
touches MRML: it only queues events. The host calls ``poll()`` on the main thread (the
controller from a QTimer or the web app's loop, scripts from ``wait``); ``poll`` drains the
queue and applies each event to MRML there: one finished slice is written into its segment
at a time, within that slice's extent, so the segment grows live while the rest runs.

Which model runs is the catalogue's decision (``weights.catalogue.choose_model``), the same
one the CLI and the web app ask; what runs is the engine's ``runtime.jobs.segmentation_job``.

Torch and the engine are imported lazily, inside the methods that need them, so the module
(and this file) can be loaded before the user agreed to install torch.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import slicer

from . import mrml
from ..errors import InputError, SamSelfPromptError
from ..runtime.jobs import EventKind, Job, JobContext, JobEvent, Worker
from .runs import BatchRun, Run, UndoState

# The backbones the widget offers (modeling.backbones.MODEL_SPECS, listed here so that the widget needs no torch).
MODEL_CHOICES = ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
SliceKey = tuple[str, str, str, int, int]  # (volume id, segmentation id, segment id, axis, slice index)


class RunFailed(SamSelfPromptError):
    """A blocking call's run ended without a result; the message says why."""


class SAMSelfPromptLogic:
    """Auto-segment, batch, click correction with undo, and Adapt, on MRML nodes."""

    def __init__(self, worker: Worker | None = None):
        self.worker = worker or Worker("samselfprompt-slicer")
        self.runs: dict[int, Run] = {}
        self.undo_stack: list[UndoState] = []
        self.max_undo = 20
        self.adapted_checkpoints: list[Path] = []
        self._segmenters: dict[tuple, Any] = {}  # (ModelChoice, device) -> Segmenter; touched on the worker only
        # The last model answer written per slice of a segment: a correction starts from its logits.
        self._last_results: dict[SliceKey, Any] = {}
        self._volumes: dict[str, tuple[int, Any]] = {}  # node id -> (image data MTime, Volume): copy and hash once
        self._observed_scenes: dict[int, tuple[Any, int]] = {}

    # --- models -----------------------------------------------------------------------------------
    def choose_model(self, volume, model: str = "litemedsam", checkpoint: str | Path | None = None,
                     target: str | None = None, force_target: bool = False):
        """The catalogue's choice for this input (instant; the model itself loads on the worker).

        Raises ``NoTargetError`` (the guard) when nothing is named and no target fits the input."""
        from ..weights.catalogue import choose_model

        return choose_model(model, None, checkpoint, volume.modality, volume.is_rgb, target=target,
                            array=volume.array, force_target=force_target, extra_targets=self.user_targets())

    def user_targets(self) -> tuple:
        """The targets users made with Adapt, offered like the shipped ones: those saved in the adapted
        folder in this session or an earlier one, and those this session saved anywhere else. A name
        adapted again in this session is this session's latest model."""
        from ..weights.catalogue import saved_user_targets, target_of_checkpoint

        session: dict[str, object] = {}
        for path in self.adapted_checkpoints:
            target = target_of_checkpoint(Path(path)) if Path(path).is_file() else None
            if target is not None:
                session.pop(target.name, None)
                session[target.name] = target
        return tuple(t for t in saved_user_targets() if t.name not in session) + tuple(session.values())

    def targets_for(self, volume_node) -> list:
        """The targets that fit this volume, the default first (for a host's target menu)."""
        from ..weights.catalogue import input_kind, targets_for

        volume = self.volume(volume_node)
        return targets_for(input_kind(volume.modality, volume.is_rgb, volume.array), self.user_targets())

    def _segmenter_loader(self, choice, device: str) -> Callable[[JobContext], Any]:
        """A function the worker calls to get the warm Segmenter for ``choice`` (loading it once)."""

        def load(ctx: JobContext):
            key = (choice, device)
            if key not in self._segmenters:
                from ..weights.catalogue import open_model

                ctx.emit(EventKind.MESSAGE, f"Loading {choice.label}...")
                self._segmenters[key] = open_model(choice, None if device == "auto" else device).segmenter
            return self._segmenters[key]

        return load

    @staticmethod
    def download_needed(model: str):
        """The DownloadSpec to show the user when ``model`` needs weights we do not have, else None.

        Only existence and size are checked here (main thread, instant); the sha256 is
        verified on the worker by ``weights.download.ensure_weights`` before the file is used.
        """
        from ..io.files import cache_dir
        from ..modeling.backbones import MODEL_SPECS

        spec = MODEL_SPECS[model].download if model in MODEL_SPECS else None
        if spec is None:
            return None
        path = cache_dir() / spec.filename
        return None if path.is_file() and path.stat().st_size == spec.size else spec

    # --- auto-segment -----------------------------------------------------------------------------
    def start_auto_segment(
        self, volume_node, *, model: str = "litemedsam", checkpoint: str | Path | None = None,
        device: str = "auto", axis: str | int = "auto", slice_range: tuple[int, int] | None = None,
        segmentation_node=None, segment_name: str = "SAM-SP", segment_id: str | None = None,
        color: Sequence[float] = mrml.DEFAULT_COLOR, allow_download: bool = False, options=None,
        target: str | None = None, force_target: bool = False, structure: int | None = None,
    ) -> Run | BatchRun:
        """Prepare the output on the main thread, then queue the engine's segmentation job.

        Returns at once with a ``Run`` handle; slices appear as ``poll()`` applies them. A new
        segmentation node (linked to the volume) is made when none is given. The output is a
        new segment unless ``segment_id`` names one explicitly: then that whole segment is
        saved on the undo stack first, so overwriting it can be undone.

        The target (named, else the default for the input; see ``choose_model``) names, colours and
        tags the segment with its terminology. A target with several structures (ACDC: RV,
        myocardium, LV) gives one run and one segment per structure, returned as a ``BatchRun``;
        the warm Segmenter's slice cache encodes each slice once for all of them.
        """
        from ..core.predictor import SegmentOptions, default_batch_size, resolve_axis
        from ..modeling.backbones import device_or_cpu
        from ..runtime.jobs import segmentation_job

        volume = self.volume(volume_node)
        ax = resolve_axis(volume, axis)
        n = 1 if volume.is_rgb else volume.shape_kji[ax]
        start, stop = slice_range or (0, n)
        if not 0 <= start < stop <= n:
            raise InputError(f"slice range {start}..{stop - 1} is outside the volume's {n} slices")
        choice = self.choose_model(volume, model, checkpoint, target, force_target)
        if segmentation_node is not None:
            mrml.check_same_grid(segmentation_node, volume_node)  # before anything in the scene changes
        structures = choice.structures
        if len(structures) > 1 and structure is None and not segment_id:
            segmentation_node = segmentation_node or mrml.new_segmentation_for(volume_node)
            same = dict(model=model, checkpoint=checkpoint, device=device, axis=axis, slice_range=slice_range,
                        segmentation_node=segmentation_node, segment_name=segment_name, color=color,
                        allow_download=allow_download, options=options, target=target, force_target=force_target)
            return BatchRun([self.start_auto_segment(volume_node, structure=i, **same) for i in range(len(structures))])
        terminology = None
        if structures:
            which = structures[structure or 0]
            if segment_name == "SAM-SP":  # the default name: the structure's own
                segment_name = which.name
            if tuple(color) == tuple(mrml.DEFAULT_COLOR):
                color = which.color
            terminology = mrml.structure_terminology(which)
        if segmentation_node is None:
            segmentation_node = mrml.new_segmentation_for(volume_node)
        elif (not segmentation_node.GetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole())
              or segmentation_node.GetSegmentation().GetNumberOfSegments() == 0):
            mrml.link_to_volume(segmentation_node, volume_node)
        if segment_id:  # an explicit overwrite: keep what is there for undo
            self._push_undo(UndoState(volume_node.GetScene(), volume_node.GetID(), segmentation_node.GetID(),
                                      segment_id, ax, None,
                                      mrml.segment_array(segmentation_node, segment_id, volume_node), {}))
        sid = mrml.output_segment(segmentation_node, segment_name, segment_id, color, terminology)
        opts = replace(options) if options is not None else SegmentOptions()
        opts.axis, opts.slice_range, opts.structure = ax, (start, stop), structure or 0
        if opts.batch_size is None:  # the worker's default, fixed now so that Cancel can say what finishes first
            opts.batch_size = default_batch_size(device_or_cpu(device))
        run = Run("segment", volume_node.GetScene(), volume_node.GetID(), segmentation_node.GetID(), sid, ax,
                  total=stop - start, name=volume_node.GetName(), batch_size=opts.batch_size, model=choice.label)
        load = self._segmenter_loader(choice, device)

        def segmenter(ctx: JobContext):
            if allow_download:
                fetch_weights(choice.model_id, ctx)
            return load(ctx)

        return self._submit(run, segmentation_job(segmenter, volume, opts, keep_mask=False))

    def auto_segment(self, volume_node, timeout: float = 3600.0, **kwargs):
        """Segment a volume and return its segmentation node; blocks (for scripts and notebooks).

        Takes the keyword arguments of ``start_auto_segment``. Raises ``RunFailed`` with the
        reason when the run fails or is cancelled.
        """
        started = self.wait(self.start_auto_segment(volume_node, **kwargs), timeout)
        runs = getattr(started, "runs", [started])  # one run per structure of a multi-structure target
        for run in runs:
            if run.status != "done":
                raise RunFailed(f"Auto-segment of {run.name} {run.status}: {run.error or run.message}")
        return volume_node.GetScene().GetNodeByID(runs[0].segmentation_id)

    def start_batch(self, volume_nodes: Sequence, **kwargs) -> BatchRun:
        """One run per volume, each into its own new segmentation, queued in order on the worker."""
        if not volume_nodes:
            raise InputError("no volumes to segment: load at least one volume")
        kwargs.pop("segmentation_node", None)
        kwargs.pop("segment_id", None)
        runs: list[Run] = []
        for node in volume_nodes:
            started = self.start_auto_segment(node, **kwargs)
            runs.extend(getattr(started, "runs", [started]))  # a multi-structure target gives several
        return BatchRun(runs)

    # --- click correction and undo ----------------------------------------------------------------
    def start_correction(
        self, volume_node, segmentation_node, segment_id: str, positive_ras: Sequence[Sequence[float]],
        negative_ras: Sequence[Sequence[float]] = (), *, axis: str | int = "auto", model: str = "litemedsam",
        checkpoint: str | Path | None = None, device: str = "auto",
    ) -> Run:
        """Refine the one slice the clicks are on; the write (after an undo snapshot) happens in poll().

        Refused while another run is active: its slices are not written yet, so a correction
        would start from a state that is about to change.
        """
        from ..core.masks import mask_box
        from ..core.predictor import SegmentOptions, SliceResult, resolve_axis

        if self.busy:
            raise InputError("wait for the current run to finish (or cancel it) before correcting a slice")
        if segmentation_node is None or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise InputError("choose the segment to correct first (run Auto-segment, or pick a segment)")
        volume = self.volume(volume_node)
        ax = resolve_axis(volume, axis)
        index, xy = mrml.ras_to_slice_pixels(volume, ax, [*positive_ras, *negative_ras])
        pos, neg = xy[:len(positive_ras)].tolist(), xy[len(positive_ras):].tolist()
        key = (volume_node.GetID(), segmentation_node.GetID(), segment_id, ax, index)
        current = mrml.read_slice(segmentation_node, segment_id, volume_node, ax, index)
        previous = self._last_results.get(key)
        if previous is None or previous.mask.shape != current.shape or not (previous.mask == current).all():
            # No model answer for this segment's slice, or the user edited it since: start from what is there.
            previous = SliceResult(index, current, mask_box(current), "user", 0.0, None)
        choice = self.choose_model(volume, model, checkpoint)
        run = Run("correct", volume_node.GetScene(), volume_node.GetID(), segmentation_node.GetID(), segment_id, ax,
                  total=1, name=volume_node.GetName(), model=choice.label)
        load = self._segmenter_loader(choice, device)
        opts = SegmentOptions(axis=ax)

        def job(ctx: JobContext):
            seg = load(ctx)
            ctx.check_cancel()
            result = seg.refine_slice(volume, index, pos, neg, previous, opts)
            ctx.check_cancel()  # a cancelled correction writes nothing
            ctx.emit(EventKind.SLICE, result)
            ctx.progress(1, 1)
            return {"slice": index}

        return self._submit(run, job)

    @property
    def can_undo(self) -> bool:
        return bool(self.undo_stack)

    def undo(self) -> UndoState | None:
        """Restore the state saved before the last correction or overwrite, byte for byte."""
        while self.undo_stack:
            state = self.undo_stack.pop()
            volume_node = self._node(state.scene, state.volume_id)
            seg_node = self._node(state.scene, state.segmentation_id)
            if volume_node is None or seg_node is None or seg_node.GetSegmentation().GetSegment(state.segment_id) is None:
                continue  # the nodes were deleted since: nothing left to restore there
            if state.index is None:
                mrml.write_segment_array(seg_node, state.segment_id, volume_node, state.mask)
            else:
                mrml.write_slice(seg_node, state.segment_id, volume_node, state.axis, state.index, state.mask)
            # The model answers recorded since that state are no longer what the segment holds.
            for key in [k for k in self._last_results if k[:3] == state.target and
                        (state.index is None or k[3:] == (state.axis, state.index))]:
                del self._last_results[key]
            self._last_results.update(state.last_results)
            return state
        return None

    def _push_undo(self, state: UndoState) -> None:
        self.undo_stack.append(state)
        del self.undo_stack[:-self.max_undo]

    # --- adapt ------------------------------------------------------------------------------------
    def start_adapt(self, pairs: Sequence[tuple[Any, Any, str]], *, model: str = "litemedsam",
                    checkpoint: str | Path | None = None, out_dir: str | Path | None = None,
                    epochs: int = 3, axis: str | int = "auto", device: str = "auto",
                    allow_model_output: bool = False) -> Run:
        """Fine-tune on (volume node, segmentation node, segment id) triples; see ``adapt``."""
        from . import adapt

        if self.busy:
            raise InputError("wait for the current run to finish (or cancel it) before adapting")
        if not pairs:
            raise InputError("choose at least one segment to learn from")
        samples = adapt.training_pairs(pairs, axis, allow_model_output=allow_model_output)
        volume_node, seg_node, segment_id = pairs[0]
        run = Run("adapt", volume_node.GetScene(), volume_node.GetID(), seg_node.GetID(), segment_id, 0,
                  total=epochs, name="Adapt")
        return self._submit(run, adapt.adapt_job(samples, model, checkpoint, out_dir, epochs, device))

    def start_adapt_target(self, volume_node, segmentation_node, segment_id: str, name: str, *,
                           extent: tuple[int, int] | None = None, empty_slices: Sequence[int] = (),
                           axis: str | int = "auto", device: str = "auto", out_dir: str | Path | None = None,
                           segment_rest: bool = True, allow_model_output: bool = False, config=None) -> Run:
        """Adapt to a new target: the user outlined it in ``segment_id`` on a few slices (optionally gave
        its first/last slice, ``extent``, and slices that are empty). Trains on the worker (progress,
        Cancel), saves the model as the user target ``name`` (offered by ``targets``/batch from then
        on), then writes the rest of the volume into a new segment "<name>" (never the user's own
        segment; never outside ``extent``). See ``adapt.adapt_target_job``."""
        from . import adapt

        if self.busy:
            raise InputError("wait for the current run to finish (or cancel it) before adapting")
        if not str(name or "").strip():
            raise InputError("name the new target (e.g. 'tumour') before Adapt")
        volume, ax, outlines = adapt.outlined_slices(volume_node, segmentation_node, segment_id, axis,
                                                     allow_model_output)
        out_id = None
        if segment_rest:
            mrml.check_same_grid(segmentation_node, volume_node)
            out_id = mrml.output_segment(segmentation_node, str(name).strip())
        run = Run("adapt", volume_node.GetScene(), volume_node.GetID(), segmentation_node.GetID(),
                  out_id or segment_id, ax, total=volume.shape_kji[ax], name=f"Adapt {name}")
        return self._submit(run, adapt.adapt_target_job(volume, ax, outlines, str(name).strip(), extent, empty_slices,
                                                        out_dir, device, segment_rest, config))

    # --- event loop (main thread) -----------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return any(not run.finished for run in self.runs.values())

    def poll(self, max_events: int | None = None) -> list[Run]:
        """Drain the worker and apply its events to MRML; returns the runs that changed."""
        return self.apply_events(self.worker.drain(max_events, raise_errors=False))

    def apply_events(self, events: Sequence[JobEvent]) -> list[Run]:
        """Apply each event to its run. One event that fails (a write into a node that changed
        under us) is reported on its run and never stops the events after it: DONE must always
        get through, or the UI would wait on Cancel forever."""
        changed: dict[int, Run] = {}
        for event in events:
            run = self.runs.get(event.job_id)
            if run is None:
                continue  # a run of a closed scene, or one we no longer track
            try:
                self._apply(run, event)
            except Exception as exc:  # noqa: BLE001 - reported on the run, never dropped
                run.write_error = run.write_error or f"could not write slice {getattr(event.payload, 'index', '?')}: {exc}"
                if run.job is not None:
                    run.job.cancel()  # the rest would fail the same way
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
            if run.write_error:
                run.finish("failed", error=run.write_error)
                return
            run.finish("done", event.payload)
            if run.kind == "adapt" and event.payload:
                self.adapted_checkpoints.append(Path(event.payload["checkpoint"]))
        elif kind is EventKind.CANCELLED:
            run.finish("failed", error=run.write_error) if run.write_error else run.finish("cancelled")
        elif kind is EventKind.ERROR:
            exc, tb = event.payload
            run.finish("failed", error=str(exc), traceback=tb)

    def _write_result(self, run: Run, result) -> None:
        if run.job is not None and run.job.cancel_event.is_set() and run.kind == "correct":
            return  # the user cancelled the correction: leave the slice as it is
        volume_node = self._node(run.scene, run.volume_id)
        seg_node = self._node(run.scene, run.segmentation_id)
        if volume_node is None or seg_node is None or seg_node.GetSegmentation().GetSegment(run.segment_id) is None:
            # The run ends "failed" with this reason (not a plain "cancelled": the user did not cancel).
            what = (f"the volume {run.name!r} was removed from the scene" if volume_node is None
                    else "the output segmentation was deleted" if seg_node is None else "the output segment was deleted")
            run.write_error = run.write_error or (f"{what} during the run; it stopped after "
                                                  f"{len(run.written)} slice(s) were written")
            run.message = run.write_error
            if run.job is not None:
                run.job.cancel()
            return
        key = (run.volume_id, run.segmentation_id, run.segment_id, run.axis, result.index)
        if run.kind == "correct":
            before = mrml.read_slice(seg_node, run.segment_id, volume_node, run.axis, result.index)
            last = {key: self._last_results[key]} if key in self._last_results else {}
            self._push_undo(UndoState(run.scene, run.volume_id, run.segmentation_id, run.segment_id, run.axis,
                                      result.index, before, last))
        mrml.write_slice(seg_node, run.segment_id, volume_node, run.axis, result.index, result.mask)
        self._last_results[key] = result
        run.written.append(result.index)
        if run.kind == "segment":
            run.voxels += int(result.mask.sum())

    def _submit(self, run: Run, fn: Callable[[JobContext], Any]) -> Run:
        self._observe_scene(run.scene)
        job: Job = self.worker.submit(fn, name=f"{run.kind}:{run.name}")
        run.job = job
        self.runs[job.id] = run
        return run

    def cancel(self) -> None:
        """Cancel the running job and every queued one (each stops between slices)."""
        for run in self.runs.values():
            if run.job is not None and not run.finished:
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
        for scene, tag in self._observed_scenes.values():
            scene.RemoveObserver(tag)
        self._observed_scenes.clear()
        self.worker.shutdown()

    # --- scene lifetime ---------------------------------------------------------------------------
    def _observe_scene(self, scene) -> None:
        if scene is not None and id(scene) not in self._observed_scenes:
            tag = scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, lambda caller, event: self.scene_closing(caller))
            self._observed_scenes[id(scene)] = (scene, tag)

    def scene_closing(self, scene) -> None:
        """The scene is being closed: node IDs will restart, so nothing of this scene may be written
        later. Cancel its runs, forget them (their late events are then dropped), and drop the undo
        states, last answers and volume copies that point into it."""
        for job_id, run in list(self.runs.items()):
            if run.scene is scene:
                if run.job is not None:
                    run.job.cancel()
                if not run.finished:
                    run.finish("cancelled")
                    run.message = "Cancelled: the scene was closed"
                del self.runs[job_id]
        self.undo_stack = [s for s in self.undo_stack if s.scene is not scene]
        self._last_results.clear()
        self._volumes.clear()

    # --- helpers ----------------------------------------------------------------------------------
    def volume(self, volume_node):
        """The node's voxels as an engine Volume, copied (and later hashed) once per change of the
        image data, not on every click: the copy is needed because the worker must never read VTK
        memory, but a 300-slice volume costs hundreds of MB to copy."""
        if volume_node is None or volume_node.GetImageData() is None:
            raise InputError("select an input volume that has image data")
        transform = volume_node.GetParentTransformNode()
        stamp = (volume_node.GetImageData().GetMTime(), volume_node.GetMTime(),
                 transform.GetMTime() if transform is not None else 0)
        cached = self._volumes.get(volume_node.GetID())
        if cached is None or cached[0] != stamp:
            cached = (stamp, mrml.volume_from_node(volume_node))
            self._volumes[volume_node.GetID()] = cached
        return cached[1]

    @staticmethod
    def _node(scene, node_id: str | None):
        return scene.GetNodeByID(node_id) if scene is not None and node_id else None


def fetch_weights(model: str, ctx: JobContext) -> None:
    """Download (consent was given on the main thread) with progress and cancel; sha256 is checked."""
    from ..modeling.backbones import MODEL_SPECS
    from ..weights.download import ensure_weights

    if model not in MODEL_SPECS or MODEL_SPECS[model].download is None:
        return
    ctx.emit(EventKind.MESSAGE, f"Downloading {model} weights...")
    ensure_weights(model, consent=lambda spec: True, progress=ctx.progress, cancel=ctx.cancel_event)
