"""Tensor-parallel layers (Megatron-LM, Shoeybi et al., 2019): each rank holds a slice of every projection.

    qkv_proj, gate_up_proj  column-parallel: rank r holds its heads' (its intermediate slice's) output rows;
                            no communication, the output stays split by head / by intermediate column
    o_proj, down_proj       row-parallel: rank r holds the matching input columns; the partial sums are
                            all-reduced, the bias added once after
    embed_tokens            vocabulary-parallel: rank r holds rows [r*V/N, (r+1)*V/N); an id outside them looks
                            up zeros, and the all-reduce fills in the owner's row
    lm_head                 vocabulary-parallel: rank r computes its vocabulary slice's logits; they are gathered
                            to rank 0, which samples

So a decoder layer costs two all-reduces. A rank's model is built at its shard's sizes from a per-rank config
(`local_config`: heads, intermediate size and vocabulary divided by N), so no rank ever allocates the full
model; `parallelize` then gives the four layers above their collectives. K/V heads fewer than N are replicated:
rank r holds K/V head r * KVH / N, the one its query heads read. `checkpoint_slice` says which slice of a
checkpoint tensor a rank loads (serval.distributed.weights reads only that slice); a fused checkpoint projection
(Phi-3's qkv_proj, gate_up_proj) is not one slice but one per part, which `fused_checkpoint_parts` lists.

Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss, DeepSeek-V3) split every expert the way the
dense MLP splits: every rank holds all E experts, 1/N of each one's intermediate dimension (gate/up rows, down
columns), or with expert parallelism E/N whole experts; the router stays whole. The experts' partial sums, plus the
shared experts' (their down_proj left plain), are all-reduced once per block (`ParallelSparseMoeBlock`,
`AllReducedOutput`). DeepSeek-V3's latent attention splits by heads with its own per-head widths
(`latent_head_widths`).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from serval.layers.linear import Linear, takes_gemv, takes_small_batch_gemv
from serval.layers.moe import ExpertRouting, FusedMoE, SparseMoeBlock
from serval.layers.quant.fp8 import BlockFp8Method, Fp8Method
from serval.layers.quant.int8 import Int8Method
from serval.layers.quant.w4a16 import W4A16Method

# The formats a rank applies to its own slice unchanged: per-channel scales are per row, and a row-parallel shard
# gets its own (RowParallelLinear); block fp8 where the blocks fall on the shards' boundaries (with_weight_blocks);
# int8 W8A8 (per-row scales) and the 4-bit formats where their words and groups do (serval.distributed.quant_shards).
SHARDED_QUANT_METHODS = (Fp8Method, BlockFp8Method, Int8Method, W4A16Method)

# The families whose every projection follows Llama's names and shapes (serval/model/llama.py). Gemma 3's
# per-head q/k norms and per-layer rotary tables are replicated; Phi-3's fused checkpoint projections are read
# part by part (fused_checkpoint_parts).
TENSOR_PARALLEL_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                 "Gemma3ForCausalLM", "Phi3ForCausalLM")
# Llama's attention with sparse-MoE feed-forwards (serval/model/mixtral.py, qwen_moe.py, gpt_oss.py): experts
# split by rows, or whole experts split among the ranks (expert parallelism). gpt-oss's attention sinks are per
# head (split with the heads); its experts' gate/up columns are interleaved and transposed in its checkpoints.
MOE_TENSOR_PARALLEL_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                                     "GptOssForCausalLM", "DeepseekV3ForCausalLM")
# Multi-head latent attention (serval/model/deepseek_v3.py): q_proj / q_b_proj and kv_b_proj are split by heads,
# each with its own per-head width, o_proj by its input heads; the down-projections to the latent (q_a_proj,
# kv_a_proj_with_mqa) and their norms are whole on every rank, and so is the latent cache (per token, not per head).
_LATENT_ATTENTION_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
_INTERLEAVED_EXPERT_ARCHITECTURES = ("GptOssForCausalLM",)
ROW_PARALLEL_PROJECTIONS = ("o_proj", "down_proj")
MXFP4_BLOCK = 32  # gpt-oss's MXFP4 experts: values sharing one scale along the input dimension


@dataclass(frozen=True)
class ShardLayout:
    """How one model splits over `size` ranks, and which slice rank `rank` holds."""
    rank: int
    size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    expert_intermediate_size: int = 0  # each routed expert's (MoE families; Mixtral: intermediate_size)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert; 0: none
    # A block-fp8 checkpoint's (block_n, block_k): its weight_scale_inv holds one scale per block, so a rank reads
    # the blocks of its rows (column-parallel) or columns (row-parallel); None for other checkpoints.
    weight_block: tuple[int, int] | None = None
    num_experts: int = 0  # routed experts (MoE families)
    expert_parallel: bool = False  # each rank holds num_experts / size whole experts, not 1/size of each
    interleaved_experts: bool = False  # gpt-oss: gate_up_proj [E, H, 2I] (gate, up interleaved), down [E, I, H]
    # Multi-head latent attention's per-head widths: q_proj/q_b_proj (nope + rope), kv_b_proj (nope + v), o_proj's
    # input (v); None for the other families.
    latent_head_widths: tuple[int, int, int] | None = None

    @property
    def local_num_heads(self) -> int:
        return self.num_heads // self.size

    @property
    def local_num_kv_heads(self) -> int:
        return max(self.num_kv_heads // self.size, 1)

    @property
    def first_kv_head(self) -> int:
        if self.num_kv_heads >= self.size:
            return self.rank * self.local_num_kv_heads
        return self.rank * self.num_kv_heads // self.size  # replicated: the head this rank's query heads read

    @property
    def local_intermediate_size(self) -> int:
        return self.intermediate_size // self.size

    @property
    def local_vocab_size(self) -> int:
        """Rows of the vocabulary each rank holds; the last rank's slice is padded when N does not divide V."""
        return -(-self.vocab_size // self.size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.local_vocab_size

    @property
    def local_num_experts(self) -> int:
        return self.num_experts // self.size if self.expert_parallel else self.num_experts

    @property
    def first_expert(self) -> int:
        return self.rank * self.local_num_experts if self.expert_parallel else 0


def shard_layout(hf_config, rank: int, size: int, expert_parallel: bool = False) -> ShardLayout:
    """The layout of the model `hf_config` describes over `size` ranks; raises ValueError when it cannot split
    that way (an architecture without tensor parallelism, heads or intermediate size that N does not divide).
    expert_parallel: a MoE model's experts are divided among the ranks whole."""
    architecture = (getattr(hf_config, "architectures", None) or ["?"])[0]
    if architecture not in TENSOR_PARALLEL_ARCHITECTURES + MOE_TENSOR_PARALLEL_ARCHITECTURES:
        raise ValueError(f"tensor_parallel_size={size}: {architecture} has no tensor-parallel implementation yet; "
                         f"supported: {list(TENSOR_PARALLEL_ARCHITECTURES + MOE_TENSOR_PARALLEL_ARCHITECTURES)}")
    num_heads, num_kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    if num_heads % size:
        raise ValueError(f"tensor_parallel_size={size} must divide the model's attention heads "
                         f"(num_attention_heads={num_heads})")
    if num_kv_heads % size and size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size={size} must divide the model's key/value heads "
                         f"(num_key_value_heads={num_kv_heads}) or be a multiple of them (then they are replicated)")
    if hf_config.intermediate_size % size:
        raise ValueError(f"tensor_parallel_size={size} must divide the model's intermediate_size "
                         f"({hf_config.intermediate_size})")
    layout = ShardLayout(rank, size, num_heads, num_kv_heads, head_dim, hf_config.intermediate_size,
                         hf_config.vocab_size, expert_parallel=expert_parallel,
                         interleaved_experts=architecture in _INTERLEAVED_EXPERT_ARCHITECTURES)
    if architecture in _LATENT_ATTENTION_ARCHITECTURES:
        nope, rope, v = hf_config.qk_nope_head_dim, hf_config.qk_rope_head_dim, hf_config.v_head_dim
        layout = replace(layout, latent_head_widths=(nope + rope, nope + v, v))
    if architecture in MOE_TENSOR_PARALLEL_ARCHITECTURES:
        return with_expert_sizes(layout, hf_config)
    if expert_parallel:
        raise ValueError(f"enable_expert_parallel=True: {architecture} has no experts to divide among the ranks")
    return layout


