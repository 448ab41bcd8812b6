"""Prepare the next batch of slices on a helper thread while the device works on this one.

On a GPU the encoder takes about 3 ms per slice in a batch, so reading, normalising and resizing
slices on the host between batches would leave the device idle (the H100 pipeline was bound by
host work, docs/RESULTS.md). ``prefetched`` keeps ``ahead`` items in preparation on one thread;
torch's resize and numpy's arithmetic release the GIL, so the preparation overlaps the main
thread's encoding and decoding.

On the CPU there is nothing to overlap (about 2 ms of preparation per 512 x 512 slice against
0.4 s of encoding), and the helper thread costs more than it saves: the resize it runs is a torch
op, so OpenMP gives that thread a team of its own. With more OpenMP threads in the process than
cores, libgomp cuts the time its idle threads spin-wait for work from about 3 ms to almost
nothing, and every one of the encoder's hundreds of small parallel ops then pays for waking
sleeping threads. Measured on the 2-core CPU, 12 phantom slices end to end: 0.56-0.59 s per slice
with the preparation on the calling thread, 0.67-0.72 s with the helper (docs/RESULTS.md, Speed).
So ``ahead=0`` prepares each item on the calling thread, in turn, and starts no thread; the
Segmenter asks for that on the CPU.

An error in ``prepare`` (a slice of NaN, say) is raised where its item is taken, so everything
before that item is yielded first, as without prefetching. Closing the generator (cancel, an
error downstream) drops what has not started and waits for what has.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")
Prepared = TypeVar("Prepared")


def prefetched(items: Iterable[Item], prepare: Callable[[Item], Prepared], ahead: int = 1
               ) -> Iterator[tuple[Item, Prepared]]:
    """Yield ``(item, prepare(item))`` in order, preparing up to ``ahead`` later items meanwhile
    (``ahead=0``: each item on the calling thread, when its turn comes)."""
    if ahead <= 0:
        for item in items:
            yield item, prepare(item)
        return
    todo = iter(items)
    pending: deque[tuple[Item, Future]] = deque()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="samselfprompt-prefetch")
    try:
        def submit_next() -> None:
            for item in todo:
                pending.append((item, pool.submit(prepare, item)))
                return

        for _ in range(1 + ahead):
            submit_next()
        while pending:
            item, future = pending.popleft()
            submit_next()  # the next one starts before this one is handed over
            yield item, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
