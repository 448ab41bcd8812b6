"""Mask agreement with the naive fp32 path of the arithmetic a GPU ran before session 10 (the whole encoder module
under bf16 autocast), emulated with this CPU's bf16, against the folded copy every device now runs.

``.venv/bin/python -W ignore docs/repro/gpu_autocast_agreement.py`` (about 10 min on the 2-core CPU)"""
import torch

from SAMSelfPromptLib.cli.bench import naive_segmenter
from SAMSelfPromptLib.core.masks import dice
from SAMSelfPromptLib.core.predictor import Segmenter, SegmentOptions, segment_volume
from SAMSelfPromptLib.io import read_any
from SAMSelfPromptLib.weights.catalogue import open_segmenter

torch.set_num_threads(2)
inputs = (("CT series", "../shared/data/ct_totalseg/dicom", None),
          ("LA-MRI 23X6SY44", "../shared/data/la_mri/images/23X6SY44VT9KFHR7S7OC.nii.gz", "left-atrium-mr"))
for name, path, target in inputs:
    volume = read_any(path)
    opened = open_segmenter(device="cpu", modality=volume.modality, is_rgb=volume.is_rgb, target=target,
                            array=volume.array)
    model, metadata = opened.segmenter.model, opened.segmenter.metadata
    options = SegmentOptions(batch_size=1, skip_slices=False)
    naive, _ = segment_volume(naive_segmenter(model, torch.device("cpu"), metadata), volume, options)
    folded, _ = segment_volume(Segmenter(model, "cpu", metadata), volume, options)
    module = Segmenter(model, "cpu", metadata)
    module.use_folded_copy = False  # the module under autocast, as a GPU ran it before session 10
    autocast, _ = segment_volume(module, volume, options)
    print(f"{name}: Dice vs fp32, module under autocast {dice(autocast, naive):.4f}, folded copy {dice(folded, naive):.4f}",
          flush=True)
