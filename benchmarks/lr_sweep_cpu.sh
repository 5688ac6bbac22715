#!/usr/bin/env bash
# The issue-10 CPU LR-transfer sweep: MuonH, AdamW, AdamH on the embedded corpus (quickstart model,
# 300 steps, 2 ranks, every param group at the swept lr) across widths 64 / 128 / 256. Resumable:
# rerun it and finished runs are skipped (runs/sweep_cpu_<optimizer>/<run>/result.json); each
# sweep's report is runs/sweep_cpu_<opt>/report.md (+ loss_vs_lr.png with matplotlib).
# 68 runs of 1-2.5 min on 2 idle cores (~1.7 h).
set -uo pipefail
cd "$(dirname "$0")/.."
HB=0.0075,0.015,0.03,0.06,0.12      # hyperball grid (MuonH quickstart lr: 0.03)
AW=0.001,0.002,0.004,0.008,0.016    # AdamW grid
sweep() {  # sweep OPTIMIZER LRS WIDTHS [--report-only] [KEY=VALUE ...]; OUT_SUFFIX names a variant
  .venv/bin/python scripts/lr_sweep.py --config configs/quickstart.yaml --lrs "$2" \
      --set model.hidden_size="$3" --out "runs/sweep_cpu_$1${OUT_SUFFIX:-}" --nproc 2 "${@:4}" \
      optimizer.name="$1" model.ffn_hidden_size=null logging.wandb.name="sweep_$1"
}
# variant: only the sphere matrices swept, the Adam groups pinned at seed 004's fixed lrs
# (3e-3 embeddings, 1e-3 output layer and 1-D params): separates the matrices' transfer from Adam's
PINNED="optimizer.embedding_lr=0.003 optimizer.output_lr=0.001 optimizer.scalar_lr=0.001"
sweep muonh $HB 64,128,256
sweep muonh 0.24,0.48 64            # width 64's best lr was the grid's top (0.12)
sweep adamw $AW 64,128,256
sweep adamw 0.00025,0.0005 256      # width 256's best lr was the grid's bottom (0.001)
sweep adamh $HB 64,128,256
sweep adamh 0.24,0.48 64            # width 64's best lr was the grid's top (0.12)
OUT_SUFFIX=_pinned sweep muonh $HB 64,128,256 $PINNED
OUT_SUFFIX=_pinned sweep muonh 0.24,0.48 64 $PINNED   # width 64's best lr was the grid's top (0.12)
# reports over every finished run of each folder
sweep muonh $HB,0.24,0.48 64,128,256 --report-only
sweep adamw 0.00025,0.0005,$AW 64,128,256 --report-only
sweep adamh $HB,0.24,0.48 64,128,256 --report-only
OUT_SUFFIX=_pinned sweep muonh $HB,0.24,0.48 64,128,256 --report-only $PINNED
