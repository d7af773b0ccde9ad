"""Mixed prefill/decode steps in the captured-graph shape (serval.engine.mixed_graphs): tokens padded to a bucket,
a padding request owning the padding rows, requests padded to the bucket's count, inputs from fixed buffers. On the
CPU the same padded forward runs eagerly through the Triton kernels in the interpreter; each step is checked
against the plain (unpadded) forward, and the tokens against transformers. On a GPU the captured graphs are checked
against eager mixed steps.

The plain forward and the plain engines the padded ones are checked against attend with the torch reference: the
interpreter is what makes these tests slow, and the plain path through the Triton kernels is checked against
transformers on its own (tests/engine/test_engine.py::test_triton_kernels_in_the_engine_match_transformers)."""
import dataclasses

import pytest
import torch

from serval import LLM, SamplingParams
from serval.engine.mixed_graphs import MixedGraphs, mixed_capture_sizes
from serval.openai.errors import InvalidArgument
from tests.engine.attention_reference import reference_attention, reference_generate
from tests.engine.test_engine import counted_launches, hf_greedy_references, make_prompts, pressured_llm
from tests.model.engine_checks import check_pressured_greedy

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
# On a GPU the padded and the plain step take different GEMM configurations (logits ~2e-2 apart, measured on an
# H200), so the step-for-step checks at 1e-4 hold on the interpreter's float32 path only; the GPU tests below check
# captured graphs against eager mixed steps instead.
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's float32 path; see above")
NUM_NEW_TOKENS = 8
# Six of make_prompts' twelve (5-70 tokens, three sharing its 20-token prefix) in a smaller pool: the steps still
# cross both buckets, the 4-token blocks, preemption and prefix hits, at about half the interpreted steps and tokens.
PROMPT_INDICES = (2, 3, 6, 8, 9, 11)
# Mistral frees the blocks behind its sliding window: more sequences at once to be preempted (six fill a mixed step).
POOLS = {"llama": dict(num_gpu_blocks_override=32), "qwen3": dict(num_gpu_blocks_override=32),
         "mistral": dict(max_num_seqs=6, num_gpu_blocks_override=36)}


def some_prompts(vocab_size: int) -> list[list[int]]:
    prompts = make_prompts(vocab_size)
    return [prompts[i] for i in PROMPT_INDICES]


def test_mixed_capture_sizes_cover_every_token_count_up_to_the_limit():
    assert mixed_capture_sizes(32) == [16, 32]
    assert mixed_capture_sizes(20) == [16, 20]
    assert mixed_capture_sizes(8) == [8]
    assert mixed_capture_sizes(1) == []
    sizes = mixed_capture_sizes(8192)
    assert sizes[:6] == [16, 32, 64, 128, 256, 512] and sizes[-1] == 2048 and sorted(set(sizes)) == sizes
    assert all(b - a == 256 for a, b in zip(sizes[5:], sizes[6:]))
    assert mixed_capture_sizes(8192, max_tokens=8192)[-1] == 8192
    for num_tokens in range(1, 2049):
        bucket = next(size for size in sizes if size >= num_tokens)
        assert bucket - num_tokens < max(num_tokens, 256)  # padding: under half the step, or under 256 tokens


class StepLog:
    """What each graph-shaped step was: tokens, requests, and query rows per request."""

    def __init__(self):
        self.steps: list[list[int]] = []
        self.order: list[str] = []  # "graph" per graph-shaped step, and "eager" where a test counts those too
        self.gathered: list[list[int]] = []  # per graph-shaped step with input ids gathered on the device: its rows

    def mixed(self) -> list[list[int]]:
        return [step for step in self.steps if any(rows > 1 for rows in step) and 1 in step]


def graph_shaped(llm: LLM, check: bool = True) -> StepLog:
    """Give the engine's runner uncaptured mixed graphs (their eager, padded forward); with `check`, each step is
    also run through the plain forward (attention on the torch reference) first and the logits compared."""
    runner = llm.engine.runner
    config = llm.engine.config
    graphs = MixedGraphs(runner.model, runner.kv_caches, runner.block_size, config.max_num_seqs,
                         config.max_model_len, config.max_num_batched_tokens, runner.device)
    log = StepLog()

    def run_and_compare(inputs, lora_slots=None, source=None, source_rows=()):
        expected = None
        if check:
            with reference_attention(runner.model):  # writes the K/V the padded forward rewrites
                expected = runner.forward_logits(inputs, source, source_rows)
        got = MixedGraphs.run(graphs, inputs, lora_slots, source, source_rows)
        if check:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        starts = inputs.query_start_loc
        log.steps.append([end - start for start, end in zip(starts, starts[1:])])
        log.order.append("graph")
        if source is not None:
            log.gathered.append(list(source_rows))
        return got

    graphs.run = run_and_compare
    runner.mixed_graphs = graphs
    return log


