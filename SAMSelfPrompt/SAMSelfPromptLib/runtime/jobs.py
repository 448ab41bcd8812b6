"""One persistent worker thread, a result queue, cancel, and a drain() for the host.

Why a single long-lived thread: the model stays loaded and warm on its device, and
jobs run one at a time so two runs never fight over the GPU or the embedding cache.
The worker never touches MRML or Qt: it only puts events on a queue. The host
(Slicer's QTimer, the CLI loop, the web app's async task) calls ``drain()`` on its
main thread and applies the events there.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from ..errors import Cancelled


class EventKind(str, Enum):
    STARTED = "started"
    SLICE = "slice"  # payload: volume.SliceResult (or any per-item result)
    PROGRESS = "progress"  # payload: (done, total)
    MESSAGE = "message"  # payload: str, for the status line
    DONE = "done"  # payload: the job function's return value
    CANCELLED = "cancelled"
    ERROR = "error"  # payload: the exception raised in the worker


@dataclass
class JobEvent:
    job_id: int
    kind: EventKind
    payload: Any = None
    time: float = field(default_factory=time.monotonic)


class JobFailed(Exception):
    """A worker exception re-raised on the caller's thread; ``events`` holds what was drained before it."""

    def __init__(self, original: BaseException, events: list[JobEvent], worker_traceback: str):
        super().__init__(f"{original.__class__.__name__}: {original}")
        self.original = original
        self.events = events
        self.worker_traceback = worker_traceback


class JobContext:
    """What a job function gets: its cancel flag and ways to report."""

    def __init__(self, job: "Job", events: "queue.Queue[JobEvent]"):
        self.job = job
        self._events = events

    @property
    def cancel_event(self) -> threading.Event:
        return self.job.cancel_event

    def check_cancel(self) -> None:
        if self.job.cancel_event.is_set():
            raise Cancelled("cancelled by the user")

    def emit(self, kind: EventKind, payload: Any = None) -> None:
        self._events.put(JobEvent(self.job.id, kind, payload))

    def progress(self, done: int, total: int) -> None:
        self.emit(EventKind.PROGRESS, (done, total))


class Job:
    def __init__(self, job_id: int, fn: Callable[[JobContext], Any], name: str):
        self.id = job_id
        self.fn = fn
        self.name = name
        self.cancel_event = threading.Event()
        self.finished = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.error_traceback = ""
        self.cancelled = False

    def cancel(self) -> None:
        self.cancel_event.set()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the job ends; re-raise its exception here, on the caller's thread."""
        if not self.finished.wait(timeout):
            raise TimeoutError(f"job {self.name} still running after {timeout} s")
        if self.error is not None:
            raise JobFailed(self.error, [], self.error_traceback) from self.error
        return self.result


class Worker:
    """A single daemon thread running submitted jobs in order."""

    def __init__(self, name: str = "samselfprompt-worker"):
        self._jobs: "queue.Queue[Job | None]" = queue.Queue()
        self.events: "queue.Queue[JobEvent]" = queue.Queue()
        self._ids = itertools.count(1)
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[JobContext], Any], name: str = "job") -> Job:
        job = Job(next(self._ids), fn, name)
        self._jobs.put(job)
        return job

    def cancel(self) -> None:
        """Cancel the running job (it stops at its next check, between slices)."""
        job = self.current
        if job is not None:
            job.cancel()

    @property
    def busy(self) -> bool:
        return self.current is not None or not self._jobs.empty()

    def drain(self, max_events: int | None = None, raise_errors: bool = True) -> list[JobEvent]:
        """Take the pending events (call on the host's main thread).

        With raise_errors, a worker exception is re-raised here as JobFailed, carrying
        the events drained before it so the host loses none of them.
        """
        out: list[JobEvent] = []
        while max_events is None or len(out) < max_events:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            if event.kind is EventKind.ERROR and raise_errors:
                exc, tb = event.payload
                raise JobFailed(exc, out, tb) from exc
            out.append(event)
        return out

    def shutdown(self, timeout: float = 5.0) -> None:
        self.cancel()
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self.current = job
            ctx = JobContext(job, self.events)
            ctx.emit(EventKind.STARTED, job.name)
            try:
                job.result = job.fn(ctx)
                ctx.emit(EventKind.DONE, job.result)
            except Cancelled:
                job.cancelled = True
                ctx.emit(EventKind.CANCELLED)
            except BaseException as exc:  # reported to the host, never swallowed
                job.error = exc
                job.error_traceback = traceback.format_exc()
                ctx.emit(EventKind.ERROR, (exc, job.error_traceback))
            finally:
                self.current = None
                job.finished.set()


def segmentation_job(segmenter, volume, options=None, keep_mask: bool = True) -> Callable[[JobContext], Any]:
    """The one job every host runs for a volume: stream one SLICE event per finished slice.

    ``segmenter`` is a warm ``Segmenter``, or a function ``(ctx) -> Segmenter`` that loads one
    on the worker (a UI's main thread must not spend seconds loading a model). Cancel is
    honoured between slices: a run stops with whole slices written, never half of one. The
    return value (the DONE payload) is the summary; with ``keep_mask`` it also holds the
    assembled K x J x I mask (the CLI writes it; the Slicer Logic writes slices as they come).
    """
    from ..core.predictor import segment_volume

    def run(ctx: JobContext):
        seg = segmenter(ctx) if callable(segmenter) else segmenter
        opts = seg.resolved(options)
        ctx.emit(EventKind.MESSAGE, f"Segmenting on {seg.device}...")

        counts = {"slices": 0, "nonempty": 0}

        def on_slice(result) -> None:
            counts["slices"] += 1
            counts["nonempty"] += bool(result.mask.any())
            ctx.emit(EventKind.SLICE, result)
            ctx.check_cancel()  # after a whole slice is out, never inside one

        # The results are not kept here: each lives in its SLICE event until the host drains it.
        mask, _ = segment_volume(seg, volume, opts, cancel=ctx.cancel_event, progress=ctx.progress,
                                 on_slice=on_slice, assemble=keep_mask, keep_results=False)
        summary = dict(counts)
        if keep_mask:
            summary["mask"] = mask
        return summary

    return run
