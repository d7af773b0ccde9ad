"""The GEMV's per-GPU block configurations: the table benchmarks/gemv_bench.py --write-config writes, read back
and picked per shape (its own entry, the table's default, the built-in default), and the kernel run with a picked
configuration against x @ W.T (interpreter on CPU)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import triton_gemv  # noqa: E402
from serval.layers import fp8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel on a GPU; Triton's interpreter on the CPU
TABLE = json.loads(triton_gemv.config_table_json(
    half={"6144x4096": (4, 1024, 4), "default": (8, 512, 2)}, float8={"4096x14336": (2, 8192, 16)},
    device_name="NVIDIA H200"))


def test_written_table_round_trips_through_its_file(tmp_path):
    path = tmp_path / triton_gemv.config_file_name("NVIDIA H200")
    assert path.name == "gemv,device=NVIDIA_H200.json"
    path.write_text(triton_gemv.config_table_json({"default": (8, 512, 2)}, {}, "NVIDIA H200"))
    assert triton_gemv.pick_config(triton_gemv.load_table(str(path)), 1, 2, float8=False) == (8, 512, 2)


@pytest.mark.parametrize("n, k, float8, expected", [
    (6144, 4096, False, (4, 1024, 4)),  # the shape's own entry
    (4096, 4096, False, (8, 512, 2)),  # not in the table: the table's default
    (4096, 14336, True, (2, 8192, 16)),  # float8 weights read their own section
    (6144, 4096, True, triton_gemv.FP8_CONFIG),  # float8 section without a default: the built-in one
])
def test_pick_config(n, k, float8, expected):
    assert triton_gemv.pick_config(TABLE, n, k, float8) == expected


def test_the_gemvs_of_pending_norms_take_their_own_section_first():
    table = dict(TABLE, **{triton_gemv.PENDING_NORM: {triton_gemv.HALF: {"6144x4096": [16, 2048, 8]}}})
    assert triton_gemv.pick_config(table, 6144, 4096, False, pending_norm=True) == (16, 2048, 8)
    assert triton_gemv.pick_config(table, 6144, 4096, False) == (4, 1024, 4)  # the plain GEMV keeps its entry
    # Shapes and weight types the section lacks: the plain GEMV's choice.
    assert triton_gemv.pick_config(table, 4096, 4096, False, pending_norm=True) == (8, 512, 2)
    assert triton_gemv.pick_config(table, 4096, 14336, True, pending_norm=True) == (2, 8192, 16)


def test_no_table_takes_the_built_in_defaults():
    assert triton_gemv.pick_config(None, 6144, 4096, float8=False) == triton_gemv.DEFAULT_CONFIG
    assert triton_gemv.pick_config(None, 6144, 4096, float8=True) == triton_gemv.FP8_CONFIG
    assert triton_gemv.get_config(6144, 4096, False, torch.device("cpu")) == triton_gemv.DEFAULT_CONFIG


@pytest.mark.parametrize("float8", [False, True])
def test_gemv_with_a_picked_config_matches_matmul(float8):
    # 37 rows and K = 96: neither a multiple of the picked blocks, so the masked paths run.
    torch.manual_seed(7)
    table = {"half": {"37x96": [4, 32, 2]}, "float8": {"37x96": [8, 64, 4]}}
    x, weight = torch.randn(1, 96, device=DEVICE), torch.randn(37, 96, device=DEVICE)
    scale = None
    if float8:
        weight, scale = fp8.quantize_weight(weight)
    expected = x @ (weight.float() * (scale[:, None] if float8 else 1)).T
    config = triton_gemv.pick_config(table, 37, 96, float8)
    assert config == ((8, 64, 4) if float8 else (4, 32, 2))
    torch.testing.assert_close(triton_gemv.gemv(x, weight, config=config, weight_scale=scale), expected,
                               atol=1e-3, rtol=1e-3)
