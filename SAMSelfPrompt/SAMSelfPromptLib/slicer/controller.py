"""The module's state machine, with no Qt: what the Slicer widget and the web app both bind to.

``ModuleController`` wraps one ``SAMSelfPromptLogic`` and owns everything the module
shows: the state (idle -> running -> cancelling -> idle), which actions each state
enables, progress, ETA, the status line and the error line. A host only binds:

- its widgets (or web state) to ``parameters`` (a ``Parameters``, or ``NodeParameters``
  over Slicer's parameter node, so the node stays the one source of truth);
- its buttons to the actions (``apply``, ``cancel``, ``click``, ``undo``, ...);
- a timer to ``tick()``, which drains the worker through ``logic.poll()`` on the main thread;
- ``subscribe(callback)`` to a refresh that renders ``view()``.

Choices that keep the UI honest:
- Clicks are refused, with a status message, while any run is in flight (an Auto-segment
  or a correction): the slice they would correct is about to change, so a correction
  started then would start from a stale state. They are not queued: the user sees the
  new result first and clicks again (defect k).
- A point placed in a slice view arrives as a markups event; it is only recorded there
  and handled on the next ``tick()``, outside the markups widget's own event, since a
  refused point is then removed from that node.
- Keyboard shortcuts are offered only while the module is entered (``shortcuts_enabled``),
  never for the whole application (defect c).
- Cancel says what finishes first: the worker encodes slices in batches and stops
  between them, never inside one (defect e).

MRML is touched here (markups, the interaction and selection nodes), all on the main
thread; torch is never imported by this module, only by the Logic's runs.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import InputError, SamSelfPromptError

POSITIVE, NEGATIVE = "positive", "negative"
NEW_SEGMENT, OVERWRITE = "new segment", "overwrite"
RERUN_CHOICES = (NEW_SEGMENT, OVERWRITE)
AXIS_CHOICES = ("auto", "axial", "coronal", "sagittal")
LAST_SLICE = -1  # the "Last slice" value that means "to the end of the volume" (the .ui shows "last")
MARKUPS_COLORS = {POSITIVE: (0.2, 0.9, 0.2), NEGATIVE: (0.9, 0.2, 0.2)}
IDLE_STATUS = "Select a volume and press Auto-segment."


class State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    CANCELLING = "cancelling"


APPLY_TEXT = {State.IDLE: "Auto-segment", State.RUNNING: "Cancel", State.CANCELLING: "Cancelling…"}


@dataclass
class Parameters:
    """What the user chose; the fields of the module's parameter node, by ``PARAMETER_NAMES``."""

    input_volume: Any = None
    batch_all: bool = False
    model: str = "litemedsam"
    checkpoint: str = ""  # "": the shipped SAM-SP model the catalogue picks for the input
    target: str = ""  # "": the default target for the input's kind (weights.catalogue.targets_for)
    force_target: bool = False  # run the named target even on an input kind it was not trained for
    output_segmentation: Any = None  # None: the first run makes one, linked to the volume
    segment_name: str = "SAM-SP"
    slice_axis: str = "auto"
    first_slice: int = 0
    last_slice: int = LAST_SLICE  # inclusive; LAST_SLICE: to the end
    device: str = "auto"
    adapt_epochs: int = 5
    rerun: str = NEW_SEGMENT  # NEW_SEGMENT, or OVERWRITE the target segment (see ``target_segment_id``)


# Parameters field -> the parameter node's (and the .ui's SlicerParameterName) name.
PARAMETER_NAMES = {
    "input_volume": "inputVolume", "batch_all": "batchAllVolumes", "model": "model", "checkpoint": "checkpoint",
    "target": "target", "force_target": "forceTarget",
    "output_segmentation": "outputSegmentation", "segment_name": "segmentName", "slice_axis": "sliceAxis",
    "first_slice": "firstSlice", "last_slice": "lastSlice", "device": "device", "adapt_epochs": "adaptEpochs",
    "rerun": "rerun",
}


class NodeParameters:
    """``Parameters`` read and written through a parameter node wrapper (``@parameterNodeWrapper``).

    The controller writes back what it decides itself (the output segmentation a first run
    made, the checkpoint Adapt saved), so the widgets bound to the node show it at once.
    """

    def __init__(self, wrapper) -> None:
        object.__setattr__(self, "wrapper", wrapper)

    def __getattr__(self, name: str):
        if name not in PARAMETER_NAMES:
            raise AttributeError(name)
        return getattr(self.wrapper, PARAMETER_NAMES[name])

    def __setattr__(self, name: str, value) -> None:
        setattr(self.wrapper, PARAMETER_NAMES[name], value)


