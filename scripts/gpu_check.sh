#!/usr/bin/env bash
# On a CUDA machine: MAE at ViT-B/16, 224 px, bf16-mixed, a few hundred training steps on
# synthetic data; prints images/s and peak GPU memory. At most about 5 minutes.
# Usage: bash scripts/gpu_check.sh   (after `make setup` or `pip install -e .`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("error: no CUDA device visible; gpu_check.sh needs a GPU")
print("device:", torch.cuda.get_device_name(0), "| bf16:", torch.cuda.is_bf16_supported())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 280 "$PY" benchmarks/mae_step.py --device cuda --precision bf16-mixed --only vit-b \
  --steps 300 --batch 128 --no-baseline
timeout 60 "$PY" benchmarks/mae_step.py --device cuda --precision bf16-mixed --only vit-b \
  --steps 30 --batch 128
