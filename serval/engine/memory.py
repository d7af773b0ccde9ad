"""KV cache sizing: how many blocks the pool gets, from the memory given, profiled on a GPU, or the CPU default.

A block holds block_size tokens' K and V for every layer, in kv_cache_dtype, so a float8 cache holds twice the
blocks of a 16-bit one in the same memory.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from serval.config import EngineConfig, default_cpu_kv_cache_blocks
from serval.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Room left beside the KV cache for the CUDA graphs' memory pool and the allocator's fragmentation.
GPU_RESERVE_BYTES = 1024**3


@dataclass
class GpuMemoryProfile:
    """What a profiling forward found on the device, in bytes."""
    total: int
    free: int
    weights: int
    activations: int  # peak, over a full step of max_num_batched_tokens

    def kv_cache_budget(self, gpu_memory_utilization: float) -> int:
        """utilization x total memory, less the weights, the activations and a reserve; never more than is free
        now (another process may hold part of the card)."""
        budget = gpu_memory_utilization * self.total - self.weights - self.activations - GPU_RESERVE_BYTES
        budget = min(budget, self.free - self.activations - GPU_RESERVE_BYTES)
        return max(int(budget), 0)


@dataclass(frozen=True)
class MemoryUsage:
    """Bytes the engine holds on its device: the model's weights (and buffers) and the KV cache pool."""
    weight_bytes: int
    kv_cache_bytes: int


def memory_usage(model, kv_caches: list[torch.Tensor]) -> MemoryUsage:
    weights = sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())
    # A hybrid KV cache's layers share tensors (serval.engine.kv_groups): each counts once.
    return MemoryUsage(weights, sum(t.nbytes for t in {id(t): t for t in kv_caches}.values()))


def profile_gpu_memory(config: EngineConfig, model, kv_cache_dtype: torch.dtype,
                       device: torch.device) -> GpuMemoryProfile:
    activations = ModelRunner.profile_activation_bytes(model, config.max_num_batched_tokens, config.max_num_seqs,
                                                       config.block_size, kv_cache_dtype, device)
    free, total = torch.cuda.mem_get_info(device)
    return GpuMemoryProfile(total=total, free=free, weights=torch.cuda.memory_allocated(device),
                            activations=activations)


def num_kv_blocks(config: EngineConfig, model, kv_cache_dtype: torch.dtype, device: torch.device) -> int:
    """Blocks in the KV pool: its memory (num_gpu_blocks_override, kv_cache_memory_bytes, profiled from
    gpu_memory_utilization, or the CPU default) over one block's bytes. Raises ValueError if one sequence of
    max_model_len would not fit."""
    per_block = ModelRunner.kv_cache_bytes_per_block(model, config.block_size, kv_cache_dtype)
    max_blocks_per_sequence = -(-config.max_model_len // config.block_size)
    if config.num_gpu_blocks_override is not None:
        num_blocks = config.num_gpu_blocks_override
    elif config.kv_cache_memory_bytes is not None:
        num_blocks = config.kv_cache_memory_bytes // per_block
    elif device.type == "cuda":
        profile = profile_gpu_memory(config, model, kv_cache_dtype, device)
        budget = profile.kv_cache_budget(config.gpu_memory_utilization)
        logger.info("gpu memory profiled", extra={
            "total_gib": _gib(profile.total), "weights_gib": _gib(profile.weights),
            "activations_gib": _gib(profile.activations), "kv_cache_gib": _gib(budget)})
        num_blocks = budget // per_block
    else:
        num_blocks = default_cpu_kv_cache_blocks(per_block, max_blocks_per_sequence, config.max_num_seqs,
                                                 available_memory_bytes())
    if num_blocks < max_blocks_per_sequence:
        raise ValueError(f"the KV cache has {num_blocks} blocks of {config.block_size} tokens, fewer than one "
                         f"sequence of max_model_len={config.max_model_len} needs ({max_blocks_per_sequence}); raise "
                         "the KV memory (kv_cache_memory_bytes, gpu_memory_utilization or num_gpu_blocks_override) "
                         "or lower max_model_len")
    return num_blocks


def available_memory_bytes() -> int | None:
    """The memory the kernel could give this process now (MemAvailable), or None where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(num_bytes: int) -> float:
    return round(num_bytes / 1024**3, 2)
