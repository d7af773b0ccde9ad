"""tensor_parallel_size=1 through the multi-process executor (distributed_executor_backend="mp", what
benchmarks/tp_bench.py times against the in-process engine) runs the single-device model op for op: the same layer
classes and parameters, the same aten ops in a decode step and no collective among them, the same GEMV calls for a
one-row step (SwiGLU fused into down_proj's); and over a whole offline workload (prefix-cache hits, decode steps of
64 rows, asynchronous scheduling) the same steps, the same ops and the same tokens. And a tensor-parallel rank's row-parallel down_proj decodes one row
with the fused SwiGLU GEMV too, its bias added once after the all-reduce."""
from __future__ import annotations

import os
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from serval import LLM, SamplingParams
from serval.distributed.processes import start_context
from serval.engine.model_runner import ForwardInputs
from serval.kernels import triton_gemv
from tests.conftest import build_tiny_model
from tests.distributed.row_parallel_rank import (HIDDEN, INTERMEDIATE, TP, full_down_proj, gate_up_row,
                                                 recording_gemv, recording_gemv_add_norm, row_parallel_decode)
from tests.model.tiny_models import build_tiny

PROMPT = [5, 17, 42]


class OpRecorder(TorchDispatchMode):
    """The aten (and c10d) ops a forward dispatches, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def decode_step(llm: LLM, monkeypatch) -> tuple[list[str], list[tuple[tuple[int, ...], bool]], torch.Tensor]:
    """Prefill PROMPT, then record one decode step through the engine's runner (the executor's runner at size 1):
    its ops, its GEMV calls (SERVAL_GEMV=triton: the GPU's batch-1 dispatch, in Triton's interpreter) and logits."""
    runner, block_size = llm.engine.runner, llm.engine.config.block_size
    n = len(PROMPT)
    runner.forward_logits(ForwardInputs(PROMPT, list(range(n)), list(range(n)), [0, n], [n], [[0]], [n - 1]))
    calls: list[tuple[tuple[int, ...], bool]] = []
    decode = ForwardInputs([7], [n], [n], [0, 1], [n + 1], [[0]], [0])
    assert n + 1 <= block_size
    with monkeypatch.context() as patch:
        patch.setenv("SERVAL_GEMV", "triton")
        patch.setattr(triton_gemv, "gemv", recording_gemv(calls))
        patch.setattr(triton_gemv, "gemv_add_norm", recording_gemv_add_norm(calls))
        with OpRecorder() as recorder:
            logits = runner.forward_logits(decode)
    return recorder.ops, calls, logits


def layer_signature(model: torch.nn.Module) -> list[tuple]:
    modules = [(name, type(module).__name__) for name, module in model.named_modules()]
    params = [(name, tuple(p.shape), p.stride(), p.dtype) for name, p in model.named_parameters()]
    return modules + params


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_the_executor_at_size_one_runs_the_single_device_model(tmp_path, monkeypatch, family):
    """Qwen2-MoE: its sparse blocks and shared expert stay one device's too (no all-reducing block class)."""
    if family == "llama":
        build_tiny_model(tmp_path, family)
    else:
        build_tiny(tmp_path, family)
    engine_args = dict(model=str(tmp_path), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=64,
                       max_num_seqs=2, block_size=16)
    single = LLM(**engine_args)
    executor = LLM(**engine_args, distributed_executor_backend="mp")
    try:
        assert executor.engine.executor is not None and executor.engine.executor.processes == []
        assert layer_signature(executor.engine.model) == layer_signature(single.engine.model)
        ops, calls, logits = decode_step(executor, monkeypatch)
        expected_ops, expected_calls, expected_logits = decode_step(single, monkeypatch)
        assert not [op for op in ops if op.startswith("c10d.")]
        assert ops == expected_ops
        assert calls == expected_calls
        if family == "llama":  # dense: every projection a GEMV, each down_proj with SwiGLU fused in
            config = single.engine.hf_config
            assert len(calls) == 4 * config.num_hidden_layers + 1
            assert sum(gated for _, gated in calls) == config.num_hidden_layers
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    finally:
        executor.engine.shutdown()


