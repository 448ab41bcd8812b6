"""Edit a shipped SAM-SP checkpoint's metadata (its tensors untouched), and its summary JSON beside it: the
same fields, and the checkpoint's new sha256. Both files are written atomically."""
import json
from pathlib import Path

import torch
from SAMSelfPromptLib.io.files import atomic_write, sha256_of
from SAMSelfPromptLib.weights.checkpoint import read_samsp


def set_metadata(path: Path, fields: dict) -> dict:
    """Set ``fields`` in the checkpoint at ``path`` and in ``path``'s .json; returns the checkpoint's metadata."""
    payload = read_samsp(path)
    payload["metadata"].update(fields)
    atomic_write(path, lambda tmp: torch.save(payload, tmp), overwrite=True)
    summary_path = path.with_suffix(".json")
    summary = json.loads(summary_path.read_text())
    summary.update(fields, sha256=sha256_of(path))
    text = json.dumps(summary, indent=1) + "\n"
    atomic_write(summary_path, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    return read_samsp(path)["metadata"]
