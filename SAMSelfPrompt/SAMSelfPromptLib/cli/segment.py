"""`samselfprompt segment`: one input or a folder of them, one segmentation file per case.

Batch work splits like nnU-Net's: cases are sorted by name and part I of N takes
every N-th case starting at I, so parts are disjoint, deterministic and cover
everything; a scheduler (or torchrun, via RANK/WORLD_SIZE) can fan them out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, SamSelfPromptError
from ..core.volume import Volume
from ..io import list_dicom_series, read_any, read_dicom_series, write_labelmap
from ..io.files import OutputExistsError
from ..io.images import PICTURE_SUFFIXES, VOLUME_SUFFIXES
from ..io.writers import full_suffix as _suffix
from ..core.predictor import SegmentOptions, segment_volume

OUTPUT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".dcm")


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    series: str | None = None  # DICOM series id inside a folder


def _safe_name(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("._")
    return keep or "case"


def find_cases(input_path: str | os.PathLike, series: str | None = None) -> list[Case]:
    """A file is one case; a folder gives one case per DICOM series and per image file in it."""
    p = Path(input_path)
    if p.is_file():
        return [Case(_safe_name(p.name[: -len(_suffix(p))] if _suffix(p) else p.name), p)]
    if not p.is_dir():
        raise InputError(f"input not found: {p}")
    files = sorted(f for f in p.iterdir() if f.is_file() and _suffix(f) in VOLUME_SUFFIXES + PICTURE_SUFFIXES)
    cases = [Case(_safe_name(f.name[: -len(_suffix(f))]), f) for f in files]
    found = list_dicom_series(p)
    if series is not None:
        found = [s for s in found if series in (s["id"], s["uid"])]
        if not found:
            raise InputError(f"{p}: series '{series}' not found; run `samselfprompt series {p}` to list them")
    for s in found:
        label = s["description"] or s["id"]
        name = _safe_name(f"{s['modality']}_{label}" if s["modality"] else label)
        cases.append(Case(name, p, s["id"]))
    if not cases:
        try:  # the DICOM reader names what it did find (e.g. only non-image DICOM such as SR or SEG)
            read_dicom_series(p)
        except InputError as exc:
            raise InputError(f"{exc}; no image files ({', '.join(VOLUME_SUFFIXES + PICTURE_SUFFIXES)}) either") from None
        raise InputError(f"{p}: no DICOM series and no image files ({', '.join(VOLUME_SUFFIXES + PICTURE_SUFFIXES)})")
    # Two series may share a description: make output names unique, deterministically.
    seen: dict[str, int] = {}
    unique = []
    for c in sorted(cases, key=lambda c: (c.name, str(c.path), c.series or "")):
        n = seen.get(c.name, 0)
        seen[c.name] = n + 1
        unique.append(Case(c.name if n == 0 else f"{c.name}_{n + 1}", c.path, c.series))
    return unique


def select_part(cases: list[Case], part: int, num_parts: int) -> list[Case]:
    if num_parts < 1 or not (0 <= part < num_parts):
        raise InputError(f"--part must be in [0, {num_parts}) and --num-parts >= 1 (got part {part} of {num_parts})")
    return sorted(cases, key=lambda c: c.name)[part::num_parts]


def output_for(case: Case, output: Path, many: bool, fmt: str) -> Path:
    if many or output.is_dir() or str(output).endswith(os.sep):
        return output / f"{case.name}{fmt}"
    if _suffix(output) not in OUTPUT_SUFFIXES:
        raise InputError(f"{output}: unknown output type; end it with one of {', '.join(OUTPUT_SUFFIXES)}")
    return output


def parse_slices(text: str | None) -> tuple[int, int] | None:
    """'a:b' -> [a, b); 'k' -> [k, k+1)."""
    if not text:
        return None
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            return int(a), int(b)
        k = int(text)
        return k, k + 1
    except ValueError:
        raise InputError(f"--slices expects START:STOP or one index, got '{text}'") from None


def options_from_args(args: argparse.Namespace, volume: Volume) -> SegmentOptions:
    rng = parse_slices(args.slices)
    boxes = None
    if args.box is not None:
        from ..core.predictor import resolve_axis

        axis = resolve_axis(volume, args.axis)
        n = volume.array.shape[axis] if not volume.is_rgb else 1
        start, stop = rng or (0, n)
        boxes = {k: list(map(float, args.box)) for k in range(start, stop)}
    return SegmentOptions(
        axis=args.axis, slice_range=rng, boxes=boxes, propagate=args.propagate, cleanup_3d=args.cleanup,
        batch_size=args.batch_size, ct_window=args.window, skip_slices=not getattr(args, "all_slices", False),
    )


def check_output(out_path: Path, overwrite: bool) -> None:
    """Refuse an output that cannot be written before any work, not after segmenting."""
    if out_path.exists() and not overwrite:
        raise OutputExistsError(f"{out_path} already exists; choose another output or pass --overwrite")
    if out_path.is_dir():
        raise InputError(f"{out_path} is a folder; name an output file, or pass a folder without a file suffix")
    parent = out_path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the folders that atomic_write will create start below this one
    if not parent.is_dir():
        raise InputError(f"cannot write {out_path}: {parent} is a file, not a folder; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {out_path}: no permission to write in {parent}; "
                         "choose a folder you can write to")


def run_case(case: Case, out_path: Path, args: argparse.Namespace, opened_cache: dict) -> dict:
    from ..weights.catalogue import open_segmenter
    from ..core.predictor import resolve_axis
    from ..core.volume import check_segmentable

    t0 = time.perf_counter()
    check_output(out_path, args.overwrite)
    volume = read_any(case.path, case.series)
    if _suffix(out_path) == ".dcm" and not volume.source_files:
        raise InputError(f"{out_path}: a DICOM-SEG output needs a DICOM series as input ({case.path} is not "
                         "DICOM); save as .seg.nrrd or .nii.gz instead")
    check_segmentable(volume, resolve_axis(volume, args.axis), parse_slices(args.slices))  # before the model loads
    from ..weights.catalogue import input_kind, saved_user_targets

    # The guard: with no target fitting this input's kind, NoTargetError (exit 2) before any model runs.
    key = (input_kind(volume.modality, volume.is_rgb, volume.array), args.target)
    if key not in opened_cache:
        opened_cache[key] = open_segmenter(args.model, args.weights, args.checkpoint, args.device,
                                           volume.modality, volume.is_rgb, target=args.target,
                                           array=volume.array, force_target=args.force_target,
                                           extra_targets=saved_user_targets() if args.target else ())
        if getattr(args, "precision", None):  # before the first slice: the encoder is built for it
            from ..modeling.backbones import resolve_precision

            seg = opened_cache[key].segmenter
            seg.precision = resolve_precision(seg.device, args.precision)
    opened = opened_cache[key]
    options = options_from_args(args, volume)
    bar = _progress_bar(case.name, args.quiet)
    structures = list(opened.structures) or [None]
    mask = None
    results: list = []
    try:
        # One pass per structure of the target (label value = its position + 1); the Segmenter's slice
        # cache encodes each slice once for all of them. Where two overlap, the later one is kept.
        for index, _ in enumerate(structures):
            options.structure = index
            found, found_results = segment_volume(opened.segmenter, volume, options, progress=bar.update)
            mask = found.astype(np.uint8) if mask is None else np.where(found > 0, index + 1, mask).astype(np.uint8)
            results = results or found_results
            if index:
                results = [a if a.mask.any() else b for a, b in zip(results, found_results)]
    finally:
        bar.close()  # also on an error or Ctrl-C: the message then starts on a line of its own
    if structures == [None]:
        segments = [{"label": 1, "name": args.name, "color": (0.9, 0.6, 0.2)}]
    else:
        segments = [s.segment_entry(i + 1) for i, s in enumerate(structures)]
        if args.name != "SAM-SP" and len(segments) == 1:
            segments[0]["name"] = args.name
    write_labelmap(out_path, mask, volume.ijk_to_ras, segments, source_files=volume.source_files,
                   overwrite=args.overwrite)
    return {
        "case": case.name, "output": str(out_path), "slices": len(results),
        "with_object": sum(1 for r in results if r.mask.any()),
        "painted": painted_amount(volume, mask), "seconds": time.perf_counter() - t0,
        "model": opened.description,
    }


def painted_amount(volume, mask: np.ndarray) -> str:
    """How much was painted, in the unit the input supports: a volume in ml for a stack of slices, an
    area in pixels for one picture (PNG, JPEG: their 1 mm spacing is a reader's default, not a size)."""
    if volume.shape_kji[0] == 1:
        return f"{int(np.count_nonzero(mask))} pixels"
    return f"{np.count_nonzero(mask) * float(np.prod(volume.spacing)) / 1000.0:.1f} ml"


class _progress_bar:
    """Slices done / total with ETA on stderr (tqdm), silent with --quiet."""

    def __init__(self, name: str, quiet: bool):
        self._bar = None
        self._name = name
        self._quiet = quiet

    def update(self, done: int, total: int) -> None:
        if self._quiet:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self._name, unit="slice", file=sys.stderr, leave=False)
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def check_options(args: argparse.Namespace) -> None:
    """Option values that are wrong whatever the input: refused before any reading or model loading."""
    from ..core.preprocess import CT_WINDOWS

    parse_slices(args.slices)
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    if args.window not in CT_WINDOWS:
        raise InputError(f"unknown CT window '{args.window}' for --window; choose one of {', '.join(CT_WINDOWS)}")
    if args.device not in ("auto", None):
        from ..modeling.backbones import pick_device

        pick_device(args.device)  # DeviceError: names the device that is not here


