"""The presence threshold of a target, swept on every val image or volume (val: selection only).
``.venv/bin/python -W ignore docs/repro/threshold_probe.py TARGET [CHECKPOINT]`` (default: the shipped checkpoint)"""
import sys, json
import torch
torch.set_num_threads(2)
from SAMSelfPromptLib.training.targets import target_samples
from SAMSelfPromptLib.training.trainer import evaluate_val, PRESENCE_THRESHOLDS
from SAMSelfPromptLib.training.embedding_cache import DiskEmbeddingCache
from SAMSelfPromptLib.weights.catalogue import find_target
from SAMSelfPromptLib.weights.checkpoint import load_samsp
from SAMSelfPromptLib.weights.targets import target_spec

name = sys.argv[1]
spec = target_spec(name)
path = sys.argv[2] if len(sys.argv) > 2 else find_target(name).path
model, meta = load_samsp(path)
samples = target_samples(spec, "../shared/data", "val", whole_split=True)
emb, frames = DiskEmbeddingCache().embed(model, samples, progress=False)
print("stored threshold", meta.get("presence_threshold"), "candidates", PRESENCE_THRESHOLDS)
for t in PRESENCE_THRESHOLDS:
    r = evaluate_val(model, samples, emb, frames, thresholds=[t])
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
best = evaluate_val(model, samples, emb, frames)
print("best on all val:", json.dumps(best))
