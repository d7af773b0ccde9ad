"""Quantized layers under tensor parallelism (CPU, gloo): quantization="fp8" quantizes each rank's slice, a
block-fp8 checkpoint's blocks are read rank by rank (Phi-3's fused projections part by part); greedy tokens equal
tensor_parallel_size=1's in the same format. Each rank's float8 weights and block scales are exactly its slice of the
checkpoint's; blocks that straddle ranks are refused at start, naming the projection. The other checkpoint formats:
test_quantized_formats.py."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from serval import LLM, SamplingParams
from serval.distributed.weights import load_rank_model
from serval.layers.parallel import RowParallelLinear, shard_layout
from serval.openai.errors import InvalidArgument
from tests.conftest import build_tiny_model
from tests.distributed.test_weights import expected_slices, ours
from tests.engine.test_engine import NUM_NEW_TOKENS, make_prompts, pressured_llm
from tests.model.test_quantized_checkpoints import block_fp8, near_tie_greedy_check, write_checkpoint
from tests.model.tiny_models import build_tiny

TP = 2
BLOCK = 128
BLOCK_FP8_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                    "weight_block_size": [BLOCK, BLOCK]}
# head_dim 128 and intermediate 512: every rank's rows and input columns are whole 128-blocks at TP 2 (the one
# K/V head a rank holds is one block of rows).
BLOCK_SHAPE = dict(hidden_size=512, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [output.outputs[0].token_ids for output in outputs]


def check_tp2_equals_tp1(path: str, prompts: list[list[int]], **engine_args) -> None:
    expected = greedy_tokens(pressured_llm(path, prefix_caching=True, **engine_args), prompts)
    llm = pressured_llm(path, prefix_caching=True, tensor_parallel_size=TP, **engine_args)
    try:
        assert greedy_tokens(llm, prompts) == expected
    finally:
        llm.shutdown()
    assert not [p for p in llm.engine.executor.processes if p.is_alive()]


# How far below transformers' (float) top logit a token fp8 picks greedily may be, in units of 4 standard
# deviations of the logits: tests/model/test_quantized_checkpoints.py's bound for fp8 formats. A wrong or missing
# scale, or a lost partial sum, lands far outside it.
FP8_TOLERANCE = 0.15


def test_fp8_at_two_ranks_is_as_close_to_transformers_as_at_one(tmp_path):
    """Column-parallel shards keep one device's per-row scales; a row-parallel shard (o_proj, down_proj) scales
    its rows, and the activations' tokens, over its own columns: finer than one device's, so not bit-equal to
    fp8 at one rank (a near-tie may go the other way). Both pick only transformers' first choices or near-ties."""
    hf_model = build_tiny_model(tmp_path, "llama")
    prompts = make_prompts(hf_model.config.vocab_size, count=8)
    llm = pressured_llm(str(tmp_path), prefix_caching=True, tensor_parallel_size=TP, quantization="fp8")
    try:
        two_ranks = greedy_tokens(llm, prompts)
        down_proj = llm.engine.model.model.layers[0].mlp.down_proj
        assert isinstance(down_proj, RowParallelLinear) and down_proj.weight.dtype == torch.float8_e4m3fn
        assert down_proj.weight.shape == (hf_model.config.hidden_size, hf_model.config.intermediate_size // TP)
    finally:
        llm.shutdown()
    one_rank = greedy_tokens(pressured_llm(str(tmp_path), prefix_caching=True, quantization="fp8"), prompts)
    for prompt, tokens in zip(prompts + prompts, two_ranks + one_rank):
        near_tie_greedy_check(hf_model, prompt, tokens, FP8_TOLERANCE)


def test_each_rank_quantizes_its_slice(tmp_path):
    """A column-parallel shard's float8 rows and scales are one device's rows (the whole row is on the rank)."""
    hf_model = build_tiny_model(tmp_path, "llama")
    from serval.model.loader import load_model
    single, _ = load_model(str(tmp_path), quantization="fp8")
    single_state = ours(single)
    column_parallel = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
    weights = {name: t.view(torch.uint8) for name, t in single_state.items() if name.endswith(column_parallel)}
    scales = {name: single_state[name + "_scale"][:, None] for name in weights}  # named as their weights
    for rank in range(TP):
        layout = shard_layout(hf_model.config, rank, TP)
        model = load_rank_model(str(tmp_path), layout, load_format="auto", dtype=torch.float32,
                                device=torch.device("cpu"), seed=0, quantization="fp8")
        got = ours(model)
        for name, want in expected_slices(weights, layout).items():
            assert torch.equal(got[name].view(torch.uint8), want), f"rank {rank}: {name}"
        for name, want in expected_slices(scales, layout).items():
            assert torch.equal(got[name + "_scale"], want[:, 0]), f"rank {rank}: {name}_scale"


def build_block_fp8(path) -> torch.nn.Module:
    hf_model = build_tiny_model(path, "llama", **BLOCK_SHAPE)
    write_checkpoint(path, hf_model, BLOCK_FP8_CONFIG, block_fp8)
    return hf_model


def test_block_fp8_checkpoint_at_two_ranks_gives_one_ranks_tokens(tmp_path):
    """The blocks and the activations' 128-column groups fall on the shards' boundaries: each rank computes exactly
    its part of one device's products."""
    hf_model = build_block_fp8(tmp_path)
    check_tp2_equals_tp1(str(tmp_path), make_prompts(hf_model.config.vocab_size, count=8))


def test_phi3_fused_block_fp8_checkpoint_at_two_ranks_gives_one_ranks_tokens(tmp_path):
    """Phi-3's qkv_proj and gate_up_proj are quantized as one tensor each; a rank reads its rows of every part and
    the scales of their blocks (the parts start on block boundaries)."""
    hf_model = build_tiny(tmp_path, "phi3", **BLOCK_SHAPE, rope_scaling=None)
    write_checkpoint(tmp_path, hf_model, BLOCK_FP8_CONFIG, block_fp8)
    check_tp2_equals_tp1(str(tmp_path), make_prompts(hf_model.config.vocab_size, count=6))


def test_each_rank_reads_its_blocks(tmp_path):
    """Each rank's float8 weights are its slice of the checkpoint's, and its (per-row) block scales those of its
    rows and its columns' blocks."""
    hf_model = build_block_fp8(tmp_path)
    saved = load_file(os.path.join(tmp_path, "model.safetensors"))
    weights = {name: t.view(torch.uint8) for name, t in saved.items() if t.dtype == torch.float8_e4m3fn}
    # Each block's scale at every element of the block, named as its weight, so one slicing serves both.
    scales = {name.replace("weight_scale_inv", "weight"): t.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
              for name, t in saved.items() if name.endswith("weight_scale_inv")}
    assert weights and sorted(scales) == sorted(weights)
    for rank in range(TP):
        layout = shard_layout(hf_model.config, rank, TP)
        model = load_rank_model(str(tmp_path), layout, load_format="auto", dtype=torch.float32,
                                device=torch.device("cpu"), seed=0)
        got = ours(model)
        for name, want in expected_slices(weights, layout).items():
            assert torch.equal(got[name].view(torch.uint8), want), f"rank {rank}: {name}"
        for name, want in expected_slices(scales, layout).items():
            assert torch.equal(got[name + "_scale_inv"], want[:, ::BLOCK]), f"rank {rank}: {name}_scale_inv"


def test_blocks_that_straddle_ranks_are_refused(tmp_path):
    """head_dim 64: a rank's one K/V head is half a 128-row block."""
    hf_model = build_tiny_model(tmp_path, "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                num_key_value_heads=2)
    write_checkpoint(tmp_path, hf_model, BLOCK_FP8_CONFIG, block_fp8)
    with pytest.raises(InvalidArgument, match=r"128x128 fp8 blocks do not divide each rank's shard of "
                                              r"k_proj/v_proj \(64 rows per rank") as info:
        LLM(model=str(tmp_path), skip_tokenizer_init=True, tensor_parallel_size=TP)
    assert info.value.param == "tensor_parallel_size"
