"""Issue 11, item 2: cardiac-mr as three single-structure checkpoints against the shipped one-checkpoint design.

Each structure gets its own model, trained with cardiac-mr's recipe (the same slices, epochs, lr, y0 weight,
CT SAM-SP start and seed) on that structure's samples only, selected on that structure's val samples, and
then scored on all 10 val volumes exactly as `evaluate --target cardiac-mr --whole-split` scores the shipped
checkpoint (slice rows, 3D Dice per volume, false-positive slices).

    .venv/bin/python docs/repro/acdc_three_models.py runs/acdc3      # about 20-40 min on the 2-core CPU
"""
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from SAMSelfPromptLib.cli.training import windowed_as_segment_runs
from SAMSelfPromptLib.evaluation.evaluate import evaluate_samples
from SAMSelfPromptLib.modeling.backbones import build_model
from SAMSelfPromptLib.training.api import base_model, train_samples
from SAMSelfPromptLib.training.embedding_cache import DiskEmbeddingCache, default_cache_dir
from SAMSelfPromptLib.training.targets import target_samples
from SAMSelfPromptLib.training.trainer import TrainConfig
from SAMSelfPromptLib.weights.catalogue import WEIGHTS_DIR
from SAMSelfPromptLib.weights.checkpoint import load_samsp
from SAMSelfPromptLib.weights.targets import target_spec

torch.set_num_threads(2)
out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/acdc3")
out_dir.mkdir(parents=True, exist_ok=True)
spec = target_spec("cardiac-mr")
recipe = spec.recipe
config = TrainConfig(epochs=int(recipe["epochs"]), lr=float(recipe["lr"]), y0_weight=float(recipe["y0_weight"]))
cache = DiskEmbeddingCache(default_cache_dir())
train_all = target_samples(spec, "../shared/data", "train")
val_select = target_samples(spec, "../shared/data", "val")            # what the shipped run selected on
val_all = target_samples(spec, "../shared/data", "val", whole_split=True)
vanilla = build_model()
report = {}
for index, structure in enumerate(spec.structures):
    def only(samples):  # this structure's samples, as structure 0 of a one-structure model
        return [replace(s, structure=0) for s in samples if s.structure == index]
    train, val, val_eval = only(train_all), only(val_select), only(val_all)
    ckpt = out_dir / f"acdc_{index}.pt"
    t0 = time.time()
    if not ckpt.is_file():
        model = base_model(WEIGHTS_DIR / recipe["init"])
        model.set_structures(1)
        result, _ = train_samples(train, val, ckpt, config, model,
                                  {"source": "repro", "structure": structure.name, "n_train": len(train)},
                                  work_dir=out_dir / f"acdc_{index}_work", cache=cache, progress=False)
        print(f"{structure.name}: trained in {time.time() - t0:.0f} s, best epoch {result.best_epoch}", flush=True)
    model, meta = load_samsp(ckpt)
    samples = windowed_as_segment_runs(val_eval, meta)
    result = evaluate_samples(vanilla, {"samsp": model}, samples, cache, progress=False,
                              presence_thresholds={"samsp": float(meta.get("presence_threshold") or 0.0)})
    volumes = result.volume_metrics([s.case_id for s in samples], [s.mask for s in samples],
                                    [structure.name] * len(samples))
    report[structure.name] = {"train_seconds": meta.get("train_seconds"), "best_epoch": meta.get("best_epoch"),
                              "presence_threshold": meta.get("presence_threshold"),
                              "rows": result.to_json()["rows"], "volumes": volumes}
    print(structure.name, json.dumps(volumes.get(f"samsp/{structure.name}")), flush=True)
    (out_dir / "three_models.json").write_text(json.dumps(report, indent=1))