@pytest.fixture
def triton_backend(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")


@interpreter_only
@pytest.mark.parametrize("arch", ["qwen3"])
def test_graph_shaped_mixed_steps_equal_plain_steps_and_transformers(tiny_models, triton_backend, arch):
    """Six prompts of 5-70 tokens through 4 sequences and 32-token steps (buckets 16 and 32): chunked prefill
    beside decodes, padding of up to 15 rows, preemption (32 blocks) and prefix hits, through qwen3's q/k norms and
    wider heads."""
    path, hf_model = tiny_models(arch)
    llm = pressured_llm(path, True, **POOLS[arch])
    log = graph_shaped(llm)
    check_pressured_greedy(llm, hf_model, True, some_prompts(hf_model.config.vocab_size), NUM_NEW_TOKENS)
    assert log.mixed(), "a step with a prefill chunk beside decodes"
    assert any(sum(step) not in (16, 32) for step in log.steps), "a step padded to its bucket"
    assert any(len(step) == llm.engine.config.max_num_seqs for step in log.mixed()), "a full batch, mixed"


@interpreter_only
@pytest.mark.parametrize("arch", ["mistral"])
def test_graph_shaped_mixed_steps_queued_behind_unread_ones(tiny_models, triton_backend, arch):
    """Asynchronous scheduling queues the mixed steps too (engine._schedule_following): each is launched before
    the host has read the step before it, whose sampled tokens reach its input ids on the device (row gather into
    the graph's buffer). Every padded step equals the plain forward given the same gather, and the greedy tokens
    equal transformers' under preemption, prefix hits and mistral's sliding window (blocks freed behind it)."""
    path, hf_model = tiny_models(arch)
    llm = pressured_llm(path, True, async_scheduling=True, **POOLS[arch])
    log = graph_shaped(llm)
    queued = counted_launches(llm.engine, ("launch_step",))
    check_pressured_greedy(llm, hf_model, True, some_prompts(hf_model.config.vocab_size), NUM_NEW_TOKENS)
    assert log.mixed(), "a step with a prefill chunk beside decodes"
    assert sum(queued) > 5, "mixed steps queued behind unread ones"
    assert any(len(rows) > 1 for rows in log.gathered), "graph-shaped steps with gathered input ids"
    assert llm.engine.in_flight is None


@interpreter_only
def test_graph_shaped_sampling_and_logprobs_equal_the_plain_engine(tiny_models, triton_backend):
    """Seeded sampling and logprobs of tokens sampled from the padded forward's logits, against the same engine
    without it; a request asking prompt logprobs runs its steps eagerly, beside graph-shaped steps of others."""
    path, hf_model = tiny_models("llama")
    prompts = make_prompts(hf_model.config.vocab_size, seed=3)[5:10]
    params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=7),
              SamplingParams(temperature=0.8, top_p=0.9, max_tokens=6, ignore_eos=True, seed=11, logprobs=1),
              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=1),
              SamplingParams(temperature=0.7, top_k=20, max_tokens=6, ignore_eos=True, seed=5)]
    requests = [{"prompt_token_ids": p} for p in prompts]
    plain = reference_generate(pressured_llm(path, True), requests, params)
    llm = pressured_llm(path, True)
    log = graph_shaped(llm, check=False)
    got = llm.generate(requests, params, use_tqdm=False)
    assert log.mixed()
    for want, have in zip(plain, got):
        assert have.outputs[0].token_ids == want.outputs[0].token_ids
        for entry_a, entry_b in zip(want.outputs[0].logprobs or [], have.outputs[0].logprobs or []):
            assert entry_a.keys() == entry_b.keys()
            for token in entry_a:
                assert entry_b[token].logprob == pytest.approx(entry_a[token].logprob, abs=1e-4)
    assert got[3].prompt_logprobs is not None and len(got[3].prompt_logprobs) == len(prompts[3])


