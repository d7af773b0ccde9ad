"""A float8 KV cache's per-layer scales under tensor parallelism: every rank takes the checkpoint's k_scale and
v_scale (under the vLLM and the ModelOpt names) for the heads it holds, as one device does, and a tp=2 engine on a
checkpoint whose keys and values exceed float8's range decodes as tp=1 does, close to transformers; without
scales in the checkpoint, --calculate-kv-scales measures them on every rank."""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from serval import LLM, SamplingParams
from serval.distributed.weights import load_rank_model
from serval.layers.parallel import shard_layout
from serval.layers.quant.kv_scales import kv_scale_modules
from serval.model.loader import load_model
from tests.layers.quant.test_kv_scales import grown_checkpoint, logprob_errors

TP = 2


def scaled_checkpoint(path) -> torch.nn.Module:
    """tests/layers/quant/test_kv_scales.py's grown Llama, saved with distinct per-layer scales: layer 0 under the
    vLLM names (self_attn.k_scale), layer 1 under ModelOpt's (self_attn.k_proj.k_scale, whose k_proj prefix a
    shard reader must not cut like k_proj's rows). Returns the transformers model."""
    hf_model, scales = grown_checkpoint(path)
    scales = {name: tensor * (1 + i / 10) for i, (name, tensor) in enumerate(scales.items())}
    tensors = load_file(os.path.join(path, "model.safetensors"))
    save_file({**tensors, **scales}, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return hf_model


def layer_scales(model: torch.nn.Module) -> dict[str, tuple[bool, float, float]]:
    return {name: (attention.has_kv_scales, attention.k_scale.item(), attention.v_scale.item())
            for name, attention in kv_scale_modules(model).items()}


def test_each_rank_takes_the_scales_one_device_takes(tmp_path):
    hf_model = scaled_checkpoint(tmp_path)
    single = layer_scales(load_model(str(tmp_path))[0])
    assert all(has for has, _, _ in single.values()) and len({k for _, k, _ in single.values()}) == 2
    for rank in range(TP):
        model = load_rank_model(str(tmp_path), shard_layout(hf_model.config, rank, TP), load_format="auto",
                                dtype=torch.float32, device=torch.device("cpu"), seed=0)
        assert layer_scales(model) == single, f"rank {rank}"


def test_tp2_under_fp8_kv_decodes_as_tp1_with_the_checkpoint_scales(tmp_path):
    hf_model = scaled_checkpoint(tmp_path)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 320, (length,), generator=generator).tolist() for length in (5, 17, 30)]
    engine_args = dict(skip_tokenizer_init=True, block_size=4, max_model_len=96, num_gpu_blocks_override=64,
                       kv_cache_dtype="fp8")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    single = LLM(model=str(tmp_path), **engine_args)
    expected = [o.outputs[0].token_ids for o in single.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                                use_tqdm=False)]
    single_scales = layer_scales(single.engine.model)
    single.shutdown()
    llm = LLM(model=str(tmp_path), tensor_parallel_size=TP, **engine_args)
    try:
        assert layer_scales(llm.engine.model) == single_scales  # the driver's shard; the worker's: the test above
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected
        # With scale 1.0 every key and value would saturate at 448 (about 1.0 off; see the single-device test).
        assert logprob_errors(llm, hf_model, prompts) < 0.1
    finally:
        llm.shutdown()


def test_tp2_calculates_each_ranks_scales_from_its_first_prefill(tmp_path):
    """--calculate-kv-scales on a checkpoint without scales: every rank (the worker too, not only the driver)
    takes its heads' scales from the first prefill, so no rank's keys and values saturate at 448."""
    hf_model, _ = grown_checkpoint(tmp_path)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 320, (length,), generator=generator).tolist() for length in (5, 17, 30)]
    llm = LLM(model=str(tmp_path), tensor_parallel_size=TP, calculate_kv_scales=True, skip_tokenizer_init=True,
              block_size=4, max_model_len=96, num_gpu_blocks_override=64, kv_cache_dtype="fp8")
    try:
        assert logprob_errors(llm, hf_model, prompts) < 0.1
    finally:
        llm.shutdown()
