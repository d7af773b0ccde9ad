"""EAGLE-3: a random head saved in the published format (config.json + safetensors: fc, midlayer.*, norm, lm_head,
d2t, t2d) for a tiny transformers Llama. The target's captured hidden states equal transformers'
output_hidden_states; the head's forward and its drafts equal a direct torch computation of the EAGLE-3 layer over
transformers' hidden states; greedy outputs equal the engine without speculation and transformers under batching
pressure; malformed heads are refused naming the file and key."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from serval import SamplingParams
from serval.engine.spec_decode.eagle3 import load_eagle3_head
from serval.kernels import paged_attention as torch_attention
from serval.layers.attention import Attention, AttentionMetadata
from serval.model.loader import load_model
from serval.openai.errors import InvalidArgument
from tests.conftest import build_tiny_model
from tests.engine.spec_decode.test_verify_graphs import graph_shaped
from tests.engine.test_engine import hf_greedy, make_prompts, pressured_llm

NUM_NEW_TOKENS = 12
NUM_TARGET_LAYERS = 8  # EAGLE-3's default layers (2, L // 2, L - 3) = (2, 4, 5) are distinct
DRAFT_VOCAB_SIZE = 200
HEAD = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=128, rope_theta=10000.0, hidden_act="silu")


def save_eagle3_head(path, target_config, seed: int = 0, target_hidden_size: int | None = None,
                     drop: tuple[str, ...] = (), **config_overrides) -> dict[str, torch.Tensor]:
    """A random EAGLE-3 head in the published layout; returns its tensors."""
    os.makedirs(path, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
              "vocab_size": target_config.vocab_size, "draft_vocab_size": DRAFT_VOCAB_SIZE, **HEAD,
              **config_overrides}
    hidden, target_hidden = config["hidden_size"], target_hidden_size or target_config.hidden_size
    head_dim = hidden // config["num_attention_heads"]
    q_rows, kv_rows = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.15):
        return torch.randn(*shape, generator=generator) * scale

    # The draft vocabulary: a random subset of target ids, in order; d2t holds each one's offset.
    draft_to_target = torch.randperm(config["vocab_size"], generator=generator)[:DRAFT_VOCAB_SIZE].sort().values
    t2d = torch.zeros(config["vocab_size"], dtype=torch.bool)
    t2d[draft_to_target] = True
    tensors = {
        "fc.weight": rand(hidden, 3 * target_hidden, scale=0.1),
        "midlayer.input_layernorm.weight": 1 + rand(hidden), "midlayer.hidden_norm.weight": 1 + rand(hidden),
        "midlayer.self_attn.q_proj.weight": rand(q_rows, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": rand(kv_rows, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": rand(kv_rows, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": rand(hidden, q_rows),
        "midlayer.post_attention_layernorm.weight": 1 + rand(hidden),
        "midlayer.mlp.gate_proj.weight": rand(config["intermediate_size"], hidden),
        "midlayer.mlp.up_proj.weight": rand(config["intermediate_size"], hidden),
        "midlayer.mlp.down_proj.weight": rand(hidden, config["intermediate_size"]),
        "norm.weight": 1 + rand(hidden), "lm_head.weight": rand(DRAFT_VOCAB_SIZE, hidden, scale=0.3),
        "d2t": draft_to_target - torch.arange(DRAFT_VOCAB_SIZE), "t2d": t2d,
    }
    save_file({name: tensor for name, tensor in tensors.items() if name not in drop},
              os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return tensors


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("eagle3_target")
    return str(path), build_tiny_model(path, "llama", num_hidden_layers=NUM_TARGET_LAYERS)


@pytest.fixture(scope="module")
def head(tmp_path_factory, target):
    path = tmp_path_factory.mktemp("eagle3_head")
    return str(path), save_eagle3_head(path, target[1].config)


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float = HEAD["rms_norm_eps"]) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_head(tensors: dict, embed: torch.Tensor, token_ids: list[int],
                   hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The EAGLE-3 layer over one causal sequence at positions 0..T-1, written out in torch: row p reads token_ids[p]
    and hidden[p] ([T, hidden], already fused). -> (draft-vocabulary logits, pre-norm output), [T, ...] each."""
    t = {name: tensor.float() for name, tensor in tensors.items()}
    num_heads, num_kv_heads = HEAD["num_attention_heads"], HEAD["num_key_value_heads"]
    head_dim = HEAD["hidden_size"] // num_heads
    x = torch.cat([rms(embed[token_ids], t["midlayer.input_layernorm.weight"]),
                   rms(hidden, t["midlayer.hidden_norm.weight"])], dim=-1)
    length = len(token_ids)
    q = (x @ t["midlayer.self_attn.q_proj.weight"].T).view(1, length, num_heads, head_dim).transpose(1, 2)
    k = (x @ t["midlayer.self_attn.k_proj.weight"].T).view(1, length, num_kv_heads, head_dim).transpose(1, 2)
    v = (x @ t["midlayer.self_attn.v_proj.weight"].T).view(1, length, num_kv_heads, head_dim).transpose(1, 2)
    rotary = LlamaRotaryEmbedding(transformers.LlamaConfig(**HEAD))
    cos, sin = rotary(v, torch.arange(length)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    h = attn.transpose(1, 2).reshape(length, -1) @ t["midlayer.self_attn.o_proj.weight"].T + hidden
    normed = rms(h, t["midlayer.post_attention_layernorm.weight"])
    mlp = (F.silu(normed @ t["midlayer.mlp.gate_proj.weight"].T) * (normed @ t["midlayer.mlp.up_proj.weight"].T)
           ) @ t["midlayer.mlp.down_proj.weight"].T
    out = mlp + h
    return rms(out, t["norm.weight"]) @ t["lm_head.weight"].T, out


def hf_aux_hidden(hf_model, token_ids: list[int], layer_ids) -> torch.Tensor:
    with torch.no_grad():
        states = hf_model(torch.tensor([token_ids]), output_hidden_states=True).hidden_states
    return torch.cat([states[i][0] for i in sorted(layer_ids)], dim=-1)


def run_flat(model, input_ids: list[int], *extra) -> torch.Tensor:
    """One sequence at positions 0..T-1 through a serval model over a fresh paged cache (block size 4)."""
    block_size, length = 4, len(input_ids)
    num_blocks = -(-length // block_size)
    kv_caches = [torch.zeros(2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
                 for _ in range(model.num_layers)]
    metadata = AttentionMetadata(slot_mapping=torch.arange(length), query_start_loc=[0, length], seq_lens=[length],
                                 block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
                                 block_size=block_size)
    positions = torch.arange(length)
    if extra:
        return model(torch.tensor(input_ids), positions, *extra, kv_caches, metadata)
    return model(torch.tensor(input_ids), positions, kv_caches, metadata)


def test_captured_hidden_states_equal_transformers_output_hidden_states(target):
    path, hf_model = target
    model, _ = load_model(path)
    prompt = make_prompts(hf_model.config.vocab_size)[7]
    run_flat(model, prompt)
    assert model.model.aux_hidden_states is None, "nothing is captured unless asked"
    model.model.aux_hidden_state_layers = (5, 0, 3)
    run_flat(model, prompt)
    torch.testing.assert_close(model.model.aux_hidden_states, hf_aux_hidden(hf_model, prompt, (0, 3, 5)),
                               rtol=1e-5, atol=1e-5)


def test_head_forward_equals_a_direct_computation(target, head):
    path, hf_model = target
    head_path, tensors = head
    model, _ = load_model(path)
    eagle = load_eagle3_head(head_path, model, torch.float32, torch.device("cpu"))
    assert eagle.aux_layer_ids == (2, 4, 5)
    generator = torch.Generator().manual_seed(3)
    token_ids = torch.randint(3, hf_model.config.vocab_size, (11,), generator=generator).tolist()
    aux = torch.randn(11, 3 * hf_model.config.hidden_size, generator=generator)
    with torch.no_grad():
        fused = eagle.fuse(aux)
        normed, prenorm = run_flat(eagle, token_ids, fused)
        logits = eagle.compute_logits(normed)
    embed = hf_model.model.embed_tokens.weight.detach()
    expected_logits, expected_prenorm = reference_head(tensors, embed, token_ids, aux @ tensors["fc.weight"].T)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prenorm, expected_prenorm, rtol=1e-4, atol=1e-4)
    # The first draft: the last row's argmax over the draft vocabulary, as a target id through d2t.
    draft_id = int(expected_logits[-1].argmax())
    assert eagle.draft_token_ids(normed[-1:]).tolist() == [draft_id + int(tensors["d2t"][draft_id])]


def test_drafts_equal_the_eagle3_chain_over_transformers_hidden_states(target, head):
    """The first verify step's k drafts: d1 from the head over the prompt (row p: target hidden p, token p + 1, the
    last row with the first generated token), then each next draft from the previous one and the head's own
    pre-norm output."""
    path, hf_model = target
    head_path, tensors = head
    num_drafts = 3
    llm = pressured_llm(path, False, speculative_config={"method": "eagle3", "model": head_path,
                                                         "num_speculative_tokens": num_drafts})
    recorded = recorded_drafts(llm)
    prompt = make_prompts(hf_model.config.vocab_size)[6]
    outputs = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=6,
                                                                          ignore_eos=True), use_tqdm=False)
    first = outputs[0].outputs[0].token_ids[0]
    sequence = prompt + [first]
    aux = hf_aux_hidden(hf_model, sequence, (2, 4, 5))[:len(prompt)]
    embed = hf_model.model.embed_tokens.weight.detach()
    token_ids, hidden = sequence[1:], aux @ tensors["fc.weight"].T
    expected = []
    for _ in range(num_drafts):
        logits, prenorm = reference_head(tensors, embed, token_ids, hidden)
        draft_id = int(logits[-1].argmax())
        expected.append(draft_id + int(tensors["d2t"][draft_id]))
        token_ids, hidden = token_ids + [expected[-1]], torch.cat([hidden, prenorm[-1:]])
    assert recorded[0] == expected


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_greedy_equals_the_engine_without_speculation_and_transformers(target, head, prefix_caching):
    path, hf_model = target
    prompts = make_prompts(hf_model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    llm = pressured_llm(path, prefix_caching, speculative_config={"method": "eagle3", "model": head[0],
                                                                  "num_speculative_tokens": 3})
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    plain = pressured_llm(path, prefix_caching).generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         use_tqdm=False)
    for prompt, output, reference in zip(prompts, outputs, plain):
        assert output.outputs[0].token_ids == reference.outputs[0].token_ids, f"prompt of {len(prompt)}"
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, NUM_NEW_TOKENS)
    stats = llm.engine.get_stats()
    assert stats.spec_decode.num_draft_tokens > 30
    assert stats.num_preemptions > 0, "the block pool was meant to force preemption"
    assert (stats.prefix_cache_hits > 0) == prefix_caching
    assert stats.num_free_blocks == stats.num_blocks
    llm.engine.kv_cache.check_invariants([])


