"""Quantized checkpoints under tensor parallelism (CPU, gloo): compressed-tensors FP8/INT8 W8A8 and W4A16
pack-quantized, AWQ and GPTQ (act-order too), written as published by tests/model/test_quantized_checkpoints.py.

Each rank's repacked tensors are exactly the slice of one device's that its shard covers (one device's loading is
checked there against the dequantized model); greedy tokens at tensor_parallel_size=2 equal size 1's for the
weight-only formats, and are the dequantized model's first choices or near-ties for the W8A8 ones (a row-parallel
shard quantizes the activations over its own columns). What a format's packing cannot split is refused at start,
naming the projection."""
from __future__ import annotations

import json
import os

import pytest
import torch

from serval import LLM
from serval.distributed.weights import load_rank_model
from serval.layers.parallel import shard_layout
from serval.model.loader import load_model
from serval.openai.errors import InvalidArgument
from tests.conftest import build_tiny_model
from tests.distributed.test_quantized import TP, check_tp2_equals_tp1, greedy_tokens
from tests.engine.test_engine import make_prompts, pressured_llm
from tests.model.test_quantized_checkpoints import FORMATS, near_tie_greedy_check, write_checkpoint
from tests.model.tiny_models import build_tiny

# head_dim 64: a rank's q rows (128), K/V rows (64) and intermediate slice (256) are whole 8-column words, and its
# input columns of o_proj (128) and down_proj (256) whole 128-groups.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
WEIGHT_ONLY = ("awq", "gptq-asym-act-order", "ct-w4a16-asym")
W8A8 = ("ct-int8-channel",)


def build(path, name: str):
    """The checkpoint at path in format `name`; returns the dequantized reference (a transformers model)."""
    quantization_config, layout, _ = FORMATS[name]
    hf_model = build_tiny_model(path, "llama", seed=7, **SHAPE)
    torch.manual_seed(11)
    return write_checkpoint(path, hf_model, quantization_config, layout)


@pytest.mark.parametrize("name", WEIGHT_ONLY + W8A8)
def test_greedy_at_two_ranks(tmp_path, name):
    reference = build(tmp_path, name)
    prompts = make_prompts(reference.config.vocab_size, count=6)
    if name in WEIGHT_ONLY:
        check_tp2_equals_tp1(str(tmp_path), prompts)
        return
    llm = pressured_llm(str(tmp_path), prefix_caching=True, tensor_parallel_size=TP)
    try:
        tokens = greedy_tokens(llm, prompts)
    finally:
        llm.shutdown()
    for prompt, output in zip(prompts, tokens):
        near_tie_greedy_check(reference, prompt, output, FORMATS[name][2])


def column_range(name: str, shard: str | None, rank: int, config) -> tuple[int, int]:
    """(start, length) of rank's output rows (column-parallel) or input columns (row-parallel), cut by hand."""
    head_dim = config.hidden_size // config.num_attention_heads
    per_rank = {"q": config.num_attention_heads * head_dim // TP, "k": config.num_key_value_heads * head_dim // TP,
                "gate": config.intermediate_size // TP}
    per_rank |= {"v": per_rank["k"], "up": per_rank["gate"], "o_proj": per_rank["q"], "down_proj": per_rank["gate"]}
    length = per_rank[shard or name.rpartition(".")[2]]
    return rank * length, length


@pytest.mark.parametrize("name", ["gptq-asym-act-order", "awq", "ct-w4a16-asym", "ct-int8-channel",
                                  "ct-fp8-channel-dynamic", "gptq-sym"])
def test_each_rank_holds_its_slice_of_one_devices_tensors(tmp_path, name):
    build(tmp_path, name)
    single, config = load_model(str(tmp_path))
    full = dict(single.named_modules())
    act_order = name.endswith("act-order")
    for rank in range(TP):
        model = load_rank_model(str(tmp_path), shard_layout(config, rank, TP), load_format="auto",
                                dtype=torch.float32, device=torch.device("cpu"), seed=0)
        checked = 0
        for module_name, ours in model.named_modules():
            if getattr(ours, "quant_method", None) is None:
                continue
            theirs = full[module_name]
            four_bit = hasattr(ours, "qweight")
            if ours.shard_names:  # column-parallel: the shard's output rows of each projection merged here
                for shard in ours.shard_names:
                    start, length = column_range(module_name, shard, rank, config)
                    mine = slice(ours.offsets[shard], ours.offsets[shard] + length)
                    full_rows = slice(theirs.offsets[shard] + start, theirs.offsets[shard] + start + length)
                    if four_bit:  # [K/8, N], [G, N], [G, N]: columns; g_idx [K] whole
                        for tensor in ("qweight", "scales", "zeros"):
                            assert torch.equal(getattr(ours, tensor)[:, mine], getattr(theirs, tensor)[:, full_rows])
                        assert torch.equal(ours.g_idx, theirs.g_idx)
                    else:  # [N, K] and per-row scales: rows
                        assert torch.equal(ours.weight[mine].view(torch.uint8),
                                           theirs.weight[full_rows].view(torch.uint8))
                        assert torch.equal(ours.weight_scale[mine], theirs.weight_scale[full_rows])
            else:  # row-parallel: the shard's input columns
                start, length = column_range(module_name, None, rank, config)
                inputs = slice(start, start + length)
                if four_bit:
                    assert torch.equal(ours.qweight, theirs.qweight[start // 8:(start + length) // 8])
                    # In order, the shard's groups are renumbered from its first; act-order keeps every group.
                    first_group = 0 if act_order else start // 128
                    assert torch.equal(ours.g_idx, theirs.g_idx[inputs] - first_group)
                    groups = slice(None) if act_order else slice(start // 128, (start + length) // 128)
                    assert torch.equal(ours.scales, theirs.scales[groups])
                    assert torch.equal(ours.zeros, theirs.zeros[groups])
                else:
                    assert torch.equal(ours.weight.view(torch.uint8), theirs.weight[:, inputs].view(torch.uint8))
                    assert torch.equal(ours.weight_scale, theirs.weight_scale)
            checked += 1
        assert checked == 4 * config.num_hidden_layers, f"rank {rank}"  # qkv, o, gate_up, down


def with_quantization_config(path, quantization_config: dict) -> None:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config, "quantization_config": quantization_config}, f)


def test_groups_that_straddle_ranks_are_refused(tmp_path):
    """intermediate 384: each rank's 192 input columns of down_proj are one and a half 128-groups."""
    hf_model = build_tiny_model(tmp_path, "llama", seed=7, **dict(SHAPE, intermediate_size=384))
    write_checkpoint(tmp_path, hf_model, *FORMATS["awq"][:2])
    with pytest.raises(InvalidArgument, match=r"each rank's shard of down_proj \(192 input columns\) is not whole "
                                              r"awq \(4-bit\) groups of 128") as info:
        LLM(model=str(tmp_path), skip_tokenizer_init=True, tensor_parallel_size=TP)
    assert info.value.param == "tensor_parallel_size"


@pytest.mark.parametrize("family, message", [
    ("qwen3_moe", "does not shard quantized Qwen3MoeForCausalLM checkpoints"),
    ("phi3", "does not shard Phi3ForCausalLM's fused qkv_proj/gate_up_proj in gptq"),
])
def test_checkpoints_left_unsharded_are_refused(tmp_path, family, message):
    build_tiny(tmp_path, family)
    with_quantization_config(tmp_path, FORMATS["gptq-sym"][0])
    with pytest.raises(InvalidArgument, match=message) as info:
        LLM(model=str(tmp_path), skip_tokenizer_init=True, tensor_parallel_size=TP)
    assert info.value.param == "quantization"
