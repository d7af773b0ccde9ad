"""The fused-MoE Triton kernel (its grouped path: the small-batch GEMV path is tests/kernels/test_triton_moe_gemv.py)
against its torch reference (serval.layers.moe.fused_experts_reference, a loop over
experts): random, skewed (every token to the same experts) and sparse routings (most experts empty), batch sizes
1 to 512, float32 and half precision, and gpt-oss's options (per-expert biases, the clamped SwiGLU over interleaved
gate/up rows); in Triton's interpreter on CPU, compiled on a GPU."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import triton_moe  # noqa: E402
from serval.layers.moe import (ClampedSwiGLU, ExpertRouting, fused_experts_reference, softmax_top_k,  # noqa: E402
                               top_k_softmax)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Absolute tolerance in units of the output's largest value: bfloat16's 8 bits of mantissa, rounded after each of
# the two GEMMs and the SwiGLU (at different points than the reference's F.linear), leave a few units in the last
# place of the largest outputs.
RELATIVE_ATOL = {torch.float32: 1e-6, torch.float16: 2 ** -9, torch.bfloat16: 2 ** -5}


def expert_weights(num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * intermediate, hidden, generator=generator) * hidden ** -0.5
    down = torch.randn(num_experts, hidden, intermediate, generator=generator) * intermediate ** -0.5
    return gate_up.to(DEVICE, dtype), down.to(DEVICE, dtype)


def random_routing(num_tokens: int, num_experts: int, top_k: int, seed: int = 0) -> ExpertRouting:
    generator = torch.Generator().manual_seed(seed)
    routing = softmax_top_k(torch.randn(num_tokens, num_experts, generator=generator), top_k, renormalize=True)
    return ExpertRouting(routing.weights.to(DEVICE), routing.expert_ids.to(DEVICE))


def fixed_routing(expert_ids: torch.Tensor, seed: int = 0) -> ExpertRouting:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(expert_ids.shape, generator=generator)
    return ExpertRouting(weights.to(DEVICE), expert_ids.to(DEVICE))


def expert_biases(num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    gate_up_bias = torch.randn(num_experts, 2 * intermediate, generator=generator) * 0.5
    down_bias = torch.randn(num_experts, hidden, generator=generator) * 0.5
    return gate_up_bias.to(DEVICE, dtype), down_bias.to(DEVICE, dtype)


def check(routing: ExpertRouting, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype,
          config: triton_moe.MoeKernelConfig | None = None, biases: tuple | None = None,
          activation: ClampedSwiGLU | None = None) -> torch.Tensor:
    """Kernel against reference; returns the reference's output."""
    gate_up, down = expert_weights(num_experts, hidden, intermediate, dtype)
    x = torch.randn(routing.expert_ids.shape[0], hidden, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    gate_up_bias, down_bias = biases or (None, None)
    expected = fused_experts_reference(
        x.cpu(), gate_up.cpu(), down.cpu(), ExpertRouting(routing.weights.cpu(), routing.expert_ids.cpu()),
        gate_up_bias=None if gate_up_bias is None else gate_up_bias.cpu(),
        down_bias=None if down_bias is None else down_bias.cpu(), activation=activation)
    got = triton_moe.fused_experts_grouped(x, gate_up, down, routing, config, gate_up_bias=gate_up_bias,
                                           down_bias=down_bias, activation=activation)
    assert got.dtype == dtype and got.shape == x.shape
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.cpu(), expected, atol=RELATIVE_ATOL[dtype] * scale, rtol=1e-2)
    return expected


@pytest.mark.parametrize("num_tokens", [1, 2, 7, 33, 512])
def test_random_routing_float32(num_tokens):
    # 512 tokens: more than the experts, so the default configuration's larger M tile runs too.
    check(random_routing(num_tokens, 8, 2, seed=num_tokens), 8, 32, 24 if num_tokens < 512 else 16, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 19, 512])