@dataclass(frozen=True)
class View:
    """Everything a host renders; a new one after each change (compare to skip a redraw)."""

    state: State
    apply_text: str
    apply_enabled: bool
    clicks_enabled: bool
    click_mode: str | None  # POSITIVE, NEGATIVE or None (not placing points)
    adapt_enabled: bool
    undo_enabled: bool
    clear_enabled: bool
    shortcuts_enabled: bool
    ticks_needed: bool  # the host's timer should call tick()
    progress_done: int
    progress_total: int
    progress_unit: str  # "slices" or "epochs"
    eta_text: str
    status_text: str
    error_text: str
    target_text: str  # which segment clicks (and an overwriting re-run) go to
    # The targets that fit the input volume, (name, menu text), the default first; empty without input.
    target_choices: tuple[tuple[str, str], ...] = ()
    target_description: str = ""  # the selected (or default) target: structures, val Dice, terms; or the guard


def slice_range(first: int, last: int, n_slices: int) -> tuple[int, int] | None:
    """The [start, stop) slices to segment from the UI's first/last (inclusive) slice.

    ``last == LAST_SLICE`` means to the end of the volume, and ``first`` is honoured
    either way. None means the whole volume. Values outside the volume are an InputError.
    """
    if first < 0:
        raise InputError(f"first slice {first} is negative: slices are numbered from 0")
    if last < LAST_SLICE:
        raise InputError(f"last slice {last} is not valid: give a slice index, or 'last' for the end")
    stop = n_slices if last == LAST_SLICE else last + 1
    if first >= n_slices:
        raise InputError(f"first slice {first} is past the volume's last slice ({n_slices - 1})")
    if stop > n_slices:
        raise InputError(f"last slice {last} is past the volume's last slice ({n_slices - 1})")
    if first >= stop:
        raise InputError(f"first slice {first} is after last slice {last}")
    return None if (first, stop) == (0, n_slices) else (first, stop)


