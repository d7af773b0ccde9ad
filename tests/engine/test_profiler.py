"""The engine's profiler (serval.engine.profiler): LLM.start_profile/stop_profile write a torch.profiler Chrome trace
that holds the engine's host ranges on the step thread and the grammar fill worker's on its own row; misuse is an
InvalidArgument and leaves the engine serving. The trace summary (serval.bench.traces.summarize_steps) is checked on
a hand-made trace whose GPU gaps are known."""
import os
import re

import pytest

from serval import LLM, SamplingParams
from serval.bench.traces import format_step_windows, load_chrome_trace, step_windows, summarize_steps
from serval.engine import profiler
from serval.openai.errors import InvalidArgument
from serval.sampling_params import StructuredOutputsParams
from tests.e2e.server import tiny_model_dir

PATTERN = r"[a-z]{3,8}-[0-9]{2}"


@pytest.fixture(scope="module")
def llm():
    return LLM(model=tiny_model_dir(), max_model_len=256, max_num_seqs=4)


def constrained(llm, num_prompts: int = 2) -> list[str]:
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=12,
                            structured_outputs=StructuredOutputsParams(regex=PATTERN))
    outputs = llm.generate([f"Code {i}:" for i in range(num_prompts)], params, use_tqdm=False)
    return [output.outputs[0].text for output in outputs]


def test_trace_holds_the_engine_ranges_and_the_fill_worker(llm, tmp_path):
    llm.start_profile(str(tmp_path))
    texts = constrained(llm)
    path = llm.stop_profile()
    assert all(re.fullmatch(PATTERN, text) for text in texts)  # profiling changes nothing the engine does
    assert os.path.dirname(path) == str(tmp_path) and path.endswith(profiler.TRACE_SUFFIX)
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left beside it
    summary = summarize_steps(load_chrome_trace(path))
    assert summary["num_steps"] >= 3  # a prefill and decode steps
    assert not summary["has_gpu_activity"]
    # No GPU on CPU: every instant of a step is idle, charged to the range the engine thread was in.
    assert summary["gpu_idle_ms"] == pytest.approx(summary["step_ms"])
    assert sum(summary["gpu_idle_by_engine_range_ms"].values()) == pytest.approx(summary["step_ms"])
    engine = summary["ranges_ms_per_step"]["engine"]
    assert {"serval.step", "serval.schedule", "serval.execute", "serval.process_step",
            "serval.prepare_inputs", "serval.sample", "serval.grammar_fill_start", "serval.grammar_join"} <= set(engine)
    assert engine["serval.step"] >= engine["serval.execute"] > 0
    assert "serval.grammar_fill" in summary["ranges_ms_per_step"]["serval-grammar-fill"]


def test_misuse_is_an_invalid_argument_and_the_engine_goes_on(llm, tmp_path, monkeypatch):
    monkeypatch.delenv(profiler.PROFILER_DIR_ENV, raising=False)
    with pytest.raises(InvalidArgument, match=profiler.PROFILER_DIR_ENV):
        llm.start_profile()
    with pytest.raises(InvalidArgument, match="not running"):
        llm.stop_profile()
    monkeypatch.setenv(profiler.PROFILER_DIR_ENV, str(tmp_path))
    llm.start_profile()
    with pytest.raises(InvalidArgument, match="already running"):
        llm.start_profile()
    assert llm.stop_profile().startswith(str(tmp_path))
    assert all(re.fullmatch(PATTERN, text) for text in constrained(llm))


def test_host_range_is_a_shared_no_op_without_a_profile():
    # record_function costs microseconds even with no profiler: ten of them a step would be measurable.
    assert profiler.host_range("serval.step") is profiler.host_range("serval.schedule")


def x(name, tid, ts, dur, cat="user_annotation"):
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur}


