"""What the web app loads: a DICOM folder (every image series in it), a volume file, a 2D picture,
uploaded files, or the built-in sample.

Everything is read by the engine's readers (``io.images.read_any``, ``io.dicom``), the ones
``samselfprompt segment`` uses, so the app and the command line see the same voxels and the same
geometry; ``slicer.volumes.add_volume`` then makes the node Slicer would make (a picture is a
vector volume with one slice).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from ..core.volume import Volume
from ..errors import InputError

SAMPLE_NAME = "Sample dermoscopy"


def read_path(path: str | Path) -> list[Volume]:
    """One Volume per image series of a DICOM folder, else the one volume or picture in the file."""
    from ..io.dicom import list_dicom_series, read_dicom_series
    from ..io.images import read_any

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        series = list_dicom_series(p)
        if not series:
            raise InputError(f"{p}: no DICOM image series in this folder")
        return [read_dicom_series(p, s["id"]) for s in series]
    return [read_any(p)]


def is_dicom_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def save_uploads(files: Iterable[dict], folder: Path) -> list[Path]:
    """Write the browser's files (trame file dicts) into ``folder``, under their base names only."""
    from trame.app.file_upload import ClientFile

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, entry in enumerate(files):
        f = ClientFile(entry)
        if f.is_empty:
            continue
        name = re.sub(r"[^\w.\-]+", "_", Path(str(f.name or f"upload-{n}")).name).lstrip(".") or f"upload-{n}"
        path = folder / name
        if path.exists():
            path = folder / f"{n}-{name}"
        path.write_bytes(f.content)
        paths.append(path)
    return paths


def read_uploads(paths: list[Path]) -> list[Volume]:
    """DICOM files together as a folder (one Volume per series), every other file on its own."""
    if not paths:
        raise InputError("no file was uploaded")
    dicom = [p for p in paths if is_dicom_file(p)]
    volumes = read_path(dicom[0].parent) if dicom else []
    for p in paths:
        if p not in dicom:
            volumes += read_path(p)
    return volumes


def read_outlines(paths: list[Path]) -> Volume:
    """The one labelmap file of outlines the browser sent (any format ``read_any`` reads)."""
    from ..io.images import read_any

    if len(paths) != 1:
        raise InputError(f"load one labelmap file of outlines at a time (got {len(paths)} files)")
    volume = read_any(paths[0])
    name = paths[0].name
    for suffix in (".nii.gz", ".seg.nrrd", ".nrrd", ".nii", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    volume.name = name or "Outlines"
    return volume


def sample_volume() -> tuple[Volume, "object"]:
    """The built-in dermoscopy sample as a picture Slicer loads (RGB, one slice), and its truth mask.

    Its geometry is the one ``io.images`` gives a PNG of it, so the app and ``samselfprompt segment``
    on a saved copy see the same input.
    """
    from ..io.dicom import LPS_TO_RAS
    from ..io.sample import dermoscopy_sample

    image, truth = dermoscopy_sample()
    return Volume(image[None], LPS_TO_RAS.copy(), "RGB", SAMPLE_NAME), truth
