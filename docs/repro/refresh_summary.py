"""Rewrite a shipped summary's checkpoint part (metadata, sha256) from the checkpoint beside it (session 13).

``.venv/bin/python docs/repro/refresh_summary.py SAMSelfPrompt/SAMSelfPromptLib/weights/NAME.json``: for a checkpoint
whose file changed after its summary was written (metadata set in place, or a new .pt copied over without its .json).
What ``evaluate --write-summary`` recorded (val rows, volumes) and the target, role, modality and description are kept:
they were measured on, or describe, the file as it is now. Written atomically."""
import json
import sys
from pathlib import Path

from SAMSelfPromptLib.io.files import atomic_write
from SAMSelfPromptLib.training.api import SUMMARY_METADATA_KEYS, write_summary

path = Path(sys.argv[1])
old = json.loads(path.read_text())
# what write_summary derives from the checkpoint goes; target and modality stay (the summary's come from the spec)
derived = (set(SUMMARY_METADATA_KEYS) - {"target", "modality"}) | {"file", "sha256", "data"}
kept = {k: v for k, v in old.items() if k not in derived}
atomic_write(path, lambda tmp: write_summary(path.with_suffix(".pt"), tmp, kept), overwrite=True)
print(f"rewrote {path}: sha256 {json.loads(path.read_text())['sha256'][:12]}...")
