"""GGUF kept in its blocks for the Triton kernels (the GPU's path; here Triton's interpreter with SERVAL_GGUF=triton):
tiny Qwen3 models written with gguf's writer, each projection in its own GGUF type as llama.cpp's mixes are (Q4_K_M
puts v_proj and down_proj in Q6_K beside Q4_K), loaded by Serval and compared with transformers running the weights
gguf.quants.dequantize reads from the same bytes."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from tests.conftest import build_tiny_model
from tests.kernels.test_triton_gguf import DEVICE, gguf_rows
from tests.model.test_gguf import add_model_metadata, gguf_name
from tests.model.test_loader import INPUT_IDS, logits_of
from tests.model.test_quantized_checkpoints import near_tie_greedy_check

from serval import LLM, SamplingParams
from serval.layers.linear import Linear
from serval.layers.quant.gguf_triton import GGUFTritonMethod
from serval.model.loader import load_model

pytest.importorskip("triton")

Q = gguf.GGMLQuantizationType
# The types of each projection, as one llama.cpp mix might write them; q/k/v and gate/up are merged in Serval.
MIXES = {
    # Every K is a multiple of 256: head_dim 64 x 4 heads = hidden 256 (o_proj's K), intermediate 256.
    "k-quants": (dict(hidden_size=256, intermediate_size=256, head_dim=64),
                 {"q_proj": Q.Q4_K, "k_proj": Q.Q4_K, "v_proj": Q.Q6_K, "o_proj": Q.Q5_K, "gate_proj": Q.Q4_K,
                  "up_proj": Q.Q4_K, "down_proj": Q.Q6_K}),
    # Gemma 3 270M's Q4_K_M file is mostly these (its K of 640 is no multiple of 256).
    "32-blocks": (dict(hidden_size=64, intermediate_size=96, head_dim=32),
                  {"q_proj": Q.Q5_0, "k_proj": Q.Q5_0, "v_proj": Q.Q8_0, "o_proj": Q.Q4_0, "gate_proj": Q.Q4_1,
                   "up_proj": Q.Q4_1, "down_proj": Q.Q5_1}),
}
# A prefill (the GEMM) and two decode steps of two rows (the GEMV): each interpreted step costs seconds.
SAMPLING = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
# A greedy token may differ from transformers' only within this share of the logits' spread (near_tie_greedy_check):
# float32 in the interpreter, the model's bfloat16 on a GPU.
GREEDY_TOLERANCE = 1e-3 if DEVICE == "cpu" else 5e-2


def write_mixed_gguf(path, hf_model, types: dict[str, Q]) -> None:
    """Write hf_model as a qwen3 GGUF (no row permutation for this architecture), each projection in its type
    from `types`, and set the HF model's projections to what gguf.quants.dequantize reads back: the reference."""
    config = hf_model.config
    writer = gguf.GGUFWriter(str(path), "qwen3")
    add_model_metadata(writer, config)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    for seed, (name, param) in enumerate(hf_model.state_dict().items()):
        projection = name.split(".")[-2]
        if projection not in types:
            writer.add_tensor(gguf_name(name), param.numpy())
            continue
        qtype = types[projection]
        raw = gguf_rows(qtype, *param.shape, seed=seed)
        if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):  # random bytes: scale them to the model's weights' size
            raw = shrink_k_quant_scales(raw, qtype)
        writer.add_tensor(gguf_name(name), raw, raw_dtype=qtype)
        param.copy_(torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def shrink_k_quant_scales(raw: np.ndarray, qtype: Q) -> np.ndarray:
    """Random K-quant blocks with super-block scales small enough that weights stay below ~0.2."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size).copy()
    limit = 5e-5 if qtype == Q.Q6_K else 2e-4
    rng = np.random.default_rng(type_size)
    for offset in ((208,) if qtype == Q.Q6_K else (0, 2)):
        blocks[:, offset:offset + 2] = rng.uniform(0, limit, size=len(blocks)).astype(np.float16) \
            .view(np.uint8).reshape(-1, 2)
    return blocks.reshape(raw.shape)


@pytest.mark.parametrize("mix", list(MIXES))
def test_packed_gguf_runs_the_kernels_and_matches_transformers(tmp_path, monkeypatch, mix):
    shape, types = MIXES[mix]
    hf_model = build_tiny_model(tmp_path / "hf", "qwen3", seed=3, **shape)
    with torch.no_grad():
        write_mixed_gguf(tmp_path / "model.gguf", hf_model, types)
    monkeypatch.setenv("SERVAL_GGUF", "triton")  # opt-in on every device (serval.model.loader.gguf_packing)
    model, _ = load_model(str(tmp_path / "model.gguf"), device=DEVICE)

    layer = model.model.layers[0]
    qkv, gate_up, down = layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj
    assert qkv.weight is None and isinstance(qkv.quant_method, GGUFTritonMethod)
    # q/k/v in two types: one buffer per projection; gate/up alike: one buffer.
    assert qkv.quant_method.shard_types == (("q", types["q_proj"].name), ("k", types["k_proj"].name),
                                            ("v", types["v_proj"].name))
    assert gate_up.gguf_blocks.dtype == torch.uint8
    bytes_per_row = gguf.GGML_QUANT_SIZES[types["down_proj"]][1] * down.in_features \
        // gguf.GGML_QUANT_SIZES[types["down_proj"]][0]
    assert down.gguf_blocks.shape == (down.out_features, bytes_per_row)
    assert not any(isinstance(m, Linear) and m.weight is not None and m.weight.dim() == 2
                   for n, m in model.named_modules() if ".layers." in n)

    if DEVICE == "cpu":  # logits_of builds its step on the CPU
        with torch.no_grad():
            expected = hf_model(INPUT_IDS[None]).logits[0]
        got = logits_of(model, INPUT_IDS)
        torch.testing.assert_close(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-3)

    # Through the engine (batching, paged KV cache), the same greedy tokens as transformers, near ties aside.
    llm = LLM(model=str(tmp_path / "model.gguf"), skip_tokenizer_init=True, max_model_len=64, block_size=4,
              device=DEVICE)
    prompts = [INPUT_IDS.tolist(), [1, 17, 42, 300, 8]]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], SAMPLING, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        near_tie_greedy_check(hf_model, prompt, output.outputs[0].token_ids, GREEDY_TOLERANCE)


def test_dequantize_switch_and_the_cpu_default_leave_the_triton_path(tmp_path, monkeypatch):
    shape, types = MIXES["32-blocks"]
    hf_model = build_tiny_model(tmp_path / "hf", "qwen3", seed=3, **shape)
    with torch.no_grad():
        write_mixed_gguf(tmp_path / "model.gguf", hf_model, types)
    monkeypatch.setenv("SERVAL_GGUF", "triton")
    monkeypatch.setenv("SERVAL_GGUF_DEQUANTIZE", "1")
    dequantized, _ = load_model(str(tmp_path / "model.gguf"))
    assert dequantized.model.layers[0].mlp.down_proj.quant_method is None
    torch.testing.assert_close(logits_of(dequantized, INPUT_IDS), hf_model(INPUT_IDS[None]).logits[0].detach(),
                               atol=1e-4, rtol=1e-4)
    monkeypatch.delenv("SERVAL_GGUF")
    monkeypatch.delenv("SERVAL_GGUF_DEQUANTIZE")
    on_cpu, _ = load_model(str(tmp_path / "model.gguf"))  # the CPU keeps its int4 kernel for 4-bit types
    assert not any(isinstance(m, Linear) and isinstance(m.quant_method, GGUFTritonMethod)
                   for m in on_cpu.modules())
