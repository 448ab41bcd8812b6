"""Image embeddings computed once and kept on disk, for CPU-mode training and evaluation.

The key hashes everything the embedding depends on: the raw pixel bytes, shape and dtype,
the intensity handling, the model input size, the model id and the image encoder's own
weights (so a LoRA-tuned or different encoder never reads a stale entry). Entries are
fp16 tensors written atomically with torch.save and read with weights_only=True;
an unreadable entry is recomputed rather than trusted.

The encoder is the one inference runs (``encoder_precision``): on a CPU with native bf16 that is
the folded bf16 copy (``modeling.fast_encoder``, about 0.45 s per image here instead of 2.1 s for
a traced fp32 module; elsewhere the same copy in fp32), so a model trained on cached embeddings sees what
Auto-segment will feed it.
The precision is part of the key, so fp32 and bf16 entries never mix.

On the CPU images are encoded one at a time: batch 1 is the fastest there (LiteMedSAM on 1 thread:
4.8 s for four single images, 6.4 s for one batch of four) and it lets ``cancel`` stop the job
between images.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Sequence

import torch

from ..errors import Cancelled
from ..io.files import atomic_write, cache_dir
from ..modeling.backbones import SamBackbone, resolve_precision
from ..modeling.fast_encoder import fast_encoder, runs_folded_copy
from ..core.memory import reuse_freed_heap
from ..core.preprocess import Frame, normalize_slice, to_model_input
from .data import Sample


def default_cache_dir() -> Path:
    return cache_dir() / "embeddings"


def _encoder_tensor_versions(model: SamBackbone) -> tuple:
    """Changes whenever any encoder tensor is replaced or written in place (an optimizer step, a
    load_state_dict): torch bumps a tensor's version counter on every in-place write."""
    enc = model.image_encoder
    return tuple((t.data_ptr(), t._version) for t in (*enc.parameters(), *enc.buffers()))


