#!/bin/bash
# Run from the repository root: bash docs/repro/adapt_s5.sh la|acdc
mkdir -p runs/adapt/s5
# Session 5: the val volumes not run before, one torch thread per process, a fresh embedding cache per k
# (so "Adapt s" includes encoding the training slices). Two of these run at once on the 2-core machine.
S=".venv/bin/samselfprompt adapt-eval --data-root ../shared/data --threads 1 --extent given --starts samsp_ctliver_litemedsam"
if [ "$1" = la ]; then
  for k in 1 5; do
    rm -rf /tmp/ac_la_$k
    $S --datasets la_mri --k $k --cache /tmp/ac_la_$k --cases 5HH0WPWIY06DLAFOBQ4M A11O45O3NAXWM7T2H8CH LH4FVU3TQDEC87YGN6FL SN4LF8SGBSRQUPTDSX78 --json runs/adapt/s5/la.jsonl
  done
else
  for k in 1 3 5; do
    rm -rf /tmp/ac_acdc_$k
    $S --datasets acdc --k $k --cache /tmp/ac_acdc_$k --cases patient013_frame02 patient030_frame02 patient033_frame02 patient045_frame02 patient093_frame02 --json runs/adapt/s5/acdc.jsonl
  done
fi
