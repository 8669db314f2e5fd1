#!/usr/bin/env bash
# On the lent GPU machine (see ../shared/GPU.md): install the carried wheels (.whl) into /tmp/site and
# make `batchgen.*` importable from this checkout. Use as:
#   source scripts/device-setup.sh && python3 -m benchmarks.bulk ...
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:-.whl}"/*.whl || return 1
mkdir -p .devpkg/batchgen
for part in jobs producer worker; do ln -sfn "$PWD/$part" ".devpkg/batchgen/$part"; done
export PYTHONPATH="/tmp/site:$PWD/.devpkg:$PWD" PYTHONUNBUFFERED=1
