"""Embedding throughput: a Qwen3-Embedding-8B shape with dummy weights, documents of 512 random tokens, in
documents per second through Serval offline (LLM(..., runner="pooling").embed), through a real `serval serve
--runner pooling` (/v1/embeddings, token arrays, base64, several requests in flight), and through transformers'
batched forward of the same shape with the same pooling (last token, L2-normalised), in one run.

The phases run one after another in this order, each freeing the GPU before the next: transformers, Serval
offline, Serval over HTTP. Each is warmed up (kernels compiled, allocator grown) before it is timed. All documents
have the same length, so transformers' batches have no padding: it is the best case for the baseline.

    # one H200 (about 8 minutes; transformers is timed on --transformers-docs documents, a rate needs no more)
    PYTHONPATH=/tmp/site:. python benchmarks/embed_bench.py --output results/embed_bench.json
    # CPU, a tiny shape, seconds
    python benchmarks/embed_bench.py --tiny
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import httpx
import torch
import transformers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from tests.e2e.server import free_port, wait_for_health  # noqa: E402  (the e2e tests' server start-up)

# Qwen3-Embedding-8B's config.json (a Qwen3 decoder without an LM head), and its sentence-transformers modules:
# last-token pooling, then Normalize.
QWEN3_EMBEDDING_8B = dict(
    architectures=["Qwen3Model"], model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151665, max_position_embeddings=40960,
    rms_norm_eps=1e-6, rope_theta=1000000, hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16")
TINY = dict(QWEN3_EMBEDDING_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=1024, max_position_embeddings=1024, torch_dtype="float32")
MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
           {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
           {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]


def write_checkpoint(shape: dict) -> str:
    """config.json and the sentence-transformers files; weights come from the dummy loader."""
    path = tempfile.mkdtemp(prefix="serval-embed-bench-")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(shape, f)
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump(MODULES, f)
    os.makedirs(os.path.join(path, "1_Pooling"))
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": shape["hidden_size"], "pooling_mode_lasttoken": True,
                   "include_prompt": True}, f)
    return path


def documents(count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=generator).tolist()


def release_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- transformers
def build_transformers_model(config, device: str, dtype: torch.dtype):
    """Built in its dtype on the device: no float32 copy of 8B parameters."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return transformers.Qwen3Model(config).eval()
    finally:
        torch.set_default_dtype(previous)


def transformers_embed(model, batch: list[list[int]]) -> torch.Tensor:
    """The same pooling as the checkpoint's sentence-transformers modules: last token, L2-normalised (documents
    of one length: no padding to skip)."""
    ids = torch.tensor(batch, device=model.device)
    hidden = model(input_ids=ids).last_hidden_state[:, -1]
    return torch.nn.functional.normalize(hidden.float(), dim=-1).cpu()


def run_transformers(shape: dict, docs: list[list[int]], batch_size: int, device: str, dtype: torch.dtype) -> dict:
    config = transformers.Qwen3Config(**{k: v for k, v in shape.items() if k not in ("architectures", "model_type")})
    started = time.perf_counter()
    model = build_transformers_model(config, device, dtype)
    load_s = time.perf_counter() - started

    with torch.inference_mode():
        transformers_embed(model, docs[:batch_size])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(docs), batch_size):
            transformers_embed(model, docs[start:start + batch_size])
        elapsed = time.perf_counter() - started
    del model
    release_gpu()
    return {"path": "transformers (batched forward)", "documents": len(docs), "elapsed_s": elapsed,
            "documents_per_s": len(docs) / elapsed, "load_s": load_s, "batch_size": batch_size}


# ---------------------------------------------------------------- Serval offline
def engine_args(args) -> dict:
    return dict(runner="pooling", load_format="dummy", skip_tokenizer_init=True, max_model_len=args.doc_len,
                max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                device=args.device, dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization)