def run(args: argparse.Namespace) -> int:
    check_options(args)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    cases = find_cases(args.input, args.series)
    part, num_parts = args.part, args.num_parts
    if part is None and num_parts is None and "WORLD_SIZE" in os.environ:  # launched by torchrun
        part, num_parts = int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
    cases = select_part(cases, part or 0, num_parts or 1)
    output = Path(args.output)
    all_cases = find_cases(args.input, args.series)
    many = len(all_cases) > 1
    if many and _suffix(output) in OUTPUT_SUFFIXES and not output.is_dir():
        names = ", ".join(c.series or c.name for c in all_cases[:4]) + (", ..." if len(all_cases) > 4 else "")
        raise InputError(f"{args.input} holds {len(all_cases)} cases ({names}) but {output} names one file; "
                         "give an output folder, or pick one series with --series ID "
                         f"(`samselfprompt series {args.input}` lists them)")
    if many:
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from ..io.files import write_failure

            raise write_failure(output, exc, "cannot create the output folder") from exc
    failures = 0
    opened: dict = {}
    for case in cases:
        out_path = output_for(case, output, many, args.format)
        try:
            s = run_case(case, out_path, args, opened)
        except SamSelfPromptError as exc:
            if not many:
                raise
            failures += 1
            print(f"FAILED {case.name}: {exc}", file=sys.stderr)
            continue
        print(f"{s['case']}: {s['with_object']}/{s['slices']} slices with object, {s['painted']}, "
              f"{s['seconds']:.1f} s, {s['model']} -> {s['output']}")
    if many:
        print(f"part {part or 0} of {num_parts or 1}: {len(cases) - failures} of {len(cases)} cases written"
              + (f", {failures} failed" if failures else ""))
    return 1 if failures else 0