def offline_pass(llm: LLM, monkeypatch) -> tuple[list[tuple], list[str], list[list[int]]]:
    """tp_bench's offline workload, small: NUM_PROMPTS prompts queued at once, twice (the first fills the prefix
    cache). The second pass's steps (each scheduler batch's tokens per request, each runner call and its rows),
    the aten ops it dispatches, and its tokens."""
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 100) for _ in range(40)]} for _ in range(NUM_PROMPTS)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    steps: list[tuple] = []
    scheduler, runner = llm.engine.scheduler, llm.engine.runner
    schedule = scheduler.schedule

    def recorded_schedule():
        scheduled = schedule()
        steps.append(("schedule", tuple(scheduled.num_scheduled_tokens)))
        return scheduled

    def recorded(name: str):
        method = getattr(runner, name)

        def call(first, *args, **kwargs):
            rows = first if isinstance(first, list) else getattr(first, "requests", None)
            steps.append((name, len(rows) if rows is not None else None))
            return method(first, *args, **kwargs)

        return call

    hits = llm.engine.get_stats().prefix_cache_hits
    with monkeypatch.context() as patch:
        patch.setattr(scheduler, "schedule", recorded_schedule)
        for name in ("execute", "launch_decode", "launch_forward", "sample_decode"):
            patch.setattr(runner, name, recorded(name))
        with OpRecorder() as recorder:
            outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.get_stats().prefix_cache_hits > hits  # the second pass is tp_bench's timed one: cache hits
    return steps, recorder.ops, [output.outputs[0].token_ids for output in outputs]


NUM_PROMPTS, MAX_NUM_SEQS = 80, 64


def test_the_executor_at_size_one_runs_an_offline_batch_as_the_engine_does(tmp_path, monkeypatch):
    """tp_bench's tp1 pair timed the executor 1.28x faster offline (decode steps of up to 256 rows, prefix-cache
    hits, asynchronous scheduling) while one row matched: here the two schedule, launch and dispatch the same,
    step for step, at 64 rows. The executor keeps steps that change the batch synchronous (its workers take host
    input ids), so the engine does too here."""
    monkeypatch.setenv("SERVAL_ASYNC_MIXED_STEPS", "0")
    build_tiny_model(tmp_path, "llama")
    engine_args = dict(model=str(tmp_path), skip_tokenizer_init=True, max_model_len=64, max_num_seqs=MAX_NUM_SEQS,
                       block_size=16, async_scheduling=True)
    steps, ops, tokens = offline_pass(LLM(**engine_args), monkeypatch)
    executor = LLM(**engine_args, distributed_executor_backend="mp")
    try:
        executor_steps, executor_ops, executor_tokens = offline_pass(executor, monkeypatch)
    finally:
        executor.engine.shutdown()
    assert ("launch_decode", MAX_NUM_SEQS) in steps  # full-batch decode steps, queued asynchronously
    assert executor_steps == steps
    assert not [op for op in executor_ops if op.startswith("c10d.")]
    assert executor_ops == ops
    assert executor_tokens == tokens


def test_a_ranks_down_proj_decodes_one_row_with_the_fused_swiglu_gemv(tmp_path):
    context = start_context()
    outputs = [os.path.join(tmp_path, f"rank{rank}.pt") for rank in range(TP)]
    processes = [context.Process(target=row_parallel_decode,
                                 args=(rank, os.path.join(tmp_path, "store"), outputs[rank])) for rank in range(TP)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [process.exitcode for process in processes] == [0] * TP
    results = [torch.load(path) for path in outputs]
    assert [result["calls"] for result in results] == [[((HIDDEN, INTERMEDIATE // TP), True)]] * TP
    full, gate_up = full_down_proj(), gate_up_row()
    gate, up = gate_up.float().chunk(2, dim=-1)
    expected = (torch.nn.functional.silu(gate) * up) @ full.weight.float().t() + full.bias.float()
    for result in results:
        torch.testing.assert_close(result["out"].float(), expected, rtol=2e-2, atol=2e-2)
