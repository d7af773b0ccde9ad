"""The W4A16 split-K decode GEMV (serval.kernels.triton_w4a16_gemv) against the torch reference, dequantize then
matmul (interpreter on CPU, compiled on GPU): 1 to 4 rows, odd N, K at group boundaries, symmetric and asymmetric
zero points, the float32 path and the float16 one (16-bit x); how it cuts K; and its sm_90 code, compiled without a
GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import triton_w4a16, triton_w4a16_gemv  # noqa: E402
from tests.kernels.test_triton_w4a16 import DEVICE, FLOAT32, random_layout  # noqa: E402


@pytest.mark.parametrize("m, k, n, group, symmetric", [
    (1, 256, 40, 128, False), (2, 256, 72, 64, False), (3, 384, 24, 128, True), (4, 256, 16, 256, False),
    (1, 96, 8, 32, True)])
def test_split_k_gemv_matches_the_reference(m, k, n, group, symmetric):
    # The split-K decode GEMV (groups in order), 1 to 4 rows at once, against dequantize-then-matmul. n=40, 72, 24,
    # 8: partial column blocks for BLOCK_N 16 to 256; split 3 over 8 tiles (k=256, BLOCK_K 32): slices of 3, 3
    # and 2; split 2 over k=384: 3+3 tiles of 64; group 256 = k: one group a column (per-channel); BLOCK_K 128
    # over groups of 64 or 32: capped to the group. symmetric: the zero point 8 everywhere.
    qweight, scales, zeros, g_idx, _ = random_layout(k, n, group, False, seed=m * 7 + k + n, symmetric=symmetric)
    x = torch.randn(m, k, device=DEVICE)
    expected = triton_w4a16.reference_linear(x, qweight, scales, zeros, g_idx)
    for config in [None, (16, 32, 3, 1, 1), (64, 128, 1, 2, 1), (32, 64, 2, 1, 1)]:
        got = triton_w4a16.matmul(x, qweight, scales, zeros, g_idx, gemv_config=config, group_size=group)
        torch.testing.assert_close(got, expected, **FLOAT32)
    # Each column block's last program sets its arrival counter back to zero for the next launch.
    assert not triton_w4a16_gemv._arrival_counters(x.device).any()


def test_split_k_gemv_adds_more_slices_than_one_load_reads():
    # 32 slices of one tile: the last program of each column block reads the partials 16 slices a load, twice.
    qweight, scales, zeros, g_idx, _ = random_layout(512, 8, 128, False, seed=3)
    x = torch.randn(2, 512, device=DEVICE)
    got = triton_w4a16.matmul(x, qweight, scales, zeros, g_idx, gemv_config=(16, 16, 32, 1, 1), group_size=128)
    torch.testing.assert_close(got, triton_w4a16.reference_linear(x, qweight, scales, zeros, g_idx), **FLOAT32)
    assert not triton_w4a16_gemv._arrival_counters(x.device).any()


def test_split_k_gemv_in_half_precision():
    qweight, scales, zeros, g_idx, _ = random_layout(512, 48, 128, False, seed=11)
    x = torch.randn(1, 512, device=DEVICE, dtype=torch.bfloat16)
    expected = triton_w4a16.reference_linear(x, qweight, scales.bfloat16(), zeros, g_idx)
    got = triton_w4a16.matmul(x, qweight, scales.bfloat16(), zeros, g_idx, gemv_config=(32, 128, 4, 1, 1),
                              group_size=128)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=2e-2)


def test_k_slices_are_whole_tiles_and_never_empty():
    for tiles in range(1, 40):
        for split_k in range(0, 45):
            config = triton_w4a16_gemv.SplitKConfig(block_n=128, block_k=64, split_k=split_k, num_warps=1, num_stages=1)
            slices = triton_w4a16_gemv.split_k_slices(config, 4096, tiles * 64, 64, torch.device("cpu"))
            assert (slices.count - 1) * slices.tiles_per_slice < tiles <= slices.count * slices.tiles_per_slice
            assert slices.count <= max(1, split_k) or split_k == 0
    # split_k 0 on one SM (the CPU): 8 warps' worth of programs, in slices of at least 128 rows of K.
    auto = triton_w4a16_gemv.SplitKConfig(block_n=128, block_k=64, split_k=0, num_warps=1, num_stages=1)
    assert triton_w4a16_gemv.split_k_slices(auto, 128, 4096, 64, torch.device("cpu")).count == 8
    assert triton_w4a16_gemv.split_k_slices(auto, 256, 4096, 64, torch.device("cpu")).count == 4  # two column blocks
    assert triton_w4a16_gemv.split_k_slices(auto, 128, 256, 64, torch.device("cpu")).count == 2  # 128 rows a slice
    # On an H200 (132 SMs), N = K = 4096 (Llama-3-8B's o projection) at 128 columns and one warp a program: 32
    # column blocks x 32 slices, at least 4 programs a SM; at 256 columns and 2 warps the 128-row floor holds it to
    # 16 x 32 (3.9 a SM).
    h200 = dict(device=torch.device("cpu"), num_sms=132)
    assert triton_w4a16_gemv.split_k_slices(auto, 4096, 4096, 64, **h200) == (32, 2)
    wide = auto._replace(block_n=256, num_warps=2)
    assert triton_w4a16_gemv.split_k_slices(wide, 4096, 4096, 64, **h200) == (32, 2)
    assert triton_w4a16_gemv.split_k_slices(wide._replace(split_k=64), 4096, 4096, 64, **h200) == (64, 1)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_split_k_gemv_replays_in_a_cuda_graph():
    # As the engine's decode graphs run it: the partials come from the graph's pool, the counters (allocated by the
    # eager warm-up) are left at zero by every replay, and replays with new inputs give new, right answers.
    qweight, scales, zeros, g_idx, _ = random_layout(4096, 520, 128, False, seed=13)
    scales = scales.bfloat16()
    x = torch.randn(1, 4096, device=DEVICE, dtype=torch.bfloat16)
    config = (128, 64, 8, 1, 1)
    triton_w4a16.matmul(x, qweight, scales, zeros, g_idx, gemv_config=config, group_size=128)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = triton_w4a16.matmul(x, qweight, scales, zeros, g_idx, gemv_config=config, group_size=128)
    for seed in range(3):
        x.copy_(torch.randn(1, 4096, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        torch.testing.assert_close(y.float(), triton_w4a16.reference_linear(x, qweight, scales, zeros, g_idx),
                                   atol=5e-2, rtol=2e-2)
    assert not triton_w4a16_gemv._arrival_counters(x.device).any()


@pytest.mark.parametrize("m, k, n, group, symmetric, dtype", [
    (1, 256, 40, 128, False, torch.bfloat16), (2, 256, 72, 64, True, torch.float16),
    (3, 384, 24, 128, False, torch.bfloat16), (4, 256, 16, 256, False, torch.float16),
    (1, 96, 8, 32, True, torch.bfloat16)])
def test_split_k_gemv_float16_products_match_the_reference(m, k, n, group, symmetric, dtype):
    # 16-bit x takes the GEMV's float16 path: x staged per program as float16 scaled by a power of two, products
    # two to an instruction, each tile summed in float16. Its error against dequantize-then-matmul in float32 must
    # stay within what rounding the output to 16 bits costs (one part in 256 for bfloat16) and a little more.
    # x spans six decades (5e-3 to 5e3): float16 alone would overflow 15 x 5e3 x a tile's 64 rows.
    qweight, scales, zeros, g_idx, _ = random_layout(k, n, group, False, seed=m * 5 + k + n, symmetric=symmetric)
    generator = torch.Generator().manual_seed(m + n)
    magnitudes = 10.0 ** (torch.rand(m, k, generator=generator) * 6 - 2.3)
    x = (torch.randn(m, k, generator=generator) * magnitudes).to(DEVICE, dtype)
    expected = triton_w4a16.reference_linear(x, qweight, scales.to(dtype), zeros, g_idx)
    scale_of_output = expected.abs().amax(dim=1, keepdim=True)
    for config in [None, (16, 32, 3, 1, 1), (64, 128, 1, 2, 1), (32, 64, 2, 1, 1)]:
        got = triton_w4a16.matmul(x, qweight, scales.to(dtype), zeros, g_idx, gemv_config=config, group_size=group)
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert ((got.float() - expected).abs() / scale_of_output).max() < 1e-2, config
    assert not triton_w4a16_gemv._arrival_counters(x.device).any()


def test_split_k_gemv_stages_x_in_several_loads(monkeypatch):
    # A slice of K longer than the staging chunk (the whole K of one program here: split 1) is staged a chunk at a
    # time, the scale from all of them: the largest |x| sits in the last chunk.
    monkeypatch.setattr(triton_w4a16_gemv, "X_STAGE_CHUNK", 64)
    qweight, scales, zeros, g_idx, _ = random_layout(512, 24, 128, False, seed=17)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(1))
    x[:, -3] = 3e4
    x = x.to(DEVICE, torch.bfloat16)
    expected = triton_w4a16.reference_linear(x, qweight, scales.bfloat16(), zeros, g_idx)
    got = triton_w4a16.matmul(x, qweight, scales.bfloat16(), zeros, g_idx, gemv_config=(32, 64, 1, 1, 1),
                              group_size=128)
    assert ((got.float() - expected).abs() / expected.abs().amax(dim=1, keepdim=True)).max() < 1e-2


def test_split_k_gemv_zero_row():
    # An all-zero row (its scale's exponent at the bottom of the range) gives zeros, not NaN.
    qweight, scales, zeros, g_idx, _ = random_layout(256, 16, 128, False, seed=19)
    x = torch.zeros(2, 256, device=DEVICE, dtype=torch.bfloat16)
    x[1] = 1.0
    got = triton_w4a16.matmul(x, qweight, scales.bfloat16(), zeros, g_idx, gemv_config=(16, 32, 2, 1, 1),
                              group_size=128)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    torch.testing.assert_close(got[1].float(), triton_w4a16.reference_linear(x, qweight, scales.bfloat16(), zeros,
                                                                               g_idx)[1], atol=3e-2, rtol=1e-2)


def sm90_tools_present() -> bool:
    import triton
    return os.path.isfile(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))


def sm90_counts(script: str):
    """What `script` (Python that compiles kernels for sm_90 and dumps JSON to stdout) printed, run in a process of
    its own without Triton's interpreter, which this one may run and which compiles nothing. No GPU needed."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.skipif(not sm90_tools_present(), reason="Triton's bundled ptxas and cuobjdump")
