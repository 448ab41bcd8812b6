"""Record the CT liver checkpoint's training field of view in its metadata (tensors untouched)."""
import json, torch
from pathlib import Path
from SAMSelfPromptLib.weights.checkpoint import read_samsp
from SAMSelfPromptLib.io.files import atomic_write

path = Path("SAMSelfPrompt/SAMSelfPromptLib/weights/samsp_ctliver_litemedsam.pt")
payload = read_samsp(path)
note = ("ct_small.nii.gz slices are 101 x 122 pixels of 3 mm (303 x 366 mm, a body crop); segment shows each "
        "larger CT slice to the model through a 366 mm window so it sees that scale (core/preprocess.scale_window)")
payload["metadata"]["field_of_view_mm"] = 366.0
payload["metadata"]["field_of_view_note"] = note
atomic_write(path, lambda tmp: torch.save(payload, tmp), overwrite=True)
summary = path.with_suffix(".json")
s = json.loads(summary.read_text())
s["field_of_view_mm"], s["field_of_view_note"] = 366.0, note
summary.write_text(json.dumps(s, indent=1) + "\n")
print("ok", read_samsp(path)["metadata"]["field_of_view_mm"])