def test_random_routing_half_precision(dtype, num_tokens):
    check(random_routing(num_tokens, 4, 2, seed=num_tokens), 4, 32, 16, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skewed_routing_every_token_to_the_same_experts(dtype):
    """All 64 tokens to expert 5 (first choice) and 2: two full experts, six empty; many M blocks of one expert."""
    expert_ids = torch.tensor([[5, 2]] * 64)
    check(fixed_routing(expert_ids), 8, 32, 16, dtype)


def test_empty_experts_and_odd_widths():
    """Only experts 0 and 7 of 8 used, top-3 with repeated picks across tokens; widths that are no multiple of any
    tile (hidden 40, intermediate 20), so every mask matters."""
    expert_ids = torch.tensor([[0, 7, 3], [7, 0, 3], [3, 0, 7], [0, 3, 7], [7, 3, 0]])
    check(fixed_routing(expert_ids, seed=2), 8, 40, 20, torch.float32)


@pytest.mark.parametrize("block_m,group_m", [(16, 1), (32, 4), (64, 8)])
def test_every_tile_shape_gives_the_same_result(block_m, group_m):
    """A tuned table may pick any configuration; all must compute the same thing (here T > and < E * block_m)."""
    config = triton_moe.MoeKernelConfig(block_m=block_m, block_n=32, block_k=32, group_m=group_m, num_warps=4,
                                        num_stages=2)
    check(random_routing(45, 6, 2, seed=3), 6, 48, 40, torch.float32, config)


def test_alignment_groups_slots_by_expert_in_blocks():
    expert_ids = torch.tensor([[2, 0], [2, 1], [0, 2]], device=DEVICE)
    blocks = triton_moe.align_by_expert(expert_ids, num_experts=4, block_m=4)
    padding = expert_ids.numel()
    # Expert 0: slots 1, 4; expert 1: slot 3; expert 2: slots 0, 2, 5; expert 3: none; each run padded to 4.
    assert blocks.sorted_slots.tolist()[:12] == [1, 4, padding, padding, 3, padding, padding, padding,
                                                 0, 2, 5, padding]
    assert blocks.num_padded.tolist() == [12]
    assert blocks.block_experts.tolist()[:3] == [0, 1, 2]
    # The static bound: cdiv(6, 4) + min(4, 6) = 6 blocks, the ones past num_padded unused (and unwritten).
    assert len(blocks.block_experts) == 6 and len(blocks.sorted_slots) == 24


def test_config_table_nearest_batch_size_and_default(tmp_path):
    table = {1: triton_moe.MoeKernelConfig(16, 32, 64, 1, 4, 3), 64: triton_moe.MoeKernelConfig(64, 64, 32, 8, 8, 4)}
    path = tmp_path / triton_moe.config_file_name(8, 64, 32, "NVIDIA H200")
    path.write_text(triton_moe.config_table_json(table))
    read = triton_moe._load_table(str(path))
    assert read == table
    assert triton_moe.pick_config(read, 40, 8) == table[64] and triton_moe.pick_config(read, 2, 8) == table[1]
    assert triton_moe.pick_config(None, 40, 8) == triton_moe.default_config(40, 8)
    # Past twice the largest tuned batch size (a partly tuned table), the default's prefill tiles, not 64's.
    assert triton_moe.pick_config(read, 128, 8) == table[64]
    assert triton_moe.pick_config(read, 129, 8) == triton_moe.default_config(129, 8) != table[64]
    # No table for a CPU device: the default.
    assert triton_moe.get_config(8, 64, 32, 40, torch.device("cpu")) == triton_moe.default_config(40, 8)


@pytest.mark.parametrize("num_tokens,num_experts,block_m", [(600, 8, 16), (3, 128, 16), (700, 5, 64)])
def test_alignment_of_random_routings(num_tokens, num_experts, block_m):
    """Every slot exactly once, in slot order within its expert, each block of one expert; more slots than one
    chunk of the kernel's scan (1024) in the first case, many experts unused in the second."""
    generator = torch.Generator().manual_seed(num_tokens)
    expert_ids = torch.randint(0, num_experts, (num_tokens, 2), generator=generator)
    blocks = triton_moe.align_by_expert(expert_ids.to(DEVICE), num_experts, block_m)
    flat = expert_ids.flatten()
    used = blocks.num_padded.item()
    slots = blocks.sorted_slots[:used].cpu().view(-1, block_m)
    block_experts = blocks.block_experts[:used // block_m].cpu()
    real = slots < flat.numel()
    assert sorted(slots[real].tolist()) == list(range(flat.numel()))
    assert torch.equal(flat[slots[real]], block_experts[:, None].expand_as(slots)[real])
    for expert in range(num_experts):
        mine = slots[(block_experts == expert)[:, None].expand_as(slots) & real]
        assert torch.equal(mine, torch.nonzero(flat == expert).flatten().to(mine.dtype))
    counts = torch.bincount(flat, minlength=num_experts)
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum())


# gpt-oss's options. A limit of 0.5 against gate/up values of about unit size: most of them are clamped.
GPT_OSS_ACTIVATION = ClampedSwiGLU(alpha=1.702, limit=0.5)


def gpt_oss_routing(num_tokens: int, num_experts: int, top_k: int, seed: int = 0) -> ExpertRouting:
    generator = torch.Generator().manual_seed(seed)
    routing = top_k_softmax(torch.randn(num_tokens, num_experts, generator=generator), top_k)
    return ExpertRouting(routing.weights.to(DEVICE), routing.expert_ids.to(DEVICE))


@pytest.mark.parametrize("num_experts", [32, 8])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_biases_and_clamped_swiglu_top_4(num_tokens, num_experts):
    """gpt-oss's top-4 routing, odd token counts, widths that are no multiple of the tiles."""
    check(gpt_oss_routing(num_tokens, num_experts, 4, seed=num_tokens), num_experts, 40, 24, torch.float32,
          biases=expert_biases(num_experts, 40, 24, torch.float32), activation=GPT_OSS_ACTIVATION)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_biases_and_clamped_swiglu_half_precision(dtype):
    check(gpt_oss_routing(19, 8, 4, seed=4), 8, 32, 16, dtype, biases=expert_biases(8, 32, 16, dtype),
          activation=GPT_OSS_ACTIVATION)


def test_biases_and_clamped_swiglu_skewed_and_large_batch():
    """Every token to experts 3, 1, 0 and 6 (many M blocks of one expert, four empty) with the prefill tile, and a
    512-token random batch."""
    config = triton_moe.MoeKernelConfig(block_m=64, block_n=32, block_k=32, group_m=8, num_warps=4, num_stages=2)
    check(fixed_routing(torch.tensor([[3, 1, 0, 6]] * 70), seed=6), 8, 32, 16, torch.float32, config,
          biases=expert_biases(8, 32, 16, torch.float32), activation=GPT_OSS_ACTIVATION)
    check(gpt_oss_routing(512, 8, 4, seed=9), 8, 32, 16, torch.float32, biases=expert_biases(8, 32, 16, torch.float32),
          activation=GPT_OSS_ACTIVATION)


def test_each_gpt_oss_option_changes_the_output():
    """The comparisons above cannot pass vacuously: without the clamp, either bias or the interleaving, the
    reference's output differs from the one the kernel matched."""
    routing = gpt_oss_routing(9, 8, 4, seed=2)
    gate_up_bias, down_bias = expert_biases(8, 32, 16, torch.float32)
    full = check(routing, 8, 32, 16, torch.float32, biases=(gate_up_bias, down_bias), activation=GPT_OSS_ACTIVATION)
    for name, options in gpt_oss_variants(gate_up_bias, down_bias).items():
        assert not torch.allclose(check(routing, 8, 32, 16, torch.float32, **options), full, atol=1e-3), name


def gpt_oss_variants(gate_up_bias: torch.Tensor, down_bias: torch.Tensor) -> dict[str, dict]:
    """gpt-oss's expert options with one of them taken away: each must change the output."""
    return {
        "no clamp": dict(biases=(gate_up_bias, down_bias), activation=ClampedSwiGLU(1.702, 1e9)),
        "no gate/up bias": dict(biases=(torch.zeros_like(gate_up_bias), down_bias), activation=GPT_OSS_ACTIVATION),
        "no down bias": dict(biases=(gate_up_bias, torch.zeros_like(down_bias)), activation=GPT_OSS_ACTIVATION),
        "silu, halves": dict(biases=(gate_up_bias, down_bias), activation=None),
    }


def fp8_experts(gate_up: torch.Tensor, down: torch.Tensor):
    """Both stacks as quantization="fp8" stores them: float8 e4m3, a float32 scale per expert and output row."""
    from serval.layers.fp8 import quantize_weight
    quantized = []
    for stack in (gate_up, down):
        pairs = [quantize_weight(expert) for expert in stack]
        quantized += [torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])]
    return quantized


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gpt_oss", [False, True], ids=["silu", "gpt-oss"])
def test_fp8_experts_apply_per_expert_row_scales(dtype, gpt_oss):
    """float8 weights with scales per expert and row (sized unlike each other, so a scale from the wrong expert or
    row shows): the kernel against the reference, which dequantizes each expert before its product."""
    num_experts, hidden, intermediate = 8, 48, 24
    gate_up, down = expert_weights(num_experts, hidden, intermediate, torch.float32)
    spread = torch.logspace(-2, 2, num_experts, device=DEVICE)[:, None, None]  # expert e's weights times 10^(4e/7 - 2)
    gate_up_q, gate_up_scale, down_q, down_scale = fp8_experts(gate_up * spread, down * spread)
    assert gate_up_scale.shape == (num_experts, 2 * intermediate) and down_scale.shape == (num_experts, hidden)
    routing = gpt_oss_routing(21, num_experts, 4, seed=11) if gpt_oss else random_routing(21, num_experts, 2, seed=11)
    options = dict(activation=GPT_OSS_ACTIVATION) if gpt_oss else {}
    if gpt_oss:
        options["gate_up_bias"], options["down_bias"] = expert_biases(num_experts, hidden, intermediate, dtype)
    x = torch.randn(21, hidden, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    on_cpu = {name: tensor.cpu() if isinstance(tensor, torch.Tensor) else tensor for name, tensor in options.items()}
    expected = fused_experts_reference(x.cpu(), gate_up_q.cpu(), down_q.cpu(),
                                       ExpertRouting(routing.weights.cpu(), routing.expert_ids.cpu()),
                                       gate_up_scale=gate_up_scale.cpu(), down_scale=down_scale.cpu(), **on_cpu)
    got = triton_moe.fused_experts_grouped(x, gate_up_q, down_q, routing, gate_up_scale=gate_up_scale,
                                           down_scale=down_scale, **options)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.cpu(), expected, atol=RELATIVE_ATOL[dtype] * scale * 4, rtol=1e-2)
    # And fp8 is what ran: near the unquantized experts (e4m3 keeps 3 mantissa bits, up to 6% off a weight, through
    # two products and the activation), not equal to them; a scale of the wrong expert would be 10x off or more.
    unquantized = fused_experts_reference(x.cpu(), (gate_up * spread).to(dtype).cpu(), (down * spread).to(dtype).cpu(),
                                          ExpertRouting(routing.weights.cpu(), routing.expert_ids.cpu()), **on_cpu)
    error = (got.cpu().float() - unquantized.float()).norm() / unquantized.float().norm()
    assert 0 < error < 0.15