def with_expert_sizes(layout: ShardLayout, hf_config) -> ShardLayout:
    """The layout with a MoE model's expert sizes; raises ValueError when N does not divide them."""
    expert = getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size
    shared = getattr(hf_config, "shared_expert_intermediate_size", 0) or 0
    if getattr(hf_config, "n_shared_experts", None):  # DeepSeek-V3: n_shared_experts experts side by side
        shared = hf_config.moe_intermediate_size * hf_config.n_shared_experts
    num_experts = (getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "n_routed_experts", None)
                   or hf_config.num_experts)
    sliced = [("shared_expert_intermediate_size", shared)]  # a shared expert is always split by rows
    if layout.expert_parallel and num_experts % layout.size:
        raise ValueError(f"tensor_parallel_size={layout.size} must divide the model's experts ({num_experts}) "
                         "with enable_expert_parallel: each rank holds E/N whole experts")
    if not layout.expert_parallel:
        sliced.insert(0, ("moe_intermediate_size", expert))
    for name, value in sliced:
        if value % layout.size:
            raise ValueError(f"tensor_parallel_size={layout.size} must divide the model's {name} ({value}): "
                             "each rank holds 1/N of every expert")
    quant_method = (getattr(hf_config, "quantization_config", None) or {}).get("quant_method")
    if layout.interleaved_experts and quant_method == "mxfp4" and not layout.expert_parallel and \
            expert // layout.size % MXFP4_BLOCK:
        raise ValueError(f"tensor_parallel_size={layout.size}: each rank's {expert // layout.size} columns of "
                         f"every MXFP4 expert's down_proj are not whole {MXFP4_BLOCK}-value blocks; use "
                         "enable_expert_parallel (whole experts per rank)")
    return replace(layout, expert_intermediate_size=expert, shared_expert_intermediate_size=shared,
                   num_experts=num_experts)


