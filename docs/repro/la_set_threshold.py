"""left-atrium-mr: the presence threshold chosen by the trainer's own selection rule on all 6 val volumes
(runs/targets/threshold_probe.py: 0.2; it had been chosen on the first 2). Tensors untouched."""
import torch
from pathlib import Path
from SAMSelfPromptLib.io.files import atomic_write
from SAMSelfPromptLib.weights.checkpoint import read_samsp

path = Path("SAMSelfPrompt/SAMSelfPromptLib/weights/samsp_la_litemedsam.pt")
payload = read_samsp(path)
payload["metadata"]["presence_threshold"] = 0.2
payload["metadata"]["presence_threshold_note"] = ("0.2: chosen in session 5 by the trainer's selection score on all 6 "
                                                  "val volumes (0.1 had been chosen on the first 2)")
atomic_write(path, lambda tmp: torch.save(payload, tmp), overwrite=True)
print("ok", read_samsp(path)["metadata"]["presence_threshold"])
