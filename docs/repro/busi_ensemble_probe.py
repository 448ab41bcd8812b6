"""Two breast-lesion-us checkpoints and their mirror images, SAM-SP logits averaged on the image grid (session 14;
val only, for selection; not built). The second model is a stage 1-3 training run's best weights from its resume
file: ``.venv/bin/python -W ignore docs/repro/busi_ensemble_probe.py runs/busi/top1_e4_work/last.pt`` (4 min)."""
import sys

import numpy as np
import torch
from dataclasses import replace
from SAMSelfPromptLib.core.masks import dice
from SAMSelfPromptLib.core.preprocess import logits_to_slice
from SAMSelfPromptLib.evaluation.evaluate import samsp_logits
from SAMSelfPromptLib.training.embedding_cache import DiskEmbeddingCache
from SAMSelfPromptLib.training.targets import target_samples
from SAMSelfPromptLib.weights.catalogue import find_target
from SAMSelfPromptLib.weights.checkpoint import load_samsp
from SAMSelfPromptLib.weights.targets import target_spec
torch.set_num_threads(2)
path = find_target("breast-lesion-us").path
A, meta = load_samsp(path)
B, _ = load_samsp(path)
ck = torch.load(sys.argv[1], weights_only=True, map_location="cpu")
B.encoder_tuned_from = 1
missing, unexpected = B.load_state_dict(ck["best_state"], strict=False)
print("unexpected", len(unexpected))
samples = target_samples(target_spec("breast-lesion-us"), "../shared/data", "val", whole_split=True)
mirrored = [replace(s, image=np.ascontiguousarray(s.image[:, ::-1]), mask=np.ascontiguousarray(s.mask[:, ::-1]),
                    case_id=s.case_id + ":mirror") for s in samples]
has = np.array([s.has_label for s in samples])
views = {}
for mname, m, thr in (("A", A, 0.25), ("B", B, 0.15)):
    for vname, group in (("id", samples), ("flip", mirrored)):
        emb, frames = DiskEmbeddingCache().embed(m, group, progress=False)
        out = samsp_logits(m, emb, frames, presence_threshold=None)
        for t in (0.0, 0.15, 0.25, 0.4):
            y1 = torch.where(((out["fallback"] > 0) | (out["presence"][:, 0] < t))[:, None, None, None], torch.full_like(out["samsp"], -20.0), out["samsp"])
            lg = [logits_to_slice(l, f) for l, f in zip(y1, frames)]
            if vname == "flip":
                lg = [torch.flip(l, dims=[-1]) for l in lg]
            views[(mname, vname, t)] = lg
        print(mname, vname, "done", flush=True)
def score(keys):
    ds = []
    for i, s in enumerate(samples):
        avg = sum(views[k][i] for k in keys) / len(keys)
        ds.append(dice(avg.numpy() > 0, s.mask))
    ds = np.array(ds)
    return f"Dice {ds[has].mean():.4f}, normals painted {int((ds[~has] < 1).sum())}/{(~has).sum()}"
for t in (0.0, 0.15, 0.25, 0.4):
    print(f"t={t}")
    print("  A        ", score([("A", "id", t)]))
    print("  B        ", score([("B", "id", t)]))
    print("  A+Aflip  ", score([("A", "id", t), ("A", "flip", t)]))
    print("  A+B      ", score([("A", "id", t), ("B", "id", t)]))
    print("  A+B+flips", score([("A", "id", t), ("A", "flip", t), ("B", "id", t), ("B", "flip", t)]))