def add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="litemedsam", help="backbone id (litemedsam, sam_vit_b/l/h, medsam_vit_b)")
    p.add_argument("--weights", help="backbone weights file (SAM/MedSAM); LiteMedSAM's are bundled")
    p.add_argument("--checkpoint", help="SAM-SP checkpoint (default: the shipped target for the input's kind)")
    p.add_argument("--target", help="a target by name (samselfprompt models lists them; default: the one for the "
                                    "input's kind, and none at all when no target fits: nothing is painted)")
    p.add_argument("--force-target", action="store_true",
                   help="run --target even on an input kind it was not trained for")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")


def register(subparsers) -> None:
    p = subparsers.add_parser("segment", help="prompt-free SAM-SP segmentation of a DICOM folder, volume or image")
    p.add_argument("input", help="DICOM folder, volume/image file, or a folder of series/images (batch)")
    p.add_argument("-o", "--output", required=True, help="output file (.seg.nrrd, .nii.gz, .nrrd, .dcm) or folder")
    add_common_model_args(p)
    p.add_argument("--axis", default="auto", help="auto/axial, coronal, sagittal, or array axis K, J, I")
    p.add_argument("--slices", help="slice range START:STOP along the axis (default: all)")
    p.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"),
                   help="expert box in slice pixels, used on every selected slice instead of self-prompting")
    p.add_argument("--propagate", action="store_true", help="carry each slice's box to the next slice")
    p.add_argument("--cleanup", action="store_true", help="keep only the largest 3D connected component")
    p.add_argument("--window", default="abdomen", help="CT window preset when the checkpoint does not set one")
    p.add_argument("--batch-size", type=int, default=None,
                   help="slices encoded per batch (default: 1 on the CPU, 4 on a GPU)")
    p.add_argument("--series", help="segment only this DICOM series id/UID from the folder")
    p.add_argument("--name", default="SAM-SP", help="segment name written into the output")
    p.add_argument("--format", default=".seg.nrrd", choices=OUTPUT_SUFFIXES, help="output type in batch mode")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--part", type=int, help="this worker's part index (0-based), with --num-parts")
    p.add_argument("--num-parts", type=int, help="split the batch into this many disjoint parts")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="encoder precision (default auto: bf16 on GPUs and CPUs with native bf16, else fp32; "
                        "also $SAMSELFPROMPT_PRECISION)")
    p.add_argument("--all-slices", action="store_true",
                   help="encode every slice (default: skip air and encode coarse to fine around the target)")
    p.set_defaults(func=run)

    s = subparsers.add_parser("series", help="list the DICOM series in a folder")
    s.add_argument("folder")
    s.set_defaults(func=_run_series)


def _run_series(args: argparse.Namespace) -> int:
    for s in list_dicom_series(args.folder):
        print(f"{s['id']}\t{s['modality']}\t{s['num_files']} files\t{s['description']}")
    return 0
