"""Volumes slice by slice: choose the axis, encode in batches, run SAM-SP, stream results.

The ``Segmenter`` is the stateful predictor the hosts keep warm: it owns the model
on its device and an embedding cache, so a refinement or a re-run with other
prompts never re-encodes a slice it has seen.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import Cancelled, InputError, OutOfMemoryError
from ..modeling.fast_encoder import fast_encoder, runs_folded_copy
from .volume import Volume, check_segmentable, finite_slice
from ..modeling.backbones import (SamBackbone, autocast_for, image_projections_in, pick_device, precision_dtype,
                                  resolve_precision)
from .preprocess import (Frame, Intensity, guess_intensity, logits_to_slice, normalize_slice, scale_window,
                         to_model_input)
from .selfprompt import SelfPromptOutput, absent, box_from_logits, box_prompt, refine, self_prompt
from .promise import promise_prompt, promise_refine
from .masks import mask_box
from .orientation import SliceStack
from .skipping import DEFAULT_STEP, coarse, next_wave, outside_body
from .memory import reuse_freed_heap, trim_heap
from .prefetch import prefetched

AXIS_NAMES = {"K": 0, "J": 1, "I": 2}
# Which RAS axis a named anatomical plane's slices are stacked along.
PLANE_NORMAL = {"axial": 2, "coronal": 1, "sagittal": 0}


def resolve_axis(volume: Volume, axis: str | int = "auto") -> int:
    """The array axis (0 = K, 1 = J, 2 = I) that slices are taken along."""
    if volume.is_rgb:
        return 0
    if isinstance(axis, int) or (isinstance(axis, str) and axis.isdigit()):
        a = int(axis)
        if a not in (0, 1, 2):
            raise InputError(f"slice axis must be 0, 1 or 2, got {a}")
        return a
    name = axis if axis != "auto" else "axial"
    if name.upper() in AXIS_NAMES:
        return AXIS_NAMES[name.upper()]
    if name.lower() not in PLANE_NORMAL:
        raise InputError(f"unknown slice axis '{axis}': use auto, axial, coronal, sagittal, K, J or I")
    ras_row = PLANE_NORMAL[name.lower()]
    # Column c of the direction matrix is the RAS direction of IJK index c; array axis = 2 - c.
    direction = volume.ijk_to_ras[:3, :3] / volume.spacing
    ijk_col = int(np.argmax(np.abs(direction[ras_row])))
    return 2 - ijk_col


def take_slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(array, index, axis=axis)


def put_slice(target: np.ndarray, axis: int, index: int, values: np.ndarray) -> None:
    sl: list[slice | int] = [slice(None)] * 3
    sl[axis] = index
    target[tuple(sl)] = values


@dataclass
class SegmentOptions:
    axis: str | int = "auto"
    slice_range: tuple[int, int] | None = None  # [start, stop) along the axis
    intensity: Intensity | None = None  # None: from the checkpoint, else guessed per volume
    ct_window: str = "abdomen"
    batch_size: int | None = None  # slices per batch; None: 1 on the CPU, 4 on a GPU (default_batch_size)
    boxes: dict[int, Sequence[float]] | None = None  # expert boxes per slice, slice pixels x0 y0 x1 y1
    # What an empty no-prompt mask means. "skip": no object on this slice; "full_box": prompt the whole
    # slice instead. None: the Segmenter decides ("skip" for a trained SAM-SP model, "full_box" for a
    # vanilla backbone, whose no-prompt pass is untrained and empty on every slice).
    empty_y0: str | None = None
    propagate: bool = False  # carry the previous slice's box to the next (LiteMedSAM-style)
    min_area: int = 10  # propagation stops when a slice's mask is smaller than this (pixels)
    cleanup_3d: bool = False  # keep the largest 3D connected component at the end
    # Encode only slices that can hold the target (trained SAM-SP, self-prompting): air and constant
    # slices are skipped, the rest run coarse to fine, every coarse_step-th first (core/skipping.py).
    skip_slices: bool = True
    coarse_step: int = DEFAULT_STEP
    # Which structure of a multi-structure checkpoint (e.g. ACDC: 0 RV, 1 myocardium, 2 LV).
    structure: int = 0


@dataclass
class SliceResult:
    index: int
    mask: np.ndarray  # bool, the slice's shape
    box: np.ndarray | None  # the prompt box in slice pixels (x0, y0, x1, y1), None if no object
    box_source: str  # "self", "fallback", "expert", "propagated", "none"
    iou: float
    # 1x1x256x256 low-res logits of the canonical view (see slice_orientation), for refinement
    logits: torch.Tensor | None = field(default=None, repr=False)


# Pass-1 maxima this close to 0, and presence scores this close to the checkpoint's threshold, are decided
# again from an fp32 embedding (Segmenter._recheck_borderline).
BORDERLINE_LOGIT = 0.3
BORDERLINE_PRESENCE = 0.02


def default_batch_size(device: torch.device) -> int:
    """Slices per batch when none is asked for. One on the CPU: batches are no faster there
    (one_at_a_time), and a 300-slice run with batches of 4 peaked 60-115 MB higher (1757-1782 against
    1666-1698 MB, four runs). Four on a GPU, where batching is what keeps the device busy."""
    return 1 if device.type == "cpu" else 4


def one_at_a_time(encode: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode`` applied slice by slice. On the CPU a batch buys nothing and holds more: fp32 took 25%
    longer per slice in a batch of 4 (991 vs 769 ms), the bf16 copy is level (281-293 vs 288 ms), and a
    batch of 4 holds its activations four times over."""
    def encode_each(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([encode(images[i:i + 1]) for i in range(len(images))])

    return encode_each


# The embedding cache's default bound: 256 MB holds 128 LiteMedSAM slices (2 MB each in fp16), a
# 100-slice CT whole (a 512 x 512 x 300 run's peak memory with it: docs/RESULTS.md, Speed). A click on
# a slice that was evicted re-encodes it (about 0.4 s on the 2-core CPU). $SAMSELFPROMPT_CACHE_MB sets it.
CACHE_MB_ENV = "SAMSELFPROMPT_CACHE_MB"
DEFAULT_CACHE_MB = 256


def default_cache_bytes() -> int:
    import os

    text = os.environ.get(CACHE_MB_ENV, "").strip()
    try:
        mb = float(text) if text else DEFAULT_CACHE_MB
    except ValueError:
        raise InputError(f"{CACHE_MB_ENV}={text!r} is not a number of megabytes") from None
    return max(0, int(mb * 2**20))


class SliceEmbeddingCache:
    """LRU of slice embeddings (fp16 on the CPU), bounded in bytes (the newest entry is always kept).

    The entries live in one block of slots allocated at the first ``put`` (pages are touched only
    as slots fill). Kept as separate 2 MB tensors, they were interleaved on the heap with the
    encoder's short-lived buffers, so the heap could not shrink after each slice: a 300-slice
    run grew about 400 MB past the cache's own bound. ``get`` returns a copy, because an evicted
    slot is reused by the next ``put``.
    """

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = default_cache_bytes() if max_bytes is None else max_bytes
        self._items: OrderedDict[tuple, tuple[int, Frame]] = OrderedDict()  # key -> (slot, frame)
        self._slots: torch.Tensor | None = None
        self._free: list[int] = []
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the entries (the block's untouched slots cost no memory)."""
        if self._slots is None:
            return 0
        return len(self._items) * self._slots[0].numel() * self._slots.element_size()

    def __contains__(self, key: tuple) -> bool:
        """Whether ``key`` is held, without counting a hit or a miss or refreshing its place."""
        with self._lock:
            return key in self._items

    def get(self, key: tuple) -> tuple[torch.Tensor, Frame] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            slot, frame = item
            return self._slots[slot].clone(), frame

    def put(self, key: tuple, embedding: torch.Tensor, frame: Frame, replace: bool = False) -> None:
        """Hold ``embedding`` under ``key``; an entry already there is kept unless ``replace``."""
        emb = embedding.detach()
        with self._lock:
            if key in self._items:
                if replace:
                    slot = self._items[key][0]
                    self._slots[slot].copy_(emb)
                    self._items[key] = (slot, frame)
                    self._items.move_to_end(key)
                return
            if self._slots is None or self._slots.shape[1:] != emb.shape:
                self._allocate(emb.shape)  # the first entry, or another model's shape: start over
            if not self._free:
                _, (slot, _) = self._items.popitem(last=False)  # the least recently used
                self._free.append(slot)
            slot = self._free.pop()
            self._slots[slot].copy_(emb)
            self._items[key] = (slot, frame)

    def _allocate(self, shape: torch.Size) -> None:
        entry_bytes = 2 * int(np.prod(shape))
        count = max(1, self.max_bytes // entry_bytes)
        self._items.clear()
        self._slots = torch.empty((count, *shape), dtype=torch.float16)
        self._free = list(range(count - 1, -1, -1))

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._slots = None
            self._free = []


def volume_key(volume: Volume) -> str:
    """Content hash: the cache must not confuse two volumes that share a name."""
    return volume.content_key()


class Segmenter:
    """A warm model on its device plus an embedding cache; segments volumes slice by slice."""

    def __init__(self, model: SamBackbone, device: str | torch.device | None = None, metadata: dict | None = None,
                 refiner: SamBackbone | None = None, precision: str | None = None):
        self.device = pick_device(str(device) if device is not None else None)
        # The encoder's precision: "auto" (bf16 on GPUs and on CPUs with native bf16, else fp32),
        # or fp32/bf16/fp16; $SAMSELFPROMPT_PRECISION overrides auto for every host.
        self.precision = resolve_precision(self.device, precision)
        self.model = model.to(self.device).eval()
        # An optional click-trained SAM-SP model for refine_slice. It must share the image encoder
        # (same frozen base, no LoRA), so the cached embeddings serve both models.
        if refiner is not None and refiner.spec.model_id != model.spec.model_id:
            raise InputError(f"click model base {refiner.spec.model_id} differs from {model.spec.model_id}")
        self.refiner = refiner.to(self.device).eval() if refiner is not None else None
        self.metadata = metadata or {}
        self.cache = SliceEmbeddingCache()
        self.encoder_calls = 0  # slices actually encoded; tests use it to prove cache reuse
        self.exact_encodes = 0  # slices encoded again in fp32 because pass 1 was borderline (_recheck_borderline)
        self._exact_keys: set[tuple] = set()  # cache keys whose embedding was computed in fp32
        # The folded copy of the encoder where ``runs_folded_copy`` says it runs; ``samselfprompt bench``
        # turns it off for its naive baseline, the plain module in fp32.
        self.use_folded_copy = True
        self._fast_encode: Callable[..., torch.Tensor] | None = None
        self._windows: dict[tuple, tuple[int, int, int, int] | None] = {}  # scale_window per volume
        # Set when the device ran out of memory: the most slices encoded at once from then on.
        self.max_encode_batch: int | None = None
        self.oom_retries = 0
        # Slices prepared ahead on a helper thread (core/prefetch.py): one on a GPU, where host work
        # would starve the device; none on the CPU, where a second thread running torch ops costs
        # every parallel op of the encoder its spin-wait (prefetch.py says why, with the numbers).
        self.prefetch_ahead = 0 if self.device.type == "cpu" else 1
        if self.device.type == "cpu":
            # Each slice's encoder tensors reuse the last slice's freed heap instead of fresh pages
            # (core/memory.py: 17-31 thousand page faults a slice otherwise).
            reuse_freed_heap()

    @property
    def method(self) -> str:
        """The prompt-free method of the loaded checkpoint: "samsp" (also for a vanilla backbone) or "promise"."""
        return str(self.metadata.get("method", "samsp"))

    @property
    def trained(self) -> bool:
        """A SAM-SP checkpoint is loaded: its prompt-free first pass is meaningful."""
        return bool(self.metadata)

    def resolved(self, options: SegmentOptions | None) -> SegmentOptions:
        """``options`` with the defaults that depend on the model filled in."""
        options = options or SegmentOptions()
        if options.empty_y0 is None:
            options = replace(options, empty_y0="skip" if self.trained else "full_box")
        if options.batch_size is None:
            options = replace(options, batch_size=default_batch_size(self.device))
        return options

    def _encoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The encoder: the folded copy on a CPU, and on a CUDA GPU at reduced precision
        (``runs_folded_copy`` says why), else the module. On the CPU one slice at a time (one_at_a_time)."""
        if self.use_folded_copy and runs_folded_copy(self.device, self.precision):
            encode = self._folded_encoder()
        else:
            encode = self.model.encode  # run under autocast_for(device, self.precision)
        return one_at_a_time(encode) if self.device.type == "cpu" else encode

    def _folded_encoder(self) -> Callable[..., torch.Tensor]:
        """The folded copy of the encoder (modeling/fast_encoder.py), built once: it pays from the first
        slice. Called with a precision ("fp32" for the exact re-encodes) or without
        (this Segmenter's). A checkpoint's ``encoder_fp32_stages`` stay fp32 in it: the stages whose
        bf16 rounding moved its masks' edges more than the 0.995 agreement with fp32 allows."""
        if self._fast_encode is None:
            self._fast_encode = fast_encoder(self.model, self.precision, self.encoder_fp32_stages)
        return self._fast_encode

    def _decoding(self, precision: str | None = None):
        """The context of this Segmenter's decoder passes: no autograd, and the decoder's image tokens
        projected at ``precision`` (default: this Segmenter's; "fp32" for the exact rechecks). Everything
        else in a pass stays fp32 (modeling/backbones.image_projections_in says why)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(image_projections_in(precision_dtype(precision or self.precision)))
        return stack

    @property
    def encoder_fp32_stages(self) -> list[int]:
        """The encoder stages the checkpoint keeps in fp32 at every precision (its metadata)."""
        return [int(i) for i in self.metadata.get("encoder_fp32_stages", ())]

    # --- intensity and inputs -------------------------------------------------------------
    def intensity_for(self, volume: Volume, options: SegmentOptions) -> Intensity:
        if options.intensity is not None:
            return options.intensity
        guessed = guess_intensity(volume.array, volume.modality, options.ct_window)
        trained = self.metadata.get("intensity")
        # Reuse the checkpoint's handling only for the same kind of image: its CT window for CT,
        # as-is for RGB. MR percentiles belong to one volume and are always recomputed.
        if trained and trained.get("modality") == guessed.modality and guessed.modality in ("CT", "RGB"):
            return Intensity.from_dict(trained)
        return guessed

    def _slice_input(self, stack: SliceStack, k: int, intensity: Intensity, name: str = "volume",
                     window: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, Frame]:
        pixels = finite_slice(stack.pixels[k], name, k)  # a NaN slice ends the run here, whole slices before it
        return to_model_input(normalize_slice(pixels, intensity), self.model.image_size, window)

    def scale_window(self, volume: Volume, stack: SliceStack, intensity: Intensity
                     ) -> tuple[int, int, int, int] | None:
        """The part of each slice the model sees: a window of the field of view it was trained at
        (checkpoint metadata "field_of_view_mm", core/preprocess.scale_window), else the whole slice."""
        fov = self.metadata.get("field_of_view_mm")
        if not fov or volume.is_rgb:
            return None
        kji = volume.spacing[::-1]  # mm along the array's k, j, i axes
        rows_cols = [float(kji[a]) for a in range(3) if a != stack.axis]
        # The voxels' hash alone would give a re-spaced copy of a volume the other's window.
        key = (volume_key(volume), stack.axis, tuple(sorted(intensity.to_dict().items())), tuple(rows_cols))
        if key not in self._windows:
            if stack.orient.transpose:
                rows_cols.reverse()
            self._windows[key] = scale_window(stack.pixels, (rows_cols[0], rows_cols[1]), float(fov), intensity)
        return self._windows[key]

    def _encode(self, encode: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        """Encode ``batch``, splitting it when the device runs out of memory.

        On an out-of-memory error the sub-batch is halved (down to one slice) and the cap is kept
        for the rest of this Segmenter's life, so later batches do not fail again; at one slice
        the error becomes an OutOfMemoryError that says what to change.
        """
        out = []
        start = 0
        while start < len(batch):
            size = min(self.max_encode_batch or len(batch), len(batch) - start)
            try:
                with torch.no_grad(), autocast_for(self.device, self.precision):
                    out.append(encode(batch[start:start + size]).float())
                start += size
            except (torch.OutOfMemoryError, RuntimeError, MemoryError) as exc:
                if not _is_out_of_memory(exc):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if size == 1:
                    todo = ("free memory (close other programs) and run again" if self.device.type == "cpu" else
                            "free its memory (close other programs using it), or run on the CPU (--device cpu)")
                    raise OutOfMemoryError(f"out of memory on {self.device} encoding even one slice at a time "
                                           f"(--batch-size 1); {todo}{_oom_detail(exc)}") from None
                self.max_encode_batch = max(1, size // 2)
                self.oom_retries += 1
        return torch.cat(out)

    def embeddings(
        self, volume: Volume, stack: SliceStack, indices: Sequence[int], intensity: Intensity, batch_size: int = 4,
        cancel: threading.Event | None = None,
    ) -> Iterator[tuple[list[int], torch.Tensor, list[Frame]]]:
        """Yield (indices, B x 256 x 64 x 64 on device, frames), encoding only uncached slices.

        On a GPU the next batch's slices are prepared on a helper thread while this one is encoded
        and decoded (core/prefetch.py), in pinned memory, copied without blocking; on the CPU they
        are prepared in turn on this thread (``prefetch_ahead``)."""
        window = self.scale_window(volume, stack, intensity)
        key_of = self._cache_keys(volume, stack, intensity, window)
        encode = self._encoder()
        step = max(1, batch_size)
        chunks = [list(indices[start:start + step]) for start in range(0, len(indices), step)]

        def prepare(chunk: list[int]) -> tuple[list[int], torch.Tensor | None, list[Frame]]:
            # Only what is not cached now; if the cache changes before the chunk's turn, it is redone then.
            need = [k for k in chunk if key_of(k) not in self.cache]
            return (need, *self._host_batch(stack, need, intensity, volume.name, window))

        for chunk, (prepared, batch, frames) in prefetched(chunks, prepare, self.prefetch_ahead):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled by the user")
            keys = [key_of(k) for k in chunk]
            cached = [self.cache.get(key) for key in keys]
            todo = [i for i, c in enumerate(cached) if c is None]
            if todo:
                need = [chunk[i] for i in todo]
                if need != prepared:
                    batch, frames = self._host_batch(stack, need, intensity, volume.name, window)
                emb = self._encode(encode, self._to_device(batch))
                self.encoder_calls += len(todo)
                for j, i in enumerate(todo):
                    self.cache.put(keys[i], emb[j], frames[j])
                    self._exact_keys.discard(keys[i])
                    cached[i] = (emb[j].half(), frames[j])  # as the cache holds it: a re-run decodes the same
            embs = torch.stack([c[0].to(self.device, torch.float32) for c in cached])  # type: ignore[index]
            yield chunk, embs, [c[1] for c in cached]  # type: ignore[index]

    def _cache_keys(self, volume: Volume, stack: SliceStack, intensity: Intensity,
                    window: tuple[int, int, int, int] | None) -> Callable[[int], tuple]:
        """Slice index -> its embedding's cache key (the volume's voxels, axis, intensity, window, model)."""
        vkey, axis, model_id = volume_key(volume), stack.axis, self.model.spec.model_id
        ikey = (tuple(sorted(intensity.to_dict().items())), window)  # another window is another embedding

        def key_of(k: int) -> tuple:
            return (vkey, axis, k, ikey, model_id)

        return key_of

    def _exact_encoder(self, volume: Volume, stack: SliceStack, intensity: Intensity
                       ) -> Callable[[int], torch.Tensor | None] | None:
        """For a reduced-precision encoder: slice k -> its embedding in fp32, which then
        replaces the fast one in the cache (a re-run and clicks decode the same); None where the
        cached one is already exact. None for an fp32 Segmenter."""
        if self.precision == "fp32":
            return None
        window = self.scale_window(volume, stack, intensity)
        key_of = self._cache_keys(volume, stack, intensity, window)

        def exact(k: int) -> torch.Tensor | None:
            key = key_of(k)
            if key in self._exact_keys:
                return None
            batch, frames = self._host_batch(stack, [k], intensity, volume.name, window)
            if self.device.type == "cpu":  # the folded copy in fp32: the module's values at half its peak memory
                emb = self._folded_encoder()(batch, "fp32")
            else:
                with torch.no_grad(), autocast_for(self.device, "fp32"):
                    emb = self.model.encode(self._to_device(batch)).float()
            self.cache.put(key, emb[0], frames[0], replace=True)
            self._exact_keys.add(key)
            self.exact_encodes += 1
            return emb.half().float()  # as the cache holds it

        return exact

    def _host_batch(self, stack: SliceStack, ks: list[int], intensity: Intensity, name: str,
                    window: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor | None, list[Frame]]:
        """The model inputs of slices ``ks`` as one host tensor (pinned for CUDA), and their frames."""
        if not ks:
            return None, []
        inputs = [self._slice_input(stack, k, intensity, name, window) for k in ks]
        batch = torch.stack([x for x, _ in inputs])
        if self.device.type == "cuda":
            batch = batch.pin_memory()  # page-locked: the copy to the device can run asynchronously
        return batch, [f for _, f in inputs]

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A host batch on the model's device; from pinned memory without blocking on CUDA."""
        return batch.to(self.device, non_blocking=batch.is_pinned())

    # --- segmentation -----------------------------------------------------------------------
    def segment(
        self,
        volume: Volume,
        options: SegmentOptions | None = None,
        cancel: threading.Event | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Iterator[SliceResult]:
        """Stream one SliceResult per slice (on the stored grid); cancel is honoured between batches."""
        options = self.resolved(options)
        axis = resolve_axis(volume, options.axis)
        stack = SliceStack.of(volume, axis)  # the one entry into the canonical view
        n = len(stack)
        start, stop = options.slice_range or (0, n)
        if not (0 <= start < stop <= n):
            raise InputError(f"slice range [{start}, {stop}) is outside the volume's {n} slices along axis {axis}")
        if int(options.batch_size) < 1:
            raise InputError(f"batch size must be at least 1 (got {options.batch_size}); use --batch-size 1 or more")
        check_segmentable(volume, axis, (start, stop))
        indices = list(range(start, stop))
        intensity = self.intensity_for(volume, options)
        boxes = None if options.boxes is None else {k: stack.box_in(b) for k, b in options.boxes.items()}
        if options.propagate:
            results = self._propagate(volume, stack, indices, intensity, options, boxes, cancel)
        else:
            results = self._self_prompted(volume, stack, indices, intensity, options, boxes, cancel)
        try:
            for done, result in enumerate(results, start=1):
                yield _stored(result, stack)  # the one exit back to the stored grid
                if progress:
                    progress(done, len(indices))
                if done % 8 == 0:
                    trim_heap()  # freed tensors back to the OS: resident memory stays flat (core/memory.py)
        except (RuntimeError, MemoryError) as exc:  # past the encoder's own retries: decoding, mask heads
            if not _is_out_of_memory(exc):
                raise
            cpu = "" if self.device.type == "cpu" else ", or run on the CPU (--device cpu)"
            raise OutOfMemoryError(f"out of memory on {self.device} while segmenting {volume.name}; use a smaller "
                                   f"--batch-size (1) or free memory{cpu}{_oom_detail(exc)}") from None

    def _self_prompted(self, volume, stack, indices, intensity, options, boxes, cancel) -> Iterator[SliceResult]:
        if boxes is not None:
            # Expert boxes: a slice without one is empty by definition, so it is never encoded.
            yield from (_empty(k, stack) for k in indices if k not in boxes)
            indices = [k for k in indices if k in boxes]
        elif options.skip_slices and options.empty_y0 == "skip" and len(indices) > 1:
            yield from self._coarse_to_fine(volume, stack, indices, intensity, options, cancel)
            return
        exact = self._exact_encoder(volume, stack, intensity) if boxes is None else None
        for chunk, embs, frames in self.embeddings(volume, stack, indices, intensity, options.batch_size, cancel):
            yield from self._decode(embs, chunk, frames, options.empty_y0, boxes, stack, options.structure, exact)

    def _coarse_to_fine(self, volume, stack, indices, intensity, options, cancel) -> Iterator[SliceResult]:
        """Skip air, then segment every coarse_step-th slice and grow around the hits (core/skipping.py).

        Results come in wave order, not slice order; each slice exactly once."""
        body = []
        for k in indices:
            if outside_body(stack.pixels[k], intensity):
                yield _empty(k, stack)
            else:
                body.append(k)
        step = max(1, int(options.coarse_step))
        wave, done = coarse(body, step), set()
        exact = self._exact_encoder(volume, stack, intensity)
        while wave:
            found = []
            for chunk, embs, frames in self.embeddings(volume, stack, wave, intensity, options.batch_size, cancel):
                for r in self._decode(embs, chunk, frames, options.empty_y0, None, stack, options.structure, exact):
                    done.add(r.index)
                    if r.box_source != "none":
                        found.append(r.index)
                    yield r
            wave = next_wave(body, found, done, step)
        yield from (_empty(k, stack) for k in body if k not in done)

    @property
    def presence_threshold(self) -> float:
        """Pass 1's predicted IoU below this means "not on this slice" (chosen on val at training)."""
        return float(self.metadata.get("presence_threshold") or 0.0)

    def _sam_sp(self, embs: torch.Tensor, fallback: torch.Tensor, empty_y0: str,
                structure: int = 0) -> SelfPromptOutput:
        """``self_prompt``; when an empty first pass means "no object" the box pass runs only where it
        found one (the slices that come out empty need no second decoder pass).

        A ProMISe checkpoint (metadata "method": "promise") runs its own prompt-free path instead
        (core/promise.py: APM points, one IPS-shifted decoder pass); it returns the same fields, its
        box being the output's box. Its clicks (``refine_slice``) are more point prompts in that pass."""
        if self.method == "promise":
            return promise_prompt(self.model, embs, fallback)
        which = torch.full((len(embs),), structure, dtype=torch.long, device=embs.device)
        if empty_y0 != "skip":
            return self_prompt(self.model, embs, fallback, structure=which)
        y0, presence = self.model.decode(embs, structure=which)
        boxes, empty = box_from_logits(y0, fallback, self.model.image_size)
        empty = absent(empty, presence, self.presence_threshold)
        y1 = torch.full_like(y0, -20.0)
        iou = torch.zeros(len(embs), 1, device=embs.device)
        keep = torch.nonzero(~empty).flatten()
        if len(keep):
            y1[keep], iou[keep] = self.model.decode(embs[keep], boxes=boxes[keep], structure=which[keep])
        return SelfPromptOutput(y0, boxes, empty, y1, iou, presence)

    def _decode(self, embs: torch.Tensor, chunk: list[int], frames: list[Frame], empty_y0: str,
                boxes: dict[int, np.ndarray] | None, stack: SliceStack, structure: int = 0,
                exact: Callable[[int], torch.Tensor | None] | None = None) -> list[SliceResult]:
        """SAM-SP (or the expert box) on a batch of embeddings; everything in the canonical view.

        ``exact`` (``_exact_encoder``): slices whose first pass is borderline are decoded again from
        an fp32 embedding (``_recheck_borderline``)."""
        dev = embs.device
        with self._decoding():
            if boxes is not None:
                out = []
                for j, k in enumerate(chunk):
                    mbox = torch.as_tensor(frames[j].box_to_model(boxes[k]), device=dev)[None]
                    logits, iou = box_prompt(self.model, embs[j:j + 1], mbox)
                    out.append(_result(k, logits[0], frames[j], boxes[k], "expert", iou))
                return out
            fallback = torch.stack([torch.as_tensor(f.full_box()) for f in frames]).to(dev)
            if dev.type == "cpu":
                # One slice at a time: batching gains nothing on the CPU, a batch of 4 holds ~0.1 GB
                # more at its peak, and a slice's result cannot depend on which slices share its batch
                # (the skipping path batches other slices together than the full path).
                parts = [self._sam_sp(embs[j:j + 1], fallback[j:j + 1], empty_y0, structure) for j in range(len(chunk))]
                sp = SelfPromptOutput(*(torch.cat([getattr(p, f) for p in parts]) for f in
                                        ("y0", "boxes", "fallback_used", "y1", "iou")),
                                      presence=None if parts[0].presence is None else
                                      torch.cat([p.presence for p in parts]))
            else:
                sp = self._sam_sp(embs, fallback, empty_y0, structure)
            if exact is not None:
                self._recheck_borderline(sp, embs, chunk, fallback, empty_y0, structure, exact)
            out = []
            for j, k in enumerate(chunk):
                if bool(sp.fallback_used[j]) and empty_y0 == "skip":
                    out.append(_empty(k, stack))
                    continue
                src = "fallback" if bool(sp.fallback_used[j]) else "self"
                box = frames[j].box_to_slice(sp.boxes[j].cpu().numpy())
                out.append(_result(k, sp.y1[j], frames[j], box, src, sp.iou[j]))
            return out

    def _recheck_borderline(self, sp: SelfPromptOutput, embs: torch.Tensor, chunk: list[int], fallback: torch.Tensor,
                            empty_y0: str, structure: int, exact: Callable[[int], torch.Tensor | None]) -> None:
        """Decode again, from an fp32 embedding and with the decoder wholly in fp32, the slices whose first
        pass is borderline, and put their results into ``sp`` (a slice whose cached embedding is already the
        fp32 one, from an earlier run, is decoded again from it). Borderline: its maximum logit lies within
        BORDERLINE_LOGIT of 0, or it found something and its presence score lies within BORDERLINE_PRESENCE
        of the checkpoint's threshold.

        Whether pass 1 finds anything, and whether its presence score clears the threshold, decide
        whether a slice is painted at all. bf16's ~1-2% embedding error moved left-atrium-mr's pass-1
        logits by 0.15-0.25, enough to empty two mid-volume slices that fp32 paints, and at its presence
        threshold 0.05 it took a slice whose fp32 score is 0.052 below it (docs/RESULTS.md, Speed);
        slices this close to either decision are few (8 of 88 there), so they pay for the fp32 encoder
        and no others do."""
        peak = sp.y0.flatten(1).amax(1)
        borderline = peak.abs() < BORDERLINE_LOGIT
        threshold = self.presence_threshold
        if threshold > 0 and sp.presence is not None:
            borderline |= (peak > 0) & ((sp.presence[:, 0] - threshold).abs() < BORDERLINE_PRESENCE)
        for j in torch.nonzero(borderline).flatten().tolist():
            emb = exact(chunk[j])
            if emb is None:
                emb = embs[j:j + 1]
            with self._decoding("fp32"):
                part = self._sam_sp(emb.to(self.device), fallback[j:j + 1], empty_y0, structure)
            for name in ("y0", "boxes", "fallback_used", "y1", "iou"):
                getattr(sp, name)[j] = getattr(part, name)[0]
            if sp.presence is not None and part.presence is not None:
                sp.presence[j] = part.presence[0]

    def _propagate(self, volume, stack, indices, intensity, options, boxes, cancel) -> Iterator[SliceResult]:
        """Seed on the slice whose first-pass mask is largest, then carry its box outward.

        The first pass self-prompts every slice or, when expert ``boxes`` are given, uses them
        (slices without a box start empty). Each other slice is prompted with the previous
        slice's mask box (LiteMedSAM-style); a slice with its own expert box keeps that result
        and restarts the carry; a direction stops when the mask falls below ``min_area`` pixels.
        """
        seeds: dict[int, SliceResult] = {}
        expert = boxes or {}
        # First pass: self-prompt (or expert-box) every slice; this encodes and caches them all.
        for chunk, embs, frames in self.embeddings(volume, stack, indices, intensity, options.batch_size, cancel):
            if boxes is not None:
                for k in chunk:
                    seeds[k] = _empty(k, stack)
                chunk_boxed = [j for j, k in enumerate(chunk) if k in boxes]
                if chunk_boxed:
                    for r in self._decode(embs[chunk_boxed], [chunk[j] for j in chunk_boxed],
                                          [frames[j] for j in chunk_boxed], options.empty_y0, boxes, stack):
                        seeds[r.index] = r
            else:
                for r in self._decode(embs, chunk, frames, options.empty_y0, None, stack, options.structure):
                    seeds[r.index] = r
        seed = max(seeds.values(), key=lambda r: int(r.mask.sum()))
        yield seed
        for direction in (1, -1):
            carry = mask_box(seed.mask)  # the box the next slice is prompted with
            k = seed.index + direction
            stopped = carry is None
            while indices[0] <= k <= indices[-1]:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled by the user")
                if k in expert:
                    result, stopped = seeds[k], False
                elif stopped:
                    result = _empty(k, stack)
                else:
                    (_, embs, frames), = list(self.embeddings(volume, stack, [k], intensity, 1))
                    mbox = torch.as_tensor(frames[0].box_to_model(carry), device=embs.device)[None]
                    with self._decoding():
                        logits, iou = box_prompt(self.model, embs, mbox)
                    result = _result(k, logits[0], frames[0], carry, "propagated", iou)
                    if result.mask.sum() < options.min_area:
                        result, stopped = _empty(k, stack), True
                yield result
                if not stopped:
                    carry = mask_box(result.mask)
                    stopped = carry is None
                k += direction

    def refine_slice(
        self, volume: Volume, k: int, positive: Sequence[Sequence[float]], negative: Sequence[Sequence[float]],
        previous: SliceResult | None = None, options: SegmentOptions | None = None,
    ) -> SliceResult:
        """Click correction of one slice on its cached embedding.

        Clicks (x, y) and ``previous`` are on the stored grid, like every result; ``previous.logits``
        are the canonical low-res logits the segment pass returned.
        """
        options = options or SegmentOptions()
        pts = [*positive, *negative]
        if not pts:
            raise InputError("a correction needs at least one positive or negative click")
        axis = resolve_axis(volume, options.axis)
        stack = SliceStack.of(volume, axis)
        intensity = self.intensity_for(volume, options)
        (_, embs, frames), = list(self.embeddings(volume, stack, [k], intensity, 1))
        frame = frames[0]
        coords = torch.as_tensor(frame.points_to_model(stack.points_in(pts)), device=embs.device)[None]
        labels = torch.tensor([[1] * len(positive) + [0] * len(negative)], device=embs.device)
        box = prev_box = None
        if previous is not None and previous.box is not None:
            prev_box = stack.box_in(previous.box)
            box = torch.as_tensor(frame.box_to_model(prev_box), device=embs.device)[None]
        prev_logits = previous.logits.to(embs.device) if previous is not None and previous.logits is not None else None
        with self._decoding():
            if self.method == "promise":  # promptable mode: APM points + clicks, IPS (core/promise.py)
                full = torch.as_tensor(frame.full_box(), device=embs.device)[None]
                logits, iou = promise_refine(self.model, embs, full, coords, labels)
            else:
                logits, iou = refine(self.refiner or self.model, embs, box, prev_logits, coords, labels)
        src = previous.box_source if previous is not None else "none"
        return _stored(_result(k, logits[0], frame, prev_box, src, iou), stack)


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS out of memory, or the CPU allocator failing (torch's or numpy's)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return "out of memory" in text or "can't allocate memory" in text or "Cannot allocate memory" in text


def _oom_detail(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
    return f" ({first})" if first else ""


def _result(k: int, low_res: torch.Tensor, frame: Frame, box, source: str, iou: torch.Tensor) -> SliceResult:
    """A result in the canonical view (``_stored`` maps it back once)."""
    mask = (logits_to_slice(low_res, frame) > 0).cpu().numpy()
    return SliceResult(k, mask, None if box is None else np.asarray(box, np.float32), source,
                       float(iou.reshape(-1)[0]), low_res.detach().reshape(1, 1, *low_res.shape[-2:]).cpu())


def _empty(k: int, stack: SliceStack) -> SliceResult:
    return SliceResult(k, np.zeros(stack.shape, bool), None, "none", 0.0, None)


def _stored(result: SliceResult, stack: SliceStack) -> SliceResult:
    """The canonical-view result on the stored slice grid; the logits stay canonical (model input)."""
    return replace(result, mask=stack.mask_out(result.mask), box=stack.box_out(result.box))


def largest_component_3d(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component; a slice-wise model leaves stray blobs."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def segment_volume(
    segmenter: Segmenter,
    volume: Volume,
    options: SegmentOptions | None = None,
    cancel: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_slice: Callable[[SliceResult], None] | None = None,
    assemble: bool = True,
    keep_results: bool = True,
) -> tuple[np.ndarray | None, list[SliceResult]]:
    """Run a whole volume and assemble a K x J x I uint8 mask (1 = object); None without ``assemble``.

    Without ``keep_results`` the list comes back empty: each result lives only as long as ``on_slice``
    (or the host it hands it to) keeps it, so a long volume's masks and logits are not all held twice."""
    options = segmenter.resolved(options)
    axis = resolve_axis(volume, options.axis)
    mask = np.zeros(volume.shape_kji, np.uint8) if assemble else None
    results = []
    for r in segmenter.segment(volume, options, cancel, progress):
        if mask is not None:
            put_slice(mask, axis, r.index, r.mask)
        if keep_results:
            results.append(r)
        if on_slice:
            on_slice(r)
    if mask is not None and options.cleanup_3d and mask.any():
        mask = largest_component_3d(mask).astype(np.uint8)
    return mask, results
