#!/usr/bin/env bash
# Issue 29's judgement, on one machine, one model after another: every shakespeare version in the store on
# Macbeth (in no training corpus) and on each play the v4 corpus's split by play holds out (`--plays auto`,
# what `train --val-plays auto` held out). v4 ships as the default only if it is at most 2.00 bits/char
# on Macbeth and no worse than v3 on any of those plays.
#   CORPUS=/work/runs/v4/plays.txt [VERSIONS="v1 v2"] bash scripts/judge_v4.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-/work/runs/v4/plays.txt}
MACBETH=${MACBETH:-../shared/data/macbeth.txt}
for version in ${VERSIONS:-$(ls model_store/shakespeare)}; do
  .venv/bin/charlstm evaluate --model "shakespeare@$version" --text "$MACBETH" --quiet
  .venv/bin/charlstm evaluate --model "shakespeare@$version" --text "$CORPUS" --plays auto
done
