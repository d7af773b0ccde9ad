"""LoRA inside the mixed prefill/decode step graphs (serval.engine.mixed_graphs.MixedGraphs with a LoRA slot region)
against the eager LoRA step and PEFT.

On the CPU nothing is captured, but the graph path runs as on a GPU, eagerly: the step's tokens padded to a token
bucket in the fixed int32 input buffer, each row's adapter slot in it (padding rows -1), the LoRA batch grouped by
slot on the device from that buffer (graph_lora_batch), the Triton attention (in the interpreter) reading lengths
from the buffer. Each graph-shaped step's logits must equal the plain eager step's with the same adapters (the plain
steps and prefills attend with the torch reference: tests/engine/attention_reference.py), and each
request's greedy tokens the PEFT model's with its adapter, under chunked prefill, preemption and prefix caching. On
a GPU, replay of the captured graphs is checked against the eager engine (and PEFT).
"""
from __future__ import annotations

import pytest
import torch

from serval import LLM
from serval.engine.mixed_graphs import MixedGraphs
from serval.lora.batch import build_lora_batch
from tests.engine.attention_reference import eager_steps_on_reference
from tests.engine.test_engine import counted_launches
from tests.lora.test_lora_generate import check, family, mixed_jobs, run  # noqa: F401, F811 (family: the fixture)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


class CheckedMixedGraphs(MixedGraphs):
    """MixedGraphs that run each step through the plain eager forward too (the same rows' adapters as an eager
    LoRABatch), compare the logits, and keep each step's rows per request and row slots."""

    def __init__(self, runner, *args, check_steps: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.runner, self.check_steps = runner, check_steps
        self.steps: list[tuple[list[int], list[int]]] = []  # (rows per request, slot per row)

    def run(self, inputs, lora_slots=None, source=None, source_rows=()):
        assert lora_slots is not None and len(lora_slots) == len(inputs.input_ids)
        self.steps.append(([end - start for start, end in zip(inputs.query_start_loc, inputs.query_start_loc[1:])],
                           list(lora_slots)))
        if not self.check_steps:
            return super().run(inputs, lora_slots, source, source_rows)
        context = self.lora
        context.batch = (build_lora_batch([1] * len(lora_slots), lora_slots, self.device)
                         if any(slot >= 0 for slot in lora_slots) else None)
        try:
            # writes the K/V the padded forward writes again
            expected = self.runner.forward_logits(inputs, source, source_rows)
        finally:
            context.batch = None
        got = super().run(inputs, lora_slots, source, source_rows)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        return got

    def mixed_steps_with_adapters(self) -> list[tuple[list[int], list[int]]]:
        """Steps with a prefill chunk beside a decode, and an adapter on some row."""
        return [(rows, slots) for rows, slots in self.steps
                if 1 in rows and any(n > 1 for n in rows) and any(slot >= 0 for slot in slots)]


def mixed_graph_path_llm(base: str, monkeypatch, max_loras: int, check_steps: bool = True, **engine_args) -> LLM:
    """An engine on the CPU whose mixed steps take the mixed-graph path (uncaptured, so run eagerly); with
    check_steps, each is compared with the plain eager step. Eager steps attend with the torch reference."""
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")  # lengths from device buffers, as graphs need
    engine_args = {"max_num_seqs": 4, "max_num_batched_tokens": 32, "block_size": 4, "max_model_len": 128,
                   **engine_args}
    llm = LLM(model=base, skip_tokenizer_init=True, enable_lora=True, max_loras=max_loras, **engine_args)
    engine, runner, config = llm.engine, llm.engine.runner, llm.engine.config
    runner.mixed_graphs = CheckedMixedGraphs(runner, engine.model, runner.kv_caches, runner.block_size,
                                             config.max_num_seqs, config.max_model_len,
                                             config.max_num_batched_tokens, runner.device,
                                             lora=engine.lora.context, max_loras=max_loras,
                                             check_steps=check_steps)
    eager_steps_on_reference(runner)
    return llm


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "queued"])
def test_mixed_steps_with_adapters_equal_eager_steps_and_peft(family, monkeypatch, async_scheduling):
    """Base + three adapters interleaved through 4 sequences and 32-token steps (buckets 16 and 32): chunked prefill
    beside decodes of other adapters, padding rows, preemption (16 blocks of 4) and prefix hits (each job comes
    again four jobs later, same adapter and prompt). Queued: the mixed steps launched before the host has read the
    step before them (their input ids gathered on the device), as on a GPU by default."""
    base, _, _ = family
    llm = mixed_graph_path_llm(base, monkeypatch, max_loras=3, max_model_len=64, num_gpu_blocks_override=16,
                               enable_prefix_caching=True, async_scheduling=async_scheduling)
    queued = counted_launches(llm.engine, ("launch_step",))
    check(llm, family, mixed_jobs()[:8])
    assert (sum(queued) > 0) == async_scheduling
    graphs = llm.engine.runner.mixed_graphs
    mixed = graphs.mixed_steps_with_adapters()
    assert mixed, "a step with a prefill chunk beside decodes, with adapters"
    assert any(len({slot for slot in slots if slot >= 0}) > 1 for _, slots in mixed), "two adapters in one step"
    assert any(-1 in slots for _, slots in mixed), "a base row beside adapter rows"
    assert any(sum(rows) not in (16, 32) for rows, _ in graphs.steps), "a step padded to its bucket"
    assert llm.engine.get_stats().num_preemptions > 0 and llm.engine.kv_cache.prefix_cache_hits > 0


def test_mixed_steps_with_the_triton_kernels_reusing_a_slot(family, monkeypatch):
    """The Triton LoRA kernels (in the interpreter) in the mixed-graph path: the segment form over the bucket's
    rows, grouped by slot on the device, padding rows in no segment. max_loras=1: the two adapters take turns in
    the one slot, copied in place between steps into the stacked tensors the graphs read."""
    monkeypatch.setenv("SERVAL_LORA", "triton")
    base, _, _ = family
    llm = mixed_graph_path_llm(base, monkeypatch, max_loras=1, check_steps=False)
    assert llm.engine.lora.context.use_triton
    # a8's decodes beside the base's second prompt chunk, then b16's prefill (in a8's slot) beside the base's decodes.
    check(llm, family, [("a8", 1), (None, 2), ("b16", 3)])
    graphs = llm.engine.runner.mixed_graphs
    assert graphs.mixed_steps_with_adapters()
    assert {slot for _, slots in graphs.steps for slot in slots} == {-1, 0}


@requires_cuda
def test_gpu_mixed_graph_replay_with_adapters_equals_eager(family):
    """On a GPU: mixed steps replayed from graphs captured with the LoRA kernels give the eager engine's tokens,
    and PEFT's (float32), under chunked prefill."""
    base, adapters, expected = family
    engine_args = dict(skip_tokenizer_init=True, enable_lora=True, max_loras=3, max_model_len=128, device="cuda",
                       dtype="float32", max_num_seqs=8, max_num_batched_tokens=32, num_gpu_blocks_override=512)
    jobs = mixed_jobs()
    graphs = LLM(model=base, cudagraph_mixed=True, **engine_args)
    mixed = graphs.engine.runner.mixed_graphs
    assert mixed is not None and mixed.lora is not None and mixed.graphs
    replayed = run(graphs, adapters, jobs)
    del graphs, mixed
    torch.cuda.empty_cache()
    eager = LLM(model=base, enforce_eager=True, **engine_args)
    assert run(eager, adapters, jobs) == replayed
    assert replayed == [expected[job] for job in jobs]