def local_config(hf_config, layout: ShardLayout):
    """A copy of hf_config at one rank's sizes: building the model from it allocates exactly that rank's shard."""
    local = copy.deepcopy(hf_config)
    local.num_attention_heads = layout.local_num_heads
    local.num_key_value_heads = layout.local_num_kv_heads
    local.head_dim = layout.head_dim  # no longer hidden_size / heads
    local.intermediate_size = layout.local_intermediate_size
    local.vocab_size = layout.local_vocab_size
    if layout.expert_parallel:  # whole experts, E/N of them; the router is widened back to E after the build
        for field in ("num_local_experts", "num_experts", "n_routed_experts"):
            if getattr(local, field, None):
                setattr(local, field, layout.local_num_experts)
        if not getattr(local, "moe_intermediate_size", None):  # Mixtral's, gpt-oss's experts: intermediate_size
            local.intermediate_size = layout.intermediate_size
    elif getattr(local, "moe_intermediate_size", None):  # Mixtral's experts are intermediate_size, divided above
        local.moe_intermediate_size = layout.expert_intermediate_size // layout.size
    if getattr(local, "shared_expert_intermediate_size", None):
        local.shared_expert_intermediate_size = layout.shared_expert_intermediate_size // layout.size
    return local


@dataclass(frozen=True)
class TensorSlice:
    """The part of a checkpoint tensor one rank loads: `length` entries from `start` along `dim`, zero-padded to
    `padded_length` (the last vocabulary slice)."""
    dim: int
    start: int
    length: int
    padded_length: int


# Checkpoint projection -> (the dim it splits along, which split). Anything else (norms, biases of row-parallel
# projections) every rank loads whole.
_SPLITS = {"q_proj": (0, "q"), "k_proj": (0, "kv"), "v_proj": (0, "kv"), "o_proj": (1, "q"),
           "gate_proj": (0, "intermediate"), "up_proj": (0, "intermediate"), "down_proj": (1, "intermediate"),
           "embed_tokens": (0, "vocab"), "lm_head": (0, "vocab")}


# Latent attention's projections split by heads -> (the dim they split along, which of latent_head_widths).
_LATENT_SPLITS = {"q_proj": (0, 0), "q_b_proj": (0, 0), "kv_b_proj": (0, 1), "o_proj": (1, 2)}


