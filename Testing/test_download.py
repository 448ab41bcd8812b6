"""Model download against a real HTTP server on 127.0.0.1 (no internet): consent,
verification, resume with Range, restart when Range is ignored, cache reuse, cancel."""
from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from SAMSelfPromptLib.weights.download import CHUNK, cache_dir, cached_weights, ensure_weights
from SAMSelfPromptLib.errors import Cancelled, DownloadError
from SAMSelfPromptLib.modeling.backbones import DownloadSpec

PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[str | None] = []  # the Range header of each GET (None: no Range)
        self.sent = 0  # payload bytes written, over all requests
        self.drop_first_after: int | None = None  # close the first response after this many bytes
        self.honor_range = True


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append(rng)
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if srv.honor_range and match:
            start = int(match.group(1))
            if start >= len(PAYLOAD):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drop_first_after is not None and len(srv.requests) == 1:
            body = body[: srv.drop_first_after]  # promised more than this: the client sees a short read
            self.close_connection = True
        # Counted before the write: the client can finish reading (and the test assert) before
        # this thread runs another line after the write returns.
        srv.sent += len(body)
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server():
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SAMSELFPROMPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _spec(srv: Server, sha: str = SHA) -> DownloadSpec:
    return DownloadSpec(f"http://127.0.0.1:{srv.server_port}/w.pth", sha, len(PAYLOAD), "w.pth")


def _yes(spec: DownloadSpec) -> bool:
    return True


def test_cache_dir_follows_env(cache):
    assert cache_dir() == cache


def test_refused_consent_downloads_nothing(server, cache):
    asked: list[DownloadSpec] = []
    with pytest.raises(DownloadError, match="not allowed"):
        ensure_weights("sam_vit_b", lambda s: asked.append(s) or False, spec=_spec(server))
    assert asked and asked[0].size == len(PAYLOAD)  # the host had the size to show
    assert server.requests == []
    assert not cache.exists() or not any(cache.iterdir())


def test_full_download_verifies_and_reports_progress(server, cache):
    seen: list[tuple[int, int]] = []
    path = ensure_weights("sam_vit_b", _yes, progress=lambda d, t: seen.append((d, t)), spec=_spec(server))
    assert path == cache / "w.pth" and path.read_bytes() == PAYLOAD
    assert not (cache / "w.pth.part").exists()
    assert server.requests == [None]
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD)) and len(seen) > 1
    assert cached_weights("sam_vit_b", spec=_spec(server)) == path


def test_interrupted_download_resumes_with_range(server, cache):
    server.drop_first_after = 120_000
    path = ensure_weights("sam_vit_b", _yes, spec=_spec(server))
    assert path.read_bytes() == PAYLOAD
    assert server.requests[0] is None
    # every byte written before the close reaches the client, so the retry asks for exactly the rest
    assert server.requests[1:] == ["bytes=120000-"]
    assert server.sent == len(PAYLOAD)


def test_preseeded_part_resumes_and_fetches_only_the_rest(server, cache):
    cache.mkdir()
    (cache / "w.pth.part").write_bytes(PAYLOAD[:50_000])
    path = ensure_weights("sam_vit_b", _yes, spec=_spec(server))
    assert path.read_bytes() == PAYLOAD
    assert server.requests == ["bytes=50000-"]
    assert server.sent == len(PAYLOAD) - 50_000


def test_server_ignoring_range_restarts_from_zero(server, cache):
    server.honor_range = False
    cache.mkdir()
    (cache / "w.pth.part").write_bytes(b"x" * 40_000)  # would corrupt the file if appended to
    path = ensure_weights("sam_vit_b", _yes, spec=_spec(server))
    assert server.requests == ["bytes=40000-"]
    assert path.read_bytes() == PAYLOAD


def test_sha_mismatch_leaves_nothing(server, cache):
    wrong = "0" * 64
    with pytest.raises(DownloadError) as err:
        ensure_weights("sam_vit_b", _yes, spec=_spec(server, sha=wrong))
    assert wrong in str(err.value) and SHA in str(err.value)
    assert list(cache.iterdir()) == []


def test_cached_file_is_reused_without_consent(server, cache):
    ensure_weights("sam_vit_b", _yes, spec=_spec(server))

    def no_asking(spec: DownloadSpec) -> bool:
        raise AssertionError("consent must not be asked for a cached file")

    assert ensure_weights("sam_vit_b", no_asking, spec=_spec(server)).read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_corrupt_cached_file_is_not_trusted(server, cache):
    cache.mkdir()
    (cache / "w.pth").write_bytes(PAYLOAD[:-1] + b"\0")  # right size, wrong bytes
    assert cached_weights("sam_vit_b", spec=_spec(server)) is None
    assert ensure_weights("sam_vit_b", _yes, spec=_spec(server)).read_bytes() == PAYLOAD


def test_medsam_has_no_download(cache):
    with pytest.raises(DownloadError, match="--weights"):
        ensure_weights("medsam_vit_b", _yes)
    with pytest.raises(DownloadError, match="unknown model"):
        ensure_weights("nope", _yes)


def test_cancel_keeps_the_part_file_and_a_later_call_resumes(server, cache):
    cancel = threading.Event()
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        cancel.set()  # the user presses Cancel while the first chunk is being reported

    with pytest.raises(Cancelled, match="resumes"):
        ensure_weights("sam_vit_b", _yes, progress=progress, spec=_spec(server), cancel=cancel)
    assert seen == [CHUNK]  # stopped right after the first chunk, not retried
    assert not (cache / "w.pth").exists()
    assert (cache / "w.pth.part").read_bytes() == PAYLOAD[:CHUNK]
    assert server.requests == [None]

    path = ensure_weights("sam_vit_b", _yes, spec=_spec(server))  # no cancel: resumes and verifies
    assert path.read_bytes() == PAYLOAD and not (cache / "w.pth.part").exists()
    assert server.requests == [None, f"bytes={CHUNK}-"]


def test_cancel_set_before_the_start_requests_nothing(server, cache):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        ensure_weights("sam_vit_b", _yes, spec=_spec(server), cancel=cancel)
    assert server.requests == []
