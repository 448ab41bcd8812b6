"""Probe: fine-tune the encoder's last stage (TinyViT stage 3) and neck with the decoder, on the CPU (session 11).

CPU mode freezes the whole encoder; paper mode (LoRA on every stage) costs ~21 min an epoch of BUSI here. This
probe caches what stage 2 hands stage 3 (4096 tokens x 320, from inference's folded bf16 copy) once, then trains
stage 3 + neck + prompt encoder + decoder under bf16 autocast with the target's SAM-SP loss (presence-aware,
y0 weight 1) and scores val each epoch as the trainer does (``evaluate_val``).

``.venv/bin/python -W ignore docs/repro/top_stage_probe.py TARGET OUT_DIR [epochs] [encoder_lr] [decoder_lr]``
starts from TARGET's shipped checkpoint; features go to OUT_DIR/features_*.pt, the log to OUT_DIR/log.jsonl and
the best epoch's stage-3/neck/decoder tensors to OUT_DIR/best.pt."""
import json
import math
import sys
import time
from pathlib import Path

import torch

from SAMSelfPromptLib.evaluation.evaluate import full_boxes
from SAMSelfPromptLib.core.preprocess import mask_to_low_res
from SAMSelfPromptLib.modeling.fast_encoder import inference_encoder
from SAMSelfPromptLib.modeling.backbones import autocast_for
from SAMSelfPromptLib.training.embedding_cache import model_input, sample_frame
from SAMSelfPromptLib.training.targets import target_samples
from SAMSelfPromptLib.training.trainer import (SamSpStep, TrainConfig, evaluate_val, mark_trainable,
                                                presence_aware_loss, training_autocast)
from SAMSelfPromptLib.weights.catalogue import find_target
from SAMSelfPromptLib.weights.checkpoint import load_samsp
from SAMSelfPromptLib.weights.targets import target_spec

torch.set_num_threads(2)
name, out = sys.argv[1], Path(sys.argv[2])
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 4
enc_lr = float(sys.argv[4]) if len(sys.argv) > 4 else 5e-5
dec_lr = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-4
out.mkdir(parents=True, exist_ok=True)
model, meta = load_samsp(find_target(name).path)
spec = target_spec(name)
train_s = target_samples(spec, "../shared/data", "train")
val_s = target_samples(spec, "../shared/data", "val", whole_split=True)
size = model.image_size


def stage2_features(samples, path: Path) -> torch.Tensor:
    """What stage 3 receives, from inference's folded bf16 copy, cached on disk."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    enc = inference_encoder(model)
    feats = []
    t0 = time.time()
    with torch.no_grad(), autocast_for(model.device, "bf16"):
        for i, s in enumerate(samples):
            x = model.normalize(model_input(s, size)[0][None]).contiguous(memory_format=torch.channels_last)
            x = enc.patch_embed(x)
            for layer in enc.layers[:3]:
                x = layer(x)
            feats.append(x.to(torch.bfloat16))
            if i % 50 == 0:
                print(f"{path.name}: {i}/{len(samples)} {time.time() - t0:.0f} s", flush=True)
    feats = torch.cat(feats)
    torch.save(feats, path)
    return feats


def top(feat: torch.Tensor) -> torch.Tensor:
    enc = model.image_encoder
    x = enc.layers[3](feat)
    b, _, c = x.shape
    return enc.neck(x.view(b, 64, 64, c).permute(0, 3, 1, 2))


train_f = stage2_features(train_s, out / "features_train.pt")
val_f = stage2_features(val_s, out / "features_val.pt")
frames = [sample_frame(s, size) for s in train_s]
targets = torch.stack([mask_to_low_res(s.mask, f) for s, f in zip(train_s, frames)])
fallback = full_boxes(frames)
limit = torch.tensor([[f.new_hw[1], f.new_hw[0]] for f in frames], dtype=torch.float32)
val_frames = [sample_frame(s, size) for s in val_s]

model.eval()
dec_params = mark_trainable(model)
enc_params = [*model.image_encoder.layers[3].parameters(), *model.image_encoder.neck.parameters()]
for p in enc_params:
    p.requires_grad_(True)
opt = torch.optim.AdamW([{"params": dec_params, "lr": dec_lr}, {"params": enc_params, "lr": enc_lr}])
config = TrainConfig(y0_weight=float(spec.recipe.get("y0_weight", 0.0)))
step_module = SamSpStep(model, encode=False)
bs = config.batch_size
steps = len(train_s) // bs
total = steps * epochs
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 10) * 0.5 * (1 + math.cos(math.pi * k / total)))


def val_embeddings() -> torch.Tensor:
    with torch.no_grad(), training_autocast(model.device):
        return torch.cat([top(val_f[i:i + 8].float()).float() for i in range(0, len(val_f), 8)])


best = -1.0
for epoch in range(epochs):
    t0 = time.time()
    gen = torch.Generator().manual_seed(epoch)
    perm = torch.randperm(len(train_s), generator=gen)
    losses = []
    for k in range(steps):
        idx = perm[k * bs:(k + 1) * bs]
        jit = (torch.rand(len(idx), 4, generator=gen) * 2 - 1) * config.box_jitter
        y = targets[idx]
        positive = y.flatten(1).any(1)
        with training_autocast(model.device):
            emb = top(train_f[idx].float())
            y0, y1, presence = step_module(emb, fallback[idx], jit, limit[idx], positive=positive)
        loss, parts = presence_aware_loss(y0.float(), None if y1 is None else y1.float(), presence.float(), y,
                                          positive, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(parts["loss"])
        if k % 20 == 0:
            print(f"epoch {epoch + 1} step {k}/{steps} loss {sum(losses) / len(losses):.4f} {time.time() - t0:.0f} s",
                  flush=True)
    val = evaluate_val(model, val_s, val_embeddings(), val_frames)
    entry = {"epoch": epoch + 1, "loss": sum(losses) / len(losses), "seconds": round(time.time() - t0), "val": val}
    print(json.dumps(entry), flush=True)
    with open(out / "log.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    if val["score"] > best:
        best = val["score"]
        keep = ("image_encoder.layers.3.", "image_encoder.neck.", "prompt_encoder.", "mask_decoder.")
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(keep)},
                   out / "best.pt")
