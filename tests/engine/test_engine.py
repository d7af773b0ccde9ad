"""The engine against Hugging Face transformers on the same weights, under batching pressure:
fewer sequence slots than prompts, a token budget that chunks prefills, a block pool that preempts."""
import random
import weakref

import pytest
import torch

from serval import LLM, SamplingParams
from serval.openai.errors import InvalidArgument
from tests.conftest import ARCHITECTURES

NUM_NEW_TOKENS = 12


def make_prompts(vocab_size: int, count: int = 12, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2, 5, 9, 16, 17, 23, 31, 40, 47, 55, 70][:count]
    shared = [rng.randrange(3, vocab_size) for _ in range(20)]
    prompts = []
    for i, length in enumerate(lengths):
        # Every third prompt shares a 20-token prefix, so the prefix cache has something to hit.
        head = shared[:min(length, 20)] if i % 3 == 0 else []
        prompts.append(head + [rng.randrange(3, vocab_size) for _ in range(length - len(head))])
    return prompts


def hf_greedy(model, prompt: list[int], num_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=num_new, min_new_tokens=num_new,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# transformers' generate() is the slow half of a greedy check, and each model is checked with and without prefix
# caching on the same prompts: the reference tokens are computed once per model.
_greedy_references: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hf_greedy_references(model, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    """hf_greedy of each prompt, remembered for the model object."""
    key = (tuple(map(tuple, prompts)), num_new)
    per_model = _greedy_references.setdefault(model, {})
    if key not in per_model:
        per_model[key] = [hf_greedy(model, prompt, num_new) for prompt in prompts]
    return per_model[key]


def pressured_llm(path: str, prefix_caching: bool, **engine_args) -> LLM:
    engine_args = {"max_num_seqs": 4, "num_gpu_blocks_override": 40, **engine_args}
    return LLM(model=path, skip_tokenizer_init=True, max_num_batched_tokens=32, block_size=4, max_model_len=128,
               enable_prefix_caching=prefix_caching, **engine_args)


# Mistral's every layer slides, so its cache frees the blocks behind the window (serval.engine.kv_cache): it takes more
# sequences at once in a smaller pool to be preempted.
PRESSURE = {"mistral": dict(max_num_seqs=8, num_gpu_blocks_override=36)}


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_greedy_matches_transformers(tiny_models, arch, prefix_caching):
    path, hf_model = tiny_models(arch)
    prompts = make_prompts(hf_model.config.vocab_size)
    llm = pressured_llm(path, prefix_caching, **PRESSURE.get(arch, {}))
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output, reference in zip(prompts, outputs, hf_greedy_references(hf_model, prompts, NUM_NEW_TOKENS)):
        assert output.prompt_token_ids == prompt
        assert output.outputs[0].token_ids == reference, f"prompt of {len(prompt)}"
        assert output.outputs[0].finish_reason == "length"
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0, "the block pool was meant to force preemption"
    assert stats.num_free_blocks == stats.num_blocks
    assert (stats.prefix_cache_hits > 0) == prefix_caching
    llm.engine.kv_cache.check_invariants([])


def test_prompt_logprobs_match_transformers(tiny_models):
    path, hf_model = tiny_models("qwen3")
    prompts = make_prompts(hf_model.config.vocab_size, count=6, seed=1)
    llm = pressured_llm(path, prefix_caching=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=1, prompt_logprobs=3, temperature=0.0), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            reference = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        assert output.prompt_logprobs[0] is None
        assert len(output.prompt_logprobs) == len(prompt)
        for position in range(1, len(prompt)):
            entry = output.prompt_logprobs[position]
            token = prompt[position]
            assert entry[token].logprob == pytest.approx(reference[position - 1, token].item(), abs=1e-4)
            top3 = torch.topk(reference[position - 1], 3).indices.tolist()
            assert set(top3) <= set(entry)


def test_sample_logprobs_match_transformers(tiny_models):
    path, hf_model = tiny_models("llama")
    prompt = make_prompts(hf_model.config.vocab_size, seed=2)[6]
    llm = pressured_llm(path, prefix_caching=True)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=4, logprobs=2, temperature=0.0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    tokens = prompt + out.token_ids
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([tokens])).logits[0].float(), dim=-1)
    for step, token in enumerate(out.token_ids):
        row = reference[len(prompt) - 1 + step]
        assert out.logprobs[step][token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert out.logprobs[step][token].rank == 1  # greedy picks the top token
    assert out.cumulative_logprob == pytest.approx(sum(out.logprobs[i][t].logprob for i, t in enumerate(out.token_ids)))


def test_triton_kernels_in_the_engine_match_transformers(tiny_models, monkeypatch):
    """The whole engine on the Triton attention kernels (the interpreter here, compiled on a GPU): chunked prefill,
    prefix hits and split-K decode give transformers' greedy tokens."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")
    path, hf_model = tiny_models("qwen2")
    prompts = [make_prompts(hf_model.config.vocab_size)[i] for i in (6, 9)]  # 23 and 47 tokens, a shared prefix
    llm = LLM(model=path, skip_tokenizer_init=True, max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
              max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 4), f"prompt of {len(prompt)}"
    assert llm.engine.get_stats().prefix_cache_hits > 0


# ---- float8 KV cache (kv_cache_dtype="fp8") ----
def test_fp8_kv_cache_doubles_the_pool_and_stays_close_to_transformers(tiny_models):
    """The same KV memory holds as many more blocks as the element is smaller (4x here: auto is float32 on CPU),
    and greedy decoding over the float8 cache stays within fp8's noise of transformers: measured here, a mean
    |logprob error| of 0.015; a cache read back with a 10% wrong scale gives 0.07, one not dequantized 1.7."""
    path, hf_model = tiny_models("llama")
    prompts = make_prompts(hf_model.config.vocab_size, seed=3)[4:10]
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=1, ignore_eos=True)
    llms = {kv_cache_dtype: LLM(model=path, skip_tokenizer_init=True, block_size=4, max_model_len=128,
                                kv_cache_memory_bytes=256 * 1024, kv_cache_dtype=kv_cache_dtype)
            for kv_cache_dtype in ("auto", "fp8")}
    auto, fp8 = llms["auto"].engine, llms["fp8"].engine
    assert fp8.runner.kv_caches[0].dtype == fp8.kv_cache_dtype == torch.float8_e4m3fn
    assert auto.runner.kv_caches[0].dtype == auto.dtype
    ratio = auto.kv_cache_dtype.itemsize // fp8.kv_cache_dtype.itemsize
    assert fp8.kv_cache.num_blocks == ratio * auto.kv_cache.num_blocks

    outputs = llms["fp8"].generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    errors, top1 = [], []
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        with torch.no_grad():
            reference = torch.log_softmax(hf_model(torch.tensor([prompt + completion.token_ids])).logits[0], dim=-1)
        for step, token in enumerate(completion.token_ids):
            row = reference[len(prompt) - 1 + step]
            errors.append(abs(completion.logprobs[step][token].logprob - row[token].item()))
            top1.append(row.argmax().item() == token)
    assert sum(errors) / len(errors) < 0.04 and max(errors) < 0.2, (sum(errors) / len(errors), max(errors))
    assert sum(top1) >= 0.9 * len(top1)


def test_invalid_kv_cache_dtype_or_quantization_names_the_argument():
    with pytest.raises(ValueError, match=r"kv_cache_dtype='int8'.*\['auto', 'fp8', 'fp8_e4m3'\]"):
        LLM(kv_cache_dtype="int8")
    with pytest.raises(ValueError, match=r"quantization='awq'.*\[None, 'fp8'\]"):
        LLM(quantization="awq")


# ---- asynchronous scheduling (decode step N+1 queued before step N's tokens are read) ----
def counted_launches(engine, kinds: tuple[str, ...] = ("launch_decode", "launch_step")) -> list[bool]:
    """Wrap the engine's real launch_decode and launch_step (decode steps; steps that change the batch) to count the
    steps they launched, True for those queued behind an unread one: proof the overlapped path ran."""
    calls = []
    for kind in kinds:
        def counting(batch, previous=None, launch=getattr(engine.runner, kind)):
            calls.append(previous is not None)
            return launch(batch, previous)

        setattr(engine.runner, kind, counting)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_async_scheduling_matches_transformers_under_pressure(tiny_models, arch):
    path, hf_model = tiny_models(arch)
    prompts = make_prompts(hf_model.config.vocab_size)
    llm = LLM(model=path, skip_tokenizer_init=True, max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
              num_gpu_blocks_override=40, max_model_len=128, async_scheduling=True)
    launches = counted_launches(llm.engine)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, NUM_NEW_TOKENS), f"prompt of {len(prompt)}"
        assert output.outputs[0].finish_reason == "length"
    assert sum(launches) > 10, "steps were meant to be queued behind unread ones"
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0 and stats.num_free_blocks == stats.num_blocks
    assert llm.engine.in_flight is None
    llm.engine.kv_cache.check_invariants([])


def mixed_requests(vocab_size: int, stop_token: int) -> list[tuple[list[int], SamplingParams]]:
    prompts = make_prompts(vocab_size, count=8, seed=5)
    return [
        (prompts[0], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_token])),  # stops early
        (prompts[1], SamplingParams(temperature=0.9, seed=7, n=2, max_tokens=15, ignore_eos=True)),
        (prompts[2], SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=3, max_tokens=17,
                                    ignore_eos=True)),
        (prompts[3], SamplingParams(temperature=0.0, max_tokens=9, min_tokens=6, stop_token_ids=[stop_token])),
        (prompts[4], SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.3, ignore_eos=True)),
        (prompts[5], SamplingParams(temperature=0.0, max_tokens=7, logprobs=2, ignore_eos=True)),
        (prompts[6], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)),
        (prompts[7], SamplingParams(temperature=1.0, seed=11, max_tokens=25, logit_bias={7: 3.0}, ignore_eos=True)),
    ]


@pytest.mark.parametrize("which", ["all", "overlap-safe"])
def test_async_scheduling_gives_the_synchronous_outputs(tiny_models, which):
    """Stops on a token (one queued row wasted), seeded sampling, n=2, min_tokens, and requests that can't overlap
    (penalties, logprobs) in one batch: every output equals the synchronous engine's. Without min_tokens and
    those, the batch overlaps from its first decode step, so the stop lands on a queued step."""
    path, hf_model = tiny_models("llama")
    greedy = hf_greedy(hf_model, make_prompts(hf_model.config.vocab_size, count=8, seed=5)[0], 6)
    stop_token = greedy[4]
    requests = mixed_requests(hf_model.config.vocab_size, stop_token)
    if which == "overlap-safe":
        requests = requests[:3] + requests[6:]
    results = {}
    for overlap in (False, True):
        llm = LLM(model=path, skip_tokenizer_init=True, max_num_seqs=6, max_num_batched_tokens=64, block_size=4,
                  max_model_len=128, async_scheduling=overlap)
        launches = counted_launches(llm.engine)
        outputs = llm.generate([{"prompt_token_ids": p} for p, _ in requests], [p for _, p in requests],
                               use_tqdm=False)
        results[overlap] = [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]
        assert (sum(launches) > 0) == overlap
        llm.engine.kv_cache.check_invariants([])
    assert results[True] == results[False]
    assert results[True][0][0][1:] == ("stop", stop_token)
    assert len(results[True][0][0][0]) == greedy.index(stop_token) + 1


def test_async_scheduling_lets_a_stop_through_once_min_tokens_are_out(tiny_models):
    """min_tokens = 2 and the free greedy run's third token as a stop token: the synchronous engine stops on it.
    Overlapped, that token is sampled while the second is still on the device: the host's count of outputs is one
    short, so it must not decide the mask (it did: the stop was masked and the request ran on)."""
    path, hf_model = tiny_models("llama")
    prompts = make_prompts(hf_model.config.vocab_size, count=12, seed=21)
    m = 2
    prompt, free = next((p, free) for p in prompts
                        if len(p) > 1 and (free := hf_greedy(hf_model, p, 12))[m] not in free[:m])
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=m, stop_token_ids=[free[m]])
    for overlap in (False, True):
        llm = LLM(model=path, skip_tokenizer_init=True, block_size=4, max_model_len=128, async_scheduling=overlap)
        launches = counted_launches(llm.engine)
        output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
        assert (output.token_ids, output.finish_reason, output.stop_reason) == (free[:m + 1], "stop", free[m])
        assert bool(launches) == overlap  # launch_decode runs only overlapped


def counted_forwards(engine) -> list[bool]:
    """Wrap the engine's real launch_forward to count the forwards queued alone, their sampling deferred until the
    host has the previous step's tokens."""
    calls = []
    launch = engine.runner.launch_forward

    def counting(requests, previous=None, staged=None):
        calls.append(True)
        return launch(requests, previous, staged)

    engine.runner.launch_forward = counting
    return calls


def test_async_scheduling_reads_the_tokens_a_bad_word_ends_with(tiny_models):
    """A two-token bad word from each prompt's free greedy run: its second token is banned only once the first is
    on the host, so the overlapped engine must not sample before then. Same outputs as the synchronous engine,
    and the word never appears."""
    path, hf_model = tiny_models("llama")
    prompts = make_prompts(hf_model.config.vocab_size, count=6, seed=9)
    free = [hf_greedy(hf_model, prompt, 12) for prompt in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, bad_words_token_ids=[tokens[4:6]])
              for tokens in free]
    results = {}
    for overlap in (False, True):
        llm = LLM(model=path, skip_tokenizer_init=True, max_num_seqs=6, block_size=4, max_model_len=128,
                  async_scheduling=overlap)
        forwards = counted_forwards(llm.engine)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results[overlap] = [o.outputs[0].token_ids for o in outputs]
        assert (len(forwards) > 0) == overlap
    assert results[True] == results[False]
    for tokens, unconstrained in zip(results[True], free):
        word = unconstrained[4:6]
        assert all(tokens[i:i + 2] != word for i in range(len(tokens) - 1))
        assert tokens != unconstrained


