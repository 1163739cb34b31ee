#!/usr/bin/env bash
# The prepared device run (one call on a lent GPU machine): checks and times the CUDA training path.
# Carried with it: .whl/ (polars, pydantic wheels for the machine's Python) and .gpudata/ (the YOOCHOOSE slice).
# Results land in $OUT (train_speed_*.json) and the last lines printed are the tables.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
mkdir -p /tmp/pkgs && ln -sfn "$PWD" /tmp/pkgs/sessionrec
export PYTHONPATH=/tmp/pkgs:/tmp/site
python3 -c "import torch, sessionrec.ops.device as d; print('torch', torch.__version__, torch.cuda.get_device_name(0), d.resolve_device('auto'))"
out=${OUT:-/tmp/out}; mkdir -p "$out"
timeout 90 python3 benchmarks/train_speed.py --data-dir .gpudata --device cuda --models gru4rec --max-seconds 30 \
  --no-progress --out "$out/train_speed_yoochoose_cuda.json" 2>&1 | tail -n 8
timeout 150 python3 benchmarks/train_speed.py --synthetic 10000000 --device cuda --models gru4rec --max-seconds 30 \
  --no-refit --test-sessions 5000 --no-progress --out "$out/train_speed_synthetic10m_cuda.json" 2>&1 | tail -n 8
