"""The persistent worker: errors reach the caller, cancel stops within one slice, one warm thread,
drain() never blocks. Real model and real segmentation jobs; the encoder runs on at most 3 slices."""
from __future__ import annotations

import threading
import time

import pytest

from SAMSelfPromptLib.cli.bench import phantom_volume
from SAMSelfPromptLib.errors import InputError
from SAMSelfPromptLib.runtime.jobs import EventKind, JobFailed, Worker, segmentation_job
from SAMSelfPromptLib.core.predictor import Segmenter, SegmentOptions

WAIT = 600  # generous upper bound on any wait below; never a speed claim


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.shutdown()


@pytest.fixture(scope="module")
def segmenter(lite_model):
    return Segmenter(lite_model, "cpu")


@pytest.fixture(scope="module")
def phantom():
    # 64 x 64 slices keep reading cheap; the encoder input is 256 x 256 whatever the slice size.
    return phantom_volume(4, size=64)


def drain_until(worker: Worker, job, stop=lambda events: False, raise_errors: bool = True) -> list:
    """Poll drain() like a host's timer until the job has finished and its events are all taken."""
    events: list = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        events += worker.drain(raise_errors=raise_errors)
        if stop(events):
            return events
        if job.finished.is_set() and worker.events.empty():
            return events
        time.sleep(0.01)
    raise AssertionError(f"job {job.name} did not finish; events so far: {[e.kind for e in events]}")


def test_worker_exception_reaches_drain_with_earlier_events(worker):
    def failing(ctx):
        ctx.emit(EventKind.MESSAGE, "loading")
        ctx.progress(1, 3)
        raise ValueError("bad pixel spacing")

    job = worker.submit(failing, "failing")
    assert job.finished.wait(WAIT)
    with pytest.raises(JobFailed, match="ValueError: bad pixel spacing") as err:
        drain_until(worker, job)
    failed = err.value
    assert isinstance(failed.original, ValueError)
    kinds = [e.kind for e in failed.events]
    assert kinds == [EventKind.STARTED, EventKind.MESSAGE, EventKind.PROGRESS]
    assert failed.events[1].payload == "loading" and failed.events[2].payload == (1, 3)
    assert "in failing" in failed.worker_traceback and "ValueError" in failed.worker_traceback
    assert worker.drain() == []  # the error event was consumed, nothing is left behind


def test_job_wait_reraises_engine_error(worker, segmenter, phantom):
    """An InputError inside a segmentation job (bad slice range) comes back from Job.wait()."""
    calls = segmenter.encoder_calls
    job = worker.submit(segmentation_job(segmenter, phantom, SegmentOptions(slice_range=(3, 9))), "bad range")
    with pytest.raises(JobFailed, match="slice range") as err:
        job.wait(WAIT)
    assert isinstance(err.value.original, InputError)
    assert job.error is err.value.original and not job.cancelled
    events = worker.drain(raise_errors=False)
    assert [e.kind for e in events if e.kind is not EventKind.MESSAGE] == [EventKind.STARTED, EventKind.ERROR]
    assert segmenter.encoder_calls == calls  # validated before any slice was encoded


def test_cancel_stops_within_one_slice(worker, segmenter, phantom):
    """batch_size=1: cancel is checked before every slice's encoding, so after cancel() at most the
    slice already being encoded can still finish; the job then ends CANCELLED, not DONE."""
    segmenter.cache.clear()
    calls = segmenter.encoder_calls
    job = worker.submit(segmentation_job(segmenter, phantom, SegmentOptions(batch_size=1)), "cancel me")
    events = drain_until(worker, job, stop=lambda ev: any(e.kind is EventKind.SLICE for e in ev))
    cancelled_at = time.monotonic()
    job.cancel()
    events += drain_until(worker, job)
    kinds = [e.kind for e in events]
    assert kinds[0] is EventKind.STARTED and kinds[-1] is EventKind.CANCELLED
    assert EventKind.DONE not in kinds and EventKind.ERROR not in kinds
    assert job.cancelled and job.error is None
    slices = [e for e in events if e.kind is EventKind.SLICE]
    after = [e for e in slices if e.time > cancelled_at]
    assert 1 <= len(slices) < phantom.array.shape[0]
    assert len(after) <= 1, f"{len(after)} slices were produced after cancel"
    assert segmenter.encoder_calls - calls == len(slices)  # nothing was encoded past the last slice
    assert [e.payload.index for e in slices] == list(range(len(slices)))
    assert job.wait(WAIT) is None  # a cancelled job is not an error


def test_worker_thread_is_persistent_and_model_stays_warm(worker, segmenter, phantom):
    """Two jobs run on the same thread, reuse the same model object and its embedding cache."""
    seen = []

    def where(ctx):
        seen.append((threading.get_ident(), id(segmenter.model)))
        return len(seen)

    first = worker.submit(where, "first")
    assert first.wait(WAIT) == 1
    # Slice 0 was encoded by the cancel test or is encoded here once; then a second job reuses it.
    options = SegmentOptions(slice_range=(0, 1), batch_size=1)
    worker.submit(segmentation_job(segmenter, phantom, options), "warm-up").wait(WAIT)
    calls = segmenter.encoder_calls
    job = worker.submit(segmentation_job(segmenter, phantom, options), "again")
    summary = job.wait(WAIT)
    second = worker.submit(where, "second")
    assert second.wait(WAIT) == 2
    assert summary["slices"] == 1 and summary["mask"].shape == phantom.shape_kji
    assert segmenter.encoder_calls == calls  # cached embedding: no re-encode, the model was not reloaded
    assert seen[0] == seen[1]  # same thread, same model object
    assert seen[0][0] != threading.get_ident()  # and it is not the caller's thread
    worker.drain(raise_errors=False)


def test_drain_never_blocks(worker):
    """drain() returns at once while a job is still running; the job is released only afterwards."""
    release, entered = threading.Event(), threading.Event()

    def blocked(ctx):
        entered.set()
        if not release.wait(WAIT):
            raise TimeoutError("never released")
        return "released"

    job = worker.submit(blocked, "blocked")
    assert entered.wait(WAIT)
    events = worker.drain()  # would deadlock if drain waited for the job
    assert not job.finished.is_set()
    assert [e.kind for e in events] == [EventKind.STARTED]
    assert worker.busy and worker.drain() == []
    release.set()
    assert job.wait(WAIT) == "released"
    events = drain_until(worker, job)
    assert [e.kind for e in events] == [EventKind.DONE] and events[0].payload == "released"
