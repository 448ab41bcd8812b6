#!/bin/bash
# Run from the repository root: bash docs/repro/augment_ph2.sh
mkdir -p runs/aug
# PH2: the same recipe with and without 2 augmented copies per training image (session 5).
S=".venv/bin/samselfprompt train ../shared/data/ph2 --split train --val-split val --threads 2 --no-progress"
( time $S -o runs/aug/ph2_plain.pt ) > runs/aug/plain.log 2>&1
( time $S --augment 2 -o runs/aug/ph2_aug2.pt ) > runs/aug/aug2.log 2>&1
( time .venv/bin/samselfprompt train ../shared/data/ph2 --split train --val-split val --threads 2 --no-progress --epochs 24 -o runs/aug/ph2_plain24.pt ) > runs/aug/plain24.log 2>&1
