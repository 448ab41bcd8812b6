"""left-atrium-mr: the presence threshold set to the lowest candidate whose val false-positive rate meets the
issue's 5% (session 8: 0.05, 8 of 176 atrium-free slices painted; 3D Dice 0.811 against 0.814 at 0.0, where
10 of 176 are painted). Val is used for this selection only. Tensors untouched; the summary JSON's threshold,
note and sha256 follow the checkpoint. Then record the val rows:
``samselfprompt evaluate --target left-atrium-mr --whole-split --json la_val.json --write-summary``."""
from pathlib import Path

from checkpoint_metadata import set_metadata

THRESHOLD = 0.05
NOTE = ("0.05: the lowest threshold whose false-positive rate on all 6 val volumes is at most 5% (8/176 = 4.5%; "
        "3D Dice 0.811, against 0.814 and 10/176 = 5.7% at 0.0, the trainer's choice); session 8")

path = Path("SAMSelfPrompt/SAMSelfPromptLib/weights/samsp_la_litemedsam.pt")
metadata = set_metadata(path, {"presence_threshold": THRESHOLD, "presence_threshold_note": NOTE})
print("ok", metadata["presence_threshold"])