def run_offline(path: str, docs: list[list[int]], args) -> dict:
    from serval import LLM
    started = time.perf_counter()
    llm = LLM(path, **engine_args(args))
    load_s = time.perf_counter() - started
    llm.embed(docs[:args.batch_size], use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.embed(docs, use_tqdm=False)
    elapsed = time.perf_counter() - started
    assert len(outputs) == len(docs) and len(outputs[0].outputs.embedding) == llm.engine.model.hidden_size
    del llm, outputs
    release_gpu()
    return {"path": "serval offline (LLM.embed)", "documents": len(docs), "elapsed_s": elapsed,
            "documents_per_s": len(docs) / elapsed, "load_s": load_s}


# ---------------------------------------------------------------- Serval over HTTP
def read_log(path: str) -> str:
    with open(path, errors="replace") as handle:
        return handle.read()


class Server:
    """`python -m serval.cli serve PATH --runner pooling` with the offline path's engine arguments."""

    def __init__(self, path: str, args, log_path: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(log_path, "w")
        flags = []
        for name, value in engine_args(args).items():
            flag = "--" + name.replace("_", "-")
            flags += [flag] if value is True else [flag, str(value)]
        command = [sys.executable, "-m", "serval.cli", "serve", path, "--host", "127.0.0.1",
                   "--port", self.url.rsplit(":", 1)[1], "--disable-log-requests", "--disable-uvicorn-access-log",
                   *flags]
        started = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        wait_for_health(self.process, self.url, 600, "serval serve", lambda: read_log(log_path))
        self.load_s = time.perf_counter() - started

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


async def _post_all(url: str, batches: list[list[list[int]]], concurrency: int) -> int:
    """Every batch as one /v1/embeddings request (token arrays, base64), at most `concurrency` in flight; the
    number of embeddings received."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(batch: list[list[int]]) -> int:
            async with limit:
                response = await client.post(url + "/v1/embeddings",
                                             json={"input": batch, "encoding_format": "base64"})
                response.raise_for_status()
                return len(response.json()["data"])
        return sum(await asyncio.gather(*(one(batch) for batch in batches)))


def run_http(path: str, docs: list[list[int]], args) -> dict:
    log_path = os.path.join(tempfile.gettempdir(), "embed_bench_serve.log")
    server = Server(path, args, log_path)
    try:
        batches = [docs[start:start + args.batch_size] for start in range(0, len(docs), args.batch_size)]
        asyncio.run(_post_all(server.url, batches[:args.concurrency], args.concurrency))  # warm-up
        started = time.perf_counter()
        received = asyncio.run(_post_all(server.url, batches, args.concurrency))
        elapsed = time.perf_counter() - started
    finally:
        server.close()
    assert received == len(docs)
    return {"path": "serval serve (/v1/embeddings)", "documents": len(docs), "elapsed_s": elapsed,
            "documents_per_s": len(docs) / elapsed, "load_s": server.load_s,
            "docs_per_request": args.batch_size, "concurrency": args.concurrency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU, 64 documents of 32 tokens")
    parser.add_argument("--num-docs", type=int, default=10000)
    parser.add_argument("--doc-len", type=int, default=512)
    parser.add_argument("--transformers-docs", type=int, default=2000,
                        help="documents transformers is timed on (its rate; default 2000 of --num-docs)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="transformers' batch, and the documents per /v1/embeddings request")
    parser.add_argument("--concurrency", type=int, default=16, help="/v1/embeddings requests in flight")
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if there is one, cpu with --tiny)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--phases", default="transformers,offline,http")
    parser.add_argument("--output", default="results/embed_bench.json")
    args = parser.parse_args()
    if args.tiny:
        args.num_docs, args.doc_len, args.transformers_docs = min(args.num_docs, 64), 32, 64
        args.batch_size, args.concurrency, args.max_num_batched_tokens = 8, 4, 256
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    shape = TINY if args.tiny else QWEN3_EMBEDDING_8B
    path = write_checkpoint(shape)
    docs = documents(args.num_docs, args.doc_len, shape["vocab_size"])
    phases = args.phases.split(",")
    results = []
    if "transformers" in phases:
        results.append(run_transformers(shape, docs[:args.transformers_docs], args.batch_size, args.device,
                                        getattr(torch, args.dtype)))
    if "offline" in phases:
        results.append(run_offline(path, docs, args))
    if "http" in phases:
        results.append(run_http(path, docs, args))
    baseline = next((r["documents_per_s"] for r in results if r["path"].startswith("transformers")), None)
    print(f"\n{'path':34} {'documents':>9} {'seconds':>9} {'docs/s':>9} {'vs transformers':>16}")
    for result in results:
        ratio = f"{result['documents_per_s'] / baseline:.2f}x" if baseline else "-"
        result["speedup_vs_transformers"] = result["documents_per_s"] / baseline if baseline else None
        print(f"{result['path']:34} {result['documents']:>9} {result['elapsed_s']:>9.2f} "
              f"{result['documents_per_s']:>9.1f} {ratio:>16}")
    summary = {"shape": "tiny" if args.tiny else "Qwen3-Embedding-8B", "doc_len": args.doc_len,
               "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
               "dtype": args.dtype, "args": vars(args), "results": results, "torch": torch.__version__,
               "transformers": transformers.__version__}
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
