"""Put the test shims on the path; works even if ``slicer`` was imported before.

The ``slicer`` meta package loads every module found in a ``slicer/`` folder on
sys.path when it is first imported; if another test imported it already, the shim
modules are loaded here the same way (extend the package path, copy public names).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

SHIMS = Path(__file__).resolve().parent


def install() -> None:
    if str(SHIMS) not in sys.path:
        sys.path.insert(0, str(SHIMS))
    import slicer

    if hasattr(slicer, "mrmlScene"):
        return
    folder = str(SHIMS / "slicer")
    if folder not in slicer.__path__:
        slicer.__path__.append(folder)
    for name in ("slicer_testapp", "ScriptedLoadableModule", "parameterNodeWrapper"):
        if not (SHIMS / "slicer" / f"{name}.py").exists():
            continue
        module = importlib.import_module(f"slicer.{name}")
        for attr in dir(module):
            if not attr.startswith("_"):
                setattr(slicer, attr, getattr(module, attr))
