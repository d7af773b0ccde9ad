"""gpt-oss against transformers on tiny random checkpoints: logits per step and chunk, the engine's greedy tokens and
prompt logprobs under batching, chunked prefill, preemption and prefix caching, the router, and MXFP4 experts.

The window (8) is far shorter than most prompts, so the sliding layers drop most of the context; YaRN is active
(factor 4 over an original context of 64); sinks, expert biases and norms are randomized (transformers starts the
biases at zero, which would hide a missing bias), and swiglu_limit is low enough that the clamp changes outputs."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

from serval import LLM, SamplingParams  # noqa: F401 (tests merging from other branches use them)
from serval.layers.moe import top_k_softmax
from serval.model.gpt_oss import FP4_VALUES, GptOssForCausalLM, dequantize_mxfp4
from serval.model.loader import load_model
from tests.engine.test_engine import hf_greedy, make_prompts  # noqa: F401
from tests.model.engine_checks import (check_each_change_alters_the_logits, check_greedy_matches_transformers,
                                       check_logits_match_transformers, check_prompt_logprobs_match_transformers,
                                       check_two_prompts_greedy_match_transformers)
from tests.model.test_llama import hf_logits, run_steps, sequences_for
from tests.model.tiny_models import build_tiny, tiny_config


@pytest.fixture(scope="module")
def tiny_gpt_oss(tiny_checkpoint):
    return tiny_checkpoint("gpt_oss")


def test_flat_batch_and_chunked_prefill_match_transformers(tiny_gpt_oss):
    model = check_logits_match_transformers(*tiny_gpt_oss, GptOssForCausalLM)
    assert [layer.self_attn.attn.sliding_window for layer in model.model.layers] == [8, None]


def test_each_gpt_oss_detail_changes_the_output(tiny_gpt_oss):
    """Guards the comparison above against passing vacuously: without sinks, the window, the clamp or YaRN's
    attention factor, the logits of the long sequence differ from transformers'."""
    def no_sinks(model):
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-1e9)

    def no_window(model):
        for layer in model.model.layers:
            layer.self_attn.attn.sliding_window = None

    def no_clamp(model):
        from serval.layers.moe import ClampedSwiGLU
        for layer in model.model.layers:
            layer.mlp.experts.activation = ClampedSwiGLU(layer.mlp.experts.activation.alpha, 1e9)

    def no_yarn_scale(model):
        rotary = model.model.rotary_emb
        norm = (rotary.cos_cache[0, 0]).item()  # cos(0) * attention factor
        rotary.cos_cache /= norm
        rotary.sin_cache /= norm

    check_each_change_alters_the_logits(*tiny_gpt_oss, [no_sinks, no_window, no_clamp, no_yarn_scale])


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_engine_greedy_matches_transformers(tiny_gpt_oss, prefix_caching):
    check_greedy_matches_transformers(*tiny_gpt_oss, prefix_caching)


def test_engine_prompt_logprobs_match_transformers(tiny_gpt_oss):
    check_prompt_logprobs_match_transformers(*tiny_gpt_oss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_picks_transformers_experts_and_weights(dtype):
    config = tiny_config("gpt_oss", num_local_experts=16, num_experts_per_tok=4)
    torch.manual_seed(0)
    router = GptOssTopKRouter(config).to(dtype)
    with torch.no_grad():
        router.weight.normal_()
        router.bias.normal_()
    hidden = torch.randn(300, config.hidden_size, dtype=dtype)
    with torch.no_grad():
        logits, want_weights, want_ids = router(hidden)
    routing = top_k_softmax(logits, config.num_experts_per_tok)
    assert torch.equal(routing.expert_ids, want_ids)
    torch.testing.assert_close(routing.weights, want_weights.float(), atol=0, rtol=0)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., K] (K a multiple of 32) -> (blocks [..., K/32, 16] uint8, scales [..., K/32] uint8): the
    published layout, each group of 32 scaled by a power of two so that its largest value fits e2m1's 6."""
    groups = weight.float().unflatten(-1, (-1, 32))
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=2.0 ** -100) / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    table = torch.tensor(FP4_VALUES)
    codes = (scaled[..., None] - table).abs().argmin(-1).to(torch.uint8)  # nearest value (+0 before -0)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def test_mxfp4_dequantization_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    torch.manual_seed(0)
    weight = torch.randn(3, 40, 64) * 0.1  # [E, out, in]
    blocks, scales = quantize_mxfp4(weight)
    ours = dequantize_mxfp4(blocks, scales, torch.float32)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out], their layout
    torch.testing.assert_close(ours, theirs.transpose(1, 2), atol=0, rtol=0)
    assert (ours - weight).abs().max() <= weight.abs().max() / 3  # half the widest e2m1 step (2) x 2^e < amax/3


