"""The shared part of the structure probes: a shipped 3D target's prompt-free masks on every val slice.

``val_predictions(name)`` -> (checkpoint metadata, samples, pass-2 masks, pass-1 masks, presence scores), as
``evaluate --target NAME --whole-split`` computes them (cached embeddings of the inference encoder)."""
import numpy as np
import torch

from SAMSelfPromptLib.evaluation.evaluate import samsp_logits, to_masks
from SAMSelfPromptLib.training.embedding_cache import DiskEmbeddingCache
from SAMSelfPromptLib.training.targets import target_samples
from SAMSelfPromptLib.weights.catalogue import find_target
from SAMSelfPromptLib.weights.checkpoint import load_samsp
from SAMSelfPromptLib.weights.targets import target_spec


def val_predictions(name: str, data_root: str = "../shared/data"):
    torch.set_num_threads(2)
    model, meta = load_samsp(find_target(name).path)
    samples = target_samples(target_spec(name), data_root, "val", whole_split=True)
    emb, frames = DiskEmbeddingCache().embed(model, samples, progress=False)
    structures = torch.tensor([s.structure for s in samples], dtype=torch.long)
    with torch.no_grad():
        logits = samsp_logits(model, emb, frames, structures=structures)
    y1, y0 = to_masks(logits["samsp"], frames), to_masks(logits["samsp_y0"], frames)
    return meta, samples, y1, y0, logits["presence"][:, 0].numpy()


def painted_masks(meta: dict, y1, y0, presence) -> list:
    """What inference paints on each slice: pass 2's mask, or nothing where pass 1 found nothing or the presence
    score is below the checkpoint's threshold (the rule of ``selfprompt.absent``)."""
    threshold = meta.get("presence_threshold") or 0.0
    return [m1 if m1.any() and m0.any() and (threshold <= 0 or p >= threshold) else np.zeros_like(m1)
            for m1, m0, p in zip(y1, y0, presence)]
