"""Consented, verified, resumable download of model weights into a cache folder.

Nothing here runs at import time. ``ensure_weights`` asks the host for consent
(the host shows the size and decides), streams into ``<file>.part`` so an
interrupted download resumes with an HTTP Range request, and only moves the file
into the cache after its size and sha256 match the registry. A ``cancel`` event is
checked between chunks: cancelling raises ``Cancelled`` and keeps the ``.part`` file, so
the next call resumes where it stopped. MedSAM has no public direct URL: it is used from
a checkpoint file the user passes (``--weights FILE``).
"""
from __future__ import annotations

import http.client
import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from ..errors import Cancelled, DownloadError
from ..io.files import cache_dir, sha256_of
from ..modeling.backbones import MODEL_SPECS, DownloadSpec

CHUNK = 1 << 16
ATTEMPTS = 3  # a dropped connection is retried from where it stopped, this many times in all
TIMEOUT_S = 60.0

Progress = Callable[[int, int], None]

# (path, size, mtime_ns) -> sha256 already checked, so a 2.5 GB ViT-H is hashed once per process.
_verified: dict[tuple[str, int, int], str] = {}


def download_spec(model_id: str) -> DownloadSpec:
    if model_id not in MODEL_SPECS:
        raise DownloadError(f"unknown model '{model_id}'; choose one of {', '.join(MODEL_SPECS)}")
    spec = MODEL_SPECS[model_id].download
    if spec is None:
        raise DownloadError(
            f"{MODEL_SPECS[model_id].title} has no public download; pass its checkpoint file with --weights FILE"
        )
    return spec


def _file_ok(path: Path, spec: DownloadSpec) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if st.st_size != spec.size:
        return False
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _verified:
        _verified[key] = sha256_of(path)
    return _verified[key] == spec.sha256


def cached_weights(model_id: str, spec: DownloadSpec | None = None) -> Path | None:
    """The cached weights file if it is present and verifies (size and sha256), else None."""
    spec = spec or download_spec(model_id)
    path = cache_dir() / spec.filename
    return path if _file_ok(path, spec) else None


def ensure_weights(
    model_id: str,
    consent: Callable[[DownloadSpec], bool],
    progress: Progress | None = None,
    url: str | None = None,
    spec: DownloadSpec | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """The verified weights file for ``model_id``, downloading it (with consent) if needed.

    ``url`` and ``spec`` override the registry (a mirror, or a test server with a small
    payload). Raises DownloadError when consent is refused, the server fails after
    retries, or the bytes do not verify; a failed verification leaves nothing behind.
    ``cancel`` (set from another thread) is checked before each attempt and after each
    chunk: it raises ``Cancelled`` and leaves ``<file>.part`` in the cache, so that a later
    call resumes the download from there instead of starting over.
    """
    spec = spec or download_spec(model_id)
    final = cache_dir() / spec.filename
    if _file_ok(final, spec):
        return final
    if not consent(spec):
        raise DownloadError(f"download of {spec.filename} ({spec.size / 1e6:.0f} MB) was not allowed")
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # our own cache entry, and it failed verification above: it is useless
        final.unlink()
    part = final.with_name(final.name + ".part")
    last: Exception | None = None
    for _ in range(ATTEMPTS):
        try:
            _fetch_into(url or spec.url, part, spec.size, progress, cancel)
            break
        except (OSError, http.client.HTTPException) as exc:  # URLError, reset, IncompleteRead
            last = exc
    else:
        done = part.stat().st_size if part.exists() else 0
        raise DownloadError(
            f"download of {spec.filename} failed at {done} of {spec.size} bytes ({last}); "
            "run it again to resume"
        ) from last
    actual, got = sha256_of(part), part.stat().st_size
    if got != spec.size or actual != spec.sha256:
        part.unlink(missing_ok=True)  # wrong bytes must not be resumed from either
        raise DownloadError(
            f"{spec.filename} did not verify: expected sha256 {spec.sha256} ({spec.size} bytes), "
            f"got {actual} ({got} bytes); the partial file was deleted"
        )
    os.replace(part, final)
    st = final.stat()
    _verified[(str(final), st.st_size, st.st_mtime_ns)] = actual
    return final


def _check_cancel(cancel: threading.Event | None, part: Path, size: int) -> None:
    if cancel is not None and cancel.is_set():
        done = part.stat().st_size if part.exists() else 0
        raise Cancelled(f"download of {part.name.removesuffix('.part')} cancelled at {done} of {size} bytes; "
                        "the partial file is kept and the next run resumes it")


def _fetch_into(url: str, part: Path, size: int, progress: Progress | None,
                cancel: threading.Event | None = None) -> None:
    """Append the rest of ``url`` to ``part``: Range from its current size, restart if ignored."""
    _check_cancel(cancel, part, size)
    have = part.stat().st_size if part.exists() else 0
    if have > size:  # longer than the real file: it cannot be a prefix of it
        part.unlink()
        have = 0
    if have == size:
        return
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the server rejects our offset: start over next attempt
            part.unlink()
        raise
    with resp:
        mode = "wb"
        if have and resp.status == 206:
            match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:
                part.unlink()  # a range we did not ask for: trust nothing, restart
                raise http.client.HTTPException(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            mode = "ab"
        elif resp.status != 200:
            raise http.client.HTTPException(f"unexpected HTTP status {resp.status}")
        else:
            have = 0  # a plain 200 is the whole file: the server ignored Range
        with open(part, mode) as fh:
            while block := resp.read(CHUNK):
                fh.write(block)
                have += len(block)
                if progress is not None:
                    progress(have, size)
                if cancel is not None and cancel.is_set():
                    fh.close()  # the bytes so far are kept for the resume
                    _check_cancel(cancel, part, size)
    if have < size:  # the server closed early without an error
        raise http.client.IncompleteRead(b"", size - have)
