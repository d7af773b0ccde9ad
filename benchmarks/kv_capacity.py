"""KV cache capacity of models that mix sliding-window and full layers: the hybrid KV cache (serval.engine.kv_groups)
against keeping every block (--disable-hybrid-kv-cache-manager). One command, a table, JSON under --out.

It runs the engine's own block accounting, not a model: the real Scheduler and the real KV cache managers, with a
fixed token standing in for the sampler, over the layer pattern of each released shape (no weights, no device). For
each shape and context length C:
  - bytes one sequence holds after prefilling C - 1 tokens in 8192-token chunks and decoding one (bf16, 16-token
    blocks);
  - how many such sequences a pool of --kv-gib GiB holds at once (the same memory for both managers).
(tests/engine/test_hybrid_kv.py checks, with the scheduler admitting and preempting, that the hybrid pool does run
that many more sequences at once.)

    python benchmarks/kv_capacity.py --out results/kv_capacity            # 8k and 32k, a 40 GiB pool
    python benchmarks/kv_capacity.py --tiny --out /tmp/kv_capacity        # small contexts and pool: seconds
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

from torch import nn

from serval.config import EngineConfig
from serval.engine.kv_cache import KVCacheManager
from serval.engine.kv_groups import HybridKVCacheManager, hybrid_kv_layout
from serval.engine.request import Request, RequestStatus
from serval.engine.scheduler import Scheduler
from serval.layers.attention import Attention
from serval.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
BLOCK_SIZE = 16
DTYPE_BYTES = 2  # bf16


@dataclass(frozen=True)
class Shape:
    name: str
    windows: tuple[int | None, ...]  # per layer; None: full attention
    num_kv_heads: int
    head_dim: int

    @property
    def bytes_per_token_and_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * DTYPE_BYTES  # K and V


def _every_sixth_global(num_layers: int, window: int) -> tuple[int | None, ...]:
    return tuple(None if i % 6 == 5 else window for i in range(num_layers))


def _alternating(num_layers: int, window: int) -> tuple[int | None, ...]:
    return tuple(window if i % 2 == 0 else None for i in range(num_layers))


SHAPES = {
    "gemma3-270m": Shape("gemma3-270m", _every_sixth_global(18, 512), 1, 256),
    "gemma3-27b": Shape("gemma3-27b", _every_sixth_global(62, 1024), 16, 128),
    "gpt-oss-20b": Shape("gpt-oss-20b", _alternating(24, 128), 8, 64),
    "gpt-oss-120b": Shape("gpt-oss-120b", _alternating(36, 128), 8, 64),
}


class _Layers(nn.Module):
    """A shape's attention layers only: all hybrid_kv_layout reads."""

    def __init__(self, windows: tuple[int | None, ...]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Attention(1, 1, 1, 1.0, sliding_window=window) for window in windows)
        self.num_layers = len(windows)


@dataclass
class Row:
    shape: str
    context: int
    manager: str  # hybrid or keep-all
    bytes_per_sequence: int
    sequences_in_pool: int  # sequences of this context the pool holds at once
    pool_gib: float


class _Managers:
    """Both managers of one shape over the same bytes, and what a block of each costs."""

    def __init__(self, shape: Shape, pool_bytes: int) -> None:
        self.layout = hybrid_kv_layout(_Layers(shape.windows))
        layer_block = BLOCK_SIZE * shape.bytes_per_token_and_layer
        self.keep_all_block_bytes = len(shape.windows) * layer_block
        self.hybrid_block_bytes = self.layout.group_size * layer_block
        self.num_keep_all_blocks = pool_bytes // self.keep_all_block_bytes

    def make(self, hybrid: bool):
        if hybrid:  # the engine's sizing: the same memory, a block holding one group's layers
            return HybridKVCacheManager(self.num_keep_all_blocks * self.layout.num_groups, BLOCK_SIZE,
                                        self.layout.groups, enable_prefix_caching=False)
        return KVCacheManager(self.num_keep_all_blocks, BLOCK_SIZE, enable_prefix_caching=False)

    def block_bytes(self, hybrid: bool) -> int:
        return self.hybrid_block_bytes if hybrid else self.keep_all_block_bytes


def _request(request_id: str, num_prompt_tokens: int, max_tokens: int, first_token: int) -> Request:
    return Request(request_id=request_id, prompt_token_ids=[(first_token + i) % 50_000 for i in range(num_prompt_tokens)],
                   sampling_params=SamplingParams(max_tokens=max_tokens), eos_token_id=None, max_model_len=1 << 30)


def _step(scheduler: Scheduler) -> None:
    out = scheduler.schedule()
    for request in scheduler.update(out):
        request.append_output_token(7)
        if request.num_output_tokens >= request.max_tokens:
            scheduler.finish_request(request, RequestStatus.FINISHED_LENGTH)


def _scheduler(kv, max_num_seqs: int) -> Scheduler:
    return Scheduler(EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=8192), kv)


def bytes_per_sequence(managers: _Managers, hybrid: bool, context: int) -> int:
    kv = managers.make(hybrid)
    scheduler = _scheduler(kv, 1)
    request = _request("one", context - 1, 3, 0)
    scheduler.add_request(request)
    while request.num_output_tokens < 1:
        _step(scheduler)
    _step(scheduler)  # the decode step: its token at position context - 1
    return kv.num_held_blocks(request) * managers.block_bytes(hybrid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768])
    parser.add_argument("--kv-gib", type=float, default=40.0, help="the KV pool's memory")
    parser.add_argument("--tiny", action="store_true", help="contexts 1024 and 2048, a 1 GiB pool, two shapes")
    parser.add_argument("--out", default="results/kv_capacity")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.tiny:
        args.contexts, args.kv_gib, args.shapes = [1024, 2048], 1.0, ["gemma3-270m", "gpt-oss-20b"]
    started = time.monotonic()
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        managers = _Managers(shape, int(args.kv_gib * 1024**3))
        for context in args.contexts:
            for hybrid in (False, True):
                per_sequence = bytes_per_sequence(managers, hybrid, context)
                pool_bytes = managers.make(hybrid).num_blocks * managers.block_bytes(hybrid)
                rows.append(Row(name, context, "hybrid" if hybrid else "keep-all", per_sequence,
                                pool_bytes // per_sequence, args.kv_gib))
                logger.info("measured", extra=asdict(rows[-1]))
    header = f"{'shape':14} {'context':>7} {'manager':9} {'MiB/sequence':>13} {'sequences in pool':>18}"
    lines = [header, "-" * len(header)]
    lines += [f"{r.shape:14} {r.context:7d} {r.manager:9} {r.bytes_per_sequence / 2**20:13.1f} {r.sequences_in_pool:18d}"
              for r in rows]
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kv_capacity.json"), "w") as out:
        json.dump({"block_size": BLOCK_SIZE, "dtype_bytes": DTYPE_BYTES, "seconds": time.monotonic() - started,
                   "rows": [asdict(r) for r in rows]}, out, indent=1)


if __name__ == "__main__":
    main()
