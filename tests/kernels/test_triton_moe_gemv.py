"""The small-batch MoE path (serval.kernels.triton_moe_gemv: a GEMV per chosen expert, no sort or alignment)
against the torch reference (serval.layers.moe.fused_experts_reference): batch 1 to 32, random and skewed routings,
top-k 1, 2, 6 and 8, odd widths, gpt-oss's biases and clamped SwiGLU, float8 experts; its configuration table; and
triton_moe.fused_experts choosing it by T * k. In Triton's interpreter on CPU, compiled on a GPU."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import triton_moe, triton_moe_gemv  # noqa: E402
from serval.layers.moe import ClampedSwiGLU, ExpertRouting, fused_experts_reference  # noqa: E402
from tests.kernels.test_triton_moe import (DEVICE, GPT_OSS_ACTIVATION, RELATIVE_ATOL, expert_biases,  # noqa: E402
                                           expert_weights, fixed_routing, fp8_experts, gpt_oss_routing,
                                           gpt_oss_variants, random_routing)


def on_cpu(tensor):
    return None if tensor is None else tensor.cpu()


def check(routing: ExpertRouting, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype,
          biases: tuple | None = None, activation: ClampedSwiGLU | None = None,
          gate_up_config: tuple | None = None, down_config: tuple | None = None) -> torch.Tensor:
    """The GEMV path against the reference; returns the GEMV path's output."""
    gate_up, down = expert_weights(num_experts, hidden, intermediate, dtype)
    x = torch.randn(routing.expert_ids.shape[0], hidden, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    gate_up_bias, down_bias = biases or (None, None)
    expected = fused_experts_reference(
        x.cpu(), gate_up.cpu(), down.cpu(), ExpertRouting(routing.weights.cpu(), routing.expert_ids.cpu()),
        gate_up_bias=on_cpu(gate_up_bias), down_bias=on_cpu(down_bias), activation=activation)
    got = triton_moe_gemv.fused_experts_gemv(x, gate_up, down, routing, gate_up_bias=gate_up_bias,
                                             down_bias=down_bias, activation=activation,
                                             gate_up_config=gate_up_config, down_config=down_config)
    assert got.dtype == dtype and got.shape == x.shape
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.cpu(), expected, atol=RELATIVE_ATOL[dtype] * scale, rtol=1e-2)
    return got


@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("num_tokens", [1, 3, 9])
def test_random_routing_float32(num_tokens, top_k):
    # 9 tokens with top-8: 72 slots, past the default max_rows (32) and a tuned table's (64), still right when called
    # directly.
    check(random_routing(num_tokens, 16, top_k, seed=num_tokens * top_k), 16, 64, 16, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 4])
def test_random_routing_half_precision(dtype, num_tokens):
    check(random_routing(num_tokens, 8, 4, seed=num_tokens), 8, 64, 32, dtype)


@pytest.mark.parametrize("top_k", [1, 2])
def test_skewed_routing_every_token_to_one_expert(top_k):
    """All 16 tokens to expert 5 first (and expert 2 second with top-2): one expert read by every slot."""
    expert_ids = torch.tensor([[5, 2][:top_k]] * 16)
    check(fixed_routing(expert_ids), 8, 32, 16, torch.float32)


def test_top_6_pads_the_down_tile():
    """k = 6 (DeepSeek-V2-Lite's): the down kernel's tile holds 8 picks, two of them padding at weight 0."""
    check(random_routing(5, 16, 6, seed=6), 16, 32, 24, torch.float32)


@pytest.mark.parametrize("gate_up_config,down_config", [
    (None, None),
    ((1, 16, 1), (2, 8, 1)),  # BLOCK_K divides neither width: the masked loads along K
    ((4, 32, 2), (16, 32, 2)),  # BLOCK_N divides neither width: the repeated last row
])
def test_odd_widths_and_every_tile_shape(gate_up_config, down_config):
    """hidden 40 and intermediate 20: no multiple of any tile, so every mask and the clamped last row matter."""
    expert_ids = torch.tensor([[0, 7, 3], [7, 0, 3], [3, 0, 7]])
    check(fixed_routing(expert_ids, seed=2), 8, 40, 20, torch.float32, gate_up_config=gate_up_config,
          down_config=down_config)


@pytest.mark.parametrize("num_tokens", [1, 7])
def test_biases_and_clamped_swiglu(num_tokens):
    """gpt-oss: top-4, both biases, the clamp (most gate/up values past a limit of 0.5), interleaved rows."""
    check(gpt_oss_routing(num_tokens, 32, 4, seed=num_tokens), 32, 40, 24, torch.float32,
          biases=expert_biases(32, 40, 24, torch.float32), activation=GPT_OSS_ACTIVATION)


