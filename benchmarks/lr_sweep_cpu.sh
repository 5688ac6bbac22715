#!/usr/bin/env bash
# The issue-10 CPU LR-transfer sweep: AdamW, AdamH, MuonH on the embedded corpus (quickstart model,
# 300 steps, 2 ranks) across widths 64 / 128 / 256. Resumable: rerun it and finished runs are skipped
# (runs/sweep_cpu_<optimizer>/<run>/result.json); each optimizer's report is runs/sweep_cpu_<opt>/report.md.
# Estimated ~2 h on 2 idle cores (MuonH at width 64 was still improving at lr 0.12: the hyperball grid goes to 0.48).
set -uo pipefail
cd "$(dirname "$0")/.."
for opt in muonh adamh adamw; do
  case $opt in adamw) LRS=0.001,0.002,0.004,0.008,0.016 ;; *) LRS=0.0075,0.015,0.03,0.06,0.12,0.24,0.48 ;; esac
  .venv/bin/python scripts/lr_sweep.py --config configs/quickstart.yaml --lrs $LRS \
      --set model.hidden_size=64,128,256 --out runs/sweep_cpu_$opt --nproc 2 \
      optimizer.name=$opt model.ffn_hidden_size=null logging.wandb.name=sweep_$opt
done
