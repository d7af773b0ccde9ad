"""LoRA inside the decode graphs (serval.engine.cuda_graphs.DecodeGraphs with a LoRA slot region) against PEFT.

On the CPU nothing is captured, but the graph path runs as on a GPU, eagerly: the fixed int32 input buffer with each
row's slot in it, rows padded to the ladder's sizes (slot -1), the LoRA batch derived on the device from that
buffer (gathered for small batches, grouped into every slot's segment for larger ones), the Triton attention (in the
interpreter) reading lengths from the buffer; prefills attend with the torch reference (tests/engine/
attention_reference.py). Each request's greedy tokens must equal the PEFT model's with its adapter, in mixed
batches, and as adapters are copied in place into a reused slot between steps. On a GPU, graph replay is checked
against the eager engine (and PEFT) as well.
"""
from __future__ import annotations

import pytest
import torch

from serval import LLM
from serval.engine.cuda_graphs import DecodeGraphs
from serval.lora.batch import MAX_GRAPH_GATHER_ROWS
from tests.engine.attention_reference import eager_steps_on_reference
from tests.lora.test_lora_generate import check, family, mixed_jobs  # noqa: F401, F811 (family: the fixture)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


class RecordedGraphs(DecodeGraphs):
    """DecodeGraphs that keep each step's request count and LoRA slots, to show which steps took the graph path."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[list[int]] = []

    def stage(self, input_ids, positions, slot_mapping, seq_lens, block_tables, lora_slots=None, groups=None):
        self.steps.append(list(lora_slots))
        return super().stage(input_ids, positions, slot_mapping, seq_lens, block_tables, lora_slots, groups)


def graph_path_llm(base: str, monkeypatch, max_loras: int, max_num_seqs: int, **engine_args) -> LLM:
    """An engine on the CPU whose decode steps take the graph path (uncaptured, so run eagerly), its prefills the
    torch attention."""
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")  # lengths from device buffers, as graphs need
    llm = LLM(model=base, skip_tokenizer_init=True, enable_lora=True, max_loras=max_loras, max_model_len=128,
              max_num_seqs=max_num_seqs, block_size=4, **engine_args)
    engine, runner = llm.engine, llm.engine.runner
    runner.graphs = RecordedGraphs(engine.model, runner.kv_caches, runner.block_size, max_num_seqs, 128,
                                   runner.device, lora=engine.lora.context, max_loras=max_loras)
    eager_steps_on_reference(runner)
    return llm


@pytest.mark.parametrize("num_jobs,async_scheduling,lora_kernels", [(3, False, "triton"), (9, False, "triton"),
                                                                    (9, True, "torch")])
def test_graph_path_mixed_adapters_matches_peft(family, monkeypatch, num_jobs, async_scheduling, lora_kernels):
    """Base + three adapters interleaved: 3 requests pad to the graph of 4 (each row gathers its adapter), 9 to
    the graph of 12 (rows grouped by slot on the device); asynchronous scheduling takes input ids on the device.
    The LoRA kernels a GPU's graphs run, the Triton ones (in the interpreter), in both forms; the torch reference's
    segment form here, its gather form in test_graph_path_reuses_a_slot_in_place."""
    monkeypatch.setenv("SERVAL_LORA", lora_kernels)
    base, _, _ = family
    llm = graph_path_llm(base, monkeypatch, max_loras=3, max_num_seqs=12, async_scheduling=async_scheduling)
    assert llm.engine.lora.context.use_triton == (lora_kernels == "triton")
    jobs = mixed_jobs()[:num_jobs]
    check(llm, family, jobs)
    steps = llm.engine.runner.graphs.steps
    assert steps and all(len(slots) == num_jobs for slots in steps)  # every decode step took the graph path
    assert -1 in steps[0] and len({slot for slot in steps[0] if slot >= 0}) == min(3, num_jobs - 1)
    assert (num_jobs > MAX_GRAPH_GATHER_ROWS) == (num_jobs == 9)


def test_graph_path_reuses_a_slot_in_place(family, monkeypatch):
    """max_loras=1: adapters take turns in the one slot, copied in place between steps into the same stacked
    tensors the graph reads (never reallocated); a small host cache makes them re-read from their folders (a8
    comes back after b16 and c4 have had the slot)."""
    monkeypatch.setenv("SERVAL_LORA", "torch")
    base, _, _ = family
    llm = graph_path_llm(base, monkeypatch, max_loras=1, max_num_seqs=8, max_cpu_loras=1)
    buffers = {name: (layer.lora_a.data_ptr(), layer.lora_b.data_ptr())
               for name, layer in llm.engine.lora.lora_layers.layers.items()}
    jobs = mixed_jobs()[:6]  # base, a8, b16, c4, base, a8: four turns of the slot, each a request's whole decode
    assert [name for name, _ in jobs].count("a8") == 2
    check(llm, family, jobs)
    steps = llm.engine.runner.graphs.steps
    assert {slot for slots in steps for slot in slots} == {-1, 0}
    assert buffers == {name: (layer.lora_a.data_ptr(), layer.lora_b.data_ptr())
                       for name, layer in llm.engine.lora.lora_layers.layers.items()}


@requires_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_graph_replay_with_adapters_equals_eager(family, dtype):
    """On a GPU: decode steps replayed from graphs captured with the LoRA kernels give the eager engine's tokens.
    float32: 3 and 12 requests (the graphs' gather and segment forms) and PEFT's tokens too. bfloat16: 3 and 7
    requests, where graph and eager steps both gather (the segment form rounds h to bfloat16 for tl.dot, which the
    gather form does not, so there the two may part on a near tie)."""
    from tests.lora.test_lora_generate import run
    base, adapters, expected = family
    engine_args = dict(skip_tokenizer_init=True, enable_lora=True, max_loras=3, max_model_len=128, device="cuda",
                       dtype=dtype, max_num_seqs=16, num_gpu_blocks_override=512)
    sizes = (3, 12) if dtype == "float32" else (3, 7)
    graphs = LLM(model=base, **engine_args)
    assert graphs.engine.runner.graphs is not None and graphs.engine.runner.graphs.lora is not None
    replayed = {size: run(graphs, adapters, mixed_jobs()[:size]) for size in sizes}
    del graphs
    torch.cuda.empty_cache()
    eager = LLM(model=base, enforce_eager=True, **engine_args)
    for size in sizes:
        jobs = mixed_jobs()[:size]
        assert run(eager, adapters, jobs) == replayed[size]
        if dtype == "float32":
            assert replayed[size] == [expected[job] for job in jobs]
