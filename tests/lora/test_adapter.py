"""Reading a PEFT adapter and checking it against the base model (serval.lora.adapter): scaling (lora_alpha / r,
rsLoRA), slices of the merged projections, and every bad adapter refused with InvalidArgument naming why."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from serval.lora.adapter import TargetShape, load_adapter
from serval.lora.request import LoRARequest
from serval.openai.errors import InvalidArgument
from tests.conftest import build_tiny_model
from tests.lora.peft_adapters import build_adapter

HIDDEN, INTERMEDIATE, Q, KV = 64, 128, 64, 32  # tests/conftest.TINY: 4 heads of 16, 2 KV heads


def llama_targets(num_layers: int = 2) -> dict:
    targets = {}
    for i in range(num_layers):
        prefix = f"model.layers.{i}"
        targets.update({(f"{prefix}.self_attn.qkv_proj", "q"): TargetShape(HIDDEN, Q),
                        (f"{prefix}.self_attn.qkv_proj", "k"): TargetShape(HIDDEN, KV),
                        (f"{prefix}.self_attn.qkv_proj", "v"): TargetShape(HIDDEN, KV),
                        (f"{prefix}.self_attn.o_proj", None): TargetShape(Q, HIDDEN),
                        (f"{prefix}.mlp.gate_up_proj", "gate"): TargetShape(HIDDEN, INTERMEDIATE),
                        (f"{prefix}.mlp.gate_up_proj", "up"): TargetShape(HIDDEN, INTERMEDIATE),
                        (f"{prefix}.mlp.down_proj", None): TargetShape(INTERMEDIATE, HIDDEN)})
    return targets


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("adapter_base"), "llama")


def load(path, max_lora_rank: int = 64):
    return load_adapter(LoRARequest("x", 1, str(path)), llama_targets(), max_lora_rank, torch.float32)


@pytest.mark.parametrize("rslora", [False, True])
def test_pairs_and_scaling(hf_model, tmp_path, rslora):
    peft_model = build_adapter(hf_model, tmp_path, rank=8, alpha=16, use_rslora=rslora)
    adapter = load(tmp_path)
    scaling = 16 / math.sqrt(8) if rslora else 16 / 8
    assert adapter.rank == 8 and adapter.scaling == pytest.approx(scaling)
    assert len(adapter.pairs) == 2 * 7
    k_proj = peft_model.base_model.model.model.layers[1].self_attn.k_proj
    pair = adapter.pairs[("model.layers.1.self_attn.qkv_proj", "k")]
    torch.testing.assert_close(pair.a, k_proj.lora_A["default"].weight)
    torch.testing.assert_close(pair.b, k_proj.lora_B["default"].weight * scaling)


def test_missing_folder_and_files(hf_model, tmp_path):
    with pytest.raises(InvalidArgument, match="no such folder") as error:
        load(tmp_path / "nowhere")
    assert error.value.param == "lora_path"
    build_adapter(hf_model, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidArgument, match="adapter_model.safetensors is missing"):
        load(tmp_path / "a")
    (tmp_path / "b" / "adapter_config.json").unlink()
    with pytest.raises(InvalidArgument, match="adapter_config.json is missing"):
        load(tmp_path / "b")


def test_rank_over_the_maximum(hf_model, tmp_path):
    build_adapter(hf_model, tmp_path, rank=32)
    with pytest.raises(InvalidArgument, match="rank r=32 is over --max-lora-rank 16"):
        load(tmp_path, max_lora_rank=16)


def test_shapes_of_another_base(tmp_path):
    other = build_tiny_model(tmp_path / "other", "llama", hidden_size=32, intermediate_size=64)
    build_adapter(other, tmp_path / "adapter")
    with pytest.raises(InvalidArgument, match="trained on another model"):
        load(tmp_path / "adapter")


def test_layers_the_base_does_not_have(tmp_path):
    deeper = build_tiny_model(tmp_path / "deeper", "llama", num_hidden_layers=3)
    build_adapter(deeper, tmp_path / "adapter")
    with pytest.raises(InvalidArgument, match="model.layers.2.* which the base model does not have"):
        load(tmp_path / "adapter")


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_lm_head_and_embedding_adapters_refused(hf_model, tmp_path, module):
    build_adapter(hf_model, tmp_path, targets=["q_proj", module])
    with pytest.raises(InvalidArgument, match=f"adapts '{module}': LoRA on the embeddings or the LM head"):
        load(tmp_path)


def test_unknown_target_module(hf_model, tmp_path):
    build_adapter(hf_model, tmp_path, targets=["q_proj"])
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = ["q_proj", "w_pack"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(InvalidArgument, match="unknown target module 'w_pack'"):
        load(tmp_path)


@pytest.mark.parametrize("change, message", [({"bias": "all"}, "bias='all' is not supported"),
                                             ({"use_dora": True}, "DoRA"),
                                             ({"peft_type": "IA3"}, "peft_type IA3")])
def test_unsupported_configs(hf_model, tmp_path, change, message):
    build_adapter(hf_model, tmp_path, targets=["q_proj"])
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(InvalidArgument, match=message):
        load(tmp_path)


def test_unreadable_files(hf_model, tmp_path):
    build_adapter(hf_model, tmp_path, targets=["q_proj"])
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InvalidArgument, match="not a readable safetensors file"):
        load(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{")
    with pytest.raises(InvalidArgument, match="not readable JSON"):
        load(tmp_path)


def test_lora_request_checks_its_fields():
    with pytest.raises(InvalidArgument, match="lora_int_id"):
        LoRARequest("x", 0, "/tmp")
    with pytest.raises(InvalidArgument, match="lora_name"):
        LoRARequest("", 1, "/tmp")
