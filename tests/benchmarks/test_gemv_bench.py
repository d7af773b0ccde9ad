"""benchmarks/gemv_bench.py --fusions end to end on the CPU (Triton's interpreter, tiny shapes; the times mean
nothing): each fused GEMV timed over a grid, and the fastest written to the table's pending_norm section, which
the GEMVs of a block with pending norms then pick."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from benchmarks import gemv_bench  # noqa: E402
from serval.kernels import triton_gemv  # noqa: E402

SHAPES = [("qkv", 48, 64), ("o", 64, 48)]  # one GEMV that finishes a norm, one that starts the next


def test_fusions_write_the_pending_norm_section_that_get_config_reads(tmp_path):
    rows = gemv_bench.bench_fusions(torch.float16, False, SHAPES, "cpu", grid=gemv_bench.TINY_GRID)
    assert [row["name"] for row in rows] == ["qkv", "o"]
    for row in rows:
        assert tuple(row["best_config"]) in gemv_bench.TINY_GRID and row["best_us"] > 0 and row["plain_us"] > 0
    assert rows[0]["residual_only_us"] is None and rows[1]["residual_only_us"] > 0
    gemv_bench.write_pending_norm_section({"half": rows}, str(tmp_path), tiny=True)
    table = triton_gemv.load_table(os.path.join(tmp_path, "gemv,device_cpu.json"))
    for row in rows:
        picked = triton_gemv.pick_config(table, row["N"], row["K"], False, pending_norm=True)
        assert list(picked) == row["best_config"]
    assert table[triton_gemv.PENDING_NORM].keys() == {triton_gemv.HALF}