def recorded_drafts(llm) -> list[list[int]]:
    """Spy on the engine's EAGLE-3 drafter: every request's drafts, as each propose() leaves them."""
    drafter = llm.engine.runner.drafter
    recorded = []
    propose = drafter.propose

    def recording_propose(requests):
        propose(requests)
        recorded.extend(list(request.spec_token_ids) for request in requests)

    drafter.propose = recording_propose
    return recorded


def test_graph_shaped_target_steps_leave_the_head_the_same_hidden_states(target, head, monkeypatch):
    """With CUDA graphs the target's hidden states come from the graphs' buffer, request b's rows at b x (k + 1) in
    a verify step: on the CPU the verify graphs' padded forward runs eagerly (Triton's interpreter) and the head
    must draft exactly what it drafts after plain steps (the reference run on the torch kernels, which are faster
    here than the interpreter, as are the prefills and the head's eager steps of the graph-shaped run)."""
    pytest.importorskip("triton")
    path, hf_model = target
    prompts = [make_prompts(hf_model.config.vocab_size)[i] for i in (2, 4)]
    params = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
    runs = []
    for graph_shaped_steps in (False, True):
        monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton" if graph_shaped_steps else "torch")
        llm = pressured_llm(path, True, speculative_config={"method": "eagle3", "model": head[0],
                                                            "num_speculative_tokens": 3})
        steps = []
        if graph_shaped_steps:
            steps = graph_shaped(llm, 3)
            llm.engine.runner.drafter.reserve_graph_rows(llm.engine.config.max_num_seqs * 4)
            for module in llm.engine.runner.drafter.model.modules():  # the head runs eagerly here
                if isinstance(module, Attention):
                    module._backend = torch_attention
        drafts = recorded_drafts(llm)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        runs.append((drafts, [output.outputs[0].token_ids for output in outputs], steps))
    (eager_drafts, eager_tokens, _), (drafts, tokens, steps) = runs
    assert steps, "the graph-shaped verify path was meant to run"
    assert drafts == eager_drafts
    assert tokens == eager_tokens == [hf_greedy(hf_model, prompt, 7) for prompt in prompts]


