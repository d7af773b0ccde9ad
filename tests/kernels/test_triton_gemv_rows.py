"""The multi-row Triton GEMV (2 to 8 rows: a speculative verify step, a few decode streams) against x @ W.T, in both
variants (CUDA-core FMAs and tl.dot), with bias, SwiGLU fused and float8 weights; its per-GPU table section; the
linear layers' opt-in dispatch; and a 5-row verify step of a tiny model through it against the torch path
(interpreter on CPU, compiled on GPU)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from serval import LLM  # noqa: E402
from serval.engine.model_runner import ForwardInputs  # noqa: E402
from serval.kernels import triton_gemv  # noqa: E402
from serval.kernels.triton_gemv import RowsConfig  # noqa: E402
from serval.layers import fp8  # noqa: E402
from serval.layers.activation import silu_and_mul  # noqa: E402
from serval.layers.linear import Linear, takes_small_batch_gemv  # noqa: E402
from tests.conftest import build_tiny_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FMA = RowsConfig(block_n=4, block_k=32, num_warps=2, use_dot=False)
DOT = RowsConfig(block_n=16, block_k=32, num_warps=4, use_dot=True, num_stages=2)
HALF_TOLERANCE = dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("config", [FMA, DOT], ids=["fma", "dot"])
@pytest.mark.parametrize("m", [2, 3, 5, 8])
def test_rows_match_matmul_with_bias(config, m):
    # 37 rows of W: no multiple of BLOCK_N; K = 80: not a multiple of BLOCK_K, so the last tile is masked.
    torch.manual_seed(m)
    x = torch.randn(m, 80, device=DEVICE, dtype=torch.float16)
    weight = torch.randn(37, 80, device=DEVICE, dtype=torch.float16)
    bias = torch.randn(37, device=DEVICE, dtype=torch.float16)
    y = triton_gemv.gemv_rows(x, weight, bias, config=config)
    assert y.shape == (m, 37) and y.dtype == torch.float16
    torch.testing.assert_close(y.float(), x.float() @ weight.float().T + bias.float(), **HALF_TOLERANCE)


@pytest.mark.parametrize("config", [FMA, DOT, None], ids=["fma", "dot", "default"])
def test_float32_rows_and_a_strided_weight_view(config):
    # Rows of a larger matrix (a shard of a merged projection): stride(0) is not K; K = 64 is whole tiles.
    torch.manual_seed(3)
    big = torch.randn(40, 70, device=DEVICE)
    weight = big[2:35, :64]
    x = torch.randn(2, 3, 64, device=DEVICE)  # any leading shape
    y = triton_gemv.gemv_rows(x, weight, config=config)
    # tl.dot multiplies float32 tiles in tf32 on a GPU (the engine sends it half precision only).
    tf32 = config is not None and config.use_dot and DEVICE == "cuda"
    tolerance = dict(atol=3e-2, rtol=1e-2) if tf32 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y, x.reshape(6, 64) @ weight.T, **tolerance)


# Triton 3.6's interpreter multiplies bfloat16 tiles in tl.dot wrongly (1e11 off on CPU), so the dot variant is
# tested in float16 there and in bfloat16 only on a GPU.
DOT_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16


@pytest.mark.parametrize("config, dtype", [(FMA, torch.bfloat16), (DOT, DOT_DTYPE)], ids=["fma", "dot"])
@pytest.mark.parametrize("m, k", [(3, 72), (8, 64)])
def test_gated_rows_are_down_of_silu_and_mul(config, dtype, m, k):
    torch.manual_seed(k + m)
    gate_up = torch.randn(m, 2 * k, device=DEVICE, dtype=dtype)
    weight = torch.randn(19, k, device=DEVICE, dtype=dtype)
    activation = silu_and_mul(gate_up.cpu()).to(DEVICE)  # the torch reference, rounded to dtype as the model is
    y = triton_gemv.gemv_rows(gate_up, weight, config=config, gated=True)
    assert y.shape == (m, 19) and y.dtype == dtype
    torch.testing.assert_close(y.float(), activation.float() @ weight.float().T, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("config", [FMA, DOT], ids=["fma", "dot"])
@pytest.mark.parametrize("gated", [False, True])
def test_fp8_weights_with_row_scales(config, gated):
    torch.manual_seed(11 + gated)
    q_weight, weight_scale = fp8.quantize_weight(torch.randn(37, 96, device=DEVICE))
    x = torch.randn(5, 192 if gated else 96, device=DEVICE, dtype=torch.float16)
    activation = silu_and_mul(x.cpu()).to(DEVICE) if gated else x
    expected = activation.float() @ (q_weight.float() * weight_scale[:, None]).T
    y = triton_gemv.gemv_rows(x, q_weight, config=config, gated=gated, weight_scale=weight_scale)
    assert y.shape == (5, 37) and y.dtype == torch.float16
    torch.testing.assert_close(y.float(), expected, **HALF_TOLERANCE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels, tensor cores and PDL: a GPU's")
@pytest.mark.parametrize("config", [triton_gemv.ROWS_CONFIG, RowsConfig(64, 128, 4, True, 3),
                                    RowsConfig(32, 256, 4, True, 4)], ids=["fma", "dot", "dot-4-stages"])
@pytest.mark.parametrize("quantized", [False, True])
def test_bf16_rows_on_a_gpu_agree_with_the_float32_product(config, quantized):
    # Blocks of the size benchmarks/gemv_bench.py tunes, bf16 activations as the engine runs them.
    torch.manual_seed(6)
    weight = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    scale = None
    if quantized:
        weight, scale = fp8.quantize_weight(weight)
    dense = weight.float() * (scale[:, None] if quantized else 1)
    for m in (2, 5, 8):
        x = torch.randn(m, 8192, device="cuda", dtype=torch.bfloat16)
        plain = triton_gemv.gemv_rows(x[:, :4096], weight, config=config, weight_scale=scale)
        gated = triton_gemv.gemv_rows(x, weight, config=config, gated=True, weight_scale=scale)
        torch.testing.assert_close(plain.float(), x[:, :4096].float() @ dense.T, atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(gated.float(), silu_and_mul(x).float() @ dense.T, atol=3e-2, rtol=3e-2)


TABLE = json.loads(triton_gemv.config_table_json(
    half={"default": (8, 512, 2)}, float8={}, device_name="NVIDIA H200",
    rows_half={2: {"6144x4096": DOT, "default": FMA}, 8: {"default": RowsConfig(8, 256, 8, False)}},
    rows_float8={4: {"default": RowsConfig(2, 2048, 4, False)}}))


@pytest.mark.parametrize("m, n, k, float8, expected", [
    (2, 6144, 4096, False, DOT),  # the shape's own entry at its row count
    (2, 4096, 4096, False, FMA),  # that row count's default
    (5, 6144, 4096, False, RowsConfig(8, 256, 8, False)),  # the fewest tuned rows >= 5: 8's
    (8, 6144, 4096, True, RowsConfig(2, 2048, 4, False)),  # past the most tuned rows: the most tuned
    (3, 1, 2, True, RowsConfig(2, 2048, 4, False)),
])
def test_pick_rows_config(m, n, k, float8, expected):
    assert triton_gemv.pick_rows_config(TABLE, m, n, k, float8) == expected


def test_a_table_without_rows_takes_the_built_in_rows_defaults(tmp_path):
    # A table written before the multi-row GEMV (this repository's H200 one) still loads, for both kernels.
    path = tmp_path / triton_gemv.config_file_name("NVIDIA H200")
    path.write_text(triton_gemv.config_table_json({"default": (8, 512, 2)}, {}, "NVIDIA H200"))
    old = triton_gemv.load_table(str(path))
    assert triton_gemv.pick_config(old, 1, 2, float8=False) == (8, 512, 2)
    assert triton_gemv.pick_rows_config(old, 5, 1, 2, float8=False) == triton_gemv.ROWS_CONFIG
    assert triton_gemv.pick_rows_config(old, 5, 1, 2, float8=True) == triton_gemv.FP8_ROWS_CONFIG
    assert triton_gemv.get_rows_config(5, 1, 2, False, torch.device("cpu")) == triton_gemv.ROWS_CONFIG


def recording(calls: list[tuple[int, bool]]):
    """triton_gemv.gemv_rows, recording each call's rows and whether SwiGLU was fused in."""
    gemv_rows = triton_gemv.gemv_rows

    def record(x, weight, bias=None, config=None, gated=False, weight_scale=None):
        calls.append((x.numel() // x.shape[-1], gated))
        return gemv_rows(x, weight, bias, config, gated, weight_scale)

    return record


@pytest.mark.parametrize("quantized", [False, True])
def test_linear_takes_the_rows_gemv_only_when_asked(monkeypatch, quantized):
    torch.manual_seed(5)
    layer = Linear(64, 48, bias=True).to(DEVICE, torch.bfloat16)
    down = Linear(32, 48, bias=False).to(DEVICE, torch.bfloat16)
    for module in (layer, down):
        torch.nn.init.normal_(module.weight, std=0.1)
        if quantized:
            module.quantize_fp8_()
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(5, 64, device=DEVICE, dtype=torch.bfloat16)
    gate_up = torch.randn(5, 64, device=DEVICE, dtype=torch.bfloat16)
    monkeypatch.setenv("SERVAL_GEMV", "triton")
    monkeypatch.delenv("SERVAL_GEMV_ROWS", raising=False)
    assert not takes_small_batch_gemv(x, 64)  # off by default: cuBLAS until measured
    expected, expected_down = layer(x).float(), down.forward_silu_and_mul(gate_up).float()
    calls: list[tuple[int, bool]] = []
    monkeypatch.setattr(triton_gemv, "gemv_rows", recording(calls))
    monkeypatch.setenv("SERVAL_GEMV_ROWS", "8")
    assert not takes_small_batch_gemv(torch.randn(9, 64, dtype=torch.bfloat16), 64)  # past GEMV_MAX_ROWS
    assert not takes_small_batch_gemv(x.float(), 64)  # half precision only
    ours, ours_down = layer(x).float(), down.forward_silu_and_mul(gate_up).float()
    assert calls == [(5, False), (5, True)]
    # The float8 path off the GEMV quantizes x per token; the GEMV reads it unquantized: within fp8's rounding.
    tolerance = dict(atol=0.15, rtol=0.05) if quantized else HALF_TOLERANCE
    torch.testing.assert_close(ours, expected, **tolerance)
    torch.testing.assert_close(ours_down, expected_down, **tolerance)


@pytest.mark.parametrize("value, rows, taken", [("8", 8, True), ("4", 5, False), ("4", 4, True), ("1", 2, False),
                                                ("0", 2, False), ("", 2, False), ("on", 2, False), ("64", 9, False)])
def test_serval_gemv_rows_is_the_most_rows_taken(monkeypatch, value, rows, taken):
    # A value that is no number leaves the GEMV off (logged once) instead of failing every forward.
    monkeypatch.setenv("SERVAL_GEMV", "triton")
    monkeypatch.setenv("SERVAL_GEMV_ROWS", value)
    assert takes_small_batch_gemv(torch.zeros(rows, 16, dtype=torch.float16), 16) == taken


PROMPT = [5, 17, 42]
DRAFTS = [7, 9, 11, 13]


def verify_step_logits(llm: LLM) -> torch.Tensor:
    """Prefill PROMPT, then a verify step's forward (its last token and 4 drafts: 5 rows, logits for each)."""
    runner, n = llm.engine.runner, len(PROMPT)
    runner.forward_logits(ForwardInputs(PROMPT, list(range(n)), list(range(n)), [0, n], [n], [[0]], [n - 1]))
    rows = len(DRAFTS) + 1
    positions = list(range(n, n + rows))
    return runner.forward_logits(ForwardInputs([PROMPT[-1], *DRAFTS], positions, positions, [0, rows], [n + rows],
                                               [[0]], list(range(rows))))


def test_a_five_row_verify_step_through_the_rows_gemv_equals_the_torch_path(tmp_path, monkeypatch):
    build_tiny_model(tmp_path, "llama")
    llm = LLM(model=str(tmp_path), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=64, max_num_seqs=2,
              block_size=16)
    try:
        monkeypatch.delenv("SERVAL_GEMV_ROWS", raising=False)
        expected = verify_step_logits(llm).float()
        calls: list[tuple[int, bool]] = []
        with monkeypatch.context() as patch:
            patch.setenv("SERVAL_GEMV", "triton")
            patch.setenv("SERVAL_GEMV_ROWS", "8")
            patch.setattr(triton_gemv, "gemv_rows", recording(calls))
            ours = verify_step_logits(llm).float()
        layers = llm.engine.hf_config.num_hidden_layers
        # The 3-token prefill takes it too, for every projection but the LM head (one logits row: the one-row
        # GEMV); the verify step for every projection of its 5 rows (q/k/v, o, gate/up, down with SwiGLU fused)
        # and the LM head's 5 rows.
        assert [rows for rows, _ in calls] == [3] * (4 * layers) + [5] * (4 * layers + 1)
        assert [gated for _, gated in calls] == [False, False, False, True] * (2 * layers) + [False]
        torch.testing.assert_close(ours, expected, atol=3e-2, rtol=3e-2)
        assert torch.equal(ours.argmax(-1), expected.argmax(-1))
    finally:
        llm.engine.shutdown()
