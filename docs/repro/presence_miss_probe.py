"""Where a 2D presence-trained target misses, and whether a looser pass 1 or an image-level classifier finds the missed
images without painting the negatives (session 14). Val only, for selection; nothing here is shipped.

``.venv/bin/python -W ignore docs/repro/presence_miss_probe.py breast-lesion-us [CHECKPOINT]`` (about 7 min the first
time: the train images are encoded and cached)

1. Every val image with the structure that SAM-SP misses (Dice < 0.3): was pass 1 empty or did it paint elsewhere?
2. The largest pass-1 logit of the missed images against the images without the structure.
3. A looser pass 1 where the shipped rule finds nothing: the box around pass-1 logits above T (T < 0), pass 2 kept when
   its predicted IoU is above G.
4. The same, gated instead by a logistic regression on the pooled image embedding (mean, max, std of each channel),
   fitted on the train split's presence labels.
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F

from SAMSelfPromptLib.core.masks import dice
from SAMSelfPromptLib.core.preprocess import logits_to_slice
from SAMSelfPromptLib.core.selfprompt import box_from_logits
from SAMSelfPromptLib.evaluation.evaluate import full_boxes, samsp_logits
from SAMSelfPromptLib.training.embedding_cache import DiskEmbeddingCache
from SAMSelfPromptLib.training.targets import target_samples
from SAMSelfPromptLib.weights.catalogue import find_target
from SAMSelfPromptLib.weights.checkpoint import load_samsp
from SAMSelfPromptLib.weights.targets import target_spec

torch.set_num_threads(2)
name = sys.argv[1]
model, meta = load_samsp(sys.argv[2] if len(sys.argv) > 2 else find_target(name).path)
threshold = meta.get("presence_threshold") or 0.0
cache = DiskEmbeddingCache()


def split(which: str):
    samples = target_samples(target_spec(name), "../shared/data", which, whole_split=True)
    emb, frames = cache.embed(model, samples, progress=False)
    return samples, emb.float(), frames


def pooled(emb: torch.Tensor) -> torch.Tensor:
    return torch.cat([emb.mean(dim=(2, 3)), emb.amax(dim=(2, 3)), emb.std(dim=(2, 3))], 1)


def on_image(logits: torch.Tensor, frames) -> list[np.ndarray]:
    return [logits_to_slice(lg, fr).numpy() > 0 for lg, fr in zip(logits, frames)]


def report(label: str, masks: list[np.ndarray]) -> None:
    d = np.array([dice(m, s.mask) for m, s in zip(masks, samples)])
    print(f"{label}: Dice {d[has].mean():.4f} on {has.sum()}, negatives painted {int((d[~has] < 1).sum())}/{(~has).sum()}")


samples, emb, frames = split("val")
has = np.array([s.has_label for s in samples])
out = samsp_logits(model, emb, frames, presence_threshold=threshold)
absent = out["fallback"].numpy() > 0
shipped = on_image(out["samsp"], frames)
y0 = out["samsp_y0"]
report(f"shipped rule (presence threshold {threshold})", shipped)

missed = [i for i in range(len(samples)) if has[i] and dice(shipped[i], samples[i].mask) < 0.3]
print(f"\n1. {len(missed)} missed images: pass 1 said absent on {int(absent[missed].sum())}, painted elsewhere on "
      f"{int((~absent[missed]).sum())}")
top = np.array([float(logits_to_slice(lg, fr).max()) for lg, fr in zip(y0, frames)])
print("2. largest pass-1 logit, missed images:", np.round(np.sort(top[missed]), 2))
print("   largest pass-1 logit, images without the structure:", np.round(np.sort(top[~has]), 2))


def looser_pass2(t: float) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    boxes, empty = box_from_logits(y0 - t, full_boxes(frames), model.image_size)
    with torch.no_grad():
        y1, iou = zip(*(model.decode(emb[a:a + 8], boxes=boxes[a:a + 8]) for a in range(0, len(samples), 8)))
    return on_image(torch.cat(y1), frames), torch.cat(iou)[:, 0].numpy(), empty.numpy()


def combined(loose: list[np.ndarray], keep: np.ndarray) -> list[np.ndarray]:
    """The shipped output where pass 1 found the structure; elsewhere the looser pass where ``keep``, else empty."""
    return [(loose[i] if keep[i] else np.zeros_like(m)) if absent[i] else m for i, m in enumerate(shipped)]


print("\n3. looser pass 1 where the shipped rule finds nothing")
loose_by_t = {t: looser_pass2(t) for t in (-1.0, -1.5, -2.0)}
for t, (loose, iou, empty) in loose_by_t.items():
    for g in (0.0, 0.5, 0.6, 0.7):
        report(f"   T={t} G={g}", combined(loose, ~empty & (iou > g)))

print("\n4. gated by a logistic regression on the pooled embedding (fitted on train)")
train, train_emb, _ = split("train")
x_train, x_val = pooled(train_emb), pooled(emb)
mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
x_train, x_val = (x_train - mu) / sd, (x_val - mu) / sd
y_train = torch.tensor([float(s.has_label) for s in train])
w = torch.zeros(x_train.shape[1], requires_grad=True)
b = torch.zeros(1, requires_grad=True)
opt = torch.optim.LBFGS([w, b], max_iter=500)
balance = (1 - y_train).sum() / y_train.sum()


def loss() -> torch.Tensor:
    opt.zero_grad()
    value = F.binary_cross_entropy_with_logits(x_train @ w + b, y_train, pos_weight=balance) + 0.1 * (w ** 2).sum()
    value.backward()
    return value


opt.step(loss)
with torch.no_grad():
    score = (x_val @ w + b).numpy()
pos, neg = score[has], score[~has]
print(f"   val AUC {(pos[:, None] > neg[None]).mean():.3f} (all images)")
print("   score, missed images:", np.round(np.sort(score[missed]), 1))
print("   score, images without the structure:", np.round(np.sort(neg), 1))
for t, (loose, _, empty) in loose_by_t.items():
    for q in (0.75, 0.9, 1.0):
        c = np.quantile(neg, q)
        report(f"   T={t} score above the negatives' {q:.0%} quantile ({c:.2f})", combined(loose, ~empty & (score > c)))
