"""serval.layers.quant.config: which layers a checkpoint's quantization_config quantizes, in which format, and
the refusals that name the format and what it lacks."""
from __future__ import annotations

import pytest

from serval.layers.quant import BlockFp8Method, Fp8Method, Int8Method, W4A16Method, parse

W4 = dict(num_bits=4, type="int", strategy="group", group_size=128, symmetric=True, actorder=None)


def compressed(weights, activations=None, checkpoint_format="pack-quantized", targets=("Linear",),
               ignore=("lm_head",)):
    return {"quant_method": "compressed-tensors", "format": checkpoint_format, "ignore": list(ignore),
            "config_groups": {"group_0": {"targets": list(targets), "weights": weights,
                                          "input_activations": activations}}}


def test_each_quant_method_gives_its_format():
    assert parse({"quant_method": "fp8"}).method_for("model.layers.0.mlp.up_proj") == Fp8Method()
    block = parse({"quant_method": "fp8", "weight_block_size": [128, 128]})
    assert block.method_for("model.layers.3.self_attn.o_proj") == BlockFp8Method(128, 128)
    assert block.method_for("lm_head") is None  # fp8 leaves the head in the model's dtype
    awq = parse({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "GEMM",
                 "modules_to_not_convert": ["mlp.gate"]})
    assert awq.method_for("model.layers.0.self_attn.q_proj") == W4A16Method("awq", 128)
    assert awq.method_for("model.layers.0.mlp.gate") is None
    gptq = parse({"quant_method": "gptq", "bits": 4, "group_size": -1, "sym": False, "desc_act": True})
    assert gptq.method_for("model.layers.0.mlp.down_proj") == W4A16Method("gptq", -1, False, zero_offset=1)
    v2 = parse({"quant_method": "gptq", "bits": 4, "group_size": 64, "checkpoint_format": "gptq_v2"})
    assert v2.method_for("model.layers.0.mlp.down_proj").zero_offset == 0


def test_compressed_tensors_targets_and_ignore():
    int8 = dict(num_bits=8, type="int", strategy="channel", symmetric=True)
    config = compressed(int8, dict(num_bits=8, type="int", strategy="token", dynamic=True), "int-quantized",
                        targets=["re:.*mlp.*"], ignore=["lm_head", "re:.*layers\\.1\\..*"])
    quantization = parse(config)
    assert quantization.method_for("model.layers.0.mlp.down_proj") == Int8Method()
    assert quantization.method_for("model.layers.0.self_attn.q_proj") is None  # not a target
    assert quantization.method_for("model.layers.1.mlp.down_proj") is None  # ignored
    w4 = parse(compressed({**W4, "symmetric": False}))
    assert w4.method_for("model.layers.0.self_attn.q_proj") == W4A16Method("compressed-tensors", 128, False)
    assert w4.method_for("lm_head") is None


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes'.*'compressed-tensors', 'awq', 'gptq'"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "gptq checkpoints with 8 bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 100}, "gptq checkpoints with group_size 100.*128"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
     "checkpoint_format 'marlin'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "awq checkpoints in the 'gemv'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 100]}, r"block-wise fp8.*\[128, 100\]"),
    (compressed({**W4, "actorder": "group"}), "group_0.*actorder 'group'"),
    (compressed(W4, checkpoint_format="naive-quantized"), "group_0: 4-bit int weights.*'naive-quantized'.*not"),
    (compressed(dict(num_bits=8, type="float", strategy="block", block_structure=[128, 128])),
     "8-bit float weights, strategy 'block'"),
    (compressed(dict(num_bits=8, type="int", strategy="channel")), "8-bit int weights"),  # W8A16: no int8 kernel
])
def test_unsupported_formats_are_refused_by_name(config, message):
    with pytest.raises(ValueError, match=message):
        parse(config)
