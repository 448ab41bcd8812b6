"""The web app: trame-slicer's real MRML scene and slice views, with the Slicer module's panel.

It binds to ``slicer.controller.ModuleController`` over ``slicer.logic.SAMSelfPromptLogic``, the
pair the Qt widget (SAMSelfPrompt.py) binds to, and in the same three ways:

- the panel's fields to the controller's ``Parameters`` (state change -> parameter -> ``refresh``);
- each button to a controller action (``apply`` is Auto-segment and, while running, Cancel;
  ``set_click_mode``; ``undo``; ``clear_points``);
- a periodic async task to ``controller.tick()`` (the Qt widget's QTimer): it drains the worker on
  this main thread and writes each finished slice into the segment, so slices appear while the
  rest runs and the page stays responsive; ``controller.subscribe`` renders each new ``View``.

A click in a slice view places a point in the controller's point list (MRML's place mode, the
markups displayable manager of trame-slicer's slice view): the controller corrects that slice on
its next tick, as it does in Slicer. What runs, which model, and how results are written are all
the controller's and the Logic's; this file holds no segmentation, model choice or MRML writing.
"""
from __future__ import annotations

import asyncio
import logging
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from trame.app import TrameApp
from trame.decorators import change
from trame.ui.vuetify3 import VAppLayout
from trame.widgets import client, html
from trame.widgets import vuetify3 as v3
from trame_server.utils.asynchronous import create_task

from trame_slicer import module as trame_slicer_module
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories

from ..errors import SamSelfPromptError
from ..slicer.controller import (LAST_SLICE, NEGATIVE, NEW_SEGMENT, POSITIVE, RERUN_CHOICES, ModuleController,
                                 Parameters, State, View)
from ..slicer.logic import MODEL_CHOICES, SAMSelfPromptLogic
from ..slicer.volumes import add_volume
from . import export, inputs

log = logging.getLogger(__name__)
POLL_S = 0.1  # the tick period (the Qt widget's timer runs at 100 ms too)
LAYOUTS = ("Axial Only", "Axial Primary", "Quad View")


def target_items(choices) -> list[dict[str, str]]:
    """The target menu from the controller's view: the default for the input, then each target that fits."""
    items = [{"title": "Default for this input (see below)", "value": ""}]
    return items + [{"title": text, "value": name} for name, text in choices]


