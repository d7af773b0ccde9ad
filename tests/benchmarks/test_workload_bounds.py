"""benchmarks/workload_bounds.py: its FLOP counts against torch's FlopCounterMode on transformers' Llama, and its
ideal scheduler against the totals any schedule of the workload must add up to."""
from __future__ import annotations

import json
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import workload_bounds
from benchmarks.workload_bounds import Shape, schedule

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 512,
        "max_position_embeddings": 256, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    path = tmp_path_factory.mktemp("bounds")
    (path / "config.json").write_text(json.dumps(TINY))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="eager")).eval()
    return Shape.from_config(str(path)), model


def counted(model, **inputs) -> dict[str, int]:
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(**inputs)
    return {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}


def test_linear_and_attention_flops_match_torch_counting_transformers_llama(tiny):
    from transformers import DynamicCache
    shape, model = tiny
    prompt = torch.randint(0, TINY["vocab_size"], (1, 37))
    cache = DynamicCache(config=model.config)
    prefill = counted(model, input_ids=prompt, cache=cache, use_cache=True)
    # eager attention: its QK^T and PV are the bmm, every projection and the head an mm
    assert prefill["aten.mm"] == 2 * (shape.linear_params + shape.head_params) * 37  # the head on every row here
    assert prefill["aten.bmm"] == shape.attention_flops(37 * 37)  # eager multiplies the masked square too
    decode = counted(model, input_ids=torch.randint(0, TINY["vocab_size"], (1, 1)), cache=cache,
                     use_cache=True)
    assert decode["aten.mm"] == 2 * (shape.linear_params + shape.head_params)
    assert decode["aten.bmm"] == shape.attention_flops(38)  # one query over the 37 cached keys and its own


@pytest.mark.parametrize("max_num_seqs,budget", [(4, 64), (3, 50), (256, 8192)])
def test_ideal_schedule_adds_up_to_the_workload(max_num_seqs, budget):
    rng = random.Random(max_num_seqs)
    prompt_lens = [rng.randint(1, 120) for _ in range(17)]
    output_lens = [rng.randint(1, 30) for _ in range(17)]
    steps = schedule(prompt_lens, output_lens, max_num_seqs, budget)
    assert all(step.num_tokens <= budget for step in steps)
    assert all(step.num_sampled <= max_num_seqs for step in steps)
    decode_rows = sum(length - 1 for length in output_lens)
    assert sum(step.num_tokens for step in steps) == sum(prompt_lens) + decode_rows
    assert sum(step.num_sampled for step in steps) == sum(output_lens)
    assert sum(step.prefill_keys for step in steps) == sum(n * (n + 1) // 2 for n in prompt_lens)
    assert sum(step.decode_keys for step in steps) == sum(p + g for p, o in zip(prompt_lens, output_lens)
                                                          for g in range(1, o))
    # a request decodes one token a step: the longest output needs that many steps after its prefill
    assert len(steps) >= max(output_lens)


def test_interpolate_hits_measured_points_and_extends_the_last_segment():
    table = {"rows": [1, 4, 8], "ms": [1.0, 2.0, 4.0]}
    assert [workload_bounds.interpolate(table, r) for r in (1, 4, 8)] == [1.0, 2.0, 4.0]
    assert workload_bounds.interpolate(table, 6) == 3.0
    assert workload_bounds.interpolate(table, 12) == 6.0
