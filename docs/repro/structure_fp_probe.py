"""Where a 3D target's painted structure-free val slices are, and what a relative-size rule would do (session 10).

For every val volume and structure: each painted slice without the structure (its area, the largest painted area
of that structure in the volume, the labelled areas slice by slice), then the rule "drop a painted slice below
FRACTION of the volume's largest" at a few fractions: 3D Dice, painted structure-free slices, true slices emptied.
``.venv/bin/python -W ignore docs/repro/structure_fp_probe.py cardiac-mr`` (about 1 min; val: selection only)"""
import sys
from collections import defaultdict

import numpy as np

from val_predictions import painted_masks, val_predictions

meta, samples, y1, y0, presence = val_predictions(sys.argv[1])
groups = defaultdict(list)  # (volume, structure) -> slices in order
for s, painted in zip(samples, painted_masks(meta, y1, y0, presence)):
    volume, k, structure = s.case_id.split(":")
    groups[(volume, structure)].append((int(k), painted, s.mask))
for g in groups.values():
    g.sort(key=lambda row: row[0])

print("painted slices without the structure:")
for (volume, structure), g in groups.items():
    largest = max(int(m.sum()) for _, m, _ in g)
    for k, m, truth in g:
        if m.any() and not truth.any():
            print(f"  {volume} {structure} slice {k}: {int(m.sum())} px, largest painted {largest}, "
                  f"labelled areas {[int(t.sum()) for _, _, t in g]}")

for fraction in (0.0, 0.05, 0.1, 0.2):
    dice3d, painted, negatives, emptied = defaultdict(list), defaultdict(int), defaultdict(int), 0
    for (volume, structure), g in groups.items():
        largest = max(int(m.sum()) for _, m, _ in g)
        kept = [m.any() and m.sum() >= fraction * largest for _, m, _ in g]
        inter = sum(int((m & t).sum()) for (_, m, t), keep in zip(g, kept) if keep)
        total = sum(int(m.sum()) for (_, m, _), keep in zip(g, kept) if keep) + sum(int(t.sum()) for _, _, t in g)
        dice3d[structure].append(2 * inter / total if total else 1.0)
        for (_, m, t), keep in zip(g, kept):
            negatives[structure] += not t.any()
            painted[structure] += keep and not t.any()
            emptied += bool(m.any() and t.any() and not keep)
    print(f"below {fraction:.2f} of the largest dropped: " + ", ".join(
        f"{st} 3D Dice {np.mean(dice3d[st]):.4f}, painted {painted[st]}/{negatives[st]}" for st in sorted(negatives))
        + f"; true slices emptied {emptied}")