def encoder_fingerprint(model: SamBackbone) -> str:
    """sha256 over the image encoder's tensors (names, shapes, bytes); cached on the model until one of them
    changes (training the encoder's top stages changes them between caching and the final embeddings)."""
    versions = _encoder_tensor_versions(model)
    cached = getattr(model, "_encoder_fingerprint", None)
    if cached is not None and cached[0] == versions:
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in sorted(model.image_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    fp = digest.hexdigest()
    object.__setattr__(model, "_encoder_fingerprint", (versions, fp))  # plain attribute, not a submodule
    return fp


def model_input(sample: Sample, image_size: int) -> tuple[torch.Tensor, Frame]:
    """The preprocessing every path shares: intensity to [0, 1], resize, pad."""
    return to_model_input(normalize_slice(sample.image, sample.intensity), image_size, sample.window)


def sample_frame(sample: Sample, image_size: int) -> Frame:
    """Where ``sample`` sits in the model input (its window included), without preprocessing it."""
    h, w = sample.image.shape[:2]
    if sample.window is None:
        return Frame(h, w, image_size)
    top, left, wh, ww = sample.window
    return Frame(wh, ww, image_size, top, left, h, w)


def encoder_precision(model: SamBackbone) -> str:
    """The precision inference runs the encoder at on this model's device (bf16 on a bf16 CPU)."""
    return resolve_precision(model.device)


def cache_key(sample: Sample, model: SamBackbone, stage: int | None = None) -> str:
    """The entry of ``sample``'s embedding, or with ``stage`` k of what TinyViT stage k receives."""
    digest = hashlib.sha256()
    pixels = sample.image if sample.image.flags["C_CONTIGUOUS"] else sample.image.copy(order="C")
    digest.update(pixels.tobytes())
    params = {
        "shape": list(pixels.shape),
        "dtype": str(pixels.dtype),
        "intensity": sample.intensity.to_dict(),
        **({"window": list(sample.window)} if sample.window is not None else {}),  # old keys stay valid
        "image_size": model.image_size,
        "pixel_norm": model.spec.pixel_norm,
        "model": model.spec.model_id,
        "encoder": encoder_fingerprint(model),
    }
    if stage is not None:
        params["tokens_before_stage"] = int(stage)
    precision = encoder_precision(model)
    if precision != "fp32":  # fp32 keys stay as they were, so existing caches keep their entries
        params["precision"] = precision
        if model.device.type == "cuda":  # until session 10 a GPU's entries came from the autocast module
            params["encoder_copy"] = "folded"
    digest.update(json.dumps(params, sort_keys=True).encode())
    return digest.hexdigest()


class DiskEmbeddingCache:
    """A folder of <key>.pt embeddings; ``embed`` fills what is missing in encoder batches."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def load(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file: recompute it
            return None

    def store(self, key: str, embedding: torch.Tensor) -> None:
        atomic_write(self.path(key), lambda tmp: torch.save(embedding.detach().to("cpu", torch.float16).clone(), tmp),
                     overwrite=True)

    @torch.no_grad()
    def embed(
        self,
        model: SamBackbone,
        samples: Sequence[Sample],
        batch_size: int = 4,
        progress: bool = False,
        desc: str = "embedding",
        cancel: threading.Event | None = None,
        stage: int | None = None,
    ) -> tuple[torch.Tensor, list[Frame]]:
        """N x 256 x 64 x 64 fp16 embeddings (CPU) and the frames of ``samples``.

        ``stage`` k: instead, N x 4096 x C fp16 tokens, what TinyViT stage k receives from the inference
        encoder's earlier stages (training stages k.. with the decoder, ``TrainConfig.encoder_from_stage``).

        ``cancel``: checked before every encoder batch (every image on the CPU); when set,
        ``errors.Cancelled`` is raised and what was encoded so far stays cached.
        """
        keys = [cache_key(s, model, stage) for s in samples]
        frames: list[Frame] = []
        out: list[torch.Tensor | None] = []
        todo: list[int] = []
        first: dict[str, int] = {}  # a sample listed twice (e.g. train = val) is encoded once
        for i, (sample, key) in enumerate(zip(samples, keys)):
            emb = self.load(key) if key not in first else None
            frames.append(sample_frame(sample, model.image_size))
            out.append(emb)
            if emb is None and key not in first:
                todo.append(i)
            first.setdefault(key, i)
        self.hits += len(samples) - len(todo)
        self.misses += len(todo)
        bar = None
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=desc, unit="img")
        if not todo:  # every entry was cached: build no encoder copy
            encode = model.encode
        elif stage is not None:
            encode = fast_encoder(model, encoder_precision(model), stop_before_stage=stage)
        else:
            encode = self._encoder(model)
        step = 1 if model.device.type == "cpu" else batch_size
        if todo and model.device.type == "cpu":
            reuse_freed_heap()  # each image's encoder tensors in the last one's freed heap (core/memory.py)
        for start in range(0, len(todo), step):
            check_cancel(cancel)
            chunk = todo[start:start + step]
            batch = torch.stack([model_input(samples[i], model.image_size)[0] for i in chunk]).to(model.device)
            embs = encode(batch).float().cpu()
            for i, emb in zip(chunk, embs):
                self.store(keys[i], emb)
                out[i] = emb.to(torch.float16)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        out = [emb if emb is not None else out[first[key]] for emb, key in zip(out, keys)]
        return torch.stack(out), frames  # type: ignore[arg-type]

    @staticmethod
    def _encoder(model: SamBackbone):
        """Inference's encoder (``runs_folded_copy``): the folded copy on a CPU and on a CUDA GPU at reduced
        precision, else the module (and the module while its encoder trains)."""
        precision = encoder_precision(model)
        if runs_folded_copy(model.device, precision) and not model.image_encoder.training:
            return fast_encoder(model, precision)
        return model.encode


def check_cancel(cancel: threading.Event | None) -> None:
    """Raise ``errors.Cancelled`` when the caller's cancel flag is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled by the user")
