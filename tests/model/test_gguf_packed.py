"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) with its 4-bit projections kept packed (on the CPU for
torch's int4 kernel, with the tied Q8_0 embedding/LM head 8-bit beside them; on a GPU as GGUF blocks for the
Triton kernels), against the same file dequantized
(SERVAL_GGUF_DEQUANTIZE=1, the path before packing; float32 on the CPU, bfloat16 on a GPU): equal greedy answers,
and the weight memory each holds.

The packed kernel multiplies in bfloat16 (its float32 path is 60x slower), so two answers can part at a near tie
of the float32 model: the rule is that every answer equals the reference up to its first difference, and there
the reference's top token beat the packed one by less than NEAR_TIE_NATS."""
from __future__ import annotations

import pytest
import torch

from serval import LLM, SamplingParams
from serval.layers.quant.gguf import GGUFInt4Method
from serval.layers.quant.gguf_q8 import GGUFQ8HeadMethod
from serval.layers.quant.gguf_triton import GGUFTritonMethod
from serval.model.default_model import default_model_path
from serval.model.gguf import load_gguf
from serval.model.loader import GGUF_DEQUANTIZE_ENV, load_model

NUM_NEW_TOKENS = 24
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Count from one to ten."},
     {"role": "assistant", "content": "One, two, three, four, five, six, seven, eight, nine, ten."},
     {"role": "user", "content": "Now backwards."}],
]
ENGINE_ARGS = dict(max_model_len=1024, max_num_batched_tokens=256, block_size=16, num_gpu_blocks_override=64)


NEAR_TIE_NATS = 0.3
# The format the packed model runs on this machine's device (LLM's device "auto"), and the largest share of the
# dequantized model's weight bytes it may hold: on the CPU 0.625 bytes a projection weight and 1.25 a weight of the
# tied Q8_0 embedding/LM head (serval.layers.quant.gguf_q8) against 4 (float32); on a GPU 0.625 against 2
# (bfloat16), the tied embedding dequantized.
ON_GPU = torch.cuda.is_available()
PACKED_METHOD = GGUFTritonMethod if ON_GPU else GGUFInt4Method
MAX_PACKED_SHARE = 0.5 if ON_GPU else 0.25


def greedy_answers(llm: LLM, logprobs: int | None = None):
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=logprobs)
    return [output.outputs[0] for output in llm.chat(CONVERSATIONS, params, use_tqdm=False)]


def assert_equal_but_near_ties(answer: list[int], reference) -> None:
    """answer equals the reference's tokens, or parts from them where the reference's choice was a near tie."""
    for position, (token, expected) in enumerate(zip(answer, reference.token_ids)):
        if token != expected:
            top = reference.logprobs[position]
            assert token in top, f"position {position}: {token} is not among the reference's top {len(top)}"
            gap = top[expected].logprob - top[token].logprob
            assert gap < NEAR_TIE_NATS, f"position {position}: the reference preferred {expected} by {gap:.3f}"
            return


@pytest.fixture(scope="module")
def dequantized():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(GGUF_DEQUANTIZE_ENV, "1")
        llm = LLM(**ENGINE_ARGS)
    return llm, greedy_answers(llm, logprobs=5), llm.engine.memory_usage().weight_bytes


def test_packed_default_model_answers_as_the_dequantized_one_in_under_half_the_memory(dequantized):
    reference, expected, dequantized_bytes = dequantized
    assert not any(m.quant_method is not None
                   for m in reference.engine.model.modules() if hasattr(m, "quant_method"))
    with pytest.MonkeyPatch.context() as patch:
        if ON_GPU:  # the Triton GGUF kernels are opt-in on a GPU (serval.model.loader.gguf_packing)
            patch.setenv("SERVAL_GGUF", "triton")
        llm = LLM(**ENGINE_ARGS)
    packed = [m for m in llm.engine.model.modules() if isinstance(getattr(m, "quant_method", None), PACKED_METHOD)]
    assert len(packed) == 30 * 4  # qkv, o, gate_up, down of every layer
    head, embedding = llm.engine.model.lm_head, llm.engine.model.model.embed_tokens
    # On the CPU the tied head is the Q8_0 table kept 8-bit, and the embedding reads its rows from it.
    assert isinstance(head.quant_method, GGUFQ8HeadMethod) != ON_GPU and (embedding.weight is None) != ON_GPU
    answers = [output.token_ids for output in greedy_answers(llm)]
    for answer, reference_answer in zip(answers, expected):
        assert_equal_but_near_ties(answer, reference_answer)
    print(f"greedy answers equal to the dequantized model's: {sum(a == r.token_ids for a, r in zip(answers, expected))}"
          f" of {len(answers)}")
    packed_bytes = llm.engine.memory_usage().weight_bytes
    # 515 MiB float32 -> 101 MiB on the CPU: 66 MiB of 4-bit projections, 35 MiB of the 8-bit tied embedding.
    print(f"default model weights: packed {packed_bytes / 2**20:.0f} MiB, dequantized {dequantized_bytes / 2**20:.0f} MiB")
    assert packed_bytes < MAX_PACKED_SHARE * dequantized_bytes


def test_a_pooling_model_has_no_head_to_keep_the_table_in_and_gets_the_embedding_dequantized():
    model, _ = load_model(default_model_path(), runner="pooling")  # on the CPU, where the head would be 8-bit
    expected = load_gguf(default_model_path()).weights["model.embed_tokens.weight"]
    assert not hasattr(model, "lm_head") and torch.equal(model.model.embed_tokens.weight, expected)
