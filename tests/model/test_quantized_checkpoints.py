"""Quantized checkpoints as they are published (block fp8, compressed-tensors FP8/INT8/W4A16, AWQ, GPTQ): a tiny
random Llama is quantized here into each format's tensor names, shapes, packing orders and quantization_config,
saved with safetensors and loaded by Serval; the reference is transformers running the dequantized weights.

The writers below are this test's own (no Serval code), from each format's published description, so a packing
order or an offset misread on either side shows up as a wrong answer.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from tests.conftest import build_tiny_model
from tests.model.test_loader import INPUT_IDS, logits_of

from serval import LLM, SamplingParams
from serval.model.loader import load_model

# hidden 256 and intermediate 384: every K is a whole number of 128-blocks and 128-groups.
SHAPE = dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
GROUP = 128


def pack(values: torch.Tensor, dim: int, order=range(8)) -> torch.Tensor:
    """Unsigned 4-bit values -> int32 words, 8 consecutive along dim per word, element order[j] in nibble j."""
    values = values.movedim(dim, -1).long()
    values = values.reshape(*values.shape[:-1], -1, 8)
    words = sum((values[..., e] & 0xF) << (4 * j) for j, e in enumerate(order))
    return (words - ((words >> 31) << 32)).to(torch.int32).movedim(-1, dim).contiguous()


def quantize_int4(weight: torch.Tensor, symmetric: bool, g_idx: torch.Tensor | None = None):
    """weight [N, K] -> (q [N, K] in 0..15, scales float16 [N, G], zeros [N, G] in 0..15, g_idx [K]) with
    weight ~= (q - zeros[:, g_idx]) * scales[:, g_idx]."""
    n, k = weight.shape
    g_idx = torch.arange(k) // GROUP if g_idx is None else g_idx
    scales, zeros = torch.empty(n, k // GROUP), torch.empty(n, k // GROUP)
    for g in range(k // GROUP):
        cols = weight[:, g_idx == g]
        if symmetric:
            scales[:, g], zeros[:, g] = cols.abs().amax(dim=1) / 7, 8
        else:
            low, high = cols.amin(dim=1).clamp(max=0), cols.amax(dim=1).clamp(min=0)
            scales[:, g] = (high - low) / 15
            zeros[:, g] = (-low / scales[:, g].half().float()).round().clamp(0, 15)
    scales = scales.half()
    q = (weight / scales.float()[:, g_idx]).round() + zeros[:, g_idx]
    return q.clamp(0, 15).long(), scales, zeros.long(), g_idx


def dequantize_int4(q, scales, zeros, g_idx):
    return (q - zeros[:, g_idx]).float() * scales.float()[:, g_idx]


def quantize_fp8_blocks(weight: torch.Tensor, block: int = 128):
    n, k = weight.shape
    blocks = weight.reshape(n // block, block, k // block, block)
    scale = blocks.abs().amax(dim=(1, 3)) / 448
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(n, k)
    return q, scale, (q.float().reshape_as(blocks) * scale[:, None, :, None]).reshape(n, k)


def write_checkpoint(path, hf_model, quantization_config: dict, layout) -> torch.nn.Module:
    """Rewrite path's checkpoint with every decoder projection through layout(name, weight, layer_input) -> (tensors
    to save by suffix, dequantized weight); return a copy of hf_model running the dequantized weights."""
    reference = copy.deepcopy(hf_model)
    state, reference_state = {}, reference.state_dict()
    perms: dict[str, torch.Tensor] = {}
    for name, tensor in hf_model.state_dict().items():
        if ".layers." in name and name.endswith("_proj.weight"):
            module = name[:-len(".weight")]
            projection = module.rsplit(".", 1)[1]
            # The projections that read the same input share GPTQ's act-order permutation.
            shared_input = module.rsplit(".", 1)[0] + {"q_proj": ".qkv", "k_proj": ".qkv", "v_proj": ".qkv",
                                                       "gate_proj": ".gu", "up_proj": ".gu"}.get(projection, projection)
            perm = perms.setdefault(shared_input, torch.randperm(tensor.shape[1]))
            tensors, dequantized = layout(tensor, perm)
            state.update({f"{module}.{suffix}": value for suffix, value in tensors.items()})
            reference_state[name].copy_(dequantized)
        else:
            state[name] = tensor.contiguous()
    save_file(state, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return reference


def block_fp8(weight, perm):
    q, scale, dequantized = quantize_fp8_blocks(weight)
    return {"weight": q, "weight_scale_inv": scale}, dequantized


def compressed_w4a16(symmetric):
    def layout(weight, perm):
        q, scales, zeros, g_idx = quantize_int4(weight, symmetric)
        tensors = {"weight_packed": pack(q, 1), "weight_scale": scales,
                   "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64)}
        if not symmetric:
            tensors["weight_zero_point"] = pack(zeros, 0)
        return tensors, dequantize_int4(q, scales, zeros, g_idx)
    return layout


def compressed_fp8(per_channel):
    def layout(weight, perm):
        amax = weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().amax().reshape(1)
        scale = amax / 448
        q = (weight / scale).to(torch.float8_e4m3fn)
        return {"weight": q, "weight_scale": scale, "input_scale": torch.ones(1)}, q.float() * scale
    return layout


def compressed_int8(weight, perm):
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    q = (weight / scale).round().clamp(-127, 127).to(torch.int8)
    return {"weight": q, "weight_scale": scale}, q.float() * scale


def awq(weight, perm):
    q, scales, zeros, g_idx = quantize_int4(weight, symmetric=False)
    # AWQ stores W^T: qweight [K, N/8] and qzeros [G, N/8], 8 columns per word in AWQ's order; scales [G, N].
    return ({"qweight": pack(q.t(), 1, AWQ_ORDER), "qzeros": pack(zeros.t(), 1, AWQ_ORDER),
             "scales": scales.t().contiguous()}, dequantize_int4(q, scales, zeros, g_idx))


def gptq(symmetric, act_order, version=1):
    def layout(weight, perm):
        g_idx = torch.empty(weight.shape[1], dtype=torch.long)
        g_idx[perm] = torch.arange(weight.shape[1]) // GROUP
        q, scales, zeros, g_idx = quantize_int4(weight, symmetric, g_idx if act_order else None)
        # qweight [K/8, N], 8 rows of K per word; qzeros [G, N/8] hold zero - 1 in GPTQ's original format.
        stored_zeros = zeros - 1 if version == 1 else zeros
        return ({"qweight": pack(q.t(), 0), "qzeros": pack(stored_zeros.t(), 1), "scales": scales.t().contiguous(),
                 "g_idx": g_idx.int()}, dequantize_int4(q, scales, zeros, g_idx))
    return layout


def compressed_tensors_config(weights: dict, activations: dict | None, checkpoint_format: str) -> dict:
    return {"quant_method": "compressed-tensors", "format": checkpoint_format, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": activations, "output_activations": None}},
            "ignore": ["lm_head"]}


W4 = dict(num_bits=4, type="int", strategy="group", group_size=GROUP, dynamic=False, actorder=None)
FP8_TOKEN = dict(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True)
FP8_STATIC = dict(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
INT8_TOKEN = dict(num_bits=8, type="int", strategy="token", dynamic=True, symmetric=True)

# (quantization_config, layout, tolerance on the logits' relative error). Weight-only formats compute with the
# dequantized weights exactly; W8A8 formats add the activations' rounding (per token, or per token and group),
# which moves a tiny random model's logits by ~8% in float8 (as tests/model/test_loader.py's fp8 tests allow) and
# ~3% in int8; a wrong or missing scale would be off by orders of magnitude.
FORMATS = {
    "block-fp8": ({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                   "weight_block_size": [128, 128]}, block_fp8, 0.15),
    "ct-w4a16-sym": (compressed_tensors_config({**W4, "symmetric": True}, None, "pack-quantized"),
                     compressed_w4a16(True), 1e-3),
    "ct-w4a16-asym": (compressed_tensors_config({**W4, "symmetric": False}, None, "pack-quantized"),
                      compressed_w4a16(False), 1e-3),
    "ct-fp8-channel-dynamic": (compressed_tensors_config(dict(num_bits=8, type="float", strategy="channel",
                                                              symmetric=True), FP8_TOKEN, "float-quantized"),
                               compressed_fp8(True), 0.15),
    "ct-fp8-tensor-static": (compressed_tensors_config(dict(num_bits=8, type="float", strategy="tensor",
                                                            symmetric=True), FP8_STATIC, "float-quantized"),
                             compressed_fp8(False), 0.15),
    "ct-int8-channel": (compressed_tensors_config(dict(num_bits=8, type="int", strategy="channel",
                                                       symmetric=True), INT8_TOKEN, "int-quantized"),
                        compressed_int8, 0.05),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}, awq,
            1e-3),
    "gptq-sym": ({"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": True},
                 gptq(True, False), 1e-3),
    "gptq-asym-act-order": ({"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True,
                             "sym": False}, gptq(False, True), 1e-3),
    "gptq-v2-act-order": ({"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True, "sym": True,
                           "checkpoint_format": "gptq_v2"}, gptq(True, True, version=2), 1e-3),
}


def near_tie_greedy_check(reference, prompt: list[int], tokens: list[int], tolerance: float) -> None:
    """Each greedy token is the reference's argmax, or within tolerance (of the logits' spread) of it: a format's
    rounding may swap near-ties, never clear winners."""
    ids = list(prompt)
    for token in tokens:
        with torch.no_grad():
            logits = reference(torch.tensor([ids])).logits[0, -1]
        margin = float(logits.max() - logits[token])
        assert margin <= tolerance * float(logits.std()) * 4, f"token {token} after {ids}: {margin} below the top"
        ids.append(token)


@pytest.mark.parametrize("name", list(FORMATS))
def test_published_layout_loads_and_matches_the_dequantized_model(tmp_path, name):
    quantization_config, layout, tolerance = FORMATS[name]
    hf_model = build_tiny_model(tmp_path, "llama", seed=7, **SHAPE)
    torch.manual_seed(11)
    reference = write_checkpoint(tmp_path, hf_model, quantization_config, layout)
    model, _ = load_model(str(tmp_path))
    with torch.no_grad():
        expected = reference(INPUT_IDS[None]).logits[0]
    got = logits_of(model, INPUT_IDS)
    relative = float((got - expected).norm() / expected.norm())
    assert relative < tolerance, relative
    # Through the engine (batching, paged KV cache): greedy tokens the dequantized model agrees with.
    llm = LLM(model=str(tmp_path), skip_tokenizer_init=True, max_model_len=64, block_size=4, device="cpu")
    prompts = [INPUT_IDS.tolist(), [1, 17, 42, 300, 8]]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        near_tie_greedy_check(reference, prompt, output.outputs[0].token_ids, tolerance)


@pytest.mark.parametrize("name, switch", [("awq", "SERVAL_W4A16"), ("gptq-asym-act-order", "SERVAL_W4A16"),
                                          ("block-fp8", "SERVAL_FP8_BLOCK")])
def test_the_triton_kernels_give_the_reference_s_logits(tmp_path, monkeypatch, name, switch):
    """The whole model through the Triton kernels (the interpreter on CPU) equals the torch reference path."""
    quantization_config, layout, _ = FORMATS[name]
    hf_model = build_tiny_model(tmp_path, "llama", seed=7, **SHAPE)
    torch.manual_seed(11)
    write_checkpoint(tmp_path, hf_model, quantization_config, layout)
    model, _ = load_model(str(tmp_path))
    expected = logits_of(model, INPUT_IDS)
    monkeypatch.setenv(switch, "triton")
    torch.testing.assert_close(logits_of(model, INPUT_IDS), expected, atol=2e-3, rtol=2e-3)


def test_checkpoints_serval_cannot_run_are_refused_by_name(tmp_path):
    hf_model = build_tiny_model(tmp_path, "llama", seed=7, **SHAPE)
    config, layout, _ = FORMATS["ct-w4a16-sym"]
    # q_proj left unquantized but k_proj and v_proj not: they are one merged layer here.
    write_checkpoint(tmp_path, hf_model, {**config, "ignore": ["lm_head", "model.layers.0.self_attn.q_proj"]},
                     layout)
    with pytest.raises(ValueError, match="merged into model.layers.0.self_attn.qkv_proj.*different formats"):
        load_model(str(tmp_path))
    config, layout, _ = FORMATS["awq"]
    write_checkpoint(tmp_path, hf_model, config, layout)
    with pytest.raises(ValueError, match="quantization='fp8'.*awq.*mixed formats"):
        load_model(str(tmp_path), quantization="fp8")

    def without_zeros(weight, perm):
        tensors, dequantized = awq(weight, perm)
        return {k: v for k, v in tensors.items() if k != "qzeros"}, dequantized
    write_checkpoint(tmp_path, hf_model, config, without_zeros)
    with pytest.raises(ValueError, match=r"awq \(4-bit\) checkpoint: missing tensors.*qkv_proj\[q\]\.qzeros"):
        load_model(str(tmp_path))


def test_merged_projections_must_share_gptq_s_input_order(tmp_path):
    hf_model = build_tiny_model(tmp_path, "llama", seed=7, **SHAPE)
    config, _, _ = FORMATS["gptq-asym-act-order"]
    act_order = gptq(False, True)
    write_checkpoint(tmp_path, hf_model, config,
                     lambda weight, perm: act_order(weight, torch.randperm(weight.shape[1])))
    with pytest.raises(ValueError, match="orders the inputs differently.*one g_idx per merged layer"):
        load_model(str(tmp_path))


def test_dummy_weights_for_a_quantized_config_run_in_its_format(tmp_path):
    """What the GPU benchmarks load: a quantized config.json without weights is quantized into its format."""
    hf_model = build_tiny_model(tmp_path, "llama", seed=7, **SHAPE)
    for name in ("awq", "block-fp8", "ct-int8-channel"):
        config, layout, _ = FORMATS[name]
        write_checkpoint(tmp_path, hf_model, config, layout)
        model, _ = load_model(str(tmp_path), load_format="dummy")
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert qkv.quant_method is not None and model.lm_head.quant_method is None
        logits = logits_of(model, INPUT_IDS)
        assert torch.isfinite(logits).all() and logits.abs().max() > 0


def test_a_layer_the_format_cannot_hold_is_named(tmp_path):
    # intermediate 320: down_proj's 320 inputs are not whole 128-column blocks (nor 128-row groups).
    hf_model = build_tiny_model(tmp_path, "llama", seed=7, **{**SHAPE, "intermediate_size": 320})
    config, _, _ = FORMATS["block-fp8"]

    def padded_blocks(weight, perm):
        n, k = weight.shape
        padded = torch.zeros(-(-n // 128) * 128, -(-k // 128) * 128)
        padded[:n, :k] = weight
        q, scale, dequantized = quantize_fp8_blocks(padded)
        return {"weight": q[:n, :k].contiguous(), "weight_scale_inv": scale}, dequantized[:n, :k]
    write_checkpoint(tmp_path, hf_model, config, padded_blocks)
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj: fp8 \\(block-wise\\).*320 inputs"):
        load_model(str(tmp_path))
    config, layout, _ = FORMATS["awq"]
    with open(os.path.join(tmp_path, "config.json")) as f:
        saved = json.load(f)
    saved["quantization_config"] = config
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(saved, f)
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj: awq \\(4-bit\\).*320 inputs.*groups of 128"):
        load_model(str(tmp_path))
