#!/usr/bin/env bash
# One device session (issue 17 + the raw CUDA loop of issue 18): the CUDA tests, the bare graph loop,
# then shakespeare@v2 candidates trained side by side inside a time budget. Run from the repo root
# with the corpus and Macbeth copied into .gpu_data/ (carried; never committed).
#   OUT=/tmp/out bash scripts/gpu/session_train.sh [BUDGET_S]
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
BUDGET=${1:-270}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/device.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_cuda.py 2>&1 | tail -30 >> "$OUT/device.txt"
timeout 80 python3 -m benchmarks.bench_cuda --batches 1,64,256,1024 --seconds 2 --repeats 2 2>&1 | tee -a "$OUT/device.txt"
python3 scripts/gpu/train_v2.py --text .gpu_data/tinyshakespeare.txt --test-text .gpu_data/macbeth.txt \
  --store model_store --work /tmp/v2 --budget-s "$BUDGET" > "$OUT/train.txt" 2>&1
tail -5 "$OUT/train.txt"
for log in /tmp/v2/run-*.log; do echo "== $log"; grep -v Warning "$log" | tail -60; done >> "$OUT/train.txt"
W=$(cat /tmp/v2/winner 2>/dev/null) || exit 1
M=/tmp/v2/store-$W/shakespeare/v2
cp "$M/card.json" "$M/loss.png" "$OUT/"
split -b 15M -d "$M/model.safetensors" "$OUT/model.safetensors.part"
ls -l "$OUT"