def test_step_summary_charges_gpu_gaps_to_the_engine_range():
    """Step 1 (serval.step over [0, 90), its window [0, 100) up to step 2's start): GPU work over [0, 30) and
    [60, 85); the engine thread in serval.execute over [0, 50), serval.grammar_join over [50, 80). Idle: 20 us in
    execute, 10 in the join, 5 in the step's own code ([85, 90)), 10 between steps. Step 2 (the last: its own
    range, [100, 150)): GPU work over [100, 110), serval.token_ids over [110, 140): 30 idle there, 10 in the
    step. A copy counts as GPU work; the fill worker's range is reported on its thread and charged nothing."""
    events = [
        x("serval.step", 7, 0, 90), x("serval.execute", 7, 0, 50), x("serval.grammar_join", 7, 50, 30),
        x("serval.step", 7, 100, 50), x("serval.token_ids", 7, 110, 30),
        x("serval.grammar_fill", 9, 20, 70), {"ph": "M", "name": "thread_name", "pid": 1, "tid": 9,
                                              "args": {"name": "serval-grammar-fill"}},
        x("gemm", 0, 0, 30, cat="kernel"), x("Memcpy DtoH", 0, 60, 25, cat="gpu_memcpy"),
        x("attention", 0, 100, 10, cat="kernel"), x("aten::mm", 7, 0, 10, cat="cpu_op"),
    ]
    summary = summarize_steps(events)
    assert summary["num_steps"] == 2
    assert summary["step_ms"] == pytest.approx((100 + 50) / 2 / 1e3)
    assert summary["gpu_busy_ms"] == pytest.approx((30 + 25 + 10) / 2 / 1e3)
    assert summary["gpu_idle_by_engine_range_ms"] == pytest.approx({
        "serval.execute": 20 / 2 / 1e3, "serval.grammar_join": 10 / 2 / 1e3, "serval.token_ids": 30 / 2 / 1e3,
        "serval.step": 15 / 2 / 1e3, "between steps": 10 / 2 / 1e3})
    assert summary["ranges_ms_per_step"]["serval-grammar-fill"] == {"serval.grammar_fill": pytest.approx(0.035)}
    assert summary["ranges_ms_per_step"]["engine"]["serval.step"] == pytest.approx(0.07)


def test_step_windows_name_the_slow_eager_step():
    """Three steps starting at 0, 100 and 1100 us (windows of 100 and 1000; the last has no window): the first
    replays a graph (one cudaGraphLaunch, one copy), the second launches 20 kernels one by one (10 through the
    runtime, 10 through the driver as Triton does) under serval.launch_forward and keeps the GPU busy 600 of its
    1000 us."""
    events = [x("serval.step", 7, 0, 90), x("serval.step", 7, 100, 990), x("serval.step", 7, 1100, 50),
              x("serval.launch_forward", 7, 110, 800), x("cudaGraphLaunch", 7, 10, 5, cat="cuda_runtime"),
              x("cudaMemcpyAsync", 7, 20, 5, cat="cuda_runtime"), x("gemm", 0, 10, 60, cat="kernel")]
    # torch's kernels through the runtime, Triton's through the driver
    events += [x("cudaLaunchKernel", 7, 120 + 10 * i, 5, cat="cuda_runtime") for i in range(0, 20, 2)]
    events += [x("cuLaunchKernelEx", 7, 120 + 10 * i, 5, cat="cuda_driver") for i in range(1, 20, 2)]
    events += [x("gemm", 0, 200 + 30 * i, 30, cat="kernel") for i in range(19)] + [
        x("flash_attention_fwd", 0, 770, 30, cat="kernel")]
    windows = step_windows(events, top=1)
    assert windows["num_steps"] == 2 and windows["eager_steps"] == 1
    assert windows["wall_ms"]["max"] == pytest.approx(1.0) and windows["wall_ms"]["p50"] == pytest.approx(1.0)
    [slowest] = windows["slowest"]
    assert slowest["start_ms"] == pytest.approx(0.1) and slowest["gpu_busy_ms"] == pytest.approx(0.6)
    assert (slowest["graph_launches"], slowest["kernel_launches"]) == (0, 20)
    assert slowest["ranges_ms"] == {"serval.launch_forward": pytest.approx(0.8)}
    assert slowest["kernels_ms"] == {"gemm": pytest.approx(0.57), "attention": pytest.approx(0.03)}
    assert "1 launched kernel by kernel" in format_step_windows(windows, "t")