def checkpoint_slice(hf_name: str, layout: ShardLayout) -> TensorSlice | None:
    """The slice of checkpoint tensor `hf_name` that rank layout.rank holds, or None for the whole tensor."""
    parts = hf_name.split(".")
    if parts[-1] == "sinks":  # gpt-oss: one per query head
        return TensorSlice(0, layout.rank * layout.local_num_heads, layout.local_num_heads, layout.local_num_heads)
    if len(parts) < 2:
        return None
    if layout.latent_head_widths is not None and parts[-2] in _LATENT_SPLITS:
        dim, width_index = _LATENT_SPLITS[parts[-2]]
        if dim == 1 and parts[-1] == "bias":
            return None
        length = layout.local_num_heads * layout.latent_head_widths[width_index]
        return TensorSlice(dim, layout.rank * length, length, length)
    if parts[-2] not in _SPLITS:
        return None
    dim, split = _SPLITS[parts[-2]]
    if dim == 1 and parts[-1] == "bias":
        return None  # a row-parallel projection's bias is added once, after the all-reduce
    piece = _split_slice(dim, split, layout)
    if parts[-1] == "weight_scale_inv" and layout.weight_block is not None:  # block fp8: its blocks' scales
        block = layout.weight_block[dim]  # rows in block_n, columns in block_k
        num_blocks = -(-piece.length // block)
        return TensorSlice(dim, piece.start // block, num_blocks, num_blocks)
    return piece


def _split_slice(dim: int, split: str, layout: ShardLayout) -> TensorSlice:
    if split == "q":
        length = layout.local_num_heads * layout.head_dim
        return TensorSlice(dim, layout.rank * length, length, length)
    if split == "kv":
        length = layout.local_num_kv_heads * layout.head_dim
        return TensorSlice(dim, layout.first_kv_head * layout.head_dim, length, length)
    if split == "intermediate":
        length = layout.local_intermediate_size
        return TensorSlice(dim, layout.rank * length, length, length)
    start, padded = layout.vocab_start, layout.local_vocab_size
    return TensorSlice(dim, start, max(min(padded, layout.vocab_size - start), 0), padded)


def with_weight_blocks(layout: ShardLayout, block_n: int, block_k: int) -> ShardLayout:
    """The layout of a block-fp8 checkpoint ([block_n, block_k] blocks, one scale each); raises ValueError naming
    the projection whose rank shard does not start and end on block boundaries (its blocks would straddle ranks)."""
    q_rows, kv_rows = layout.local_num_heads * layout.head_dim, layout.local_num_kv_heads * layout.head_dim
    kv_starts = [replace(layout, rank=rank).first_kv_head * layout.head_dim for rank in range(layout.size)]
    checks = [("q_proj", "rows", q_rows, block_n), ("k_proj/v_proj", "rows", kv_rows, block_n),
              ("k_proj/v_proj", "first row", next((start for start in kv_starts if start % block_n), 0), block_n),
              ("gate_proj/up_proj", "rows", layout.local_intermediate_size, block_n),
              ("o_proj", "input columns", q_rows, block_k),
              ("down_proj", "input columns", layout.local_intermediate_size, block_k)]
    for projection, what, value, block in checks:
        if value % block:
            raise ValueError(f"tensor_parallel_size={layout.size}: the checkpoint's {block_n}x{block_k} fp8 blocks "
                             f"do not divide each rank's shard of {projection} ({value} {what} per rank, blocks of "
                             f"{block}); a block's one scale cannot be split between ranks")
    return replace(layout, weight_block=(block_n, block_k))


# A fused checkpoint projection (Phi-3) -> the parts it stacks along its rows, in order.
_FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class FusedPart:
    """One part of a fused checkpoint tensor as a rank loads it: the part's own checkpoint name (q_proj, ...) and
    the rows of the fused tensor that hold the rank's slice of it."""
    hf_name: str
    piece: TensorSlice


def fused_checkpoint_parts(hf_name: str, layout: ShardLayout) -> list[FusedPart] | None:
    """The rank's slices of a fused checkpoint tensor, one per part, or None for a tensor that is not fused.

        qkv_proj rows      [ q: H*d | k: KVH*d | v: KVH*d ]      rank r reads its heads' rows of each part
        gate_up_proj rows  [ gate: I | up: I ]                   rank r reads its intermediate slice of each

    A block-fp8 checkpoint's weight_scale_inv has the same parts in blocks of block_n rows.
    """
    parts = hf_name.split(".")
    if len(parts) < 2 or parts[-2] not in _FUSED_PROJECTIONS:
        return None
    q_rows, kv_rows = layout.num_heads * layout.head_dim, layout.num_kv_heads * layout.head_dim
    part_rows = ([q_rows, kv_rows, kv_rows] if parts[-2] == "qkv_proj"
                 else [layout.intermediate_size, layout.intermediate_size])
    if parts[-1] == "weight_scale_inv" and layout.weight_block is not None:  # block fp8: rows in blocks of block_n
        part_rows = [rows // layout.weight_block[0] for rows in part_rows]  # whole blocks (with_weight_blocks)
    fused_parts, offset = [], 0
    for part, rows in zip(_FUSED_PROJECTIONS[parts[-2]], part_rows, strict=True):
        part_name = ".".join(parts[:-2] + [part, parts[-1]])
        piece = checkpoint_slice(part_name, layout)
        fused_parts.append(FusedPart(part_name, TensorSlice(0, offset + piece.start, piece.length,
                                                            piece.padded_length)))
        offset += rows
    return fused_parts


# A routed expert's projection, per expert (Mixtral: w1 gate, w3 up, w2 down; Qwen: gate/up/down_proj) or stacked
# as transformers 5 saves them (gate_up_proj [E, 2I, H], gate rows first; down_proj [E, H, I]); and Qwen2-MoE's
# shared expert's.
_EXPERT_TENSOR = re.compile(r"\.experts\.(?:\d+\.(?P<projection>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight|"
                            r"(?P<stack>gate_up_proj|down_proj))$")
_SHARED_EXPERT_TENSOR = re.compile(r"\.shared_experts?\.(?P<projection>gate_proj|up_proj|down_proj)\.weight$")


# gpt-oss's stacked experts as its checkpoints hold them: transformers' [E, H, 2I] gate_up_proj (gate and up in
# alternate columns) and [E, I, H] down_proj, their biases, or MXFP4 blocks [E, 2I, H/32, 16] / [E, H, I/32, 16]
# with scales [E, 2I, H/32] / [E, H, I/32].
_INTERLEAVED_EXPERT_TENSOR = re.compile(r"\.experts\.(?P<tensor>(?:gate_up_proj|down_proj)(?:_bias|_blocks|_scales)?)$")


def interleaved_expert_slice(tensor: str, layout: ShardLayout) -> TensorSlice:
    """Rank r's slice of every gpt-oss expert: intermediate columns [r*I/N, (r+1)*I/N), which in the interleaved
    gate/up are the 2*I/N consecutive columns from 2*r*I/N. The down bias is whole (added by rank 0 alone)."""
    length = layout.expert_intermediate_size // layout.size
    start = layout.rank * length
    if tensor.startswith("gate_up_proj"):  # [E, H, 2I] (dim 2), or [E, 2I] and MXFP4 [E, 2I, ...] (dim 1)
        return TensorSlice(2 if tensor == "gate_up_proj" else 1, 2 * start, 2 * length, 2 * length)
    if tensor == "down_proj":  # [E, I, H]
        return TensorSlice(1, start, length, length)
    blocks = length // MXFP4_BLOCK  # down_proj_blocks [E, H, I/32, 16], down_proj_scales [E, H, I/32]
    return TensorSlice(2, start // MXFP4_BLOCK, blocks, blocks)


def expert_checkpoint_slices(hf_name: str, layout: ShardLayout) -> list[TensorSlice] | None:
    """The slices of a MoE expert's checkpoint tensor that rank layout.rank holds, concatenated in this order along
    their dim (two for a stacked gate_up_proj: its gate rows, then its up rows); None for any other tensor."""
    if layout.expert_intermediate_size == 0:
        return None
    if layout.interleaved_experts and (match := _INTERLEAVED_EXPERT_TENSOR.search(hf_name)):
        return [interleaved_expert_slice(match["tensor"], layout)] if match["tensor"] != "down_proj_bias" else None
    if match := _SHARED_EXPERT_TENSOR.search(hf_name):
        length = layout.shared_expert_intermediate_size // layout.size
        dim = 1 if match["projection"] == "down_proj" else 0
        return [TensorSlice(dim, layout.rank * length, length, length)]
    match = _EXPERT_TENSOR.search(hf_name)
    if match is None:
        return None
    full = layout.expert_intermediate_size
    length = full // layout.size
    start = layout.rank * length
    if match["stack"] == "gate_up_proj":
        return [TensorSlice(1, start, length, length), TensorSlice(1, full + start, length, length)]
    if match["stack"] == "down_proj":
        return [TensorSlice(2, start, length, length)]
    dim = 1 if match["projection"] in ("w2", "down_proj") else 0
    return [TensorSlice(dim, start, length, length)]


class ParallelSparseMoeBlock(SparseMoeBlock):
    """A SparseMoeBlock whose experts (and shared expert) are a shard: 1/N of every expert's intermediate
    dimension, or (expert parallelism) E/N whole experts. Either way its output is a partial sum, added up over the
    ranks by one all-reduce. The router is whole on every rank."""
    group: dist.ProcessGroup | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = super().forward(hidden)
        dist.all_reduce(out, group=self.group)
        return out


class ShardedFusedMoE(FusedMoE):
    """A FusedMoE holding a shard of the experts. With expert parallelism it holds experts [first_expert,
    first_expert + num_experts): every rank routes every token alike (the router is whole), and a slot routed to
    another rank's expert is given weight 0 on a local expert, so it adds exactly nothing here while its owner
    adds its share (static shapes: CUDA graphs capture it). `reduces`: its output is all-reduced here (gpt-oss,
    whose block has nothing else to join that all-reduce)."""
    group: dist.ProcessGroup | None = None
    expert_parallel: bool = False
    first_expert: int = 0
    reduces: bool = False

    def forward(self, hidden: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
        if self.expert_parallel:
            routing = owned_routing(routing, self.first_expert, self.num_experts)
        out = super().forward(hidden, routing)
        if self.reduces:
            dist.all_reduce(out, group=self.group)
        return out


def owned_routing(routing: ExpertRouting, first_expert: int, num_local_experts: int) -> ExpertRouting:
    """The routing in local expert ids, slots of other ranks' experts sent to local expert 0 with weight 0."""
    local = routing.expert_ids - first_expert
    owned = (local >= 0) & (local < num_local_experts)
    return ExpertRouting(torch.where(owned, routing.weights, 0.0), torch.where(owned, local, 0))


class AllReducedOutput(nn.Module):
    """Mixed into a MoE block whose routed and shared experts are shards (DeepSeek-V3's): their partial sums are
    added in the block's own forward, then all-reduced once."""
    group: dist.ProcessGroup | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = super().forward(hidden)
        dist.all_reduce(out, group=self.group)
        return out


def parallelize_experts(model: nn.Module, group: dist.ProcessGroup | None = None,
                        layout: ShardLayout | None = None) -> nn.Module:
    """After parallelize: give each sparse MoE block its all-reduce (gpt-oss's experts their own). A shared
    expert's down_proj goes back to a plain Linear, so that its partial sum joins the experts' before that one
    all-reduce. Split by rows, gpt-oss's down bias stays on rank 0 only (it is added once). No-op for dense models,
    and at size 1 (as parallelize)."""
    if layout is not None and layout.size == 1:
        return model
    reducing_classes: dict[type, type] = {}
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            module.__class__ = ParallelSparseMoeBlock
            module.group = group
            if module.shared_expert is not None:
                module.shared_expert.down_proj.__class__ = Linear
        elif isinstance(getattr(module, "experts", None), FusedMoE) and hasattr(module, "shared_experts"):
            cls = type(module)  # DeepSeek-V3's block: experts(x) + shared_experts(x), then one all-reduce
            if cls not in reducing_classes:
                reducing_classes[cls] = type(f"Parallel{cls.__name__}", (AllReducedOutput, cls), {})
            module.__class__ = reducing_classes[cls]
            module.group = group
            module.shared_experts.down_proj.__class__ = Linear
    in_blocks = {id(module.experts) for module in model.modules()
                 if isinstance(module, (SparseMoeBlock, AllReducedOutput))}
    for module in model.modules():
        if isinstance(module, FusedMoE):
            module.__class__ = ShardedFusedMoE
            module.group, module.reduces = group, id(module) not in in_blocks
            if layout is not None and layout.expert_parallel:
                module.expert_parallel, module.first_expert = True, layout.first_expert
            elif layout is not None and layout.rank != 0 and module.down_proj_bias is not None:
                module.down_proj_bias.data.zero_()
    return model


class RowParallelLinear(Linear):
    """A Linear holding input columns of the full projection: the partial products are summed over the ranks.

    Quantized (fp8, block fp8), each rank's format applies to its columns: per-channel fp8 scales its rows and
    the activations' tokens over its columns only (finer than one device's scales, so not bit-equal to it); block
    fp8's blocks and activation groups fall on the shard's boundaries (with_weight_blocks), so they are the same.
    A quantized layer's bias is kept apart (reduced_bias) so the format adds none before the all-reduce."""
    group: dist.ProcessGroup | None = None
    reduced_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(self._partial(x))

    def forward_silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._reduce(self._partial(gate_up, gated=True))

    def _partial(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        if self.quant_method is not None:  # fp8 may fuse SwiGLU into the activations' quantization
            return self.quant_method.apply(self, x, gated=gated)
        if takes_gemv(x, 2 * self.in_features if gated else self.in_features):
            # One device's kernel for one row, SwiGLU fused in when gated (a separate silu_and_mul would be one more
            # dependent launch per layer); without the bias, which _reduce adds once.
            from serval.kernels import triton_gemv
            return triton_gemv.gemv(x, self.weight, None, gated=gated).view(*x.shape[:-1], self.out_features)
        if takes_small_batch_gemv(x, 2 * self.in_features if gated else self.in_features):  # 2-8 rows, opt-in
            from serval.kernels import triton_gemv
            return triton_gemv.gemv_rows(x, self.weight, None, gated=gated).view(*x.shape[:-1], self.out_features)
        if gated:
            from serval.layers.activation import silu_and_mul
            x = silu_and_mul(x)
        return F.linear(x, self.weight)

    def _reduce(self, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, group=self.group)
        bias = self.bias if self.quant_method is None else self.reduced_bias
        return out if bias is None else out + bias


class VocabParallelEmbedding(nn.Embedding):
    """An nn.Embedding holding rows [vocab_start, vocab_start + num_embeddings) of the full table."""
    group: dist.ProcessGroup | None = None
    vocab_start: int = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        owned = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(torch.where(owned, local, 0), self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)
        dist.all_reduce(out, group=self.group)
        return out


class ParallelLMHead(Linear):
    """A Linear holding the logits of one vocabulary slice. The slices are gathered to rank 0, the only rank that
    samples: forward returns the whole vocabulary's logits there, and on every other rank an empty [..., 0] tensor
    (a worker sees no logits, and no rank receives N - 1 slices it would drop)."""
    group: dist.ProcessGroup | None = None
    vocab_size: int = 0  # the full vocabulary: the gathered logits lose the last slice's padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = super().forward(x)
        rows = local.reshape(-1, local.shape[-1]).contiguous()
        size = dist.get_world_size(self.group)
        if dist.get_rank(self.group) != 0:
            dist.gather(rows, None, dst=0, group=self.group)
            return local[..., :0]
        # One buffer, its per-rank views the gather's targets (no copies after it): what a CUDA graph captures.
        gathered = rows.new_empty((size, rows.shape[0], rows.shape[1]))
        dist.gather(rows, list(gathered.unbind(0)), dst=0, group=self.group)
        logits = gathered.movedim(0, 1).flatten(1)
        return logits.view(*local.shape[:-1], size * rows.shape[1])[..., :self.vocab_size]


def parallelize(model: nn.Module, layout: ShardLayout, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Give a Llama-family model built from local_config its collectives (the layer classes above, in place:
    parameters, their names and tied weights stay as they are) and its full vocabulary size back.

    At size 1 the layers stay as built: the one rank holds the whole model and runs one device's kernels and ops,
    none more (a collective over a group of one is still a call into the process group, the logits' gather still
    copies them, the embedding's vocabulary mask is five more ops, each a launch in every decode graph)."""
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        quant_method = getattr(module, "quant_method", None)
        if quant_method is not None and (not isinstance(quant_method, SHARDED_QUANT_METHODS)
                                         or leaf in ("lm_head", "embed_tokens")):
            raise ValueError(f"tensor parallelism does not shard {quant_method.name} layers ({name}); it shards "
                             "fp8, block-fp8, int8 and 4-bit projections of the decoder layers")
        if layout.size == 1:
            continue
        if leaf in ROW_PARALLEL_PROJECTIONS:
            module.__class__ = RowParallelLinear
            if quant_method is not None and module.bias is not None:
                module.reduced_bias, module.bias = module.bias, None
        elif leaf == "lm_head":
            module.__class__ = ParallelLMHead
            module.vocab_size = layout.vocab_size
        elif leaf == "embed_tokens":
            module.__class__ = VocabParallelEmbedding
            module.vocab_start = layout.vocab_start
        else:
            continue
        module.group = group
    model.vocab_size = layout.vocab_size
    return model
