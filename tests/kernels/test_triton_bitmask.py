"""The one-launch token bitmask (serval.kernels.triton_bitmask) against the torch path the CPU runs
(structured_output.disallowed_mask + masked_fill), in Triton's interpreter on CPU: llguidance's own masks for a
JSON grammar, random words (bit 31 set included), vocabularies wider and narrower than the bitmask, and a subset of
rows picked by index."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from serval.engine import structured_output  # noqa: E402
from serval.kernels.triton_bitmask import apply_token_bitmask_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    expected = logits.clone()
    disallowed = structured_output.disallowed_mask(bitmask.cpu(), logits.shape[1]).to(logits.device)
    expected[rows] = expected[rows].masked_fill(disallowed, float("-inf"))
    return expected


@pytest.mark.parametrize("vocab_size, words", [(100, 4), (128, 4), (90, 4), (1500, 47), (1500, 40)])
@pytest.mark.parametrize("subset", [False, True])
def test_random_words_equal_the_torch_mask(vocab_size: int, words: int, subset: bool) -> None:
    generator = torch.Generator().manual_seed(vocab_size * 7 + words)
    num_rows = 5
    logits = torch.randn(num_rows, vocab_size, generator=generator).to(DEVICE)
    rows = [3, 0, 4] if subset else list(range(num_rows))
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), words), generator=generator, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    bitmask[0, 0] = -1  # every token of the first word allowed
    bitmask[-1, -1] = 0  # none of the last word
    expected = reference(logits, bitmask, rows)
    apply_token_bitmask_(logits, bitmask.to(DEVICE),
                         torch.tensor(rows, dtype=torch.int64, device=DEVICE) if subset else None)
    assert torch.equal(torch.isneginf(logits), torch.isneginf(expected))
    assert torch.equal(logits[~torch.isneginf(logits)], expected[~torch.isneginf(expected)])


def test_a_json_grammar_mask_from_llguidance() -> None:
    """The masks llguidance fills for a JSON schema, over the Llama 3 vocabulary (128,256 tokens)."""
    from transformers import PreTrainedTokenizerFast

    from serval.bench.tokenizer import resolve_path
    from serval.sampling_params import StructuredOutputsParams
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=resolve_path("llama3"))
    compiler = structured_output.GrammarCompiler(tokenizer)
    states = [compiler.new_state(StructuredOutputsParams(json={"type": "object", "properties": {
        "a": {"type": "integer"}}, "required": ["a"]})) for _ in range(3)]
    states[1].consume(tokenizer.encode("{", add_special_tokens=False)[0])
    bitmask = structured_output.fill_bitmask([state.matcher for state in states], states[0].vocab_size)
    vocab = len(tokenizer)
    logits = torch.randn(3, vocab + 7).to(DEVICE)  # embedding rows past the vocabulary are never allowed
    expected = reference(logits, bitmask, [0, 1, 2])
    apply_token_bitmask_(logits, bitmask.to(DEVICE))
    assert torch.equal(torch.isneginf(logits), torch.isneginf(expected))
    assert 0 < int((~torch.isneginf(logits[1])).sum()) < vocab
