#!/usr/bin/env bash
# On the lent GPU machine (see ../shared/GPU.md): install the carried wheels (.whl) into /tmp/site and
# make `batchgen.*` importable from this checkout. Use as:
#   source scripts/device-setup.sh && python3 -m benchmarks.bulk ...
# WHEELS=<dir> installs another carried set instead: e.g. one with a newer transformers than the image's (the
# generic path's CUDA graphs need >= 5.24 for BLOOM) in place of the wheels a benchmark does not import (valkey,
# xgrammar, jsonschema), to stay within the 64 MiB a call carries. .whl-bloom (61 MB) is that set:
#   mkdir .whl-bloom && cp .whl/*.whl .whl-bloom/ && rm .whl-bloom/{valkey,xgrammar,apache_tvm,jsonschema,referencing,rpds,attrs}*
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform any \
#       -d .whl-bloom transformers==5.24.0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:-.whl}"/*.whl || return 1
mkdir -p .devpkg/batchgen
for part in jobs producer worker; do ln -sfn "$PWD/$part" ".devpkg/batchgen/$part"; done
export PYTHONPATH="/tmp/site:$PWD/.devpkg:$PWD" PYTHONUNBUFFERED=1