def test_abort_while_a_step_is_queued_frees_everything(tiny_models):
    path, hf_model = tiny_models("llama")
    prompts = make_prompts(hf_model.config.vocab_size, count=3, seed=8)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    engine = LLM(model=path, skip_tokenizer_init=True, block_size=4, max_model_len=128,
                 async_scheduling=True).engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    while engine.in_flight is None:
        engine.step()
    engine.abort_request("1")
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    assert sorted(finished) == ["0", "2"]
    for request_id in ("0", "2"):
        assert finished[request_id] == hf_greedy(hf_model, prompts[int(request_id)], 10)
    engine.step()  # whatever is still queued is read and dropped
    assert engine.in_flight is None
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_blocks
    engine.kv_cache.check_invariants([])


def test_async_scheduling_with_text_stops_and_the_default_model(default_llm):
    """Stop strings found by the detokenizer while the next step is already queued: same text, same token ids,
    same finish as the synchronous engine, on the real default model and tokenizer."""
    overlapped = LLM(max_model_len=2048, async_scheduling=True)
    prompts = ["The quick brown fox jumps over the lazy dog. The quick brown fox", "Once upon a time",
               "1, 2, 3, 4,"]
    plain = SamplingParams(temperature=0.0, max_tokens=24)
    reference = default_llm.generate(prompts, plain, use_tqdm=False)
    # Stop on a short string each output reaches a few tokens in (whatever the model writes).
    stops = [out.outputs[0].text[len(out.outputs[0].text) // 3:][:3] for out in reference]
    params = [plain.clone(stop=[stop]) for stop in stops] + [plain.clone(seed=5, temperature=0.8)]
    expected = default_llm.generate(prompts + prompts[:1], params, use_tqdm=False)
    launches = counted_launches(overlapped.engine)
    got = overlapped.generate(prompts + prompts[:1], params, use_tqdm=False)
    assert sum(launches) > 5
    for ours, theirs in zip(got, expected):
        assert (ours.outputs[0].text, ours.outputs[0].token_ids, ours.outputs[0].finish_reason) == \
               (theirs.outputs[0].text, theirs.outputs[0].token_ids, theirs.outputs[0].finish_reason)
    assert [out.outputs[0].finish_reason for out in got[:3]] == ["stop"] * 3
    assert overlapped.engine.in_flight is None


# ---- a request can't kill the engine ----
def bad_token_id_requests(vocab_size: int) -> list[tuple[str, dict, SamplingParams]]:
    """(param at fault, prompt, params): one for every token id a request can carry."""
    good = {"prompt_token_ids": [5, 6, 7]}
    return [
        ("prompt", {"prompt_token_ids": [5, vocab_size]}, SamplingParams()),
        ("prompt", {"prompt_token_ids": [5, -1]}, SamplingParams()),
        ("prompt", {"prompt_token_ids": [5, True]}, SamplingParams()),
        ("prompt", {"prompt_token_ids": 5}, SamplingParams()),
        # The original defect: min_tokens made the sampler index the logits with this id, inside step().
        ("stop_token_ids", good, SamplingParams(stop_token_ids=[vocab_size + 5], min_tokens=1)),
        ("stop_token_ids", good, SamplingParams(stop_token_ids=[3, vocab_size])),
        ("logit_bias", good, SamplingParams(logit_bias={vocab_size + 5: 1.0})),
        ("allowed_token_ids", good, SamplingParams(allowed_token_ids=list(range(vocab_size + 1)))),
        ("prompt", {"prompt_token_ids": [5, 6.0]}, SamplingParams()),
    ]


def test_every_token_id_is_range_checked_before_admission(tiny_models):
    path, hf_model = tiny_models("llama")
    vocab_size = hf_model.config.vocab_size
    engine = pressured_llm(path, prefix_caching=True).engine
    for param, prompt, params in bad_token_id_requests(vocab_size):
        with pytest.raises(InvalidArgument) as error:
            engine.add_request(f"bad-{param}", prompt, params)
        assert error.value.param == param, (param, prompt, params)
        assert not engine.has_unfinished_requests()
    prompt = make_prompts(vocab_size, count=3)[2]
    engine.add_request("good", {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=6,
                                                                             ignore_eos=True))
    outputs = [output for _ in range(20) for output in engine.step() if output.finished]
    assert outputs[0].outputs[0].token_ids == hf_greedy(hf_model, prompt, 6)


def fail_once(runner, method: str = "execute"):
    """Make the runner's next call of `method` raise, as a device or kernel fault would (nothing outside can
    fault a step on demand); later calls run the real method."""
    real = getattr(runner, method)
    calls = []

    def faulty(*args, **kwargs):
        calls.append(True)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    setattr(runner, method, faulty)
    return calls


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async-scheduling"])
def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(tiny_models, async_scheduling):
    path, hf_model = tiny_models("llama")
    prompts = make_prompts(hf_model.config.vocab_size, count=6, seed=9)
    llm = pressured_llm(path, prefix_caching=True, async_scheduling=async_scheduling)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i, prompt in enumerate(prompts[:4]):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    for _ in range(3):  # prefills done; decoding (queued ahead, with asynchronous scheduling)
        engine.step()
    fail_once(engine.runner, "launch_decode" if async_scheduling else "execute")
    failed = {output.request_id: output for output in engine.step()}
    assert failed and all(output.finished for output in failed.values())
    assert {c.finish_reason for output in failed.values() for c in output.outputs} == {"error"}
    finished = dict(failed)
    while engine.has_unfinished_requests():
        finished.update((output.request_id, output) for output in engine.step() if output.finished)
    assert sorted(finished) == ["0", "1", "2", "3"]
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_blocks
    engine.kv_cache.check_invariants([])
    # The engine goes on, and nothing the failed step wrote is served from the prefix cache.
    later = [prompts[4], prompts[5]] + [prompts[int(i)] for i in failed]
    outputs = llm.generate([{"prompt_token_ids": p} for p in later], params, use_tqdm=False)
    for prompt, output in zip(later, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 8)
        assert output.outputs[0].finish_reason == "length"


def test_the_original_defect_without_the_range_check_fails_only_its_step(tiny_models, monkeypatch):
    """Defence in depth: were a bad id to slip past admission (the check switched off here), the step it
    breaks (the min_tokens mask indexing the logits with it) fails that step's requests, not the engine."""
    path, hf_model = tiny_models("llama")
    vocab_size = hf_model.config.vocab_size
    engine = pressured_llm(path, prefix_caching=True).engine
    monkeypatch.setattr(engine.input_processor, "_check_token_ids", lambda *args: None)
    engine.add_request("bad", {"prompt_token_ids": [5, 6, 7]},
                       SamplingParams(stop_token_ids=[vocab_size + 5], min_tokens=1))
    [output] = engine.step()
    assert output.finished and output.outputs[0].finish_reason == "error"
    assert engine.get_stats().num_free_blocks == engine.get_stats().num_blocks
    prompt = make_prompts(vocab_size, count=2)[1]
    engine.add_request("next", {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=5,
                                                                             ignore_eos=True))
    outputs = [output for _ in range(10) for output in engine.step() if output.finished]
    assert outputs[0].outputs[0].token_ids == hf_greedy(hf_model, prompt, 5)