@pytest.fixture(scope="module")
def tiny_gpt_oss_mxfp4(tmp_path_factory):
    """A checkpoint whose experts are MXFP4 in the published tensor names, and the transformers model holding the
    same experts dequantized by transformers' own converter."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    path = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    hf_model = build_tiny(path, "gpt_oss", seed=5)
    weights = load_file(path / "model.safetensors")
    for name in [n for n in weights if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
        blocks, scales = quantize_mxfp4(weights.pop(name).transpose(1, 2))  # to [E, out, in]
        weights[f"{name}_blocks"], weights[f"{name}_scales"] = blocks, scales
        with torch.no_grad():
            hf_param = hf_model.get_parameter(name)
            hf_param.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4",
                                     "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    return str(path), hf_model


def test_mxfp4_checkpoint_matches_transformers(tiny_gpt_oss_mxfp4):
    path, hf_model = tiny_gpt_oss_mxfp4
    model, config = load_model(path)
    sequences = sequences_for(config.vocab_size)
    for got, want in zip(run_steps(model, sequences, [[(0, len(s)) for s in sequences]]),
                         hf_logits(hf_model, sequences)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_mxfp4_engine_greedy_matches_transformers(tiny_gpt_oss_mxfp4):
    check_greedy_matches_transformers(*tiny_gpt_oss_mxfp4, prefix_caching=True)


def test_mxfp4_half_missing_is_named(tmp_path):
    build_tiny(tmp_path, "gpt_oss")
    weights = load_file(tmp_path / "model.safetensors")
    blocks, _ = quantize_mxfp4(weights.pop("model.layers.0.mlp.experts.down_proj").transpose(1, 2))
    weights["model.layers.0.mlp.experts.down_proj_blocks"] = blocks
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"down_proj': \['blocks'\]"):
        load_model(str(tmp_path))


def test_triton_attention_backend_matches_transformers(tiny_gpt_oss, monkeypatch):
    """The Triton kernels with sinks (the interpreter here, compiled on a GPU): windowed and full layers, chunked
    prefill and a prefix hit give transformers' greedy tokens."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")
    llm = check_two_prompts_greedy_match_transformers(*tiny_gpt_oss)
    assert llm.engine.get_stats().prefix_cache_hits > 0


def test_bfloat16_is_close_to_transformers_in_bfloat16(tiny_gpt_oss):
    path, hf_model = tiny_gpt_oss
    model, config = load_model(path, load_format="safetensors", dtype=torch.bfloat16)
    sequences = sequences_for(config.vocab_size)
    for got, want in zip(run_steps(model, sequences, [[(0, len(s)) for s in sequences]]),
                         hf_logits(copy.deepcopy(hf_model).to(torch.bfloat16), sequences)):
        # Against transformers in bf16 too: a router's choice can flip under bf16 rounding (it does here).
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_fused_moe_kernel_matches_transformers(tiny_checkpoint, monkeypatch):
    """The experts on the fused Triton kernel (the interpreter here, compiled on a GPU), its biases and clamped
    SwiGLU included: logits per chunk (the first step past the GEMV path's rows, on the grouped kernel; the second
    at them, on the GEMV kernels), then the engine's greedy tokens with attention on the Triton kernel too, the
    whole path a GPU runs (and captures in CUDA graphs)."""
    triton_moe = pytest.importorskip("serval.kernels.triton_moe")
    monkeypatch.setenv("SERVAL_MOE_BACKEND", "triton")
    # Experts 16 wide, not 32: half of the interpreter's 32-column gate/up tile (tests/conftest.py) is masked, so
    # no width is a multiple of the kernels' tiles.
    path, hf_model = tiny_checkpoint("gpt_oss", intermediate_size=16)
    model, config = load_model(path, load_format="safetensors")
    sequences = sequences_for(config.vocab_size)
    splits = [4, 9, 23]
    chunked = run_steps(model, sequences, [[(0, s) for s in splits], list(zip(splits, map(len, sequences)))])
    for got, want in zip(chunked, hf_logits(hf_model, sequences)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert model.model.layers[0].mlp.experts._backend is triton_moe.fused_experts

    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")
    # 9 and 23 tokens (past the window of 8) in 16-token steps: a chunked prefill, then decodes.
    prompts = [make_prompts(hf_model.config.vocab_size)[i] for i in (3, 6)]
    llm = LLM(model=path, skip_tokenizer_init=True, max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
              max_model_len=128)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 4), f"prompt of {len(prompt)}"


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@requires_cuda
def test_gpu_graphs_match_cpu_engine(tiny_gpt_oss):
    """gpt-oss decodes from CUDA graphs now that its experts are the fused kernel: the GPU engine (Triton attention
    with sinks and windows, fused experts, graphs) gives the CPU engine's greedy tokens in float32, with batches of
    every size from 1 to 9 passing through the graphs as requests finish; and in bfloat16 graphs equal eager."""
    path, hf_model = tiny_gpt_oss
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, hf_model.config.vocab_size, (n,), generator=generator).tolist()
               for n in (1, 3, 8, 9, 16, 17, 30, 41, 70)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    def generate(**engine_args):
        llm = LLM(model=path, skip_tokenizer_init=True, block_size=4, max_model_len=256, max_num_seqs=12,
                  num_gpu_blocks_override=400, **engine_args)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return llm, [output.outputs[0].token_ids for output in outputs]

    _, cpu = generate(device="cpu")
    llm, gpu = generate(device="cuda", dtype="float32")
    assert llm.engine.runner.graphs is not None
    assert gpu == cpu
    _, eager = generate(device="cuda", dtype="bfloat16", enforce_eager=True)
    _, graphs = generate(device="cuda", dtype="bfloat16")
    assert graphs == eager
