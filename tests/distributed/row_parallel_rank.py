"""What a spawned rank of tests/distributed/test_size_one.py runs: a row-parallel down_proj decoding one row.

Apart from the test module so that a spawned rank imports torch and Serval's layers only, not the test module's
engine, transformers and fixtures (seconds a rank, on every spawn)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from serval.kernels import triton_gemv
from serval.layers.linear import Linear
from serval.layers.parallel import RowParallelLinear


def recording_gemv(calls: list[tuple[tuple[int, ...], bool]]):
    """triton_gemv.gemv, recording each call's weight shape and whether SwiGLU was fused in."""
    gemv = triton_gemv.gemv

    def record(x, weight, bias=None, config=None, gated=False, weight_scale=None, **fusions):
        calls.append((tuple(weight.shape), gated))
        return gemv(x, weight, bias, config, gated, weight_scale, **fusions)

    return record


def recording_gemv_add_norm(calls: list[tuple[tuple[int, ...], bool]]):
    """triton_gemv.gemv_add_norm (a batch-1 block's o_proj and down_proj), recorded as recording_gemv does."""
    gemv_add_norm = triton_gemv.gemv_add_norm

    def record(x, weight, *args, gated=False, **kwargs):
        calls.append((tuple(weight.shape), gated))
        return gemv_add_norm(x, weight, *args, gated=gated, **kwargs)

    return record


HIDDEN, INTERMEDIATE, TP = 16, 32, 2


def full_down_proj() -> Linear:
    generator = torch.Generator().manual_seed(0)
    layer = Linear(INTERMEDIATE, HIDDEN, bias=True).to(torch.bfloat16)
    layer.weight.data.copy_(torch.randn(HIDDEN, INTERMEDIATE, generator=generator) / 4)
    layer.bias.data.copy_(torch.randn(HIDDEN, generator=generator))
    return layer


def gate_up_row() -> torch.Tensor:
    return torch.randn(1, 2 * INTERMEDIATE, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


def row_parallel_decode(rank: int, store_path: str, out_path: str) -> None:
    """In a spawned process: rank `rank`'s down_proj (its intermediate columns) on one row of gate/up output."""
    torch.set_num_threads(1)
    os.environ["SERVAL_GEMV"] = "triton"
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=TP)
    try:
        full, gate_up = full_down_proj(), gate_up_row()
        width = INTERMEDIATE // TP
        columns = slice(rank * width, (rank + 1) * width)
        layer = RowParallelLinear(width, HIDDEN, bias=True).to(torch.bfloat16)
        layer.weight.data.copy_(full.weight[:, columns])
        layer.bias.data.copy_(full.bias)
        gate, up = gate_up.chunk(2, dim=-1)
        calls: list[tuple[tuple[int, ...], bool]] = []
        triton_gemv.gemv = recording_gemv(calls)
        out = layer.forward_silu_and_mul(torch.cat([gate[:, columns], up[:, columns]], dim=-1))
        torch.save({"out": out, "calls": calls}, out_path)
    finally:
        dist.destroy_process_group()
