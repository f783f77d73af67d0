#!/usr/bin/env bash
# The serving stack as wheels for the device machine (Python 3.12, x86-64, no package index there),
# with every dependency, at the versions constraints.txt pins. The device image already has torch,
# numpy, safetensors, tqdm, matplotlib, httpx and aiohttp; these add FastAPI, uvicorn and the rest.
#   bash scripts/gpu/fetch_wheels.sh        # into .whl/ (ignored; carried by a device run)
set -eu
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -c constraints.txt -d .whl fastapi "uvicorn[standard]" sse-starlette fastapi-offline pydantic pydantic-settings redis
ls .whl | wc -l
du -sh .whl
