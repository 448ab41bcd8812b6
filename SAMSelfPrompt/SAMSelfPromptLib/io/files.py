"""Files on disk: the one atomic write, the one cache folder, sha256.

Every file the project writes (segmentations, checkpoints, embedding caches, downloads'
final rename) goes through ``atomic_write``: the file appears complete or not at all.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import SamSelfPromptError


class OutputExistsError(SamSelfPromptError, FileExistsError):
    """The output file exists and overwriting was not requested."""


def cache_dir() -> Path:
    """$SAMSELFPROMPT_CACHE, else ~/.cache/samselfprompt (not created until something is cached)."""
    env = os.environ.get("SAMSELFPROMPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "samselfprompt"


def full_suffix(path: Path) -> str:
    """The file type, counting the double suffixes .seg.nrrd and .nii.gz as one."""
    name = path.name.lower()
    for double in (".seg.nrrd", ".nii.gz"):
        if name.endswith(double):
            return double
    return path.suffix.lower()


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place.

    The temporary file keeps the target's suffix, so format-by-suffix writers pick the right
    format; os.replace is atomic within one file system, so a crash, a full disk or an
    exception in ``write`` leaves either the old file or nothing, never half a file.
    """
    out = Path(path)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; choose another name or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=full_suffix(out))
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); a result should be as readable as any new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, out.stat().st_mode & 0o777 if out.exists() else 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