def test_biases_and_clamped_swiglu_bfloat16():
    check(gpt_oss_routing(3, 8, 4, seed=4), 8, 32, 16, torch.bfloat16, biases=expert_biases(8, 32, 16, torch.bfloat16),
          activation=GPT_OSS_ACTIVATION)


def test_each_gpt_oss_option_changes_the_output():
    """The comparisons above cannot pass vacuously: without the clamp, either bias or the interleaving, the output
    the kernel matched differs."""
    routing = gpt_oss_routing(2, 8, 4, seed=2)
    gate_up_bias, down_bias = expert_biases(8, 32, 16, torch.float32)
    full = check(routing, 8, 32, 16, torch.float32, biases=(gate_up_bias, down_bias), activation=GPT_OSS_ACTIVATION)
    for name, options in gpt_oss_variants(gate_up_bias, down_bias).items():
        assert not torch.allclose(check(routing, 8, 32, 16, torch.float32, **options), full, atol=1e-3), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gpt_oss", [False, True], ids=["silu", "gpt-oss"])
def test_fp8_experts_apply_per_expert_row_scales(dtype, gpt_oss):
    """float8 weights with a scale per expert and row, sized unlike each other (expert e's weights times
    10^(4e/7 - 2)), so a scale from the wrong expert or row shows."""
    num_experts, hidden, intermediate, num_tokens = 8, 48, 24, 10  # 10 tokens: every expert chosen, both routings
    gate_up, down = expert_weights(num_experts, hidden, intermediate, torch.float32)
    spread = torch.logspace(-2, 2, num_experts, device=DEVICE)[:, None, None]
    gate_up_q, gate_up_scale, down_q, down_scale = fp8_experts(gate_up * spread, down * spread)
    routing = (gpt_oss_routing(num_tokens, num_experts, 4, seed=11) if gpt_oss
               else random_routing(num_tokens, num_experts, 2, seed=11))
    options = dict(activation=GPT_OSS_ACTIVATION) if gpt_oss else {}
    if gpt_oss:
        options["gate_up_bias"], options["down_bias"] = expert_biases(num_experts, hidden, intermediate, dtype)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    cpu_options = {name: t.cpu() if isinstance(t, torch.Tensor) else t for name, t in options.items()}
    cpu_routing = ExpertRouting(routing.weights.cpu(), routing.expert_ids.cpu())
    expected = fused_experts_reference(x.cpu(), gate_up_q.cpu(), down_q.cpu(), cpu_routing,
                                       gate_up_scale=gate_up_scale.cpu(), down_scale=down_scale.cpu(), **cpu_options)
    got = triton_moe_gemv.fused_experts_gemv(x, gate_up_q, down_q, routing, gate_up_scale=gate_up_scale,
                                             down_scale=down_scale, **options)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.cpu(), expected, atol=RELATIVE_ATOL[dtype] * scale * 4, rtol=1e-2)
    # fp8 is what ran: near the unquantized experts (as near as the grouped path on the same routing), not equal.
    unquantized = fused_experts_reference(x.cpu(), (gate_up * spread).to(dtype).cpu(), (down * spread).to(dtype).cpu(),
                                          cpu_routing, **cpu_options)
    error = (got.cpu().float() - unquantized.float()).norm() / unquantized.float().norm()
    assert 0 < error < 0.15


