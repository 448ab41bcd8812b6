"""CLI commands ``train`` and ``evaluate``; cli.py calls ``register(subparsers)``.

Each handler returns an exit code; user errors (SamSelfPromptError) are printed by the host.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..core.preprocess import CT_WINDOWS, ct_window
from ..io.files import write_text_atomic

DEFAULT_PH2_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "samsp_ph2_litemedsam.pt"


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", help="2D folder with images/, masks/ (and splits.json)")
    p.add_argument("--image", help="3D volume (NIfTI, NRRD, ...) instead of a 2D folder")
    p.add_argument("--label", help="label map on the same grid as --image")
    p.add_argument("--label-id", type=int, nargs="+", default=None, help="label value(s) that make the mask")
    p.add_argument("--ct-window", default="abdomen", choices=sorted(CT_WINDOWS), help="CT window for 3D CT input")
    p.add_argument("--cache", help="embedding cache folder (default $SAMSELFPROMPT_CACHE/embeddings, or ~/.cache/samselfprompt/embeddings)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--target", help="a shipped target (samselfprompt models): its data, labels and recipe "
                                    "(train) or its checkpoint and val data (evaluate)")
    p.add_argument("--data-root", default=os.environ.get("SAMSELFPROMPT_DATA", "../shared/data"),
                   help="folder holding the targets' data sets (default $SAMSELFPROMPT_DATA or ../shared/data)")


def register(subparsers) -> None:
    t = subparsers.add_parser("train", help="train SAM-SP (cpu mode: cached embeddings; paper mode: LoRA)")
    _data_args(t)
    t.add_argument("--split", default="train", help="training split of a 2D folder (default train; 'all' for every image)")
    t.add_argument("--val-split", default="val", help="model-selection split (default val; 'none' to skip)")
    t.add_argument("--val-image", help="3D: a second volume for model selection")
    t.add_argument("--val-label", help="3D: its label map")
    t.add_argument("-o", "--out", required=True, help="SAM-SP checkpoint to write (.pt)")
    t.add_argument("--mode", choices=("cpu", "paper"), default="cpu")
    t.add_argument("--method", choices=("samsp", "promise"), default="samsp",
                   help="samsp (default): self-prompting SAM; promise: ProMISe's APM + IPS on the frozen backbone "
                        "(cpu mode, cached embeddings)")
    t.add_argument("--gt-point-fraction", type=float, default=0.25,
                   help="promise: share of IPS training images prompted with ground-truth points (default 0.25)")
    t.add_argument("--epochs", "--max-epochs", dest="epochs", type=int, default=None,
                   help="training epochs (default: the trainer's, 8)")
    t.add_argument("--val-from", type=int, default=0, metavar="EPOCH",
                   help="first epoch scored on val for model selection (default 0: the second half; 1: every epoch)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4 for samsp, 2e-3 for promise)")
    t.add_argument("--alpha", type=float, default=1.0, help="KL weight")
    t.add_argument("--box-jitter", type=float, default=0.1)
    t.add_argument("--flip", action="store_true", help="flip cached embeddings (approximate augmentation)")
    t.add_argument("--augment", type=int, default=0, metavar="N",
                   help="N augmented copies of every training image (flips, crops, colour or contrast), each encoded "
                        "and cached once: the cache grows (N + 1)x; val is never augmented")
    t.add_argument("--objective", choices=("samsp", "single"), default="samsp",
                   help="single: Dice on the no-prompt pass only (the no_self_prompt ablation)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--click-rounds", type=int, default=0,
                   help="click training: up to N simulated click rounds per step (cpu mode), joint with SAM-SP")
    t.add_argument("--click-weight", type=float, default=1.0, help="weight of the click-round Dice loss")
    t.add_argument("--lora-rank", type=int, default=4)
    t.add_argument("--encoder-from-stage", type=int, default=None, metavar="K",
                   help="cpu mode: also train LiteMedSAM's TinyViT stages K.. (1-3) and its neck with the decoder, on "
                        "cached inputs of stage K (default 0: the encoder frozen; a target's recipe may set it)")
    t.add_argument("--encoder-lr", type=float, default=None,
                   help="learning rate of those encoder stages (default 5e-5, or the recipe's)")
    t.add_argument("--init", help="start from this SAM-SP checkpoint instead of vanilla LiteMedSAM")
    t.add_argument("--work-dir", help="log.jsonl and last.pt for --resume (default: OUT minus .pt + '_work')")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--half", choices=("auto", "yes", "no"), default="auto",
                   help="store fp16 (auto: only if val Dice moves by at most 0.002)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--fewshot-slices", type=int, nargs="+", default=None,
                   help="3D few-shot: train only on these slice indices (k) of --image, then segment the rest")
    t.add_argument("--segment-out", help="few-shot: write the segmented label volume here (on --image's own grid)")
    t.add_argument("--extent", type=int, nargs=2, metavar=("FIRST", "LAST"), default=None,
                   help="few-shot (Adapt): the first and last slice that contain the target; slices outside are "
                        "negatives and nothing is written there (default: a guess, see training/adapt.py)")
    t.add_argument("--empty-slices", type=int, nargs="+", default=(), metavar="K",
                   help="few-shot (Adapt): slices known to be empty (trained as negatives)")
    t.add_argument("--name", help="few-shot (Adapt): the target's name in the saved model (default: the output file's stem)")
    t.set_defaults(func=run_train)

    e = subparsers.add_parser("evaluate", help="Dice/IoU/HD95 of vanilla prompting vs SAM-SP")
    _data_args(e)
    e.add_argument("--split", default=None, help="evaluate only this split of a 2D folder (default: all images)")
    e.add_argument("--checkpoint", help=f"SAM-SP checkpoint (default: the shipped {DEFAULT_PH2_CHECKPOINT.name}; "
                                        "'none': no SAM-SP rows)")
    e.add_argument("--promise-checkpoint", help="ProMISe checkpoint (train --method promise): rows promise, "
                                                "promise_apm (its APM map alone), promise_ips_gt_points")
    e.add_argument("--alpha0-checkpoint", help="ablation: trained with alpha = 0 (row samsp_alpha0)")
    e.add_argument("--no-self-prompt-checkpoint", help="ablation: trained without self-prompt (row no_self_prompt)")
    e.add_argument("--json", required=True, help="write rows and per-case metrics here")
    e.add_argument("--whole-split", action="store_true",
                   help="with --target: every image or volume of the split, not the recipe's CPU budget of them")
    e.add_argument("--write-summary", action="store_true",
                   help="with --target: record the val rows (and 3D metrics) in the checkpoint's JSON summary")
    e.add_argument("--clicks", type=int, default=0, metavar="N",
                   help="also simulate up to N expert clicks from the prompt-free result (Dice after 1/3/5, NoC@85/90)")
    e.add_argument("--clicks-baseline-checkpoint", action="append", default=[], metavar="NAME=FILE",
                   help="extra SAM-SP checkpoint(s) for the click table, e.g. no_click_training=old.pt")
    e.set_defaults(func=run_evaluate)


def _cache(args):
    from ..training.embedding_cache import DiskEmbeddingCache

    return DiskEmbeddingCache(args.cache)


def windowed_as_segment_runs(samples: list, metadata: dict) -> list:
    """Each volume's slices with the window ``segment`` shows the model for this checkpoint (its
    "field_of_view_mm", core/preprocess.scale_window), so evaluate scores what users get. Every row
    (vanilla prompts included) then sees that window; pictures and checkpoints without it are unchanged."""
    from dataclasses import replace

    from ..core.preprocess import scale_window

    fov = metadata.get("field_of_view_mm")
    if not fov:
        return samples
    by_case: dict[str, list[int]] = {}
    for n, s in enumerate(samples):
        if s.image.ndim == 2:  # a volume's slices are "<volume>:<k>" (training.data.volume_samples)
            by_case.setdefault(s.case_id.rsplit(":", 1)[0], []).append(n)
    out = list(samples)
    for idx in by_case.values():
        first = samples[idx[0]]
        window = scale_window([samples[n].image for n in idx], first.spacing, float(fov), first.intensity)
        for n in idx:
            out[n] = replace(samples[n], window=window)
    return out


def _volume_samples(image: str, label: str, ids, window: str):
    from ..training.data import load_volume

    if not ids:
        raise SystemExit("--label-id is required with --image/--label")
    return load_volume(image, label, ids, intensity=ct_window(window) if _is_ct(image) else None)


def _is_ct(path: str) -> bool:
    from ..training.data import read_volume

    arr, _ = read_volume(path, None)
    return float(arr.min()) < -500


def run_train(args) -> int:
    import torch

    from ..training.api import base_model, train_samples
    from ..training.data import folder_ids, load_folder
    from ..training.trainer import TrainConfig

    torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    if args.method == "promise" and (args.fewshot_slices is not None or args.mode != "cpu" or args.init or args.resume):
        raise SystemExit("--method promise trains in cpu mode from vanilla weights (no --fewshot-slices, --init, --resume)")
    config = TrainConfig(mode=args.mode, epochs=args.epochs or TrainConfig.epochs, batch_size=args.batch_size,
                         lr=args.lr or TrainConfig.lr, alpha=args.alpha,
                         box_jitter=args.box_jitter, flip=args.flip, objective=args.objective, seed=args.seed,
                         lora_rank=args.lora_rank, lora_alpha=float(args.lora_rank),
                         click_rounds=args.click_rounds, click_weight=args.click_weight, val_from=args.val_from,
                         encoder_from_stage=args.encoder_from_stage or 0,
                         encoder_lr=args.encoder_lr or TrainConfig.encoder_lr)
    t0 = time.time()
    if args.fewshot_slices is not None:
        from ..training.fewshot import fewshot_command

        return fewshot_command(args, config)
    if args.target:
        return _train_target(args, config, t0)
    if args.image:
        train = _volume_samples(args.image, args.label, args.label_id, args.ct_window)
        val = _volume_samples(args.val_image, args.val_label, args.label_id, args.ct_window) if args.val_image else None
        summary = {"source": "volume", "image": Path(args.image).name, "label": Path(args.label).name,
                   "label_ids": args.label_id, "n_train": len(train), "n_train_with_label": sum(s.has_label for s in train),
                   "n_val": len(val or [])}
    else:
        if not args.data:
            raise SystemExit("give a 2D DATA folder or --image/--label")
        split = None if args.split == "all" else args.split
        train = load_folder(args.data, split)
        val = None
        if args.val_split != "none" and (Path(args.data) / "splits.json").is_file() and split is not None:
            val = load_folder(args.data, args.val_split)
        summary = {"source": "folder", "folder": Path(args.data).name, "split": args.split, "val_split": args.val_split,
                   "n_train": len(train), "n_val": len(val or []),
                   "train_ids": folder_ids(args.data, split) if split else None}
    train, summary = _with_augmented_copies(train, summary, args)
    if args.method == "promise":
        return _train_promise(args, train, val, summary, t0)
    device, rank = _init_distributed(args.device)
    model = base_model(args.init, device=device)
    work = args.work_dir or str(Path(args.out).with_suffix("")) + "_work"
    result, meta = train_samples(train, val, args.out if rank == 0 else None, config, model, summary,
                                 work_dir=work if rank == 0 else None, resume=args.resume,
                                 half=args.half, cache=_cache(args), progress=not args.no_progress and rank == 0)
    print(f"trained in {time.time() - t0:.0f} s; best epoch {result.best_epoch}; val {result.best_val}")
    return 0


def _with_augmented_copies(train: list, summary: dict, args) -> tuple[list, dict]:
    """``--augment N``: N augmented copies of every training sample (training/augment.py); val untouched."""
    if not args.augment:
        return train, summary
    from ..training.augment import augmented_copies

    return augmented_copies(train, args.augment, args.seed), {**summary, "augment_copies": args.augment,
                                                               "n_train_augmented": len(train) * (1 + args.augment)}


def _train_target(args, config, t0: float) -> int:
    """train --target NAME: the target's data and recipe; writes the checkpoint and its JSON summary."""
    from dataclasses import replace

    from ..training.api import base_model, train_samples, write_summary
    from ..training.targets import target_samples
    from ..weights.targets import target_spec

    spec = target_spec(args.target)
    if args.epochs is None and spec.recipe.get("epochs"):
        config = replace(config, epochs=int(spec.recipe["epochs"]))
    if args.lr is None and spec.recipe.get("lr"):
        config = replace(config, lr=float(spec.recipe["lr"]))
    if spec.recipe.get("y0_weight"):
        config = replace(config, y0_weight=float(spec.recipe["y0_weight"]))
    if args.encoder_from_stage is None and spec.recipe.get("encoder_from_stage"):
        config = replace(config, encoder_from_stage=int(spec.recipe["encoder_from_stage"]))
    if args.encoder_lr is None and spec.recipe.get("encoder_lr"):
        config = replace(config, encoder_lr=float(spec.recipe["encoder_lr"]))
    if args.init is None and spec.recipe.get("init"):  # a shipped SAM-SP start: its pass 1 already finds objects
        from ..weights.catalogue import WEIGHTS_DIR

        args.init = str(WEIGHTS_DIR / spec.recipe["init"])
    train = target_samples(spec, args.data_root, "train")
    val = target_samples(spec, args.data_root, "val")
    summary = {"source": "target", "target": spec.name, "dataset": spec.dataset, "split": "train", "val_split": "val",
               "n_train": len(train), "n_train_negative": sum(not s.has_label for s in train),
               "n_val": len(val), "n_val_negative": sum(not s.has_label for s in val), "recipe": spec.recipe}
    train, summary = _with_augmented_copies(train, summary, args)
    model = base_model(args.init, device=None if args.device == "auto" else args.device)
    model.set_structures(len(spec.structures))
    work = args.work_dir or str(Path(args.out).with_suffix("")) + "_work"
    result, meta = train_samples(train, val, args.out, config, model, summary, work_dir=work, resume=args.resume,
                                 half=args.half, cache=_cache(args), progress=not args.no_progress,
                                 extra_metadata={"target": spec.to_dict(), "role": "auto", "kind": spec.kinds[0]})
    write_summary(args.out, Path(args.out).with_suffix(".json"), {
        "target": spec.to_dict(), "role": "auto", "modality": spec.kinds[0],
        "description": f"{spec.title}: prompt-free SAM-SP, LiteMedSAM base, trained on {spec.dataset} train, "
                       f"selected on {spec.dataset} val" + (" (NON-COMMERCIAL terms)" if spec.noncommercial else "")})
    print(f"trained {spec.name} in {time.time() - t0:.0f} s; best epoch {result.best_epoch}; val {result.best_val}")
    return 0


