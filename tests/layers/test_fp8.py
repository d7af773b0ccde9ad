"""FP8 quantization (serval.layers.fp8) against float32 arithmetic: scales, rounding, saturation, and the W8A8
product that Linear runs once quantized."""
from __future__ import annotations

import pytest
import torch

from serval.layers import fp8
from serval.layers.activation import silu_and_mul
from serval.layers.linear import Linear, MergedLinear

# e4m3 keeps 3 mantissa bits: a value is rounded to within 2^-4 of itself (relative), half a step.
E4M3_RELATIVE_STEP = 2.0 ** -4


def test_weight_scales_are_per_output_row_and_the_row_maximum_is_exact():
    torch.manual_seed(0)
    weight = torch.randn(24, 48) * torch.logspace(-3, 2, 24)[:, None]  # rows five decades apart
    q, scale = fp8.quantize_weight(weight)
    assert q.dtype == torch.float8_e4m3fn and q.shape == weight.shape
    assert scale.dtype == torch.float32 and scale.shape == (24,)
    torch.testing.assert_close(scale, weight.abs().amax(dim=1) / 448)
    dequantized = q.float() * scale[:, None]
    # Each row keeps its own relative precision, whatever its magnitude.
    relative = (dequantized - weight).abs() / weight.abs().amax(dim=1, keepdim=True)
    assert relative.max() <= E4M3_RELATIVE_STEP
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((24,), 448.0))


def test_rows_of_zeros_and_huge_values_stay_finite():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1e30, -1e30, 1.0, 0.0]])
    q, scale = fp8.quantize_rows(x)
    assert torch.isfinite(q.float()).all() and torch.isfinite(scale).all()
    assert torch.equal(q[0].float(), torch.zeros(4))
    assert q[1].float().tolist()[:2] == [448.0, -448.0]


def test_gated_rows_quantize_silu_and_mul():
    torch.manual_seed(1)
    gate_up = torch.randn(3, 2 * 32)
    q, scale = fp8.quantize_rows(gate_up, gated=True)
    expected_q, expected_scale = fp8.quantize_rows(silu_and_mul(gate_up))
    assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))
    torch.testing.assert_close(scale, expected_scale)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_is_the_product_of_the_dequantized_operands(with_bias):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64)
    weight = torch.randn(32, 64)
    bias = torch.randn(32) if with_bias else None
    q_weight, weight_scale = fp8.quantize_weight(weight)
    y = fp8.linear(x, q_weight, weight_scale, bias)
    assert y.shape == (2, 3, 32) and y.dtype == x.dtype
    q_x, x_scale = fp8.quantize_rows(x.reshape(6, 64))
    expected = (q_x.float() * x_scale) @ (q_weight.float() * weight_scale[:, None]).T
    expected = expected + (bias if with_bias else 0)
    torch.testing.assert_close(y.reshape(6, 32), expected, atol=1e-4, rtol=1e-4)
    # And close to the unquantized product: fp8 costs a few percent, not the answer.
    exact = x @ weight.T + (bias if with_bias else 0)
    assert (y - exact).norm() / exact.norm() < 0.05


def test_quantized_layers_run_the_fp8_path_and_keep_their_interface():
    torch.manual_seed(3)
    layer = MergedLinear(64, {"gate": 48, "up": 48}, bias=True)
    down = Linear(48, 64, bias=False)
    for module in (layer, down):
        torch.nn.init.normal_(module.weight, std=0.1)
    torch.nn.init.normal_(layer.bias, std=0.1)
    x = torch.randn(5, 64)
    exact = down(silu_and_mul(layer(x)))
    layer.quantize_fp8_()
    down.quantize_fp8_()
    assert layer.weight.dtype == down.weight.dtype == torch.float8_e4m3fn
    assert layer.weight_scale.shape == (96,) and "weight_scale" in layer.state_dict()
    gate_up = layer(x)
    assert gate_up.shape == (5, 96) and gate_up.dtype == torch.float32
    fused = down.forward_silu_and_mul(gate_up)
    torch.testing.assert_close(fused, down(silu_and_mul(gate_up)))
    assert (fused - exact).norm() / exact.norm() < 0.08
    with pytest.raises(ValueError, match="already quantized"):
        down.quantize_fp8_()


def test_the_engine_on_fp8_weights_gives_its_model_s_greedy_tokens(tiny_models):
    """quantization="fp8" through the whole engine (batching, chunked prefill, preemption, prefix cache) gives
    the same tokens as recomputing the quantized model over the whole sequence at every step: per-token activation
    scales make a token's result independent of what it is batched with."""
    from tests.engine.test_engine import make_prompts, pressured_llm
    from tests.model.test_loader import logits_of

    from serval import SamplingParams
    from serval.model.loader import load_model

    path, hf_model = tiny_models("qwen3")
    prompts = make_prompts(hf_model.config.vocab_size, seed=4)
    llm = pressured_llm(path, prefix_caching=True, quantization="fp8", device="cpu")  # as the reference
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    model, _ = load_model(path, quantization="fp8")
    for prompt, output in zip(prompts, outputs):
        tokens = list(prompt)
        for _ in range(12):
            tokens.append(int(logits_of(model, torch.tensor(tokens))[-1].argmax()))
        assert output.outputs[0].token_ids == tokens[len(prompt):], f"prompt of {len(prompt)}"
    assert llm.engine.get_stats().num_preemptions > 0
