#!/usr/bin/env bash
# The serving stack as wheels for the device machine (Python 3.12, x86-64, no package index there): the
# serving install's dependencies (pyproject.toml) and what the benchmarks add, with every dependency of
# theirs, at the versions constraints.txt pins. The device image already has torch, numpy, safetensors,
# tqdm, matplotlib, httpx, aiohttp and pytest, so numpy's wheel is left out (a device run carries at most
# 64 MiB).
#   bash scripts/gpu/fetch_wheels.sh        # into .whl/ (ignored; carried by a device run)
set -eu
rm -rf .whl && mkdir -p .whl
deps=$(python3 -c "
import tomllib
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']
print(' '.join(d for d in deps if not d.startswith(('numpy', 'safetensors'))))")
# shellcheck disable=SC2086  # one argument a requirement
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -c constraints.txt -d .whl $deps sse-starlette
rm -f .whl/numpy-*.whl
ls .whl | wc -l
du -sh .whl
