"""3D Dice and FP slice rate of a 3D target on its val volumes, with and without keeping the largest 3D component."""
import json, sys
import numpy as np, torch
torch.set_num_threads(2)
from pathlib import Path
from SAMSelfPromptLib.core.masks import dice
from SAMSelfPromptLib.core.predictor import segment_volume, SegmentOptions, largest_component_3d
from SAMSelfPromptLib.core.volume import Volume
from SAMSelfPromptLib.io import read_any
from SAMSelfPromptLib.weights.catalogue import open_segmenter
from SAMSelfPromptLib.weights.targets import target_spec

name = sys.argv[1]
spec = target_spec(name)
root = Path("../shared/data") / spec.dataset
ids = json.loads((root / "splits.json").read_text())["val"]
rows = []
for case in ids:
    img = read_any(root / "images" / f"{case}.nii.gz")
    lab = read_any(root / "labels" / f"{case}.nii.gz").array
    opened = open_segmenter(device="cpu", target=name, modality=img.modality, array=img.array)
    seg = opened.segmenter
    for si, st in enumerate(spec.structures):
        truth = np.isin(lab, st.label_ids)
        mask, _ = segment_volume(seg, img, SegmentOptions(structure=si, skip_slices=False))
        for cleanup in (False, True):
            m = largest_component_3d(mask) if cleanup and mask.any() else mask > 0
            neg = ~truth.reshape(len(truth), -1).any(1)
            fp = int((m.reshape(len(m), -1).any(1) & neg).sum())
            rows.append({"case": case, "structure": st.name, "cleanup": cleanup, "dice3d": dice(m, truth),
                         "fp": fp, "neg": int(neg.sum())})
            print(json.dumps(rows[-1]), flush=True)
for st in spec.structures:
    for cleanup in (False, True):
        r = [x for x in rows if x["structure"] == st.name and x["cleanup"] == cleanup]
        print(st.name, "cleanup" if cleanup else "as is", "3D Dice %.3f" % np.mean([x["dice3d"] for x in r]),
              "FP %d/%d" % (sum(x["fp"] for x in r), sum(x["neg"] for x in r)))