class SAMSelfPromptWebApp(TrameApp):
    """One scene, one Logic, one controller, served to every browser tab that connects."""

    def __init__(self, server=None, *, inputs_: Sequence[str | Path] = (), sample: bool = True) -> None:
        # The model's stack (torch, and triton with it) is imported before any view renders: loading
        # triton's LLVM after Mesa's (the offscreen OpenGL of the views) crashes the process, which
        # would otherwise happen at the first Auto-segment.
        from ..modeling import backbones  # noqa: F401

        super().__init__(server)
        self.server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        self.scene = self.slicer_app.scene
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.scene, self.slicer_app.view_manager, self.server)
        grids = LayoutManager.default_grid_configuration()
        self.layout_manager.register_layout_dict({name: grids[name] for name in LAYOUTS}, lazy_initialization=True)
        self.layout_manager.set_layout(LAYOUTS[0])

        self.logic = SAMSelfPromptLogic()
        self.parameters = Parameters()
        self.controller = ModuleController(self.logic, self.parameters, confirm=self._confirm, scene=self.scene)
        self.work_dir = tempfile.TemporaryDirectory(prefix="samselfprompt-app-")  # uploads (DICOM-SEG needs them) and exports
        self.source_files: dict[str, list[str]] = {}  # volume node id -> its DICOM files, in slice order
        self._uploads = 0
        self._tick_task = None
        self._fitted_views: set[int] = set()

        self._init_state()
        self._build_ui()
        self.controller.subscribe(self._render)
        self.controller.module_entered()  # the panel is always shown: ticks run, clicks may be placed
        self.server.controller.on_server_ready.add(self._start_ticks)
        for path in inputs_:  # the command line's inputs: a bad one stops the app before it serves
            self._add_volumes(lambda: inputs.read_path(path), raise_errors=True)
        if not inputs_ and sample:
            self.load_sample()
        self._render(self.controller.refresh())

    # --- loading --------------------------------------------------------------------------------
    def load_path(self, path: str | Path) -> list:
        """Add every volume in a file or DICOM folder to the scene; errors are shown in the panel."""
        return self._add_volumes(lambda: inputs.read_path(path))

    def load_sample(self) -> list:
        return self._add_volumes(lambda: [inputs.sample_volume()[0]])

    def _add_volumes(self, read: Callable[[], list], raise_errors: bool = False) -> list:
        self.state.ssp_message = ""
        try:
            volumes = read()
        except SamSelfPromptError as exc:
            if raise_errors:
                raise
            self.state.ssp_message = str(exc)
            return []
        nodes = []
        for volume in volumes:
            node = add_volume(self.scene, volume)
            if volume.source_files:
                self.source_files[node.GetID()] = list(volume.source_files)
            nodes.append(node)
        self._update_volume_list()
        if nodes:
            self.state.ssp_volume_id = nodes[-1].GetID()
            self._select_volume(nodes[-1].GetID())
        return nodes

    def _update_volume_list(self) -> None:
        nodes = [n for n in self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
                 if not n.IsA("vtkMRMLLabelMapVolumeNode")]
        self.state.ssp_volumes = [{"title": n.GetName(), "value": n.GetID()} for n in nodes]

    def _latest_segmentation(self, volume_node):
        """The last segmentation made on this volume (the Logic links each to its volume)."""
        if volume_node is None:
            return None
        found = None
        for seg in self.scene.GetNodesByClass("vtkMRMLSegmentationNode"):
            if seg.GetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole()) == volume_node.GetID():
                found = seg
        return found

    def _select_volume(self, node_id: str | None) -> None:
        node = self.scene.GetNodeByID(node_id) if node_id else None
        if node is self.parameters.input_volume and node is not None:
            return
        if self.controller.points:
            self.controller.clear_points()  # they were placed on the other volume
        self.parameters.input_volume = node
        self.parameters.output_segmentation = self._latest_segmentation(node)
        self._show(node)
        self._update_choice()
        self._update_export()
        self.controller.refresh()

    def _show(self, node) -> None:
        display = self.slicer_app.display_manager
        display.show_volume_in_slice_background(node)
        display.show_volume_in_slice_foreground(None)
        display.reset_views()
        self._fit_on_resize()

    def _fit_on_resize(self) -> None:
        """Fit each view to the volume again when the browser gives it its size (a volume loaded
        before any browser connected was fitted to the default window size)."""
        for view in self.slicer_app.view_manager.get_views():
            if id(view) not in self._fitted_views:
                self._fitted_views.add(id(view))
                view.render_window().AddObserver("WindowResizeEvent", lambda *_, v=view: v.reset_view())

    # --- panel -> parameters ----------------------------------------------------------------------
    def _init_state(self) -> None:
        s = self.state
        s.trame__title = "SAM Self-Prompt"
        s.ssp_volumes, s.ssp_volume_id = [], None
        s.ssp_batch_all = False
        s.ssp_targets, s.ssp_target = target_items(()), ""
        s.ssp_force_target = False
        s.ssp_models, s.ssp_model = list(MODEL_CHOICES), self.parameters.model
        s.ssp_choice = ""
        s.ssp_first_slice, s.ssp_last_slice = "0", ""
        s.ssp_rerun_choices, s.ssp_rerun = list(RERUN_CHOICES), NEW_SEGMENT
        s.ssp_allow_download = False
        s.ssp_formats, s.ssp_format = [], "seg.nrrd"
        s.ssp_export_enabled = False
        s.ssp_message = ""
        s.ssp_layouts, s.ssp_layout = list(LAYOUTS), LAYOUTS[0]
        s.ssp_view = {}

    @change("ssp_volume_id")
    def _on_volume(self, ssp_volume_id, **_):
        self._guard(lambda: self._select_volume(ssp_volume_id))

    @change("ssp_batch_all", "ssp_rerun")
    def _on_flags(self, ssp_batch_all, ssp_rerun, **_):
        self.parameters.batch_all = bool(ssp_batch_all)
        self.parameters.rerun = ssp_rerun if ssp_rerun in RERUN_CHOICES else NEW_SEGMENT
        self.controller.refresh()

    @change("ssp_model", "ssp_target", "ssp_force_target")
    def _on_model(self, ssp_model, ssp_target, ssp_force_target, **_):
        self.parameters.model = ssp_model or "litemedsam"
        self.parameters.target = ssp_target or ""
        self.parameters.force_target = bool(ssp_force_target)
        self._update_choice()
        self.controller.refresh()

    @change("ssp_first_slice", "ssp_last_slice")
    def _on_slices(self, ssp_first_slice, ssp_last_slice, **_):
        self.state.ssp_message = ""
        try:
            first = int(str(ssp_first_slice).strip() or 0)
            last_text = str(ssp_last_slice if ssp_last_slice is not None else "").strip()
            last = LAST_SLICE if last_text in ("", "last") else int(last_text)
        except ValueError:
            self.state.ssp_message = "Slices are whole numbers (leave Last empty for the end of the volume)."
            return
        self.parameters.first_slice, self.parameters.last_slice = first, last
        self.controller.refresh()

    @change("ssp_format")
    def _on_format(self, **_):
        self._update_export()

    @change("ssp_layout")
    def _on_layout(self, ssp_layout, **_):
        if ssp_layout in LAYOUTS:
            self.layout_manager.set_layout(ssp_layout)
            self._show(self.parameters.input_volume)

    def _update_choice(self) -> None:
        """What the catalogue runs for the selected volume with the chosen target and backbone."""
        p = self.parameters
        if p.input_volume is None:
            self.state.ssp_choice = ""
            return
        try:
            choice = self.logic.choose_model(self.logic.volume(p.input_volume), p.model, p.checkpoint or None,
                                             (p.target or None) if not p.checkpoint else None, bool(p.force_target))
            self.state.ssp_choice = f"Runs: {choice.label} ({choice.kind} input)"
        except SamSelfPromptError as exc:
            self.state.ssp_choice = f"Cannot run: {exc}"

    def _update_export(self) -> None:
        p = self.parameters
        files = self.source_files.get(p.input_volume.GetID()) if p.input_volume is not None else None
        ids = export.formats_for(files)
        self.state.ssp_formats = [{"title": export.FORMATS[f][0], "value": f} for f in ids]
        if self.state.ssp_format not in ids:
            self.state.ssp_format = ids[0]
        self.state.ssp_export_enabled = (self.controller.state is State.IDLE and p.input_volume is not None
                                         and p.output_segmentation is not None)

    def _confirm(self, message: str) -> bool:
        """The controller asks before downloading weights (and installing packages): the panel's checkbox."""
        if not self.state.ssp_allow_download:
            self.state.ssp_message = f"{message} Tick 'Allow downloads' to agree, then press Auto-segment again."
            return False
        return True

    # --- buttons -> controller -------------------------------------------------------------------
    def apply(self) -> None:
        self._guard(self.controller.apply)

    def adapt_target(self) -> None:
        """The Adapt panel: the slice-range fields are the target's extent, the "without the target"
        field lists slices trained as absent (controller.adapt_target)."""
        self._guard(lambda: self.controller.adapt_target(str(self.state.ssp_adapt_name or "").strip(),
                                                         empty_slices=str(self.state.ssp_adapt_empty or "")))

    def toggle_click_mode(self, sign: str) -> None:
        self._guard(lambda: self.controller.set_click_mode(None if self.controller.click_mode == sign else sign))

    def undo(self) -> None:
        self._guard(self.controller.undo)

    def clear_points(self) -> None:
        self._guard(self.controller.clear_points)

    def load_sample_button(self) -> None:
        self._guard(self.load_sample)

    def upload(self, files: list[dict]) -> None:
        """Files the browser sent: kept for the app's lifetime (a DICOM-SEG export reads its series)."""
        self._uploads += 1
        folder = Path(self.work_dir.name) / f"upload-{self._uploads}"
        self._guard(lambda: self._add_volumes(lambda: inputs.read_uploads(inputs.save_uploads(files or [], folder))))

    def upload_outlines(self, files: list[dict]) -> None:
        """A labelmap file of outlines on the input volume's grid: a segment the user made, for Adapt."""
        self._uploads += 1
        folder = Path(self.work_dir.name) / f"outlines-{self._uploads}"
        self._guard(lambda: self._load_outlines(inputs.save_uploads(files or [], folder)))

    def _load_outlines(self, paths: list[Path]) -> None:
        self.state.ssp_message = ""
        try:
            outlines = inputs.read_outlines(paths)
        except SamSelfPromptError as exc:
            self.state.ssp_message = str(exc)
            return
        if self.controller.load_outlines(outlines, outlines.name) is not None:
            self._update_export()

    def export_file(self) -> dict[str, Any] | None:
        """The export the browser downloads: {name, mime, data} (data is a binary attachment)."""
        p = self.parameters
        self.state.ssp_message = ""
        fmt = self.state.ssp_format
        try:
            files = self.source_files.get(p.input_volume.GetID()) if p.input_volume is not None else None
            path = export.export_segmentation(p.output_segmentation, p.input_volume, fmt, self.work_dir.name, files,
                                              segment_id=self.controller.target_segment_id())
        except SamSelfPromptError as exc:
            self.state.ssp_message = f"Export failed: {exc}"
            return None
        data = path.read_bytes()
        path.unlink()
        return {"name": path.name, "mime": export.MIME[fmt], "data": self.server.protocol.addAttachment(data)}

    def _guard(self, fn: Callable[[], Any]) -> None:
        """Run a panel action; the controller reports user errors in its view, anything else
        (a bug) is shown in the panel rather than lost in the server log."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - shown to the user and logged with its traceback
            log.error("SAMSelfPrompt web app: %s", traceback.format_exc())
            self.state.ssp_message = f"Unexpected error: {exc}"

    # --- controller -> panel ---------------------------------------------------------------------
    def _render(self, view: View) -> None:
        """Copy the controller's view into the state; nothing is decided here."""
        done, total = view.progress_done, view.progress_total
        self.state.ssp_view = {
            "state": view.state.value, "busy": view.state is not State.IDLE,
            "apply_text": view.apply_text, "apply_enabled": view.apply_enabled,
            "clicks_enabled": view.clicks_enabled, "click_mode": view.click_mode,
            "undo_enabled": view.undo_enabled, "clear_enabled": view.clear_enabled,
            "progress_done": done, "progress_total": total,
            "progress": 100.0 * done / total if total else 0.0,
            "progress_text": f"{done} / {total} {view.progress_unit}" if total else "",
            "eta_text": view.eta_text, "status_text": view.status_text,
            "error_text": view.error_text, "target_text": view.target_text,
            "target_description": view.target_description, "adapt_enabled": view.adapt_enabled,
        }
        items = target_items(view.target_choices)
        if items != self.state.ssp_targets:
            self.state.ssp_targets = items
        self._update_export()

    def _start_ticks(self, **_) -> None:
        if self._tick_task is None:
            self._tick_task = create_task(self._tick_loop())

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            with self.state:
                self._guard(self.tick)

    def tick(self) -> None:
        """One tick of the controller; after a batch, each volume shows its own new segmentation."""
        self.controller.tick()
        p = self.parameters
        if self.controller.state is State.IDLE and p.input_volume is not None and p.output_segmentation is None:
            latest = self._latest_segmentation(p.input_volume)
            if latest is not None:
                p.output_segmentation = latest
                self.controller.refresh()

    def close(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
        self.controller.close()
        self.logic.shutdown()
        self.work_dir.cleanup()

    # --- the page ----------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        ctrl = self.server.controller
        dense = dict(density="compact", hide_details=True)
        with VAppLayout(self.server, theme="dark") as self.ui:
            client.Style("html { overflow-y: hidden; } .ssp-panel .v-btn { text-transform: none; letter-spacing: 0; }")
            with v3.VAppBar(density="compact"):
                v3.VToolbarTitle("SAM Self-Prompt", style="user-select: none;")
                v3.VSpacer()
                html.Span("Load a DICOM series, a volume or a picture", classes="text-caption mr-1")
                v3.VFileInput(
                    id="ssp-upload", multiple=True, hide_input=True, prepend_icon="mdi-folder-open",
                    title="Load files: every file of a DICOM series, a volume (.nii.gz, .nrrd, ...) or a picture",
                    style="max-width: 48px;", change=(self.upload, "[$event.target.files]"), **dense,
                )
                v3.VBtn("Sample", id="ssp-sample", prepend_icon="mdi-image", variant="text", classes="ml-2",
                        click=self.load_sample_button)
                v3.VSelect(v_model=("ssp_layout",), items=("ssp_layouts",), style="max-width: 170px;",
                           classes="mx-2", **dense)
                v3.VProgressCircular(indeterminate=("!!trame__busy",), size=16, width=3, classes="mr-3")

            with v3.VNavigationDrawer(permanent=True, width=340), html.Div(classes="ssp-panel pa-3 d-flex flex-column ga-2"):
                v3.VSelect(id="ssp-volume", label="Input volume", v_model=("ssp_volume_id",), items=("ssp_volumes",),
                           **dense)
                v3.VCheckbox(id="ssp-batch", label="Batch: every loaded volume", v_model=("ssp_batch_all",),
                             disabled=("ssp_view.busy",), **dense)
                v3.VSelect(id="ssp-target", label="Target", v_model=("ssp_target",), items=("ssp_targets",),
                           disabled=("ssp_view.busy",), **dense)
                v3.VSelect(id="ssp-model", label="Backbone", v_model=("ssp_model",), items=("ssp_models",),
                           disabled=("ssp_view.busy",), **dense)
                html.Div("{{ ssp_choice }}", id="ssp-choice", classes="text-caption text-medium-emphasis")
                html.Div("{{ ssp_view.target_description }}", id="ssp-target-description",
                         classes="text-caption text-medium-emphasis")
                v3.VCheckbox(id="ssp-force-target", label="Run the target even if this input is not what it was "
                             "trained for", v_model=("ssp_force_target",), disabled=("ssp_view.busy",), **dense)
                with html.Div(classes="d-flex ga-2"):
                    v3.VTextField(id="ssp-first", label="First slice", v_model=("ssp_first_slice",), type="number",
                                  disabled=("ssp_view.busy",), **dense)
                    v3.VTextField(id="ssp-last", label="Last slice", placeholder="last", v_model=("ssp_last_slice",),
                                  type="number", disabled=("ssp_view.busy",), **dense)
                v3.VSelect(id="ssp-rerun", label="A re-run writes", v_model=("ssp_rerun",), items=("ssp_rerun_choices",),
                           disabled=("ssp_view.busy",), **dense)
                v3.VCheckbox(label="Allow downloads (model weights)", v_model=("ssp_allow_download",), **dense)
                v3.VBtn("{{ ssp_view.apply_text }}", id="ssp-apply", block=True, size="large",
                        color=("ssp_view.busy ? 'error' : 'primary'",), disabled=("!ssp_view.apply_enabled",),
                        prepend_icon=("ssp_view.busy ? 'mdi-stop' : 'mdi-auto-fix'",), click=self.apply)
                v3.VProgressLinear(model_value=("ssp_view.progress",), height=6, rounded=True, color="primary")
                html.Div("{{ ssp_view.progress_text }}{{ ssp_view.eta_text ? ' · ' + ssp_view.eta_text : '' }}",
                         id="ssp-progress", classes="text-caption")
                html.Div("{{ ssp_view.status_text }}", id="ssp-status", classes="text-body-2")
                v3.VAlert("{{ ssp_view.error_text }}", id="ssp-error", v_show="ssp_view.error_text", type="error",
                          density="compact", variant="tonal")
                v3.VAlert("{{ ssp_message }}", id="ssp-message", v_show="ssp_message", type="warning",
                          density="compact", variant="tonal")

                v3.VDivider()
                html.Div("Correct a slice: pick a point type, then click in the view.", classes="text-caption")
                with html.Div(classes="d-flex ga-2"):
                    for sign, icon, color in ((POSITIVE, "mdi-plus-circle", "success"),
                                              (NEGATIVE, "mdi-minus-circle", "error")):
                        v3.VBtn(sign.capitalize(), id=f"ssp-{sign}", prepend_icon=icon, classes="flex-grow-1",
                                color=(f"ssp_view.click_mode === '{sign}' ? '{color}' : undefined",),
                                variant=(f"ssp_view.click_mode === '{sign}' ? 'flat' : 'outlined'",),
                                disabled=("!ssp_view.clicks_enabled",),
                                click=(self.toggle_click_mode, f"['{sign}']"))
                with html.Div(classes="d-flex ga-2"):
                    v3.VBtn("Undo", id="ssp-undo", prepend_icon="mdi-undo", classes="flex-grow-1",
                            disabled=("!ssp_view.undo_enabled",), click=self.undo)
                    v3.VBtn("Clear points", id="ssp-clear", classes="flex-grow-1",
                            disabled=("!ssp_view.clear_enabled",), click=self.clear_points)
                html.Div("{{ ssp_view.target_text }}", id="ssp-target-text", classes="text-caption text-medium-emphasis")

                v3.VDivider()
                html.Div("Adapt to a new target: load its outlines on a few slices (a labelmap file on this "
                         "volume's grid, the pen button), optionally set its first/last slice above and list slices "
                         "without it, name it, press Adapt. The rest of the volume is segmented after training.",
                         classes="text-caption")
                with html.Div(classes="d-flex ga-2 align-center"):
                    v3.VTextField(id="ssp-adapt-name", label="Target name", v_model=("ssp_adapt_name", ""),
                                  disabled=("ssp_view.busy",), **dense)
                    v3.VTextField(id="ssp-adapt-empty", label="Slices without it", placeholder="e.g. 3, 7-9",
                                  v_model=("ssp_adapt_empty", ""), disabled=("ssp_view.busy",), **dense)
                    v3.VFileInput(
                        id="ssp-outlines", hide_input=True, prepend_icon="mdi-draw",
                        title="Load outlines: a labelmap file (.nii.gz, .nrrd, ...) on this volume's grid",
                        style="max-width: 48px;", change=(self.upload_outlines, "[$event.target.files]"), **dense,
                    )
                    v3.VBtn("Adapt", id="ssp-adapt", prepend_icon="mdi-school",
                            disabled=("ssp_view.busy || !ssp_view.adapt_enabled || !ssp_adapt_name",),
                            click=self.adapt_target)

                v3.VDivider()
                with html.Div(classes="d-flex ga-2 align-center"):
                    v3.VSelect(id="ssp-format", label="Export as", v_model=("ssp_format",), items=("ssp_formats",),
                               **dense)
                    v3.VBtn(id="ssp-export", icon="mdi-download", title="Download the segmentation",
                            disabled=("!ssp_export_enabled",),
                            click=(f"trigger('{ctrl.trigger_name(self.export_file)}')"
                                   ".then(r => r && utils.download(r.name, r.data, r.mime))"))

            with v3.VMain(), html.Div(style="position: relative; width: 100%; height: calc(100vh - 48px);"):
                self.layout_manager.initialize_layout_grid(self.ui)


def serve(input_paths: Sequence[str | Path] = (), *, host: str = "127.0.0.1", port: int = 8080,
          open_browser: bool = False) -> int:
    """Start the app and block until it is stopped (Ctrl-C)."""
    import sys

    app = SAMSelfPromptWebApp(inputs_=input_paths)
    argv, sys.argv = sys.argv, sys.argv[:1]  # trame reads its own options from sys.argv: ours are parsed already
    try:
        app.server.start(host=host, port=port, open_browser=open_browser, timeout=0, show_connection_info=True)
    finally:
        sys.argv = argv
        app.close()
    return 0
