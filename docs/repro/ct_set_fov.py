"""Record the CT liver checkpoint's training field of view in its metadata (tensors untouched); the summary JSON
beside it follows, with the checkpoint's new sha256 (checkpoint_metadata.set_metadata, both written atomically)."""
from pathlib import Path

from checkpoint_metadata import set_metadata

FIELD_OF_VIEW_MM = 366.0
NOTE = ("ct_small.nii.gz slices are 101 x 122 pixels of 3 mm (303 x 366 mm, a body crop); segment shows each "
        "larger CT slice to the model through a 366 mm window so it sees that scale (core/preprocess.scale_window)")

path = Path("SAMSelfPrompt/SAMSelfPromptLib/weights/samsp_ctliver_litemedsam.pt")
metadata = set_metadata(path, {"field_of_view_mm": FIELD_OF_VIEW_MM, "field_of_view_note": NOTE})
print("ok", metadata["field_of_view_mm"])
