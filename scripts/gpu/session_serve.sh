#!/usr/bin/env bash
# The second device session (issues 18 and 17): the CUDA and device-engine tests, bench_cuda (bare
# loop, engine, HTTP side by side), then one more shakespeare@v2 candidate in the time that is left.
# Serving packages travel as wheels in .whl/ (scripts/gpu/fetch_wheels.sh; carried), the corpus in
# .gpu_data/ (a copy of ../shared/data; carried, never committed). CANDIDATES "": no training.
#   OUT=/tmp/out bash scripts/gpu/session_serve.sh [END_S] [CANDIDATES]
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
END=${1:-510}            # seconds after the start by which everything must be written
CANDIDATES=${2-}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, service.server; print('torch', torch.__version__, torch.cuda.get_device_name(), 'serving stack imports')"
} > "$OUT/tests.txt" 2>&1
timeout 90 python3 -m pytest -q -p no:cacheprovider -x tests/unit/test_cuda.py tests/unit/test_device_engine.py >> "$OUT/tests.txt" 2>&1
echo "tests done at ${SECONDS}s" >> "$OUT/tests.txt"
timeout 170 python3 -m benchmarks.bench_cuda --batches 1,64,256 --engine-streams 1,64,256 --steps 16 --seconds 1.5 \
  --repeats 2 --modes "graph a step,graph of k steps" --http-clients 256 --http-seconds 8 --http-processes 4 \
  > "$OUT/bench_cuda.txt" 2>&1
echo "bench done at ${SECONDS}s" >> "$OUT/bench_cuda.txt"
BUDGET=$(( END - SECONDS - 75 ))
if [ -n "$CANDIDATES" ] && [ "$BUDGET" -gt 60 ]; then
  python3 scripts/gpu/train_v2.py --text .gpu_data/tinyshakespeare.txt --test-text .gpu_data/macbeth.txt \
    --store model_store --work /tmp/v2 --budget-s "$BUDGET" --candidates "$CANDIDATES" > "$OUT/train.txt" 2>&1
  for log in /tmp/v2/run-*.log; do echo "== $log"; grep -v -e Warning -e "_VF.lstm" "$log" | tail -70; done >> "$OUT/train.txt"
  W=$(cat /tmp/v2/winner 2>/dev/null) && M=/tmp/v2/store-$W/shakespeare/v2 && cp "$M/card.json" "$M/loss.png" "$OUT/" \
    && split -b 15M -d "$M/model.safetensors" "$OUT/model.safetensors.part"
fi
echo "all done at ${SECONDS}s (training budget ${BUDGET}s)"
ls -l "$OUT"
