"""The W4A16 grouped kernels' per-GPU block configurations: the table benchmarks/quant_kernel_tune.py --write-config
writes (per shape its fastest, a default fastest over all shapes), read back and picked per shape, and the kernels
run with picked configurations against the torch reference (interpreter on CPU)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from benchmarks.quant_kernel_tune import device_table, programs_per_sm, split_k_gemv_grid  # noqa: E402
from serval.kernels import triton_w4a16  # noqa: E402
from tests.kernels.test_triton_w4a16 import DEVICE, FLOAT32, random_layout  # noqa: E402

TABLE = json.loads(triton_w4a16.config_table_json(
    gemv={"6144x4096": (128, 128, 8, 1, 1), "default": (256, 64, 0, 2, 1)}, gemm={"4096x14336": (64, 64, 64, 4)},
    device_name="NVIDIA H200"))


def test_table_file_name_and_pick():
    assert triton_w4a16.config_file_name("NVIDIA H200") == "w4a16,device=NVIDIA_H200.json"
    # the shape's own GEMV entry, then the GEMV's default
    assert triton_w4a16.pick_configs(TABLE, 6144, 4096) == ((128, 128, 8, 1, 1), None)
    assert triton_w4a16.pick_configs(TABLE, 4096, 14336) == ((256, 64, 0, 2, 1), (64, 64, 64, 4))
    assert triton_w4a16.pick_configs(TABLE, 6144, 4096)[0].split_k == 8
    assert triton_w4a16.pick_configs(None, 4096, 4096) == (None, None)
    assert triton_w4a16.tuned_configs(torch.zeros(1, 8), 4096, 4096) == (None, None)  # the CPU reads no table


def test_an_older_table_s_gemv_entries_are_skipped():
    # Three numbers (BLOCK_N, BLOCK_K, num_warps) tuned the GEMV before split-K: the shape falls to the table's
    # new-style default, else to the built-in config; the GEMM's entries still count.
    old = {"grouped_gemv": {"4096x4096": [8, 1024, 2], "default": [16, 1024, 2]},
           "grouped_gemm": {"default": [128, 64, 64, 8]}}
    assert triton_w4a16.pick_configs(old, 4096, 4096) == (None, (128, 64, 64, 8))
    mixed = {"grouped_gemv": {"4096x4096": [8, 1024, 2], "default": [128, 64, 4, 1, 1]}}
    assert triton_w4a16.pick_configs(mixed, 4096, 4096) == ((128, 64, 4, 1, 1), None)


def test_the_benchmark_s_table_takes_each_shape_s_best_and_the_fastest_default_overall():
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096)}
    rows = [{"projection": "qkv M=256", "best": [32, 64, 64, 4],
             "all_us": {"[32, 64, 64, 4]": 10.0, "[64, 64, 64, 4]": 12.0, "[16, 16, 16, 2]": 50.0}},
            {"projection": "o M=256", "best": [16, 16, 16, 2],
             "all_us": {"[32, 64, 64, 4]": 9.0, "[64, 64, 64, 4]": 6.0, "[16, 16, 16, 2]": 5.0}}]
    # Per shape its best; overall, [64, 64, 64, 4] (18 us) beats [32, 64, 64, 4] (19) and [16, 16, 16, 2] (55).
    assert device_table(rows, shapes) == {"6144x4096": (32, 64, 64, 4), "4096x4096": (16, 16, 16, 2),
                                          "default": (64, 64, 64, 4)}


@pytest.mark.parametrize("m", [1, 9])
def test_picked_configs_match_the_reference(m):
    k, n, group = 256, 40, 128
    qweight, scales, zeros, g_idx, _ = random_layout(k, n, group, False, seed=m)
    table = {"grouped_gemv": {f"{n}x{k}": [16, 64, 2, 1, 1]}, "grouped_gemm": {"default": [16, 16, 64, 2]}}
    gemv_config, gemm_config = triton_w4a16.pick_configs(table, n, k)
    x = torch.randn(m, k, device=DEVICE)
    got = triton_w4a16.matmul(x, qweight, scales, zeros, g_idx, gemv_config=gemv_config, gemm_config=gemm_config,
                              group_size=group)
    torch.testing.assert_close(got, triton_w4a16.reference_linear(x, qweight, scales, zeros, g_idx), **FLOAT32)


def test_the_quick_grid_fills_an_h200_on_the_o_projection():
    # N = K = 4096 at batch 1 (Llama-3-8B's o projection) on 132 SMs: for each tile width the quick grid tries
    # (128 and 256 columns a warp) at one warp, some SPLIT_K gives at least 4 programs a SM; SPLIT_K 0 does at 128.
    grid = split_k_gemv_grid(quick=True)
    for per_warp in (128, 256):
        one_warp = [c for c in grid if c[0] == per_warp and c[3] == 1]
        assert max(programs_per_sm(c, 4096, 4096, 132) for c in one_warp) >= 4, per_warp
    assert programs_per_sm((128, 64, 0, 1, 1), 4096, 4096, 132) == 32 * 32 / 132
    assert programs_per_sm((256, 64, 64, 1, 1), 4096, 4096, 132) == 16 * 64 / 132
