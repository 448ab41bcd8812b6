"""Files on disk: the one atomic write, the one cache folder, sha256.

Every file the project writes (segmentations, checkpoints, embedding caches, downloads'
final rename) goes through ``atomic_write``: the file appears complete or not at all.
"""
from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import SamSelfPromptError


class OutputExistsError(SamSelfPromptError, FileExistsError):
    """The output file exists and overwriting was not requested."""


class OutputWriteError(SamSelfPromptError, OSError):
    """The output could not be written (disk full, no permission, read-only); nothing partial is left."""


# What an OS error while writing means for the user, and what to do about it.
_WRITE_REASONS = {
    errno.ENOSPC: "the disk is full; free some space or choose another folder",
    errno.EDQUOT: "the disk quota is exhausted; free some space or choose another folder",
    errno.EFBIG: "the file is larger than this file system (or a limit) allows; choose another folder",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
    errno.EROFS: "the file system is read-only; choose a folder you can write to",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another output path",
    errno.EEXIST: "a part of the path is a file, not a folder; choose another output path",
    errno.ENAMETOOLONG: "the file name is too long; choose a shorter one",
}


def write_failure(out: Path, exc: OSError, what: str = "could not write", tail: str = "") -> OutputWriteError:
    """One line for the user: which file, what went wrong and what to do."""
    reason = _WRITE_REASONS.get(exc.errno or 0) or f"{exc.strerror or exc}; choose another output path"
    return OutputWriteError(f"{what} {out}: {reason} ({exc.strerror or exc.__class__.__name__}){tail}")


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
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=full_suffix(out))
    except OSError as exc:
        raise write_failure(out, exc, "cannot write") from exc
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); a result should be as readable as any new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, out.stat().st_mode & 0o777 if out.exists() else 0o666 & ~umask)
        os.replace(tmp, out)
    except SamSelfPromptError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except OSError as exc:  # a full disk, a quota, a file-size limit: a message, and no partial file
        Path(tmp).unlink(missing_ok=True)
        tail = "; nothing was written" + ("; the existing file is unchanged" if existed else "")
        raise write_failure(out, exc, tail=tail) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """A report (JSON, a Markdown table) written whole or not at all, replacing an earlier one: an
    interrupted run never leaves half a report where the last complete one was."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), overwrite=True)
