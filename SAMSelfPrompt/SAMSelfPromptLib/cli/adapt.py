"""`samselfprompt adapt-eval`: Adapt measured on the val volumes of LA-MRI and ACDC.

For each val volume and each k, the k annotated slices are spread over the structure (what a
user would outline), Adapt trains from the chosen start, then the rest is segmented from those
slices outward. Reported per (dataset, k, start, extent given or not): Dice over the slices that
were not annotated (3D, those slices only), the false-positive rate (share of the slices without
the structure where anything was painted) and the Adapt time (embedding of the training slices +
training; segmentation of the rest is timed apart).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..io.files import write_text_atomic

DATASETS = {"la_mri": (1,), "acdc": (3,)}  # ACDC: the left ventricle


def register(subparsers) -> None:
    p = subparsers.add_parser("adapt-eval", help="measure Adapt (few annotated slices) on LA-MRI / ACDC val volumes")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--starts", nargs="+", default=["auto"],
                   help="auto (nearest shipped target of the modality, else vanilla), vanilla, or shipped "
                        "checkpoint names/paths")
    p.add_argument("--extent", choices=("given", "none", "both"), default="both",
                   help="give Adapt the true first/last slice, none, or run both")
    p.add_argument("--start-k", type=int, nargs="+", default=None,
                   help="compare --starts only at these k (the first start runs every k)")
    p.add_argument("--max-volumes", type=int, default=None)
    p.add_argument("--cases", nargs="+", default=None, help="only these val case ids")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cache", help="embedding cache folder")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write every run here (JSON lines, appended as they finish)")
    p.add_argument("--summarize", nargs="+", metavar="JSONL", help="only print the table of earlier runs' JSON lines")
    p.add_argument("--markdown", help="write the summary table here")
    p.set_defaults(func=run_adapt_eval)


def _start(name: str):
    from ..training.adapt import start_checkpoint
    from ..weights.catalogue import shipped_models

    if name == "auto":
        return start_checkpoint("MR")
    if name == "vanilla":
        return "vanilla", None
    for m in shipped_models():
        if m.name == name:
            return m.name, m.path
    return Path(name).stem, Path(name)


def run_adapt_eval(args) -> int:
    import torch

    from ..core.preprocess import guess_intensity
    from ..training.adapt import AdaptConfig, SliceEmbeddings, adapt_model, pick_annotated, segment_adapted, true_extent
    from ..training.api import base_model
    from ..training.data import read_volume
    from ..training.embedding_cache import DiskEmbeddingCache

    if args.summarize:
        runs = [json.loads(line) for f in args.summarize for line in Path(f).read_text().splitlines() if line.strip()]
        rows = list({(r["dataset"], r["case"], r["k"], r["start"], r["extent"]): r for r in runs}.values())  # last wins
        table = summary_table(rows)
        print(table)
        if args.markdown:
            write_text_atomic(args.markdown, table + "\n")
        return 0
    if not args.json:
        raise SystemExit("adapt-eval: --json is required (or --summarize)")
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = DiskEmbeddingCache(args.cache)
    config = AdaptConfig() if args.steps is None else AdaptConfig(steps=args.steps)
    starts = [_start(s) for s in args.starts]
    variants = {"given": [True], "none": [False], "both": [True, False]}[args.extent]
    out = Path(args.json)
    rows = []
    for ds in args.datasets:
        root = Path(args.data_root) / ds
        ids = json.loads((root / "splits.json").read_text())["val"]
        ids = [c for c in ids if args.cases is None or c in args.cases][: args.max_volumes]
        for case in ids:
            image, spacing = read_volume(root / "images" / f"{case}.nii.gz")
            labels, _ = read_volume(root / "labels" / f"{case}.nii.gz")
            truth = np.isin(labels, DATASETS[ds])
            intensity = guess_intensity(image)
            for k in args.k:
                for si, (start, path) in enumerate(starts):
                    if si and args.start_k and k not in args.start_k:
                        continue
                    for given in variants:
                        annotated = pick_annotated(truth, k)
                        extent = true_extent(truth) if given else None
                        model = base_model(path)
                        emb = SliceEmbeddings(model, image, intensity, cache)
                        t0, c0 = time.time(), time.process_time()
                        outcome = adapt_model(model, image, {a: truth[a] for a in annotated}, intensity, extent,
                                              slice_mm=float(spacing[0]), config=config, embeddings=emb)
                        t1, c1 = time.time(), time.process_time()
                        pred, res = segment_adapted(outcome.model, emb, {a: truth[a] for a in annotated},
                                                    outcome.presence_threshold, extent, config.patience)
                        seg_s = time.time() - t1
                        row = {"dataset": ds, "case": case, "k": k, "start": start, "extent": given,
                               **score(pred, truth, annotated), "adapt_s": round(t1 - t0, 1), "adapt_cpu_s": round(c1 - c0, 1),
                               "embed_s": round(outcome.embed_seconds, 1), "train_s": round(outcome.train_seconds, 1),
                               "segment_s": round(seg_s, 1), "slices_run": len(res.visited),
                               "encoded": emb.encoded, "negatives": outcome.negatives, "annotated": annotated,
                               "presence_threshold": outcome.presence_threshold}
                        rows.append(row)
                        with open(out, "a") as fh:
                            fh.write(json.dumps(row) + "\n")
                        print(json.dumps(row), flush=True)
    table = summary_table(rows)
    print(table)
    if args.markdown:
        write_text_atomic(args.markdown, table + "\n")
    return 0


def score(pred: np.ndarray, truth: np.ndarray, annotated) -> dict:
    rest = np.ones(truth.shape[0], bool)
    rest[list(annotated)] = False
    p, t = pred[rest], truth[rest]
    denom = p.sum() + t.sum()
    dice = float(2 * (p & t).sum() / denom) if denom else 1.0
    neg = [k for k in range(truth.shape[0]) if rest[k] and not truth[k].any()]
    fp = sum(bool(pred[k].any()) for k in neg)
    pos = [k for k in range(truth.shape[0]) if rest[k] and truth[k].any()]
    missed = sum(not pred[k].any() for k in pos)
    return {"dice": round(dice, 4), "fp_slices": fp, "n_negative": len(neg), "missed_slices": missed,
            "n_positive": len(pos)}


def summary_table(rows: list[dict]) -> str:
    """Mean Dice (unannotated slices), pooled false-positive rate and mean/max Adapt time per group."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["start"], r["extent"], r["k"]), []).append(r)
    lines = ["| data | start | extent given | k | volumes | Dice (unannotated slices) | FP rate (slices without it) "
             "| missed slices | Adapt s, wall (mean / max) | Adapt s, CPU (mean / max) | segment s (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (ds, start, given, k), rs in sorted(groups.items(), key=lambda x: (x[0][0], x[0][1], not x[0][2], x[0][3])):
        neg = sum(r["n_negative"] for r in rs)
        fp = sum(r["fp_slices"] for r in rs)
        pos = sum(r["n_positive"] for r in rs)
        lines.append(f"| {ds} | {start} | {'yes' if given else 'no'} | {k} | {len(rs)} | "
                     f"{np.mean([r['dice'] for r in rs]):.3f} | "
                     f"{(f'{fp / neg:.1%} ({fp}/{neg})') if neg else 'n/a (0 slices)'} | "
                     f"{sum(r['missed_slices'] for r in rs)}/{pos} | "
                     f"{np.mean([r['adapt_s'] for r in rs]):.1f} / {max(r['adapt_s'] for r in rs):.1f} | "
                     f"{_cpu(rs)} | "
                     f"{np.mean([r['segment_s'] for r in rs]):.1f} |")
    return "\n".join(lines)


def _cpu(rows: list[dict]) -> str:
    """Process CPU seconds of Adapt (1 thread: what it takes on a core of its own), where recorded."""
    cpu = [r["adapt_cpu_s"] for r in rows if "adapt_cpu_s" in r]
    return f"{np.mean(cpu):.1f} / {max(cpu):.1f}" if cpu else "n/a"

