"""Mixed prefill/decode steps in the captured-graph shape (serval.engine.mixed_graphs) over a float8 KV cache: the
padded forward against the plain one step for step, and the steps before calculate_kv_scales has run taken eagerly.
On the CPU the padded forward runs through the Triton kernels in the interpreter (tests/engine/test_mixed_graphs.py
says how); its own file, so that the two workers of `pytest -n 2 --dist loadfile` share the interpreted steps."""
import torch

from serval import SamplingParams
from tests.engine.attention_reference import reference_generate
from tests.engine.test_engine import make_prompts, pressured_llm
from tests.engine.test_mixed_graphs import NUM_NEW_TOKENS, POOLS, graph_shaped, interpreter_only, some_prompts
from tests.engine.test_mixed_graphs import triton_backend  # noqa: F401, F811 (the fixture)


@interpreter_only
def test_graph_shaped_steps_with_a_float8_cache(tiny_models, triton_backend):
    """kv_cache_dtype="fp8": the padded forward writes and reads the float8 cache as the plain one does, step for
    step, and the tokens equal the plain engine's."""
    path, hf_model = tiny_models("llama")
    prompts = some_prompts(hf_model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    plain = reference_generate(pressured_llm(path, True, kv_cache_dtype="fp8", **POOLS["llama"]), requests, params)
    llm = pressured_llm(path, True, kv_cache_dtype="fp8", **POOLS["llama"])
    log = graph_shaped(llm)
    got = llm.generate(requests, params, use_tqdm=False)
    assert log.mixed() and llm.engine.get_stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in plain]


@interpreter_only
def test_steps_before_the_float8_scales_are_calculated_run_eagerly(tiny_models, triton_backend):
    """calculate_kv_scales: the first prefill sets every layer's scales; a graph would skip that, so the graphs
    take no step until it has run, and the scales come out as the plain engine's."""
    path, hf_model = tiny_models("llama")
    prompts = make_prompts(hf_model.config.vocab_size)[6:10]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    engine_args = dict(kv_cache_dtype="fp8", calculate_kv_scales=True)
    plain_llm = pressured_llm(path, True, **engine_args)
    plain = reference_generate(plain_llm, requests, params)
    llm = pressured_llm(path, True, **engine_args)
    log = graph_shaped(llm, check=False)
    runner = llm.engine.runner
    eager_forward = runner.forward_logits

    def counted_eager_forward(inputs, *gather):
        log.order.append("eager")
        return eager_forward(inputs, *gather)

    runner.forward_logits = counted_eager_forward
    got = llm.generate(requests, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in plain]
    scales = [(m.k_scale.item(), m.v_scale.item()) for m in llm.engine.model.modules() if hasattr(m, "k_scale")]
    want = [(m.k_scale.item(), m.v_scale.item()) for m in plain_llm.engine.model.modules() if hasattr(m, "k_scale")]
    # Equal up to the matmuls' last bits (the two engines' prefills may block their GEMMs differently); a skipped
    # calculation would leave 1.0, far outside the tolerance.
    torch.testing.assert_close(scales, want, rtol=1e-5, atol=0)
    assert all(k != 1.0 for k, _ in scales)
    assert log.order[0] == "eager" and "graph" in log.order
