#!/usr/bin/env bash
# Issue 38, item 5, in one device call: the CUDA tests (graph capture of the one sampler definition, the
# cuda backend through the engine), then bench_cuda: the raw graph loop, the engine at 1, 64 and 256
# streams, and the service over HTTP at 256 clients, side by side. Goals: the engine at 256 streams at
# least 1,000,000 chars/s, HTTP at 256 clients at least 300,000.
# Serving packages travel as wheels in .whl/ (scripts/gpu/fetch_wheels.sh; carried).
#   device run, carry [".whl"]:  OUT=$OUT bash scripts/gpu/session_cost.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, service.server; print('torch', torch.__version__, torch.cuda.get_device_name(), 'serving stack imports')"
} > "$OUT/tests.txt" 2>&1
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/unit/test_cuda.py tests/unit/test_device_engine.py \
  tests/contracts/test_backends.py -k "cuda or device" >> "$OUT/tests.txt" 2>&1
echo "tests done at ${SECONDS}s" >> "$OUT/tests.txt"
timeout 300 python3 -m benchmarks.bench_cuda --batches 1,64,256 --engine-streams 1,64,256 --steps 16 --seconds 1.5 \
  --repeats 2 --modes "graph a step,graph of k steps" --http-clients 256 --http-seconds 8 --http-processes 4 \
  > "$OUT/bench_cuda.txt" 2>&1
echo "bench done at ${SECONDS}s" >> "$OUT/bench_cuda.txt"