def test_fused_experts_takes_the_gemv_path_up_to_max_rows(monkeypatch):
    """triton_moe.fused_experts: T * k <= max_rows runs the GEMV kernels (the same bits as calling them), more runs
    the grouped ones (their bits), an explicit grouped config always the grouped ones. The two paths sum in
    different orders, so their float32 bits differ here and the equalities say which one ran."""
    monkeypatch.setenv("SERVAL_MOE_GEMV", "1")  # a GPU without a tuned table keeps the grouped path otherwise
    # A smaller default keeps the boundary's batches (2 and 3 tokens of top-4) cheap in the interpreter.
    monkeypatch.setattr(triton_moe_gemv, "DEFAULT_MAX_ROWS", 8)
    max_rows = triton_moe_gemv.max_rows(32, 64, torch.device(DEVICE))
    assert max_rows >= 4
    gate_up, down = expert_weights(16, 64, 32, torch.float32)
    for num_tokens, gemv_expected in ((max_rows // 4, True), (max_rows // 4 + 1, False)):
        routing = random_routing(num_tokens, 16, 4, seed=num_tokens)
        x = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        gemv = triton_moe_gemv.fused_experts_gemv(x, gate_up, down, routing)
        grouped = triton_moe.fused_experts_grouped(x, gate_up, down, routing)
        assert not torch.equal(gemv, grouped)
        assert torch.equal(triton_moe.fused_experts(x, gate_up, down, routing), gemv if gemv_expected else grouped)
        config = triton_moe.default_config(num_tokens, 16)
        assert torch.equal(triton_moe.fused_experts(x, gate_up, down, routing, config),
                           triton_moe.fused_experts_grouped(x, gate_up, down, routing, config))


def test_config_table_round_trips_and_picks_per_kernel(tmp_path):
    text = triton_moe_gemv.config_table_json(
        "NVIDIA H200", max_rows={"768x2048": 64, "default": 16},
        half={"gate_up": {"768x2048": (4, 512, 4), "default": (2, 1024, 8)}, "down": {"2048x768": (32, 256, 4)}},
        float8={"gate_up": {"768x2048": (8, 1024, 4)}})
    path = tmp_path / triton_moe_gemv.config_file_name("NVIDIA H200")
    assert path.name == "moe_gemv,device=NVIDIA_H200.json"
    path.write_text(text)
    table = triton_moe_gemv.load_table(str(path))
    assert table == json.loads(text)
    assert triton_moe_gemv.pick_max_rows(table, 768, 2048) == 64 and triton_moe_gemv.pick_max_rows(table, 1, 2) == 16
    pick = triton_moe_gemv.pick_config
    assert pick(table, "gate_up", 768, 2048, float8=False) == (4, 512, 4)  # the shape's own entry
    assert pick(table, "gate_up", 1408, 2048, float8=False) == (2, 1024, 8)  # the kernel's default
    assert pick(table, "down", 2048, 768, float8=False) == (32, 256, 4)
    assert pick(table, "down", 4096, 768, float8=False) == triton_moe_gemv.DEFAULT_DOWN  # no default: built-in
    assert pick(table, "gate_up", 768, 2048, float8=True) == (8, 1024, 4)  # float8 reads its own section
    assert pick(table, "down", 2048, 768, float8=True) == triton_moe_gemv.FP8_DOWN
    assert pick(None, "gate_up", 768, 2048, float8=False) == triton_moe_gemv.DEFAULT_GATE_UP
    assert triton_moe_gemv.pick_max_rows(None, 768, 2048) == triton_moe_gemv.DEFAULT_MAX_ROWS
    # A shape where the grouped kernel always won: 0, not the default.
    assert triton_moe_gemv.pick_max_rows({"max_rows": {"768x2048": 0, "default": 16}}, 768, 2048) == 0
    # A CPU device has no table.
    assert triton_moe_gemv.max_rows(768, 2048, torch.device("cpu")) == triton_moe_gemv.DEFAULT_MAX_ROWS


def test_tuned_table_configs_compute_the_same_result():
    """Configurations a tuned table may hold, each kernel alone, on widths some of their BLOCK_K divide (the
    unmasked loads) and some do not."""
    for kernel in ("gate_up", "down"):
        for config in [triton_moe_gemv.DEFAULT_GATE_UP, triton_moe_gemv.DEFAULT_DOWN, (8, 64, 4), (1, 32, 2)]:
            configs = dict(gate_up_config=config) if kernel == "gate_up" else dict(down_config=config)
            check(random_routing(2, 8, 2, seed=9), 8, 64, 32, torch.float32, **configs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_gemv_path_replays_from_a_cuda_graph(monkeypatch):
    """Decode graphs capture the MoE layers: the GEMV path reads the routing on the device (no host sync), so a
    replay with new hidden states and a new routing in the captured tensors equals an eager call on them."""
    monkeypatch.setenv("SERVAL_MOE_GEMV", "1")  # a GPU without a tuned table keeps the grouped kernel otherwise
    gate_up, down = expert_weights(16, 64, 32, torch.bfloat16)
    static_x = torch.zeros(2, 64, device=DEVICE, dtype=torch.bfloat16)
    static_routing = random_routing(2, 16, 4, seed=0)
    assert 2 * 4 <= triton_moe_gemv.max_rows(32, 64, static_x.device)
    triton_moe.fused_experts(static_x, gate_up, down, static_routing)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = triton_moe.fused_experts(static_x, gate_up, down, static_routing)
    for seed in (1, 2):
        routing = random_routing(2, 16, 4, seed=seed)
        x = torch.randn(2, 64, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16)
        static_x.copy_(x)
        static_routing.weights.copy_(routing.weights)
        static_routing.expert_ids.copy_(routing.expert_ids)
        graph.replay()
        assert torch.equal(static_out, triton_moe.fused_experts(x, gate_up, down, routing))
