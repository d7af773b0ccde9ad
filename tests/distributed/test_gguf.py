"""GGUF checkpoints under tensor parallelism (CPU, gloo), written as llama.cpp's converter writes them
(tests/model/test_gguf.py: q/k rows permuted, Q8_0 blocks of 32): each rank's weights are exactly its slice of the
dequantized checkpoint, greedy tokens at tensor_parallel_size=2 equal size 1's; a shard whose input columns cut
through the blocks is refused at start, naming the tensor, and so is a GGUF mixture of experts."""
from __future__ import annotations

import os

import pytest
import torch

from serval import LLM
from serval.distributed.weights import load_rank_model
from serval.layers.parallel import shard_layout
from serval.layers.quant.gguf_blocks import Q
from serval.model.gguf import load_gguf
from serval.openai.errors import InvalidArgument
from tests.conftest import build_tiny_model
from tests.distributed.test_quantized import TP, check_tp2_equals_tp1
from tests.distributed.test_weights import expected_slices, ours
from tests.engine.test_engine import make_prompts
from tests.model.test_gguf import write_gguf
from tests.model.test_gguf_moe import write_moe_gguf
from tests.model.tiny_models import build_tiny


def build_gguf(tmp_path, **overrides) -> str:
    """A tiny Llama as a Q8_0 GGUF file (its own directory: beside safetensors a .gguf is not picked)."""
    hf_model = build_tiny_model(tmp_path / "hf", "llama", **overrides)
    os.makedirs(tmp_path / "gguf")
    path = tmp_path / "gguf" / "model.gguf"
    write_gguf(path, "llama", hf_model, Q.Q8_0)
    return str(path)


def test_each_rank_holds_its_slice_of_the_dequantized_checkpoint(tmp_path):
    """vocab 321: the last rank's slice of the embedding and LM head is padded."""
    path = build_gguf(tmp_path, vocab_size=321)
    checkpoint = load_gguf(path)
    for rank in range(TP):
        layout = shard_layout(checkpoint.config, rank, TP)
        model = load_rank_model(path, layout, load_format="auto", dtype=torch.float32, device=torch.device("cpu"),
                                seed=0)
        got, want = ours(model), expected_slices(checkpoint.weights, layout)
        assert sorted(got) == sorted(want)
        for name in want:
            assert torch.equal(got[name], want[name]), f"rank {rank}: {name}"


def test_greedy_at_two_ranks_equals_one(tmp_path):
    path = build_gguf(tmp_path)
    check_tp2_equals_tp1(path, make_prompts(320, count=6))


def test_blocks_that_straddle_ranks_are_refused(tmp_path):
    """intermediate 96: each rank's 48 input columns of down_proj are one and a half Q8_0 blocks."""
    path = build_gguf(tmp_path, intermediate_size=96)
    with pytest.raises(InvalidArgument, match=r"each rank's 48 input columns of model\.layers\.0\.mlp\.down_proj\."
                                              r"weight \(blk\.0\.ffn_down\.weight\) cut through its Q8_0 blocks of "
                                              r"32") as info:
        LLM(model=path, skip_tokenizer_init=True, tensor_parallel_size=TP)
    assert info.value.param == "tensor_parallel_size"


def test_mixture_of_experts_ggufs_are_refused(tmp_path):
    hf_model = build_tiny(tmp_path / "hf", "mixtral")
    write_moe_gguf(tmp_path / "model.gguf", "llama", hf_model)
    with pytest.raises(InvalidArgument, match=r"does not shard GGUF mixture-of-experts checkpoints \(blk\.0\.ffn_\w+"
                                              r"_exps\.weight stacks every expert") as info:
        LLM(model=str(tmp_path / "model.gguf"), skip_tokenizer_init=True, tensor_parallel_size=TP)
    assert info.value.param == "load_format"
