#!/usr/bin/env bash
# The wheels `vllm serve` needs beyond the 22 of ../shared/peers/vllm-wheels.sh (the offline LLM's): uvicorn and its
# server packages, uvloop (vLLM's API server imports it), python-multipart (FastAPI's form endpoints),
# prometheus-client and prometheus-fastapi-instrumentator (/metrics), model-hosting-container-standards with jmespath
# and supervisor (imported by the API server), watchfiles (imported at start by its TLS certificate reloader; the
# H200 run of 2026-12-03 stopped there). About 6 MiB: they travel with the last staging call (c3).
# Run here, in the checkout's root; then carry OUTDIR/serve and install it with the others (benchmarks/peer_serve.sh
# does, from VLLM_SERVE_WHEELS).
#
#     bash benchmarks/peer_serve_wheels.sh [OUTDIR=.peer-vllm]
set -euo pipefail
out=${1:-.peer-vllm}/serve
mkdir -p "$out"
grep -qx "/${1:-.peer-vllm}/" .git/info/exclude 2>/dev/null || echo "/${1:-.peer-vllm}/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$out" \
    uvicorn h11 click uvloop httptools python-multipart prometheus-client prometheus-fastapi-instrumentator \
    model-hosting-container-standards jmespath supervisor watchfiles
ls -la "$out"
