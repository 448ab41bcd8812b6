"""Run handles the Logic returns: what the widget shows (progress, ETA, status) and the batch summary.

A ``Run`` is created and updated only on the main thread (by ``Logic.poll``); the
worker thread never sees it. Node references are kept as IDs plus their scene, so a
node the user deletes mid-run is detected instead of written into.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FINAL = ("done", "cancelled", "failed")


@dataclass
class Run:
    kind: str  # "segment", "correct" or "adapt"
    scene: Any = field(repr=False)
    volume_id: str | None
    segmentation_id: str | None
    segment_id: str | None
    axis: int
    total: int = 0
    name: str = ""
    job: Any = field(default=None, repr=False)
    status: str = "queued"  # queued, running, done, cancelled, failed
    message: str = ""
    done: int = 0
    written: list[int] = field(default_factory=list)  # slice indices written, in order
    voxels: int = 0
    result: Any = None
    error: str = ""
    write_error: str = ""  # the first slice that could not be written; the run then ends "failed"
    batch_size: int = 1  # slices encoded together: a cancel lands after the batch in flight
    model: str = ""  # what runs, for the status line
    traceback: str = field(default="", repr=False)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    ended: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    def finish(self, status: str, result: Any = None, error: str = "", traceback: str = "") -> None:
        self.status, self.result, self.error, self.traceback = status, result, error, traceback
        self.ended = time.monotonic()
        self.message = {"done": "Done", "cancelled": "Cancelled", "failed": f"Failed: {error}"}[status]

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.monotonic()) - self.started

    def eta(self) -> float | None:
        """Seconds left, from the mean time per finished slice (None until one is done)."""
        if self.started is None or self.done == 0 or self.finished:
            return None
        return self.elapsed / self.done * max(0, self.total - self.done)

    def progress_text(self) -> str:
        eta = self.eta()
        tail = f", about {eta:.0f} s left" if eta is not None else ""
        return f"{self.name}: {self.done}/{self.total} slices{tail}"

    def summary(self) -> dict[str, Any]:
        return {
            "volume": self.name, "segmentation_id": self.segmentation_id, "segment_id": self.segment_id,
            "status": self.status, "slices": len(self.written), "total": self.total,
            "nonempty": (self.result or {}).get("nonempty") if isinstance(self.result, dict) else None,
            "voxels": self.voxels, "seconds": round(self.elapsed, 2), "error": self.error,
        }


@dataclass
class BatchRun:
    """Several runs queued together (one per volume); finished when all are."""

    runs: list[Run]

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self.runs)

    @property
    def done(self) -> int:
        return sum(r.done for r in self.runs)

    @property
    def total(self) -> int:
        return sum(r.total for r in self.runs)

    def summary(self) -> list[dict[str, Any]]:
        return [r.summary() for r in self.runs]


@dataclass
class UndoState:
    """A segment's slice (or, for an overwrite, the whole segment) as it was before a change."""

    scene: Any = field(repr=False)
    volume_id: str
    segmentation_id: str
    segment_id: str
    axis: int
    index: int | None  # None: ``mask`` is the whole [K, J, I] segment
    mask: np.ndarray = field(repr=False)
    # The Logic's last model answers for that slice before the change, restored with it, so the
    # next correction starts from the logits that match what the segment holds again.
    last_results: dict = field(default_factory=dict, repr=False)

    @property
    def target(self) -> tuple[str, str, str]:
        return (self.volume_id, self.segmentation_id, self.segment_id)
