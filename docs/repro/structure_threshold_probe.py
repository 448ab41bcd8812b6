"""Per-structure presence thresholds of a multi-structure target on all its val volumes (val: selection only).

For each structure and candidate threshold: slice Dice on slices with the structure (empty output scores 0)
and how many slices without it are painted. ``.venv/bin/python docs/repro/structure_threshold_probe.py cardiac-mr``"""
import sys

import numpy as np

from SAMSelfPromptLib.core.masks import dice
from SAMSelfPromptLib.training.trainer import PRESENCE_THRESHOLDS
from val_predictions import val_predictions

meta, samples, y1, y0, presence = val_predictions(sys.argv[1])
structures = np.array([s.structure for s in samples])
has = np.array([s.has_label for s in samples])
d1 = np.array([dice(p, s.mask) for p, s in zip(y1, samples)])
painted = np.array([p.any() for p in y1]) & np.array([p.any() for p in y0])
print("stored threshold", meta.get("presence_threshold"))
for k in range(int(structures.max()) + 1):
    sel = structures == k
    for t in PRESENCE_THRESHOLDS:
        kept = painted & ((presence >= t) | (t <= 0))
        print(f"structure {k} threshold {t:.2f}: Dice {np.where(kept, d1, 0.0)[sel & has].mean():.4f} "
              f"({(sel & has).sum()} slices), painted without it {(kept & sel & ~has).sum()}/{(sel & ~has).sum()}")
