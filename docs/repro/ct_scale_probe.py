"""Why does the CT liver model (trained on ct_small) transfer poorly to the DICOM series? Inference-only probes."""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
from SAMSelfPromptLib.io import read_any
from SAMSelfPromptLib.io.dicom import read_dicom_series
from SAMSelfPromptLib.core.volume import Volume
from SAMSelfPromptLib.core.predictor import segment_volume, SegmentOptions
from SAMSelfPromptLib.core.masks import dice
from SAMSelfPromptLib.weights.catalogue import open_segmenter
import scipy.ndimage as ndi

D = "../shared/data/ct_totalseg/"
series = read_dicom_series(D + "dicom")
liver = read_any(D + "labels.nii.gz").array == 5
seg = open_segmenter(device="cpu", modality="CT").segmenter
opts = SegmentOptions(skip_slices=False)

def run(name, vol, truth=liver, back=None):
    t = time.time()
    mask, _ = segment_volume(seg, vol, opts)
    if back is not None:
        mask = back(mask)
    d = dice(mask > 0, truth)
    per = [round(dice(mask[k] > 0, truth[k]), 3) for k in range(len(truth))]
    print(json.dumps({"variant": name, "dice3d": round(d, 4), "per_slice_min": min(per), "seconds": round(time.time() - t, 1)}), flush=True)
    return d

a = series.array.astype(np.float32)
run("as is", series)
run("HU - 44 (liver mean of ct_small)", Volume((a - 44).astype(np.int16), series.ijk_to_ras, "CT", "shift"))
# Scale: ct_small shows the liver at 256/122/3 = 0.70 model px per mm; the series at 256/512/0.98 = 0.51.
# Zoom 1.37x about the body's centre (crop 374 px, resize to 512), then map the mask back.
j0, j1, i0, i1 = 159, 489, 4, 508
cj, ci, half = (j0 + j1) // 2, (i0 + i1) // 2, 187
cj = min(max(cj, half), 512 - half); ci = min(max(ci, half), 512 - half)
crop = a[:, cj - half:cj + half, ci - half:ci + half]
zoomed = ndi.zoom(crop, (1, 512 / crop.shape[1], 512 / crop.shape[2]), order=1)
def unzoom(mask):
    small = ndi.zoom(mask.astype(np.float32), (1, crop.shape[1] / 512, crop.shape[2] / 512), order=1) > 0.5
    out = np.zeros(liver.shape, bool)
    out[:, cj - half:cj - half + small.shape[1], ci - half:ci - half + small.shape[2]] = small
    return out
run("zoom 1.37x (ct_small's scale)", Volume(zoomed.astype(np.int16), series.ijk_to_ras, "CT", "zoom"), back=unzoom)
run("zoom 1.37x and HU - 44", Volume((zoomed - 44).astype(np.int16), series.ijk_to_ras, "CT", "zoomshift"), back=unzoom)
