"""Training data for a shipped target, from its folder in shared/data (``weights.targets.TARGETS``).

2D sets (PH2, BUSI, HC18): the split's images and masks; BUSI's normal images have empty masks
and are the negatives. 3D sets (LA-MRI, ACDC): every K slice of each volume, one sample per
structure, so slices without a structure are that structure's negatives; the recipe's
``train_slice_step`` keeps every n-th training slice (neighbouring slices are near copies),
val keeps them all (3D Dice and the false-positive rate need every slice).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..errors import InputError
from ..weights.targets import TargetSpec
from .data import Sample, load_folder, load_volume


def split_ids(root: Path, split: str) -> list[str]:
    splits_file = root / "splits.json"
    if not splits_file.is_file():
        raise InputError(f"{root}: no splits.json; a target is trained from a folder with train/val splits")
    splits = json.loads(splits_file.read_text())
    if split not in splits:
        raise InputError(f"{splits_file}: no split '{split}' (has {', '.join(splits)})")
    return list(splits[split])


def volume_cases(spec: TargetSpec, root: Path, ids: Sequence[str], slice_step: int = 1,
                 negative_step: int | None = None) -> list[list[Sample]]:
    """Per volume: its samples, one per (slice, structure), structure index set.

    Every ``slice_step``-th slice, and with ``negative_step`` also every ``negative_step``-th slice
    without the structure: the slices past a structure's ends are where a 3D target paints what is
    not there, and every 8th slice keeps only a few of them."""
    out = []
    for case in ids:
        image, label = root / "images" / f"{case}.nii.gz", root / "labels" / f"{case}.nii.gz"
        samples: list[Sample] = []
        for index, structure in enumerate(spec.structures):
            for k, s in enumerate(load_volume(image, label, structure.label_ids)):
                extra_negative = negative_step is not None and not s.has_label and k % negative_step == 0
                if k % slice_step != 0 and not extra_negative:
                    continue
                s.structure = index
                s.case_id = f"{case}:{s.case_id.split(':')[-1]}:{structure.name}"
                samples.append(s)
        out.append(samples)
    return out


def target_samples(spec: TargetSpec, data_root: str | Path, split: str, whole_split: bool = False) -> list[Sample]:
    """The split's samples for ``spec`` (train subsampled by the recipe; val cut to the recipe's CPU
    budget unless ``whole_split``)."""
    root = Path(data_root) / spec.dataset
    if not root.is_dir():
        raise InputError(f"{root}: the {spec.name} training data is not there (see shared/data/README.md)")
    ids = split_ids(root, split)
    train = split == "train"
    if spec.layout == "2d":
        # A CPU budget: the first n ids of the split (splits.json lists them in a seeded random order).
        limit = None if whole_split and not train else spec.recipe.get("max_train" if train else "max_val")
        return load_folder(root, ids=ids[:limit] if limit else ids)
    step = int(spec.recipe.get("train_slice_step", 1)) if train else 1
    negative_step = int(spec.recipe["train_negative_step"]) if train and spec.recipe.get("train_negative_step") else None
    if not train and not whole_split and spec.recipe.get("val_volumes"):  # a CPU budget: the first n
        ids = ids[:int(spec.recipe["val_volumes"])]
    return [s for case in volume_cases(spec, root, ids, step, negative_step) for s in case]
