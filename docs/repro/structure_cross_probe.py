"""Would rules that tie cardiac-mr's structures together remove its painted structure-free val slices? (session 12)

For each painted slice without its structure: which other structures are painted and labelled on that slice. Then
rules of the kind "paint the myocardium only where the left ventricle is painted too": painted structure-free slices
removed, and true slices emptied. ``.venv/bin/python -W ignore docs/repro/structure_cross_probe.py`` (about 1 min with
the val embeddings cached; val: selection only)"""
from collections import defaultdict

from val_predictions import painted_masks, val_predictions

RV, MYO, LV = "Right ventricle", "Myocardium", "Left ventricle"
RULES = {  # name -> (structure dropped, the structures of which at least one must be painted on the slice)
    "myocardium only with the LV painted": (MYO, (LV,)),
    "myocardium only with the LV or RV painted": (MYO, (LV, RV)),
    "LV only with the myocardium painted": (LV, (MYO,)),
    "RV only with the LV painted": (RV, (LV,)),
}

meta, samples, y1, y0, presence = val_predictions("cardiac-mr")
slices = defaultdict(dict)  # (volume, k) -> structure -> (painted px, labelled px)
for s, painted in zip(samples, painted_masks(meta, y1, y0, presence)):
    volume, k, structure = s.case_id.split(":")
    slices[(volume, int(k))][structure] = (int(painted.sum()), int(s.mask.sum()))

painted_negatives = [(key, st) for key, d in slices.items() for st, (a, b) in d.items() if a and not b]
beside_labelled = sum(any(b for other, (_, b) in slices[key].items() if other != st) for key, st in painted_negatives)
print(f"{len(painted_negatives)} painted structure-free slices; {beside_labelled} of them on a slice where another "
      "structure is labelled")
for (volume, k), st in sorted(painted_negatives):
    print(f"  {volume} slice {k} {st}: others (painted px, labelled px) "
          f"{ {o: v for o, v in slices[(volume, k)].items() if o != st} }")
for name, (dropped, needs) in RULES.items():
    removed = emptied = 0
    for d in slices.values():
        a, b = d[dropped]
        if a and not any(d[n][0] for n in needs):
            removed += not b
            emptied += bool(b)
    print(f"{name}: painted structure-free slices {len(painted_negatives)} -> {len(painted_negatives) - removed}, "
          f"true slices emptied {emptied}")