def test_the_torch_reference_is_refused(tiny_models, monkeypatch):
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "torch")
    path, _ = tiny_models("llama")
    runner = pressured_llm(path, True).engine.runner
    with pytest.raises(ValueError, match="Triton"):
        MixedGraphs(runner.model, runner.kv_caches, runner.block_size, 4, 128, 32, runner.device)


def test_cudagraph_mixed_flag():
    from serval.cli import build_parser, engine_config_from_args

    def config(*flags):
        return engine_config_from_args(build_parser().parse_args(["serve", *flags]))

    # On by default; in 16 bits only up to 256 tokens (a GEMM-bound step pays for its padding), to 2,048 with
    # adapters (eager mixed steps with LoRA pay its launches) and with float8 weights (the host bounds their steps).
    assert (config().cudagraph_mixed, config().cudagraph_mixed_max_tokens) == (True, 256)
    assert (config("--enable-lora").cudagraph_mixed, config("--enable-lora").cudagraph_mixed_max_tokens) == (True, 2048)
    assert config("--quantization", "fp8").cudagraph_mixed_max_tokens == 2048
    assert config("--cudagraph-mixed-max-tokens", "1024").cudagraph_mixed_max_tokens == 1024
    for flags in ((), ("--enable-lora",), ("--quantization", "fp8")):
        assert config(*flags, "--no-cudagraph-mixed").cudagraph_mixed is False
    # Buckets as given (sorted, once each); their largest is the limit, and a copy of the config keeps them.
    given = config("--cudagraph-mixed-sizes", "640, 64,128,64")
    assert (given.cudagraph_mixed_sizes, given.cudagraph_mixed_max_tokens) == ((64, 128, 640), 640)
    assert dataclasses.replace(given, max_num_seqs=8).cudagraph_mixed_sizes == (64, 128, 640)
    with pytest.raises(InvalidArgument, match="not both"):
        config("--cudagraph-mixed-sizes", "64,128", "--cudagraph-mixed-max-tokens", "256")


def test_given_capture_sizes_are_the_buckets(tiny_models, triton_backend):
    """cudagraph_mixed_sizes replaces the computed buckets; one above the step limit becomes the limit, and a step
    takes the smallest bucket that holds it."""
    assert mixed_capture_sizes(512, 256, (24, 64, 1024)) == [24, 64, 512]
    assert mixed_capture_sizes(8192, 256, (24, 64, 1024)) == [24, 64, 1024]
    path, _ = tiny_models("llama")
    runner = pressured_llm(path, True).engine.runner
    graphs = MixedGraphs(runner.model, runner.kv_caches, runner.block_size, 4, 128, 32, runner.device,
                         sizes=(8, 24, 40))
    assert graphs.sizes == [8, 24, 32]
    assert [graphs.bucket(n) for n in (2, 8, 9, 24, 25, 32)] == [8, 8, 24, 24, 32, 32]


# ---- on a GPU: captured graphs against eager mixed steps ----

def cuda_llm(path: str, **engine_args) -> LLM:
    return LLM(model=path, skip_tokenizer_init=True, device="cuda", block_size=16, max_model_len=256,
               max_num_seqs=8, max_num_batched_tokens=96, num_gpu_blocks_override=512, **engine_args)