def test_the_float16_path_compiles_for_sm90_at_under_three_instructions_a_weight():
    # Compiled for sm_90 with its inline PTX, no GPU needed (in a process of its own: this one may run Triton's
    # interpreter, which compiles nothing): the K loop of the built-in config at one row (2.3 when written; the
    # float32 path's was 4.5), and at 4 rows (BLOCK_K capped at 32) under 1.5 a product.
    script = ("import json, sys; from benchmarks.quant_kernel_tune import inner_loop_instructions as count; "
              "from serval.kernels.triton_w4a16 import GROUPED_GEMV_CONFIG as c; "
              "json.dump([count(tuple(c), rows=1), count(tuple(c), rows=4)], sys.stdout)")
    one_row, four_rows = sm90_counts(script)
    assert one_row["per_weight"] < 3.0 and one_row["opcodes"].get("HFMA2", 0) > one_row["loop_instructions"] / 4
    assert four_rows["per_weight"] < 4 * 1.5


def test_tiles_of_one_word_a_thread_skip_the_paired_ptx():
    # The PTX takes two words a thread; BLOCK_N 16 x BLOCK_K 16 on a warp holds one (it takes plain arithmetic).
    assert not triton_w4a16_gemv._pairs_columns(triton_w4a16_gemv.SplitKConfig(16, 16, 32, 1, 1), 16)
    assert triton_w4a16_gemv._pairs_columns(triton_w4a16_gemv.SplitKConfig(16, 32, 3, 1, 1), 32)
    assert triton_w4a16_gemv._pairs_columns(triton_w4a16.GROUPED_GEMV_CONFIG, 64)
