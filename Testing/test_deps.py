"""Slicer dependency installs (slicer/deps.py) without Slicer and without network.

What can run here runs for real: pip in a subprocess (installing a wheel built in tmp_path,
``--no-index``), torch reading real SAM-SP checkpoints, a 127.0.0.1 socket that pip waits on.
Only the PyTorch extension, which needs Slicer, is replaced by a small stand-in with the
same method signature.
"""
from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from SAMSelfPromptLib.slicer import deps

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "SAMSelfPrompt" / "SAMSelfPromptLib" / "weights" / "samsp_ph2_litemedsam.pt"
PIP = (sys.executable, "-m", "pip", "install", "--isolated", "--no-index", "--no-deps")


def make_wheel(folder: Path, name: str = "samsp_tiny_pkg", version: str = "0.1") -> Path:
    """A minimal pure-Python wheel, written with zipfile (no build step)."""
    files = {
        f"{name}/__init__.py": f"VALUE = {version!r}\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test_deps\nRoot-Is-Purelib: true\n"
                                             "Tag: py3-none-any\n",
    }
    record = f"{name}-{version}.dist-info/RECORD"
    lines = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        lines.append(f"{path},sha256={digest},{len(text.encode())}")
    files[record] = "\n".join(lines + [f"{record},,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def drain(job: deps.BackgroundInstall, timeout: float = 120.0) -> tuple[list[str], list[float], int]:
    """Poll like a QTimer would: lines, the time each poll() took, polls seen while it ran."""
    lines, durations, while_running = [], [], 0
    deadline = time.monotonic() + timeout
    while True:
        running = not job.finished
        t0 = time.perf_counter()
        lines += job.poll()
        durations.append(time.perf_counter() - t0)
        while_running += running
        if not running:
            lines += job.poll()
            return lines, durations, while_running
        assert time.monotonic() < deadline, "install did not finish"
        time.sleep(0.02)


# --- what is planned ---------------------------------------------------------------------------


def test_plan_never_lists_peft_by_itself():
    assert not any(r.startswith("peft") for r in deps.REQUIREMENTS)
    todo = deps.plan(deps.REQUIREMENTS + ("no-such-package-samsp-test>=1",))
    assert todo.packages == ["no-such-package-samsp-test>=1"]  # everything else is in this venv
    assert "peft" not in todo.message()


def test_only_lora_metadata_needs_peft():
    assert deps.checkpoint_requirements({"lora": {"rank": 4, "alpha": 4.0}}) == ["peft>=0.10"]
    assert deps.checkpoint_requirements({"modality": "CT"}) == []
    assert deps.checkpoint_requirements({"lora": None}) == []


def test_missing_for_checkpoint_reads_real_checkpoints(tmp_path, monkeypatch):
    assert deps.missing_for_checkpoint(SHIPPED) == []  # no LoRA
    assert deps.missing_for_checkpoint(None) == []
    assert deps.missing_for_checkpoint(tmp_path / "absent.pt") == []  # the loader reports that one

    lora = tmp_path / "lora.pt"
    torch.save({"format": "samselfprompt-checkpoint/1", "base_model": "litemedsam",
                "tensors": {"w": torch.zeros(2)}, "metadata": {"lora": {"rank": 4, "alpha": 4.0}}}, lora)
    assert deps.missing_for_checkpoint(lora) == []  # peft is installed here
    # A peft this venv cannot satisfy stands for "peft not installed".
    monkeypatch.setattr(deps, "LORA_REQUIREMENT", "peft>=999")
    assert deps.missing_for_checkpoint(lora) == ["peft>=999"]
    assert deps.missing_for_checkpoint(SHIPPED) == []
    todo = deps.plan(checkpoint=lora)
    assert todo.packages == ["peft>=999"] and not todo.torch
    assert "peft>=999 (needed by the LoRA checkpoint lora.pt)" in todo.message()
    assert deps.plan(checkpoint=SHIPPED).empty


def test_importing_deps_pulls_in_neither_torch_nor_qt():
    code = ("import sys; import SAMSelfPromptLib.slicer.deps; "
            "bad = [m for m in ('torch', 'qt', 'ctk', 'slicer', 'PyQt5', 'PySide2') if m in sys.modules]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=str(REPO / "SAMSelfPrompt"))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_outside_slicer_pip_runs_with_this_interpreter():
    assert deps.default_python() == sys.executable
    assert deps.pip_command(["a>=1"]) == [sys.executable, "-m", "pip", "install", "a>=1"]


class ExtensionStandIn:
    """The PyTorch extension's logic as far as deps uses it (the real one needs Slicer)."""

    @staticmethod
    def _getPipInstallArguments(forceComputationBackend=None, torchVersionRequirement=None,  # noqa: N802, N803
                                torchvisionVersionRequirement=None):  # noqa: N803
        return ["install", "torch" + (torchVersionRequirement or ""),
                "torchvision" + (torchvisionVersionRequirement or "")]


def test_torch_is_installed_in_the_background_with_the_extensions_arguments():
    cmds = deps.torch_commands(ExtensionStandIn(), "/slicer/bin/PythonSlicer")
    assert cmds[-1] == ["/slicer/bin/PythonSlicer", "-m", "light_the_torch", "install",
                        "torch>=2.2,<3", "torchvision>=0.17"]
    if not deps.installed_ok(deps.LTT_REQUIREMENT):  # not in this venv: installed first, also in the background
        assert cmds[0] == ["/slicer/bin/PythonSlicer", "-m", "pip", "install", "light-the-torch>=0.5"]
    assert deps.torch_commands(object(), "/x/PythonSlicer") is None  # an extension without it: blocking fallback


# --- the background installer (real pip) ---------------------------------------------------------


def test_background_install_installs_a_wheel_while_the_caller_keeps_polling(tmp_path):
    wheel = make_wheel(tmp_path)
    site = tmp_path / "site"
    job = deps.BackgroundInstall([[*PIP, "--target", str(site), str(wheel)]])
    t0 = time.perf_counter()
    assert job.start() is job
    assert time.perf_counter() - t0 < 0.5 and not job.finished  # start() returns before pip does
    lines, durations, while_running = drain(job)
    assert job.ok and job.error == "" and job.returncode == 0
    assert while_running >= 3 and max(durations) < 0.1  # the "UI" thread polled freely meanwhile
    assert lines[0].startswith("$ ") and "pip install" in lines[0]
    assert any("Successfully installed samsp_tiny_pkg" in ln or "Successfully installed samsp-tiny-pkg" in ln
               for ln in lines), lines
    assert (site / "samsp_tiny_pkg" / "__init__.py").read_text() == "VALUE = '0.1'\n"
    assert job.poll() == []


def test_commands_run_in_order_and_a_failure_stops_the_rest(tmp_path):
    wheel = make_wheel(tmp_path)
    missing = tmp_path / "nope-1.0-py3-none-any.whl"
    job = deps.BackgroundInstall([
        [*PIP, "--target", str(tmp_path / "a"), str(missing)],
        [*PIP, "--target", str(tmp_path / "b"), str(wheel)],
    ]).start()
    lines, _, _ = drain(job)
    assert job.finished and not job.ok and job.returncode != 0
    assert "'pip install' failed with exit code" in job.error
    # pip's own error line, naming the file, reaches the message
    assert "ERROR" in job.error and "nope-1.0-py3-none-any.whl" in job.error, job.error
    assert not (tmp_path / "b").exists()  # the second command never ran
    assert sum(ln.startswith("$ ") for ln in lines) == 1


def test_a_missing_interpreter_is_reported(tmp_path):
    job = deps.BackgroundInstall([[str(tmp_path / "PythonSlicer"), "-m", "pip", "install", "x"]]).start()
    assert job.wait(30) and not job.ok
    assert "could not run" in job.error and "PythonSlicer" in job.error


def test_cancel_terminates_a_waiting_pip(tmp_path):
    # A local "index" that accepts connections and never answers: pip waits on it.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        index = f"http://127.0.0.1:{srv.getsockname()[1]}/simple/"
        job = deps.BackgroundInstall([
            [sys.executable, "-m", "pip", "install", "--isolated", "--index-url", index, "--timeout", "300",
             "--retries", "0", "--target", str(tmp_path / "site"), "samsp-never-there"],
            [*PIP, "--target", str(tmp_path / "second"), str(make_wheel(tmp_path))],
        ]).start()
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while not any("Looking in indexes" in ln for ln in lines):  # pip is up and about to connect
            assert not job.finished, lines
            assert time.monotonic() < deadline
            lines += job.poll()
            time.sleep(0.05)
        time.sleep(1.0)
        assert not job.finished  # still waiting for the index
        t0 = time.monotonic()
        job.cancel()
        assert job.wait(deps.KILL_AFTER_S + 10)
        assert time.monotonic() - t0 < deps.KILL_AFTER_S  # SIGTERM was enough
    assert job.cancelled and not job.ok
    assert "cancelled" in job.error and "run it again" in job.error
    assert job.returncode != 0
    assert not (tmp_path / "second").exists()  # nothing after the cancelled command ran
    job.cancel()  # no-op once finished


def test_cancel_before_start_runs_nothing(tmp_path):
    job = deps.BackgroundInstall([[*PIP, "--target", str(tmp_path / "s"), str(make_wheel(tmp_path))]])
    job.cancel()
    job.start()
    assert job.wait(30) and not job.ok and "cancelled" in job.error
    assert not (tmp_path / "s").exists()


# --- the widget's entry point ------------------------------------------------------------------


def test_install_in_background_asks_once_then_the_second_call_is_ready(tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path)
    site = tmp_path / "site"
    requirement = f"samsp_tiny_pkg @ {wheel.as_uri()}"
    # pip options from the environment: the job inherits it, so pip installs into site, offline
    monkeypatch.setenv("PIP_TARGET", str(site))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_NO_DEPS", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)

    asked: list[str] = []
    with pytest.raises(deps.DependencyError, match="nothing was installed"):
        deps.install_in_background(lambda m: asked.append(m) or False, requirements=(requirement,),
                                   python=sys.executable)
    assert len(asked) == 1 and "samsp_tiny_pkg" in asked[0] and not site.exists()

    job = deps.install_in_background(lambda m: True, requirements=(requirement,), python=sys.executable)
    assert isinstance(job, deps.BackgroundInstall)
    drain(job)
    assert job.ok, job.error
    monkeypatch.syspath_prepend(str(site))  # where Slicer's site-packages would be
    assert deps.install_in_background(lambda m: pytest.fail("asked although nothing is missing"),
                                      requirements=(requirement,)) is None
    assert deps.install_in_background(lambda m: pytest.fail("asked"), checkpoint=SHIPPED) is None