def cuda_generate(llm: LLM, prompts: list[list[int]], num_new: int = 16) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=num_new, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def twenty_prompts(vocab_size: int, seed: int) -> list[list[int]]:
    """Prompts of 2 to 140 tokens through 8 sequences and 96-token steps: new prompts keep joining running decodes."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist()
            for n in (5, 17, 40, 90, 33, 2, 64, 120, 9, 71, 16, 48, 100, 3, 30, 57, 80, 11, 25, 140)]


def assert_same_greedy(got: list[list[int]], want: list[list[int]], dtype: str) -> None:
    """Every token in float32; in 16 bits and float8 another GEMM kernel for another row count may flip a near-tie,
    so 18 of the 20 prompts must match whole (a wrong padding, gather or tile mapping breaks nearly all)."""
    if dtype == "float32":
        assert got == want
    else:
        assert sum(a == b for a, b in zip(got, want)) >= 18, (got, want)


def count_replays(llm: LLM) -> list[int]:
    graphs = llm.engine.runner.mixed_graphs
    assert graphs is not None and set(graphs.graphs) == set(graphs.sizes)
    replays = []
    run = graphs.run

    def counted(inputs, *args):
        replays.append(len(inputs.input_ids))
        return run(inputs, *args)

    graphs.run = counted
    return replays


@requires_cuda
@pytest.mark.parametrize("arch,dtype,engine_args", [
    ("llama", "float32", {}), ("qwen3", "bfloat16", {}), ("mistral", "bfloat16", {}),
    ("llama", "bfloat16", {"kv_cache_dtype": "fp8"}),
    ("qwen3", "bfloat16", {"quantization": "fp8", "kv_cache_dtype": "fp8"})],
    ids=["llama-fp32", "qwen3-bf16", "mistral-bf16", "llama-fp8kv", "qwen3-fp8"])
def test_gpu_mixed_graph_replay_equals_eager_mixed_steps(tiny_models, arch, dtype, engine_args):
    """Twenty prompts through 8 sequences and 96-token steps (buckets 16, 32, 64, 96): new prompts keep joining
    running decodes, so most steps are mixed and replay a graph; the tokens equal those of the same engine with
    mixed steps eager (--no-cudagraph-mixed), decode graphs on in both. In float32 every token; in 16-bit and
    float8 cuBLAS may pick another kernel for the padded row count, so a near-tie may flip a greedy token: at
    least 18 of the 20 prompts must match whole (a wrong padding or tile mapping breaks nearly all)."""
    path, hf_model = tiny_models(arch)
    prompts = twenty_prompts(hf_model.config.vocab_size, seed=2)
    eager = cuda_generate(cuda_llm(path, dtype=dtype, cudagraph_mixed=False, **engine_args), prompts)
    llm = cuda_llm(path, dtype=dtype, cudagraph_mixed=True, **engine_args)
    replays = count_replays(llm)
    assert_same_greedy(cuda_generate(llm, prompts), eager, dtype)
    assert len(replays) > 5 and len(set(replays)) >= 3  # several graph sizes, not one


@requires_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_mixed_steps_queued_behind_unread_ones_change_no_token(tiny_models, dtype):
    """Steps that admit prompts beside running decodes, launched before the host has read the step before them
    (engine._schedule_following: input ids gathered on the device into the captured graph's buffer, its staging
    double-buffered), against the synchronous loop: every token equal in float32. A queued step admits waiting
    prompts a step later (the seats of requests that stop on the unread tokens free only once they are read), so
    the batches differ: in bfloat16 a near-tie may flip a greedy token, and 18 of the 20 must match whole."""
    path, hf_model = tiny_models("llama")
    prompts = twenty_prompts(hf_model.config.vocab_size, seed=4)
    synchronous = cuda_generate(cuda_llm(path, dtype=dtype, async_scheduling=False), prompts)
    llm = cuda_llm(path, dtype=dtype, async_scheduling=True)
    queued = counted_launches(llm.engine, ("launch_step",))
    replays = count_replays(llm)
    assert_same_greedy(cuda_generate(llm, prompts), synchronous, dtype)
    assert sum(queued) > 5 and len(replays) > 5


@requires_cuda
def test_gpu_mixed_graphs_match_transformers_in_float32(tiny_models):
    path, hf_model = tiny_models("llama")
    prompts = make_prompts(hf_model.config.vocab_size)
    llm = cuda_llm(path, dtype="float32", cudagraph_mixed=True)
    replays = count_replays(llm)
    assert cuda_generate(llm, prompts, NUM_NEW_TOKENS) == hf_greedy_references(hf_model, prompts, NUM_NEW_TOKENS)
    assert replays


@requires_cuda
def test_gpu_no_mixed_graphs_with_enforce_eager_or_the_flag(tiny_models):
    path, _ = tiny_models("llama")
    assert cuda_llm(path, enforce_eager=True, cudagraph_mixed=True).engine.runner.mixed_graphs is None
    assert cuda_llm(path, cudagraph_mixed=False).engine.runner.mixed_graphs is None
    default = cuda_llm(path)  # on by default: buckets to min(max_num_batched_tokens 96, 256)
    assert default.engine.config.cudagraph_mixed_max_tokens == 256
    assert default.engine.runner.mixed_graphs.sizes == [16, 32, 64, 96]
    assert cuda_llm(path, cudagraph_mixed_max_tokens=64).engine.runner.mixed_graphs.sizes == [16, 32, 64]
    assert cuda_llm(path, cudagraph_mixed_sizes="24,48,200").engine.runner.mixed_graphs.sizes == [24, 48, 96]
