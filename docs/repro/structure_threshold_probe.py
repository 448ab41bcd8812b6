"""Per-structure presence thresholds of a multi-structure target on all its val volumes (val: selection only).

For each structure and candidate threshold: slice Dice on slices with the structure (empty output scores 0)
and how many slices without it are painted. ``.venv/bin/python docs/repro/structure_threshold_probe.py cardiac-mr``"""
import sys

import numpy as np
import torch

from SAMSelfPromptLib.core.masks import dice
from SAMSelfPromptLib.evaluation.evaluate import samsp_logits, to_masks
from SAMSelfPromptLib.training.embedding_cache import DiskEmbeddingCache
from SAMSelfPromptLib.training.targets import target_samples
from SAMSelfPromptLib.training.trainer import PRESENCE_THRESHOLDS
from SAMSelfPromptLib.weights.catalogue import find_target
from SAMSelfPromptLib.weights.checkpoint import load_samsp
from SAMSelfPromptLib.weights.targets import target_spec

torch.set_num_threads(2)
name = sys.argv[1]
model, meta = load_samsp(find_target(name).path)
samples = target_samples(target_spec(name), "../shared/data", "val", whole_split=True)
emb, frames = DiskEmbeddingCache().embed(model, samples, progress=False)
structures = torch.tensor([s.structure for s in samples], dtype=torch.long)
with torch.no_grad():
    logits = samsp_logits(model, emb, frames, structures=structures)
y1, y0 = to_masks(logits["samsp"], frames), to_masks(logits["samsp_y0"], frames)
presence = logits["presence"][:, 0].numpy()
has = np.array([s.has_label for s in samples])
d1 = np.array([dice(p, s.mask) for p, s in zip(y1, samples)])
painted = np.array([p.any() for p in y1]) & np.array([p.any() for p in y0])
print("stored threshold", meta.get("presence_threshold"))
for k in range(int(structures.max()) + 1):
    sel = structures.numpy() == k
    for t in PRESENCE_THRESHOLDS:
        kept = painted & ((presence >= t) | (t <= 0))
        print(f"structure {k} threshold {t:.2f}: Dice {np.where(kept, d1, 0.0)[sel & has].mean():.4f} "
              f"({(sel & has).sum()} slices), painted without it {(kept & sel & ~has).sum()}/{(sel & ~has).sum()}")
