"""Qwen2MoeForCausalLM (shared expert with a sigmoid gate, a dense layer by mlp_only_layers) and
Qwen3MoeForCausalLM (q/k norm, norm_topk_prob, a dense layer by decoder_sparse_step) against transformers on tiny
random weights: greedy tokens under engine pressure and prompt logprobs."""
from __future__ import annotations

import pytest
import torch

from serval import LLM, SamplingParams
from serval.layers.mlp import GatedMLP
from serval.layers.moe import SparseMoeBlock
from serval.model.loader import load_model
from tests.model.engine_checks import (check_greedy_matches_transformers, check_prompt_logprobs_match_transformers,
                                       check_two_prompts_greedy_match_transformers)
from tests.model.tiny_models import build_tiny

ARCHS = ["qwen2_moe", "qwen3_moe"]


@pytest.fixture(scope="module")
def qwen_moe(tiny_checkpoint):
    return tiny_checkpoint


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(qwen_moe, arch, prefix_caching):
    check_greedy_matches_transformers(*qwen_moe(arch), prefix_caching)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logprobs_match_transformers(qwen_moe, arch):
    check_prompt_logprobs_match_transformers(*qwen_moe(arch))


@pytest.mark.parametrize("arch,sparse", [("qwen2_moe", [True, False]), ("qwen3_moe", [False, True])])
def test_dense_and_sparse_layers_follow_the_config(qwen_moe, arch, sparse):
    model, _ = load_model(qwen_moe(arch)[0])
    kinds = [type(layer.mlp) for layer in model.model.layers]
    assert kinds == [SparseMoeBlock if s else GatedMLP for s in sparse]
    sparse_blocks = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoeBlock)]
    assert [block.shared_expert is not None for block in sparse_blocks] == [arch == "qwen2_moe"]


def test_stacked_experts_checkpoint_loads(tmp_path):
    hf_model = build_tiny(tmp_path, "qwen2_moe", seed=4, save_original_format=False)
    check_prompt_logprobs_match_transformers(str(tmp_path), hf_model)


def test_fused_moe_kernel_in_the_engine_matches_transformers(qwen_moe, monkeypatch):
    """The whole engine with the experts on the Triton kernel (the interpreter here, compiled on a GPU)."""
    triton_moe = pytest.importorskip("serval.kernels.triton_moe")
    monkeypatch.setenv("SERVAL_MOE_BACKEND", "triton")
    # Experts 16 wide, not 32: half of the interpreter's 32-column gate/up tile (tests/conftest.py) is masked; the
    # shared expert (80) keeps its width.
    llm = check_two_prompts_greedy_match_transformers(*qwen_moe("qwen2_moe", moe_intermediate_size=16))
    block = llm.engine.model.model.layers[0].mlp
    assert block.experts._backend is triton_moe.fused_experts


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_quantizes_the_experts_too(qwen_moe, backend, monkeypatch):
    """quantization="fp8": the experts' stacks become float8 with a scale per expert and row (the router and the
    shared expert's gate stay in the model dtype), and the logits stay near transformers' unquantized ones, on
    the torch reference and on the fused kernel (the interpreter here)."""
    from tests.model.test_llama import hf_logits, run_steps, sequences_for
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("SERVAL_MOE_BACKEND", backend)
    path, hf_model = qwen_moe("qwen3_moe")
    model, config = load_model(path, quantization="fp8")
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.float8_e4m3fn
    assert experts.gate_up_proj_scale.shape == (config.num_experts, 2 * config.moe_intermediate_size)
    assert experts.down_proj_scale.shape == (config.num_experts, config.hidden_size)
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    sequences = sequences_for(config.vocab_size)[:3]
    for got, want in zip(run_steps(model, sequences, [[(0, len(s)) for s in sequences]]),
                         hf_logits(hf_model, sequences)):
        # fp8 moves a tiny random model's logits by several percent (as for the dense layers, test_loader.py),
        # no more: a scale of the wrong expert or row would be orders of magnitude off.
        assert 0 < (got - want).norm() / want.norm() < 0.15


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fp8_experts_replayed_from_graphs_equal_eager(qwen_moe):
    """quantization="fp8" on a GPU: float8 experts through the fused kernel, captured in CUDA graphs, give the
    eager steps' tokens."""
    path, _ = qwen_moe("qwen3_moe")
    prompts = [[5 + i] * (3 + 7 * i) for i in range(9)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def generate(**engine_args):
        llm = LLM(model=path, skip_tokenizer_init=True, block_size=4, max_model_len=256, max_num_seqs=16,
                  num_gpu_blocks_override=400, device="cuda", dtype="bfloat16", quantization="fp8", **engine_args)
        return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                              use_tqdm=False)]

    assert generate() == generate(enforce_eager=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton routing and q/k-norm kernels need a GPU")
@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_gpu_kernels_give_the_cpu_engines_tokens(qwen_moe, arch):
    """In float32 on a GPU (routing in one Triton kernel, Qwen3's q/k norms in one, the experts on Triton, CUDA
    graphs) the greedy tokens are the CPU engine's (torch reference throughout), prefill and decode alike."""
    path, hf_model = qwen_moe(arch)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, hf_model.config.vocab_size, (n,), generator=generator).tolist()
               for n in (1, 5, 17, 33, 64)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def generate(**engine_args):
        llm = LLM(model=path, skip_tokenizer_init=True, block_size=4, max_model_len=256, max_num_seqs=8,
                  **engine_args)
        return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                              use_tqdm=False)]

    assert generate(device="cuda", dtype="float32", num_gpu_blocks_override=400) == generate(device="cpu")
