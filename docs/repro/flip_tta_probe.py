"""A left-right mirror image at test time for a 2D target (session 12): SAM-SP runs on the image and on its mirror
image, and the two outputs' logits are averaged on the image grid (the mirror's flipped back); an empty output (pass
1 found nothing, or presence below the threshold) counts as -20, as inference paints it. Val only, for selection.
``.venv/bin/python -W ignore docs/repro/flip_tta_probe.py breast-lesion-us [CHECKPOINT [THRESHOLD]]`` (about 2 min
the first time: the mirror images are encoded and cached)"""
import sys
from dataclasses import replace

import numpy as np
import torch
from SAMSelfPromptLib.core.masks import dice
from SAMSelfPromptLib.core.preprocess import logits_to_slice
from SAMSelfPromptLib.evaluation.evaluate import samsp_logits
from SAMSelfPromptLib.training.embedding_cache import DiskEmbeddingCache
from SAMSelfPromptLib.training.targets import target_samples
from SAMSelfPromptLib.weights.catalogue import find_target
from SAMSelfPromptLib.weights.checkpoint import load_samsp
from SAMSelfPromptLib.weights.targets import target_spec

torch.set_num_threads(2)
name = sys.argv[1]
model, meta = load_samsp(sys.argv[2] if len(sys.argv) > 2 else find_target(name).path)
threshold = float(sys.argv[3]) if len(sys.argv) > 3 else (meta.get("presence_threshold") or 0.0)
samples = target_samples(target_spec(name), "../shared/data", "val", whole_split=True)
mirrored = [replace(s, image=np.ascontiguousarray(s.image[:, ::-1]), mask=np.ascontiguousarray(s.mask[:, ::-1]),
                    case_id=s.case_id + ":mirror") for s in samples]


def output_logits(group) -> list[torch.Tensor]:
    """SAM-SP's output logits of every sample on its own image grid."""
    emb, frames = DiskEmbeddingCache().embed(model, group, progress=False)
    with torch.no_grad():
        low_res = samsp_logits(model, emb, frames, presence_threshold=threshold)["samsp"]
    return [logits_to_slice(lg, fr) for lg, fr in zip(low_res, frames)]


one_view, two_views = [], []
for s, a, b in zip(samples, output_logits(samples), output_logits(mirrored)):
    one_view.append(dice(a.numpy() > 0, s.mask))
    two_views.append(dice(((a + torch.flip(b, dims=[-1])) / 2).numpy() > 0, s.mask))
has = np.array([s.has_label for s in samples])
print(f"presence threshold {threshold}")
for label, d in (("the image alone", np.array(one_view)), ("image and mirror image", np.array(two_views))):
    print(f"{label}: Dice {d[has].mean():.4f} on {has.sum()} images with the structure; images without it painted "
          f"{int((d[~has] < 1).sum())}/{(~has).sum()}")
