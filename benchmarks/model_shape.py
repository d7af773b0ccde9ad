"""A decoder's sizes as benchmarks/workload_bounds.py charges them: the FLOPs a token costs and the weight bytes a
step reads, read from a Hugging Face config.json, dense (Llama, Mistral, Qwen2/3) or mixture-of-experts
(Mixtral, Qwen3-MoE).

A mixture-of-experts step of n tokens reads the dense weights (attention, routers, dense MLP layers) and the
experts its tokens chose. How many that is depends on the routing; the bound assumes each token's top-k is a
uniformly random k-subset of the E experts (dummy weights route near-uniformly), which hits
E x (1 - (1 - k/E)^n) experts a layer in expectation: k at one token, all E once n k >> E (Mixtral's 8 from about
30 tokens, Qwen3-30B-A3B's 128 from about 200).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

# bytes per weight: float8 weights keep the LM head (and the embedding) in bfloat16, as both engines run them
WEIGHT_BYTES = {"bf16": 2, "fp8": 1}
KV_BYTES = {"bf16": 2, "fp8": 1}


@dataclass
class Shape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def attention_params(self) -> int:
        """q, k, v and o of one layer."""
        return self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)

    @property
    def linear_params(self) -> int:
        """Weights every token multiplies by: q, k, v, o, gate, up and down of every layer (not the LM head)."""
        return self.num_layers * (self.attention_params + 3 * self.hidden_size * self.intermediate_size)

    @property
    def head_params(self) -> int:
        return self.hidden_size * self.vocab_size

    def weight_bytes(self, precision: str, num_tokens: int) -> float:
        """Weight bytes a step of num_tokens rows reads: every weight once, whatever the rows."""
        return self.linear_params * WEIGHT_BYTES[precision] + self.head_params * 2

    def kv_bytes_per_token(self, precision: str) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * KV_BYTES[precision]

    def attention_flops(self, num_keys: int) -> int:
        """QK^T and PV of one query over num_keys keys, every layer."""
        return 4 * self.num_layers * self.num_heads * self.head_dim * num_keys


@dataclass
class MoeShape(Shape):
    """intermediate_size is the dense MLP's (layers without experts); each expert's is expert_intermediate_size."""
    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    num_moe_layers: int

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.expert_intermediate_size

    @property
    def linear_params(self) -> int:
        """Weights a token multiplies by: attention, the router and its top-k experts (dense MLP where a layer has
        no experts); the LM head apart."""
        moe_layer = self.hidden_size * self.num_experts + self.experts_per_token * self.expert_params
        dense_layer = 3 * self.hidden_size * self.intermediate_size
        return (self.num_layers * self.attention_params + self.num_moe_layers * moe_layer
                + (self.num_layers - self.num_moe_layers) * dense_layer)

    def weight_bytes(self, precision: str, num_tokens: int) -> float:
        """The dense weights and, per layer with experts, the experts num_tokens rows hit (in expectation)."""
        unread = self.experts_per_token - expected_experts_hit(self.num_experts, self.experts_per_token, num_tokens)
        return super().weight_bytes(precision, num_tokens) - (
            self.num_moe_layers * unread * self.expert_params * WEIGHT_BYTES[precision])


def expected_experts_hit(num_experts: int, experts_per_token: int, num_tokens: int) -> float:
    """Experts num_tokens tokens hit in one layer, each choosing a uniformly random set of experts_per_token: one
    token misses a given expert with probability 1 - k/E, all of them independently."""
    return num_experts * (1 - (1 - experts_per_token / num_experts) ** num_tokens)


def shape_from_config(path: str) -> Shape:
    """The shape of the model whose config.json is in the folder `path`."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    heads = config["num_attention_heads"]
    num_layers = config["num_hidden_layers"]
    dense = (num_layers, config["hidden_size"], config["intermediate_size"], heads,
             config.get("num_key_value_heads", heads), config.get("head_dim") or config["hidden_size"] // heads,
             config["vocab_size"])
    architecture = config["architectures"][0]
    if architecture == "MixtralForCausalLM":
        return MoeShape(*dense, config["num_local_experts"], config["num_experts_per_tok"],
                        config["intermediate_size"], num_layers)
    if architecture == "Qwen3MoeForCausalLM":
        # transformers' rule for which layers have experts; the rest run a dense MLP of intermediate_size
        step, dense_only = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers", []))
        moe_layers = [i for i in range(num_layers)
                      if config["num_experts"] and i not in dense_only and (i + 1) % step == 0]
        return MoeShape(*dense, config["num_experts"], config["num_experts_per_tok"],
                        config["moe_intermediate_size"], len(moe_layers))
    if any(key in config for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise ValueError(f"{path}: {architecture} has experts the bounds do not count yet "
                         "(counted: MixtralForCausalLM, Qwen3MoeForCausalLM, and dense decoders)")
    return Shape(*dense)