@pytest.mark.parametrize("change, fragments", [
    (dict(drop=("midlayer.hidden_norm.weight",)), ["missing tensor", "midlayer.hidden_norm.weight"]),
    (dict(drop=("d2t",)), ["missing tensor", "d2t"]),
    (dict(target_hidden_size=48), ["fc.weight", "(64, 144)", "3 x the target's hidden size 64"]),
    (dict(vocab_size=250), ["config.json", "vocab_size=250", "320"]),
    (dict(eagle_aux_hidden_state_layer_ids=[1, 4, 8]), ["config.json", "eagle_aux_hidden_state_layer_ids",
                                                        "[0, 8)"]),
    (dict(hidden_size=32, intermediate_size=64), ["embed_tokens.weight", "hidden size (32)"]),
], ids=["missing-tensor", "missing-d2t", "target-hidden-size", "vocab", "aux-layers", "no-shared-embeddings"])
def test_bad_heads_are_refused_naming_the_file_and_key(target, tmp_path, change, fragments):
    path, hf_model = target
    save_eagle3_head(tmp_path, hf_model.config, **change)
    with pytest.raises(InvalidArgument) as error:
        pressured_llm(path, True, speculative_config={"method": "eagle3", "model": str(tmp_path),
                                                      "num_speculative_tokens": 2})
    assert error.value.param == "speculative_config"
    message = str(error.value)
    assert str(tmp_path) in message
    for fragment in fragments:
        assert fragment in message
