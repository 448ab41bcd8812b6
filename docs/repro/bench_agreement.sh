#!/bin/bash
# Run from the repository root: bash docs/repro/bench_agreement.sh
mkdir -p runs/bench
# dice_vs_naive on PH2 val (40 pictures, the default RGB target) and one LA-MRI val volume (left-atrium-mr),
# with bench's own functions (the full bench runs the CT series).
.venv/bin/python - <<'PY'
import json, torch
torch.set_num_threads(2)
from SAMSelfPromptLib.cli.bench import compare_inputs, input_files
out = {}
out["ph2_val"] = compare_inputs(input_files("../shared/data/ph2", "val"), torch.device("cpu"), 4)
out["la_val"] = compare_inputs(input_files("../shared/data/la_mri/images/23X6SY44VT9KFHR7S7OC.nii.gz"),
                               torch.device("cpu"), 4, "left-atrium-mr")
for k, r in out.items():
    print(k, r["input_slices"], "slices: dice_vs_naive", round(r["dice_vs_naive"], 4), "lowest", round(r.get("dice_vs_naive_min", r["dice_vs_naive"]), 4))
    r.pop("inputs", None)
open("runs/bench/agreement.json", "w").write(json.dumps(out, indent=1))
PY
