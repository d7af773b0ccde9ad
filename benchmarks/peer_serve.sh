#!/usr/bin/env bash
# Issue 23's serving comparison: `vllm serve` and `serval serve` on the same GPU, one after the other, each under
# `serval bench serve` at the same request rates (Poisson arrivals, the same random prompts: Llama 3 tokenizer,
# input 1024 +- 50%, output 128 +- 50%, every request ignoring EOS), TTFT/TPOT/ITL p50/p99 side by side at the end
# (benchmarks/peer_suite.py --serve-table). Dummy weights of the Llama-3-8B shape, max_model_len 2048, the same
# max_num_seqs and max_num_batched_tokens; PRECISION fp8 adds float8 weights and KV cache to both.
#
#     bash benchmarks/peer_serve.sh [OUT=results/peer_serve] [RATES=4,8,16] [NUM_PROMPTS=200] [PRECISION=bf16]
#
# Environment: VLLM_SITE (vLLM's staged wheels, default /tmp/site; ../shared/peers/README.md), VLLM_SERVE_WHEELS
# (a folder of benchmarks/peer_serve_wheels.sh's wheels, installed into VLLM_SITE first if given), SERVAL_PYTHONPATH
# (Serval's own path, default: the checkout; keep vLLM's site off it), SERVAL_SERVE_ARGS (more `serval serve` flags,
# e.g. "--cudagraph-mixed"; vLLM's side stays at its defaults), SERVAL_VARIANTS (below), SKIP_VLLM=1 (Serval's
# variants alone, where vLLM is not staged: the table's vLLM columns stay empty). Each rate sends its own
# prompts (`serval bench serve` draws them per rate), so no rate hits a prefix cache filled by the one before.
set -uo pipefail
out=${1:-results/peer_serve}
rates=${2:-4,8,16}
num_prompts=${3:-200}
precision=${4:-bf16}
vllm_site=${VLLM_SITE:-/tmp/site}
serval_path=${SERVAL_PYTHONPATH:-.}
port=8011
model=benchmarks/configs/llama-3-8b
mkdir -p "$out"
engine_args=(--load-format dummy --dtype bfloat16 --max-model-len 2048 --max-num-seqs 256
             --max-num-batched-tokens 8192 --gpu-memory-utilization 0.9)
[ "$precision" = fp8 ] && engine_args+=(--quantization fp8 --kv-cache-dtype fp8)
if [ -n "${VLLM_SERVE_WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$vllm_site" "$VLLM_SERVE_WHEELS"/*.whl
fi
tokenizer=$(PYTHONPATH=$serval_path python3 -c \
    "import os; from serval.bench.tokenizer import resolve_path; print(os.path.dirname(resolve_path('llama3')))")

# One server at a time: start it, wait for /health, run the sweep, stop it and wait until it is gone.
run_engine() {
    local name=$1; shift
    "$@" >"$out/$name.server.log" 2>&1 &
    local server=$!
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
        kill -0 $server 2>/dev/null || { echo "$name server exited:"; tail -30 "$out/$name.server.log"; return 1; }
        sleep 1
    done
    PYTHONPATH=$serval_path python3 -m serval.cli bench serve --base-url "$name=http://127.0.0.1:$port" \
        --model llama-3-8b --tokenizer llama3 --workload random --input-len 1024 --output-len 128 \
        --random-range-ratio 0.5 --num-prompts "$num_prompts" --num-warmups 4 --sweep "$rates" \
        --slo ttft=500,tpot=50 --result-dir "$out/$name" --disable-tqdm --no-plots
    kill -TERM $server 2>/dev/null
    wait $server 2>/dev/null
    sleep 5  # the engine's worker processes let go of the GPU
}

if [ -z "${SKIP_VLLM:-}" ]; then
    # vLLM's own check that its API server imports with what is staged: names the first missing module, if any.
    PYTHONPATH=$vllm_site python3 -c "import vllm.entrypoints.openai.api_server" 2>&1 | tail -3
    PYTHONPATH=$vllm_site VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 \
        run_engine vllm python3 -m vllm.entrypoints.cli.main serve "$model" "${engine_args[@]}" \
        --tokenizer "$tokenizer" --served-model-name llama-3-8b --host 127.0.0.1 --port "$port" \
        --uvicorn-log-level warning
fi
# SERVAL_VARIANTS="name=flags;name=flags" runs several `serval serve` settings in turn (each name must start with
# "serval"), e.g. "serval=;serval_mixed=--cudagraph-mixed"; the default is one run named serval with SERVAL_SERVE_ARGS.
IFS=';' read -ra variants <<< "${SERVAL_VARIANTS:-serval=${SERVAL_SERVE_ARGS:-}}"
for variant in "${variants[@]}"; do
    # shellcheck disable=SC2086  # the flags split into words
    PYTHONPATH=$serval_path run_engine "${variant%%=*}" python3 -m serval.cli serve "$model" "${engine_args[@]}" \
        --tokenizer "$tokenizer" --served-model-name llama-3-8b --host 127.0.0.1 --port "$port" \
        --disable-log-requests --disable-uvicorn-access-log ${variant#*=}
done
PYTHONPATH=$serval_path python3 benchmarks/peer_suite.py --serve-table "$out" | tee "$out/serve_table.md"