def parse_slice_list(text: str, n_slices: int) -> list[int]:
    """Slice numbers from a field such as "3, 7-9" (0-based, ranges inclusive); "" is none.

    Adapt trains the slices listed as "target absent", so a typo must not silently drop one:
    anything unreadable or outside the volume is an InputError that names it."""
    out: set[int] = set()
    for part in str(text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo_text, dash, hi_text = part.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if dash else lo
        except ValueError:
            raise InputError(f"'{part}' is not a slice number or a range such as 7-9 "
                             "(list the slices without the target, e.g. 3, 7-9)") from None
        if lo > hi:
            raise InputError(f"slice range '{part}' runs backwards: write it as {hi}-{lo}")
        if hi >= n_slices:
            raise InputError(f"slice {hi} in '{part}' is past the volume's last slice ({n_slices - 1})")
        out.update(range(lo, hi + 1))
    return sorted(out)


class ModuleController:
    """The module's state and actions over one Logic; see the module docstring."""

    def __init__(self, logic, parameters: Parameters | NodeParameters | None = None, *,
                 confirm: Callable[[str], bool] | None = None, scene=None) -> None:
        self.logic = logic
        self.parameters = parameters if parameters is not None else Parameters()
        # Asked before installing packages or downloading weights: a dialog in Slicer. None refuses.
        self.confirm = confirm or (lambda message: False)
        self._scene = scene
        self.state = State.IDLE
        self.run = None  # the Run or BatchRun of the current (or last) action
        self.entered = False
        self.points: list[tuple[tuple[float, float, float], bool]] = []  # (RAS, positive) of the applied clicks
        self.output: tuple[str | None, str | None] = (None, None)  # (segmentation id, segment id) last written
        self.status = IDLE_STATUS
        self.error = ""
        self._install = None  # a deps.BackgroundInstall in flight, then ``_after_install`` runs
        self._after_install: Callable[[], Any] | None = None
        self._markups: dict[str, Any] = {}
        self._markups_tags: list[tuple[Any, int]] = []
        self._placed: list[tuple[tuple[float, float, float], bool]] = []  # points placed in views, not handled yet
        self._syncing = False
        self._observers: list[Callable[[View], None]] = []
        self._last_view: View | None = None

    # --- observers ----------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[View], None]) -> Callable[[], None]:
        """Call ``callback(view)`` after each change; returns the function that unsubscribes."""
        self._observers.append(callback)
        return lambda: self._observers.remove(callback) if callback in self._observers else None

    def refresh(self) -> View:
        """Recompute the view (e.g. after the host changed a parameter) and tell subscribers if it changed."""
        view = self.view()
        if view != self._last_view:
            self._last_view = view
            for callback in list(self._observers):
                callback(view)
        return view

    # --- what the UI shows --------------------------------------------------------------------
    @property
    def scene(self):
        if self._scene is None:
            import slicer

            self._scene = slicer.mrmlScene
        return self._scene

    def view(self) -> View:
        p = self.parameters
        idle = self.state is State.IDLE
        have_output = p.input_volume is not None and p.output_segmentation is not None
        done, total, unit, eta = self._progress()
        return View(
            state=self.state,
            apply_text=APPLY_TEXT[self.state],
            apply_enabled=self.state is State.RUNNING or (idle and (p.input_volume is not None or bool(p.batch_all))),
            clicks_enabled=idle and have_output,
            click_mode=self.click_mode,
            adapt_enabled=idle and have_output,
            undo_enabled=idle and bool(self.logic.can_undo),
            clear_enabled=bool(self.points),
            shortcuts_enabled=self.entered,
            ticks_needed=self.entered or not idle,
            progress_done=done, progress_total=total, progress_unit=unit,
            eta_text=f"about {eta:.0f} s left" if eta is not None else "",
            status_text=self.status,
            error_text=self.error,
            target_text=self._target_text(),
            **self._targets_view(),
        )

    def _targets_view(self) -> dict:
        """The target menu for the input volume and the text under it (cached per volume content)."""
        from ..weights.catalogue import choose_target_message, default_target, input_kind, no_target_message

        node = self.parameters.input_volume
        if node is None or bool(self.parameters.batch_all):
            return {"target_choices": (), "target_description": ""}
        image = node.GetImageData()
        key = (node.GetID(), image.GetMTime() if image is not None else 0, len(self.logic.adapted_checkpoints))
        if getattr(self, "_targets_key", None) != key:
            try:
                volume = self.logic.volume(node)
                kind = input_kind(volume.modality, volume.is_rgb, volume.array)
                fitting = self.logic.targets_for(node)
            except SamSelfPromptError:
                kind, fitting = "unknown", []
            self._targets_key, self._targets = key, (kind, fitting)
        kind, fitting = self._targets
        choices = tuple((t.name, t.title + (" (non-commercial)" if t.noncommercial else "")) for t in fitting)
        name = self.parameters.target or ""
        default = default_target(kind, self.logic.user_targets())
        chosen = next((t for t in fitting if t.name == name), None) if name else default
        if chosen is not None:
            text = chosen.describe()
        elif name:
            text = (f"{name} is not trained for this {kind} input; it runs only with 'Run the target even if ...' "
                    "checked.")
        elif fitting:
            text = choose_target_message(kind, fitting)
        else:
            text = no_target_message(kind)
        return {"target_choices": choices, "target_description": text}

    def _progress(self) -> tuple[int, int, str, float | None]:
        run = self.run
        if run is None:
            return 0, 0, "slices", None
        runs = getattr(run, "runs", [run])
        unit = "epochs" if runs[0].kind == "adapt" else "slices"
        if self.state is State.IDLE:
            return run.done, run.total, unit, None
        started = [r for r in runs if r.started is not None]
        done = sum(r.done for r in started)
        if not done:
            return run.done, run.total, unit, None
        # Seconds per finished item so far, times what is left (a batch's queued volumes included).
        rate = sum(r.elapsed for r in started) / done
        return run.done, run.total, unit, rate * max(0, run.total - run.done)

    def _target_text(self) -> str:
        p = self.parameters
        sid = self.target_segment_id()
        if sid is None:
            return "Clicks correct the segment Auto-segment writes; run it first."
        seg = p.output_segmentation
        name = seg.GetSegmentation().GetSegment(sid).GetName()
        text = f"Clicks correct '{name}' in {seg.GetName()}."
        return text + (f" A re-run overwrites '{name}' (Undo restores it)." if p.rerun == OVERWRITE else "")

    # --- parameters -----------------------------------------------------------------------------
    def target_segment_id(self) -> str | None:
        """The segment clicks correct and an overwriting re-run replaces: the one this module last
        wrote in the output segmentation, else the segment named like ``segment_name`` there."""
        seg = self.parameters.output_segmentation
        if seg is None:
            return None
        segmentation = seg.GetSegmentation()
        if self.output[0] == seg.GetID() and segmentation.GetSegment(self.output[1]) is not None:
            return self.output[1]
        sid = segmentation.GetSegmentIdBySegmentName(self.parameters.segment_name or "SAM-SP")
        if sid:
            return sid
        # A target names its segments after its structures ("Liver"): the last segment this module made.
        from . import mrml

        ours = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
                if mrml.segment_tag(segmentation.GetNthSegment(i), mrml.SOURCE_TAG) is not None]
        return ours[-1] if ours else None

    def _slice_count(self, volume_node) -> int:
        """Slices of ``volume_node`` along the chosen axis (1 for a picture)."""
        from ..core.predictor import resolve_axis  # lazily: it imports torch

        volume = self.logic.volume(volume_node)  # the Logic's cached copy, which the run then reuses
        return 1 if volume.is_rgb else volume.shape_kji[resolve_axis(volume, self.parameters.slice_axis)]

    def _slice_range_for(self, volume_node) -> tuple[int, int] | None:
        p = self.parameters
        if p.first_slice == 0 and p.last_slice == LAST_SLICE:
            return None  # the whole volume: no need to read its size here
        n = self._slice_count(volume_node)
        try:
            return slice_range(p.first_slice, p.last_slice, n)
        except InputError as exc:
            raise InputError(f"{volume_node.GetName()}: {exc}") from None

    def _volumes(self) -> list:
        p = self.parameters
        if not p.batch_all:
            if p.input_volume is None:
                raise InputError("select an input volume")
            return [p.input_volume]
        volumes = [node for node in self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
                   if not node.IsA("vtkMRMLLabelMapVolumeNode")]
        if not volumes:
            raise InputError("no volumes to segment: load at least one volume")
        return volumes

    # --- actions ----------------------------------------------------------------------------------
    def apply(self) -> None:
        """The Apply button: Auto-segment when idle, Cancel while running."""
        if self.state is State.RUNNING:
            self.cancel()
        elif self.state is State.IDLE:
            self.auto_segment()

    def auto_segment(self):
        """Start Auto-segment on the input (or every volume, with batch_all); returns the run or None."""
        if not self._can_start("Auto-segment"):
            return None
        p = self.parameters
        self.error = ""
        try:
            volumes = self._volumes()
            if not self._dependencies_ready(self.auto_segment):
                return None  # a consented install runs first, then this again
            ranges = [self._slice_range_for(node) for node in volumes]  # all checked before any starts
            kwargs = dict(model=p.model, checkpoint=p.checkpoint or None, device=p.device, axis=p.slice_axis,
                          segment_name=p.segment_name or "SAM-SP", allow_download=self._download_allowed(),
                          target=(p.target or None) if not p.checkpoint else None,
                          force_target=bool(p.force_target))
            self.set_click_mode(None)
            self.clear_points()  # the clicks were for the result this run replaces
            if len(volumes) == 1 and not p.batch_all:
                overwrite = self.target_segment_id() if p.rerun == OVERWRITE else None
                run = self.logic.start_auto_segment(volumes[0], segmentation_node=p.output_segmentation,
                                                    segment_id=overwrite, slice_range=ranges[0], **kwargs)
                first = getattr(run, "runs", [run])[0]  # a multi-structure target: one run per structure
                if p.output_segmentation is None:
                    p.output_segmentation = self.scene.GetNodeByID(first.segmentation_id)
                self.output = (first.segmentation_id, first.segment_id)
            else:  # one new segmentation per volume, each with its own slice range
                from .runs import BatchRun

                started = [self.logic.start_auto_segment(node, slice_range=r, **kwargs)
                           for node, r in zip(volumes, ranges)]
                run = BatchRun([r for s in started for r in getattr(s, "runs", [s])])
        except SamSelfPromptError as exc:
            if self.logic.busy:  # a batch that could not start every volume starts none
                self.logic.cancel()
            return self._refuse(str(exc), error=True)
        return self._start(run, f"Auto-segment of {len(volumes)} volumes queued..." if len(volumes) > 1
                           else f"Auto-segment of {volumes[0].GetName()} queued...")

    def cancel(self) -> None:
        """Cancel what runs; the status says what still finishes before it stops."""
        if self.state is not State.RUNNING:
            return
        if self._install is not None:
            self._install.cancel()
            self.status = "Cancelling the installation: packages pip already finished stay installed."
        else:
            self.logic.cancel()
            self.status = self._cancel_text()
        self.state = State.CANCELLING
        self.refresh()

    def _cancel_text(self) -> str:
        runs = getattr(self.run, "runs", [self.run])
        current = next((r for r in runs if not r.finished), runs[-1])
        if current.kind == "segment":
            text = (f"Cancelling: the slices being encoded (a batch of up to {max(1, current.batch_size)}) "
                    "finish first.")
            return text + (" Queued volumes will not start." if len(runs) > 1 else "")
        if current.kind == "correct":
            return "Cancelling: the correction being computed is dropped; the slice stays as it is."
        return "Cancelling: Adapt stops at its next step; no checkpoint is written."

    def tick(self) -> View:
        """The host's timer: apply the worker's events to MRML, handle placed points, refresh."""
        if self._install is not None:
            self._tick_install()
        self.logic.poll()
        if self.run is not None and self.state is not State.IDLE:
            if self.run.finished:
                self._finished(self.run)
            elif self.state is State.RUNNING:
                self.status = self._running_text()
        placed, self._placed = self._placed, []
        for ras, positive in placed:
            self.click(ras, positive)
        return self.refresh()

    def wait(self, timeout: float = 600.0, interval: float = 0.05) -> View:
        """Tick until idle (scripts, tests and the self-test; a UI uses its timer instead)."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.tick()
            if self.state is State.IDLE:
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"still {self.state.value} after {timeout} s: {self.status}")
            time.sleep(interval)

    def _running_text(self) -> str:
        runs = getattr(self.run, "runs", [self.run])
        current = next((r for r in runs if not r.finished), runs[-1])
        message = current.message or ("Waiting for the worker..." if current.status == "queued" else "Running...")
        return f"{current.name}: {message}" if len(runs) > 1 else message

    # --- clicks -----------------------------------------------------------------------------------
    @property
    def click_mode(self) -> str | None:
        """Which points a click in a slice view places now, read from MRML (the user may leave
        place mode from Slicer's toolbar at any time)."""
        interaction = self.scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
        selection = self.scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
        if interaction is None or selection is None or interaction.GetCurrentInteractionMode() != interaction.Place:
            return None
        active = selection.GetActivePlaceNodeID()
        return next((sign for sign, node in self._markups.items() if node.GetID() == active), None)

    def set_click_mode(self, sign: str | None) -> None:
        """Place positive or negative points with the next clicks in a view, or stop (None)."""
        interaction = self.scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
        selection = self.scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
        if sign is None:
            if self.click_mode is not None:
                interaction.SetCurrentInteractionMode(interaction.ViewTransform)
            self.refresh()
            return
        if sign not in (POSITIVE, NEGATIVE):
            raise ValueError(f"click mode must be {POSITIVE!r}, {NEGATIVE!r} or None, not {sign!r}")
        if not self.view().clicks_enabled:
            self._refuse(self._clicks_off_text())
            return
        node = self._markups_node(sign)
        selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
        selection.SetActivePlaceNodeID(node.GetID())
        interaction.SetPlaceModePersistence(1)  # one point per click until Escape
        interaction.SetCurrentInteractionMode(interaction.Place)
        self.refresh()

    def click(self, ras: Sequence[float], positive: bool = True) -> bool:
        """Correct the clicked slice of the target segment with every point placed on it so far.

        Refused (False, with a status message) while a run is in flight; a click on another
        slice starts a new set of points there. Each accepted click is one undo step.
        """
        point = (tuple(float(v) for v in ras), bool(positive))
        if self.state is not State.IDLE:
            self._sync_markups()  # take the refused point off the view
            self._refuse(self._clicks_off_text())
            return False
        p = self.parameters
        target = self.target_segment_id()
        if p.input_volume is None or p.output_segmentation is None or target is None:
            self._sync_markups()
            self._refuse("Run Auto-segment first (or choose the output segmentation holding the segment to correct).")
            return False
        self.error = ""
        attempts = [self.points + [point], [point]] if self.points else [[point]]
        for points in attempts:
            try:
                run = self.logic.start_correction(
                    p.input_volume, p.output_segmentation, target,
                    [xyz for xyz, pos in points if pos], [xyz for xyz, pos in points if not pos],
                    axis=p.slice_axis, model=p.model, checkpoint=p.checkpoint or None, device=p.device)
            except InputError as exc:
                error = str(exc)
                continue  # the earlier points are on another slice: start over there with this one
            self.points = points
            self._sync_markups()
            self.output = (p.output_segmentation.GetID(), target)
            self._start(run, "Correcting the clicked slice...")
            return True
        self._sync_markups()
        self._refuse(error, error=True)
        return False

    def _clicks_off_text(self) -> str:
        if self.state is State.IDLE:
            return "Run Auto-segment first (or choose the output segmentation holding the segment to correct)."
        kind = getattr(self.run, "kind", "segment")
        if kind == "correct":
            return "Click ignored: the last correction is still being computed. Click again when it is written."
        return "Click ignored: clicks are off while a run is in progress. Wait for it or cancel it."

    def clear_points(self) -> None:
        """Forget the points (the corrections they made stay; Undo reverts those)."""
        self.points = []
        self._placed = []
        self._sync_markups()
        self.refresh()

    def undo(self):
        """Restore the slice (or the overwritten segment) as it was before the last change."""
        if self.state is not State.IDLE:
            return self._refuse("Undo waits until the current run has finished.")
        state = self.logic.undo()
        if state is None:
            self.status = "Nothing to undo."
        elif state.index is None:
            self.status = "Restored the segment as it was before the re-run."
        else:
            if self.points:
                self.points.pop()  # that click's correction is gone
                self._sync_markups()
            self.status = f"Restored slice {state.index}."
        self.refresh()
        return state

    # --- adapt ----------------------------------------------------------------------------------
    def adapt(self, segment_ids: Sequence[str] | None = None, *, allow_model_output: bool = False):
        """Fine-tune on the user's segments of the output segmentation (default: every segment
        the user made, ``adapt.user_segments``); on success the new checkpoint is selected."""
        if not self._can_start("Adapt"):
            return None
        p = self.parameters
        self.error = ""
        seg = p.output_segmentation
        if p.input_volume is None or seg is None:
            return self._refuse("Choose the input volume and the segmentation holding your segments.", error=True)
        from .adapt import user_segments

        ids = list(segment_ids) if segment_ids is not None else user_segments(seg)
        if not ids:
            return self._refuse(f"{seg.GetName()} has no segment you drew: draw the structure on a few slices "
                                "(Segment Editor), then press Adapt.", error=True)
        try:
            if not self._dependencies_ready(lambda: self.adapt(segment_ids, allow_model_output=allow_model_output)):
                return None
            run = self.logic.start_adapt([(p.input_volume, seg, sid) for sid in ids], model=p.model,
                                         checkpoint=p.checkpoint or None, epochs=int(p.adapt_epochs),
                                         axis=p.slice_axis, device=p.device, allow_model_output=allow_model_output)
        except SamSelfPromptError as exc:
            return self._refuse(str(exc), error=True)
        return self._start(run, f"Adapt on {len(ids)} segment(s) queued...")

    def adapt_target(self, name: str, segment_id: str | None = None, *, empty_slices: Sequence[int] | str = (),
                     allow_model_output: bool = False):
        """Adapt to a new target named ``name``: the user outlined it on a few slices of the output
        segmentation's segment ``segment_id`` (default: the last segment they made) and may have set its
        first/last slice in the slice-range fields (then the extent: nothing is learnt as "present" or
        written outside it) and listed slices without it (``empty_slices``: numbers, or the panel's
        text such as "3, 7-9"; trained as "absent"). Trains in the background (progress, Cancel),
        saves the model as a user target, then writes the rest of the volume into a new segment named
        ``name``."""
        if not self._can_start("Adapt"):
            return None
        p = self.parameters
        self.error = ""
        seg = p.output_segmentation
        if p.input_volume is None or seg is None:
            return self._refuse("Choose the input volume and the segmentation holding your outlines.", error=True)
        from .adapt import user_segments

        ids = user_segments(seg)
        sid = segment_id or (ids[-1] if ids else None)
        if sid is None:
            return self._refuse(f"{seg.GetName()} has no segment you drew: outline the target on a few slices "
                                "(Segment Editor), optionally set its first/last slice, then press Adapt.", error=True)
        try:
            if not self._dependencies_ready(lambda: self.adapt_target(name, segment_id, empty_slices=empty_slices,
                                                                      allow_model_output=allow_model_output)):
                return None
            span = self._slice_range_for(p.input_volume)
            extent = None if span is None else (span[0], span[1] - 1)
            if isinstance(empty_slices, str):
                empty_slices = parse_slice_list(empty_slices, self._slice_count(p.input_volume))
            run = self.logic.start_adapt_target(p.input_volume, seg, sid, name, extent=extent,
                                                empty_slices=empty_slices, axis=p.slice_axis, device=p.device,
                                                allow_model_output=allow_model_output)
        except SamSelfPromptError as exc:
            return self._refuse(str(exc), error=True)
        where = f" (slices {extent[0]}-{extent[1]})" if extent else ""
        marked = f", {len(empty_slices)} slice(s) marked empty" if len(empty_slices) else ""
        return self._start(run, f"Adapt to '{name}'{where}{marked} queued...")

    def load_outlines(self, outlines, name: str = "Outlines") -> str | None:
        """Outlines drawn in another tool (an engine Volume read from a labelmap file on the input
        volume's grid) as a segment the user made in the output segmentation, for Adapt to a new
        target: every nonzero voxel is outlined. A host without a Segment Editor (the web app) loads
        them this way. Returns the new segment's id; nothing the user made before is changed."""
        import numpy as np

        from . import mrml

        p = self.parameters
        self.error = ""
        if p.input_volume is None:
            return self._refuse("Choose the input volume the outlines were drawn on first.", error=True)
        if not self._can_start("Loading outlines"):
            return None
        try:
            volume = self.logic.volume(p.input_volume)
            same_grid = (outlines.array.shape == volume.array.shape
                         and np.allclose(outlines.ijk_to_ras, volume.ijk_to_ras, atol=1e-3))
            if outlines.is_rgb or not same_grid:
                raise InputError(f"{name} is not a labelmap on the grid of {p.input_volume.GetName()} (its array "
                                 f"{tuple(outlines.array.shape)} against the volume's {tuple(volume.array.shape)}, or "
                                 "another position or direction): save the outlines on that volume's grid")
            mask = np.asarray(outlines.array) > 0
            outlined = [int(k) for k in np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))]
            if not outlined:
                raise InputError(f"{name} has no nonzero voxel: nothing is outlined in it")
            seg = p.output_segmentation or mrml.new_segmentation_for(p.input_volume,
                                                                     f"{p.input_volume.GetName()} outlines")
            mrml.check_same_grid(seg, p.input_volume)
        except SamSelfPromptError as exc:
            return self._refuse(str(exc), error=True)
        sid = seg.GetSegmentation().AddEmptySegment("", name, [0.95, 0.75, 0.2])
        mrml.write_segment_array(seg, sid, p.input_volume, mask)
        p.output_segmentation = seg
        shown = ", ".join(map(str, outlined[:8])) + (", ..." if len(outlined) > 8 else "")
        self.status = (f"Outlines '{name}' loaded on {len(outlined)} slice(s) ({shown}). Name the target, "
                       "optionally set its first/last slice and the slices without it, then press Adapt.")
        self.refresh()
        return sid

    # --- module and scene lifetime ----------------------------------------------------------------
    def module_entered(self) -> None:
        self.entered = True
        self.refresh()

    def module_exited(self) -> None:
        """Leaving the module: no shortcuts, no point placing (a run goes on in the background)."""
        self.entered = False
        self.set_click_mode(None)
        self.refresh()

    def scene_closed(self) -> None:
        """The scene was closed: its nodes are gone. (The Logic cancels its runs and undo itself.)"""
        self._remove_markups_observers()
        self._markups.clear()
        if self._install is None:
            self.state = State.IDLE
            self.run = None
        self.points, self._placed = [], []
        self.output = (None, None)
        self.status, self.error = IDLE_STATUS, ""
        self.refresh()

    def close(self) -> None:
        """The host goes away: stop observing, remove the point lists this controller made."""
        self._remove_markups_observers()
        for node in self._markups.values():
            if self.scene.GetNodeByID(node.GetID()) is node:
                self.scene.RemoveNode(node)
        self._markups.clear()
        self._observers.clear()

    # --- helpers ------------------------------------------------------------------------------------
    def _can_start(self, action: str) -> bool:
        if self.state is State.IDLE and not self.logic.busy:
            return True
        self._refuse(f"{action} waits until the current run has finished (or is cancelled).")
        return False

    def _start(self, run, status: str):
        self.run, self.state, self.status = run, State.RUNNING, status
        self.refresh()
        return run

    def _refuse(self, message: str, error: bool = False) -> None:
        if error:
            self.error = message
        else:
            self.status = message
        self.refresh()
        return None

    def _finished(self, run) -> None:
        self.state = State.IDLE
        runs = getattr(run, "runs", None)
        if runs is not None:
            self.status = "; ".join(f"{r.name}: {r.status}, {len(r.written)}/{r.total} slices" for r in runs)
            self.error = "\n".join(f"{r.name}: {r.error}" for r in runs if r.status == "failed")
            return
        if run.status == "failed":
            self.error = run.error or "the run failed"
        if run.kind == "segment":
            self.status = {"done": f"Done: {len(run.written)} slices written in {run.elapsed:.0f} s.",
                           "cancelled": f"Cancelled: {len(run.written)} of {run.total} slices were written.",
                           "failed": f"Auto-segment failed after {len(run.written)} of {run.total} slices."}[run.status]
        elif run.kind == "correct":
            if run.status != "done" and self.points:
                self.points.pop()  # that click changed nothing
                self._sync_markups()
            self.status = {"done": f"Corrected slice {run.written[0]}." if run.written else "Correction done.",
                           "cancelled": "Correction cancelled; the slice is unchanged.",
                           "failed": "The correction failed; the slice is unchanged."}[run.status]
        elif run.status == "done" and run.result.get("target"):  # Adapt to a new target (adapt_target)
            self.parameters.target, self.parameters.checkpoint = str(run.result["target"]), ""
            if run.result.get("painted") is not None:  # its segment is now the one clicks correct and exports hold
                self.output = (run.segmentation_id, run.segment_id)
            self.status = (f"Adapted target '{run.result['target']}' saved ({run.result['checkpoint']}) and selected; "
                           f"{len(run.written)} slices written. It is offered for other volumes and batch too.")
        elif run.status == "done":
            path = str(run.result["checkpoint"])
            self.parameters.checkpoint = path
            self.status = f"Adapted model saved and selected ({path}). Press Auto-segment to re-run with it."
        else:
            self.status = {"cancelled": "Adapt cancelled; no checkpoint was written.",
                           "failed": "Adapt failed; no checkpoint was written."}[run.status]

    def _dependencies_ready(self, then: Callable[[], Any]) -> bool:
        """True when every package is there; else a consented background install starts (state
        running) and ``then`` runs again once it has finished well."""
        from . import deps

        try:
            job = deps.install_in_background(self.confirm, checkpoint=self.parameters.checkpoint or None)
        except deps.DependencyError as exc:
            raise InputError(str(exc)) from None
        if job is None:
            return True
        self._install, self._after_install = job, then
        self.run = None
        self._start(None, "Installing Python packages...")
        return False

    def _tick_install(self) -> None:
        job = self._install
        lines = job.poll()
        if lines and self.state is State.RUNNING:
            self.status = lines[-1]
        if not job.finished:
            return
        self._install, then, self._after_install = None, self._after_install, None
        self.state = State.IDLE
        if job.ok:
            self.status = "Packages installed."
            then()
        else:
            self.error, self.status = job.error, "Nothing was run: the packages are not installed."

    def _download_allowed(self) -> bool:
        """Ask before downloading a backbone's weights (main thread: only size and existence are checked)."""
        p = self.parameters
        spec = None if p.checkpoint else self.logic.download_needed(p.model)
        if spec is None:
            return False
        text = (f"{p.model} weights ({spec.size / 1e6:.0f} MB) will be downloaded from {spec.url}, checked "
                "against their sha256 and kept in the cache folder. Download now?")
        if not self.confirm(text):
            raise InputError(f"{p.model} needs its weights: allow the download, or choose a checkpoint file")
        return True

    # --- markups (the points shown in the views) ----------------------------------------------------
    def markups_node(self, sign: str):
        """The point list of ``sign`` that the views place into (made on first use)."""
        return self._markups_node(sign)

    def _markups_node(self, sign: str):
        node = self._markups.get(sign)
        if node is not None and self.scene.GetNodeByID(node.GetID()) is node:
            return node
        # The Markups logic makes a new point list the active one: keep what the user was placing into.
        selection = self.scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
        active = selection.GetActivePlaceNodeID() if selection is not None else None
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"SAM-SP {sign}")
        if selection is not None:
            selection.SetActivePlaceNodeID(active)
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor(MARKUPS_COLORS[sign])
        node.GetDisplayNode().SetColor(MARKUPS_COLORS[sign])
        positive = sign == POSITIVE
        tag = node.AddObserver(node.PointPositionDefinedEvent,
                               lambda caller, _: self._on_point_placed(caller, positive))
        self._markups_tags.append((node, tag))
        self._markups[sign] = node
        return node

    def _on_point_placed(self, node, positive: bool) -> None:
        """A point was placed in a view: only record it here (inside the markups event); ``tick`` handles it."""
        if self._syncing or node.GetNumberOfControlPoints() == 0:
            return
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(node.GetNumberOfControlPoints() - 1, position)
        self._placed.append((tuple(position), positive))

    def _sync_markups(self) -> None:
        """Make the point lists show exactly ``self.points``."""
        self._syncing = True
        try:
            for sign in (POSITIVE, NEGATIVE):
                want = [xyz for xyz, pos in self.points if pos == (sign == POSITIVE)]
                node = self._markups.get(sign)
                if node is None or self.scene.GetNodeByID(node.GetID()) is not node:
                    if not want:
                        continue
                    node = self._markups_node(sign)
                have = []
                for n in range(node.GetNumberOfControlPoints()):
                    position = [0.0, 0.0, 0.0]
                    node.GetNthControlPointPositionWorld(n, position)
                    have.append(tuple(position))
                if len(have) == len(want) and all(max(abs(a - b) for a, b in zip(h, w)) < 1e-6
                                                  for h, w in zip(have, want)):
                    continue
                node.RemoveAllControlPoints()
                for xyz in want:
                    node.AddControlPointWorld(list(xyz))
        finally:
            self._syncing = False

    def _remove_markups_observers(self) -> None:
        for node, tag in self._markups_tags:
            node.RemoveObserver(tag)
        self._markups_tags.clear()