def _train_promise(args, train, val, summary, t0: float) -> int:
    """ProMISe: APM + IPS on the frozen backbone, written in the SAM-SP checkpoint format."""
    from ..training.api import base_model
    from ..training.promise_trainer import PromiseConfig, train_promise_samples

    config = PromiseConfig(epochs=args.epochs or PromiseConfig.epochs, batch_size=args.batch_size,
                           lr=args.lr or PromiseConfig.lr, seed=args.seed, val_from=args.val_from,
                           gt_point_fraction=args.gt_point_fraction)
    result, _ = train_promise_samples(train, val, args.out, config, base_model(None, device=args.device), summary,
                                      cache=_cache(args), progress=not args.no_progress)
    print(f"trained in {time.time() - t0:.0f} s; best epoch {result.best_epoch}; val {result.best_val}")
    return 0


def _init_distributed(device: str) -> tuple[str, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group, one GPU per local rank (nccl),
    or gloo on CPUs. Returns the device to use and this process's rank."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
        return f"cuda:{local}", dist.get_rank()
    return "cpu", dist.get_rank()


def run_evaluate(args) -> int:
    import torch

    from ..weights.checkpoint import load_samsp
    from ..evaluation.evaluate import evaluate_samples
    from ..modeling.backbones import build_model, pick_device
    from ..training.data import load_folder

    torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    spec = None
    if args.target:
        from ..training.targets import target_samples
        from ..weights.catalogue import find_target
        from ..weights.targets import target_spec

        spec = target_spec(args.target)
        samples = target_samples(spec, args.data_root, args.split or "val", whole_split=args.whole_split)
        if not args.checkpoint:
            args.checkpoint = str(find_target(spec.name).path)
    elif args.image:
        samples = _volume_samples(args.image, args.label, args.label_id, args.ct_window)
    elif args.data:
        samples = load_folder(args.data, args.split)
    else:
        raise SystemExit("give a 2D DATA folder or --image/--label")
    device = pick_device(args.device)
    vanilla = build_model().to(device)
    ckpt = args.checkpoint or str(DEFAULT_PH2_CHECKPOINT)
    trained, thresholds = {}, {}
    if ckpt != "none":
        model, meta = load_samsp(ckpt)
        trained["samsp"] = model.to(device)
        thresholds["samsp"] = float(meta.get("presence_threshold") or 0.0)
        samples = windowed_as_segment_runs(samples, meta)
    if args.promise_checkpoint:
        trained["promise"] = load_samsp(args.promise_checkpoint)[0].to(device)
    if args.alpha0_checkpoint:
        trained["samsp_alpha0"] = load_samsp(args.alpha0_checkpoint)[0].to(device)
    if args.no_self_prompt_checkpoint:
        trained["no_self_prompt"] = load_samsp(args.no_self_prompt_checkpoint)[0].to(device)
    result = evaluate_samples(vanilla, trained, samples, _cache(args), progress=True,
                              presence_thresholds=thresholds)
    print(result.markdown())
    out = result.to_json()
    if spec is not None:
        out["target"] = spec.name
        if spec.layout == "3d":
            out["volumes"] = result.volume_metrics([s.case_id for s in samples], [s.mask for s in samples],
                                                   [spec.structures[s.structure].name for s in samples])
            print(result.volume_markdown(out["volumes"]))
        if args.write_summary:
            _record_val_rows(Path(args.checkpoint), out, args.split or "val")
    out["checkpoint"] = ckpt
    if args.promise_checkpoint:
        out["promise_checkpoint"] = args.promise_checkpoint
    if args.clicks:
        out["clicks"], out["clicks_rows"] = _click_metrics(args, vanilla, trained, samples, device)
    write_text_atomic(args.json, json.dumps(out, indent=1))
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _record_val_rows(checkpoint: Path, out: dict, split: str) -> None:
    """The val table beside a target's checkpoint, for `samselfprompt models` and the hosts."""
    summary_path = checkpoint.with_suffix(".json")
    if not summary_path.is_file():
        raise SystemExit(f"--write-summary: {summary_path} does not exist (train --target writes it)")
    summary = json.loads(summary_path.read_text())
    summary["val_rows"] = {row: {k: v for k, v in m.items()} for row, m in out["rows"].items()}
    summary["val_rows_split"] = split
    if "volumes" in out:
        summary["val_volumes"] = out["volumes"]
    text = json.dumps(summary, indent=1) + "\n"
    write_text_atomic(summary_path, text)
    print(f"recorded the val rows in {summary_path}", file=sys.stderr)


def _click_metrics(args, vanilla, trained, samples, device) -> tuple[dict, dict]:
    """Rows: the untrained model (baseline), the evaluated checkpoint(s) (samsp, promise), and any named extras.

    ProMISe clicks in its promptable mode (APM points + clicks, IPS); row promise_plain_decoder clicks with
    SAM-SP's protocol (box of its output + clicks + previous logits) on its untouched decoder."""
    from ..weights.checkpoint import load_samsp
    from ..evaluation.clicks import PLAIN_DECODER_SUFFIX, click_rows, clicks_markdown, prompt_free_starts

    emb, frames = _cache(args).embed(vanilla, samples, progress=True)
    models = {"vanilla": vanilla, **{k: trained[k] for k in ("samsp", "promise") if k in trained}}
    if "promise" in trained:  # its clicks also on the untouched decoder with SAM-SP's protocol, for comparison
        models["promise" + PLAIN_DECODER_SUFFIX] = trained["promise"]
    for spec in args.clicks_baseline_checkpoint:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--clicks-baseline-checkpoint expects NAME=FILE, got '{spec}'")
        models[name] = load_samsp(path)[0].to(device)
    rows = {name: (m, *prompt_free_starts(m, emb, frames, vanilla=name == "vanilla")) for name, m in models.items()}
    table = click_rows(rows, emb, frames, [s.mask for s in samples], max_clicks=args.clicks)
    print(clicks_markdown(table))
    main = "samsp" if "samsp" in table else next(iter(table))
    summary = {k: v for k, v in table[main].items() if k != "per_case"}
    return summary, table


def main(argv=None) -> int:
    """Only train and evaluate (tests call it in-process); `samselfprompt` itself is cli.main."""
    parser = argparse.ArgumentParser(prog="samselfprompt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
