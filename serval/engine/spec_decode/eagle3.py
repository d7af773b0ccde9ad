"""EAGLE-3 (Li et al., 2025): a one-layer draft head fed by the target's own hidden states, in the published format.

    fused = fc([h_a; h_b; h_c])       the target's residual stream entering layers a, b, c (default 2, L//2, L-3)
    x     = [RMSNorm_in(embed(token)); RMSNorm_hidden(fused)]        2 x hidden wide: q, k and v read both
    h     = fused + Attn(x);   out = h + MLP(RMSNorm_post(h))          (`midlayer.*`)
    draft = d + d2t[d],  d = argmax lm_head(RMSNorm(out))              over the reduced draft vocabulary

Row p of the head pairs the target's hidden state at position p with the token at p + 1 and predicts the token at
p + 2; its K/V lives at p in the head's own paged cache, on the target's block ids (as a draft model's does, so
preemption and freed drafts cover both caches). A checkpoint is a directory: config.json (LlamaForCausalLMEagle3,
draft_vocab_size, optionally target_hidden_size, eagle_aux_hidden_state_layer_ids, norm_before_residual) and
safetensors (or pytorch_model.bin) with fc.weight, midlayer.*, norm.weight, lm_head.weight, d2t, t2d, and
embed_tokens.weight unless the head shares the target's.

Per step, inside the runner: follow_target() runs after the target's forward and verification, over every row the
target computed and kept (prefill chunks, a decoding row, a verify step's accepted rows), each with the token after
it (the sampled or verified one for the last row). Its last row gives a request that reached its end the first draft
and that row's pre-norm output (a ChainStart). At the next step, once the scheduler has allocated the verify slots,
propose() takes draft 1 from the ChainStart and runs the chain: draft j + 1 comes from a one-row head step at
position computed + j - 1 fed draft j and the previous step's pre-norm output (EAGLE-3's own hidden state, not the
target's). follow_target() later rewrites those positions with the verified tokens and the target's hidden states,
so the head's K/V below the computed end is always the one of the kept tokens. On CUDA the head's steps replay its
own graphs (serval.engine.spec_decode.eagle3_graphs; a pass over a longer prefill chunk runs eagerly); the target
keeps its CUDA graphs, whose replays leave the hidden states in a buffer reserved before capture
(reserve_graph_rows).
"""
from __future__ import annotations

import json
import logging
import os
import weakref
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from serval.engine import sampler
from serval.engine.request import Request
from serval.engine.spec_decode.draft_model import flat_batch_metadata
from serval.engine.spec_decode.eagle3_graphs import HeadDrafts, HeadGraphs, HeadStep
from serval.layers.attention import AttentionMetadata
from serval.layers.embedding import Embedding
from serval.layers.linear import Linear, MergedLinear, qkv_linear
from serval.layers.mlp import GatedMLP
from serval.layers.norm import RMSNorm
from serval.layers.rotary import RotaryEmbedding, rope_parameters
from serval.model.llama import _MERGED_PROJECTIONS, LlamaAttention, head_dim_of
from serval.model.loader import init_dummy_weights, iter_safetensors, safetensors_files
from serval.openai.errors import InvalidArgument

logger = logging.getLogger(__name__)

# Every published head has these; embed_tokens.weight is optional (shared with the target) and d2t is needed only
# when the draft vocabulary is smaller than the target's.
REQUIRED_TENSORS = (
    "fc.weight", "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight", "midlayer.post_attention_layernorm.weight", "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight", "norm.weight", "lm_head.weight")


class Eagle3Layer(nn.Module):
    """`midlayer`: a Llama decoder layer whose attention reads the normed token embedding and fused hidden state."""

    def __init__(self, config, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        bias = bool(getattr(config, "attention_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, 0, rotary_emb, qkv_bias=bias, o_bias=bias, qk_norm=False)
        self.self_attn.qkv_proj = qkv_linear(2 * config.hidden_size, config.num_attention_heads,
                                             config.num_key_value_heads, head_dim_of(config), bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            bias=getattr(config, "mlp_bias", False))
        # Heads converted by speculators normalize the hidden state before it becomes the residual.
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        normed_hidden = self.hidden_norm(hidden)
        residual = normed_hidden if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed_hidden], dim=-1)
        x = self.self_attn(positions, x, kv_cache, metadata)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Eagle3Head(nn.Module):
    def __init__(self, config, target_hidden_size: int, aux_layer_ids: tuple[int, ...], max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.aux_layer_ids = aux_layer_ids
        self.vocab_size = config.vocab_size
        self.draft_vocab_size = getattr(config, "draft_vocab_size", None) or config.vocab_size
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.fc = Linear(len(aux_layer_ids) * target_hidden_size, config.hidden_size, bias=False)
        rotary_emb = RotaryEmbedding(head_dim_of(config), max_positions, rope_parameters(config))
        self.midlayer = Eagle3Layer(config, rotary_emb)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, self.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.ones(config.vocab_size, dtype=torch.bool))
        # What the KV cache is sized with (serval.engine.engine.share_blocks_with_draft).
        self.num_layers = 1
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)

    def fuse(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """The target's captured hidden states [T, 3 x target hidden] -> the head's input hidden state [T, hidden]."""
        return self.fc(aux_hidden)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                kv_caches: list[torch.Tensor], metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (normed output for the LM head, pre-norm output: the next chain step's hidden state), both [T, hidden]."""
        out, residual = self.midlayer(positions, self.embed_tokens(input_ids), hidden, kv_caches[0], metadata)
        return self.norm(out, residual)

    def compute_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """float32 logits over the draft vocabulary [N, draft_vocab]."""
        return self.lm_head(normed).float()

    def draft_token_ids(self, normed: torch.Tensor) -> torch.Tensor:
        """The greedy draft of each row, as target token ids [N]."""
        draft_ids = self.compute_logits(normed).argmax(dim=-1)
        return draft_ids + self.d2t[draft_ids]


@dataclass
class ChainStart:
    """Where a request's next chain of drafts starts: the head's last row over its kept tokens."""
    position: int  # that row's position: the request's num_computed_tokens - 1 when it drafts
    token_id: int  # the first draft (a target id)
    hidden: torch.Tensor  # [hidden] the row's pre-norm output, the second draft step's hidden state


class Eagle3Drafter:
    def __init__(self, head: Eagle3Head, target: nn.Module, num_blocks: int, block_size: int,
                 kv_cache_dtype: torch.dtype, device: torch.device, num_speculative_tokens: int = 1) -> None:
        self.model = head
        self.block_size = block_size
        self.device = device
        self.num_speculative_tokens = num_speculative_tokens
        shape = (2, num_blocks, block_size, head.num_kv_heads, head.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=kv_cache_dtype, device=device)]
        # The head's own graphs (serval.engine.spec_decode.eagle3_graphs), on CUDA: one row a request (chain steps,
        # the pass after plain decodes) and k + 1 rows a request (the pass after a verify step).
        self.graphs: HeadGraphs | None = None
        self.verify_pass_graphs: HeadGraphs | None = None
        # The target's LlamaModel keeps the residual stream entering these layers after each forward.
        self.target_model = target.model
        self.target_model.aux_hidden_state_layers = head.aux_layer_ids
        # Keyed by the Request object: an entry goes when its request does.
        self.chain_starts: weakref.WeakKeyDictionary[Request, ChainStart] = weakref.WeakKeyDictionary()

    def capture_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Capture the head's graphs for batches of up to max_num_seqs (the runner calls this on CUDA only)."""
        self.use_graphs(max_num_seqs, max_model_len)
        self.graphs.capture()
        self.verify_pass_graphs.capture()

    def use_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Run the head's steps in the graphs' padded shape from now on, without capturing (on a CPU, tests run
        that shape eagerly through the Triton interpreter)."""
        self.graphs = HeadGraphs(self.model, self.kv_caches, self.block_size, max_num_seqs, max_model_len, 1,
                                 self.device)
        self.verify_pass_graphs = HeadGraphs(self.model, self.kv_caches, self.block_size, max_num_seqs,
                                             max_model_len, self.num_speculative_tokens + 1, self.device)

    def reserve_graph_rows(self, num_rows: int) -> None:
        """Before the target's graphs are captured: a buffer their replays leave the captured hidden states in, for
        steps of up to num_rows rows."""
        self.target_model.aux_hidden_buffer = torch.empty(num_rows, self.model.fc.in_features,
                                                          dtype=self.model.fc.weight.dtype, device=self.device)

    @torch.inference_mode()
    def follow_target(self, requests: list[Request], positions: list[int], query_start_loc: list[int],
                      sampled_token_ids: list[int | None], verified: list | None,
                      graph_rows_per_request: int | None = None) -> None:
        """Run the head over the rows of the target's step (its flat plan) that the step kept, each with the token
        after it; set the chain start of each request whose step reached its last token. graph_rows_per_request:
        the target's step was a graph replay in which request b's rows start at b x that (serval.engine.cuda_graphs,
        spec_decode.verify_graphs), and left its hidden states in the reserved buffer."""
        if graph_rows_per_request is None:
            aux_hidden = self.target_model.aux_hidden_states
        else:
            aux_hidden = self.target_model.aux_hidden_buffer
        rows, input_ids, head_positions, starts, seq_lens, kept = [], [], [], [0], [], []
        ends_at_last_token: list[bool] = []
        for i, (request, start, end) in enumerate(zip(requests, query_start_loc, query_start_loc[1:])):
            result = verified[i] if verified is not None else None
            new_tokens = (result.token_ids if result is not None
                          else [sampled_token_ids[i]] if sampled_token_ids[i] is not None else [])
            # A verify step keeps its first row and one more per accepted draft: as many rows as new tokens.
            num_rows = len(new_tokens) if result is not None else end - start
            tokens = request.all_token_ids + new_tokens
            first = positions[start]
            row0 = start if graph_rows_per_request is None else i * graph_rows_per_request
            rows += range(row0, row0 + num_rows)
            input_ids += tokens[first + 1:first + num_rows + 1]
            head_positions += range(first, first + num_rows)
            starts.append(starts[-1] + num_rows)
            seq_lens.append(first + num_rows)
            kept.append(request)
            ends_at_last_token.append(bool(new_tokens))
        if not rows:
            return
        fused = self.model.fuse(aux_hidden[sampler.to_device(rows, torch.int64, self.device)])
        step = HeadStep(input_ids, head_positions, starts, seq_lens, kept, fused)
        last_rows = [end - 1 for end, ends in zip(starts[1:], ends_at_last_token) if ends]
        drafts = self._run(step, last_rows)
        for request, row, token_id, hidden in zip([r for r, e in zip(kept, ends_at_last_token) if e], last_rows,
                                                  drafts.token_ids, drafts.prenorm):
            self.chain_starts[request] = ChainStart(head_positions[row], token_id, hidden)

    @torch.inference_mode()
    def propose(self, requests: list[Request]) -> None:
        """Replace each request's spec_token_ids (placeholders, as many as the scheduler kept) by the head's chain."""
        chains = []
        for request in requests:
            start = self.chain_starts.get(request)
            if start is None or start.position != request.num_computed_tokens - 1:
                # Not expected (every step that brings a request to its last token runs follow_target); the
                # placeholders are then verified as they are, which costs acceptance, never exactness.
                logger.warning("eagle3: no chain start", extra={"request_id": request.request_id})
                continue
            request.spec_token_ids[0] = start.token_id
            chains.append((request, start))
        num_steps = max((len(request.spec_token_ids) for request, _ in chains), default=0)
        hidden = {id(request): start.hidden for request, start in chains}
        for j in range(1, num_steps):
            active = [request for request, _ in chains if len(request.spec_token_ids) > j]
            positions = [request.num_computed_tokens + j - 1 for request in active]
            step = HeadStep([request.spec_token_ids[j - 1] for request in active], positions,
                            list(range(len(active) + 1)), [p + 1 for p in positions], active,
                            torch.stack([hidden[id(request)] for request in active]))
            drafts = self._run(step, list(range(len(active))))
            for request, token_id, row in zip(active, drafts.token_ids, drafts.prenorm):
                request.spec_token_ids[j] = token_id
                hidden[id(request)] = row

    def _run(self, step: HeadStep, draft_rows: list[int]) -> HeadDrafts:
        """The head over the step's rows; the drafts and pre-norm outputs of draft_rows. A graph replay where one
        fits (every request at most Q rows), else eagerly."""
        for graphs in (self.graphs, self.verify_pass_graphs):
            if graphs is not None and graphs.can_run(step.query_start_loc):
                return graphs.run(step, draft_rows)
        return self.run_eager(step, draft_rows)

    def run_eager(self, step: HeadStep, draft_rows: list[int]) -> HeadDrafts:
        """The head step op by op, over the flat rows (no padding, no graph)."""
        metadata = flat_batch_metadata(step.requests, step.positions, step.query_start_loc, step.seq_lens,
                                       self.block_size, self.device)
        normed, prenorm = self.model(sampler.to_device(step.input_ids, torch.int64, self.device),
                                     sampler.to_device(step.positions, torch.int64, self.device), step.hidden,
                                     self.kv_caches, metadata)
        wanted = sampler.to_device(draft_rows, torch.int64, self.device)
        return HeadDrafts(self.model.draft_token_ids(normed[wanted]).tolist(), prenorm[wanted])


def load_eagle3_head(path: str, target: nn.Module, dtype: torch.dtype, device: torch.device,
                     load_format: str = "auto", seed: int = 0) -> Eagle3Head:
    """The head at `path` for `target`, checked against it; raises InvalidArgument naming the file and key at fault.
    load_format "dummy": random weights from config.json alone (benchmarks), d2t the identity."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise _bad(path, "no config.json (an EAGLE-3 head is a directory with config.json and its weights)")
    with open(config_path) as f:
        raw = json.load(f)
    config = transformers.LlamaConfig(**{key: value for key, value in raw.items() if key != "model_type"})
    target_config = target.config
    if config.vocab_size != target.vocab_size:
        raise _bad(config_path, f"vocab_size={config.vocab_size}, but the target's vocabulary has "
                                f"{target.vocab_size} tokens: the head must be trained for this target")
    declared_hidden = raw.get("target_hidden_size")
    if declared_hidden is not None and declared_hidden != target_config.hidden_size:
        raise _bad(config_path, f"target_hidden_size={declared_hidden}, but the target's hidden size is "
                                f"{target_config.hidden_size}")
    if not hasattr(getattr(target, "model", None), "aux_hidden_state_layers"):
        raise _bad(path, f"the target ({type(target).__name__}) cannot return its hidden states; EAGLE-3 runs on "
                         "the Llama-family models (serval.model.llama.LlamaModel)")
    aux_layer_ids = _aux_layer_ids(raw, config_path, target_config.num_hidden_layers)
    max_positions = max(config.max_position_embeddings, target_config.max_position_embeddings)
    with torch.device(device):
        head = Eagle3Head(config, target_config.hidden_size, aux_layer_ids, max_positions)
    head = head.to(dtype).eval().requires_grad_(False)
    if load_format == "dummy":
        init_dummy_weights(head, seed)
        if head.config.hidden_size == target_config.hidden_size:
            head.embed_tokens.share(target.model.embed_tokens)
        return head
    _load_weights(head, _read_tensors(path), path, target)
    return head


def _aux_layer_ids(raw: dict, config_path: str, num_target_layers: int) -> tuple[int, ...]:
    """The target layers whose input hidden states the head reads: config.json's eagle_aux_hidden_state_layer_ids
    (at the top or in eagle_config), else EAGLE-3's default (2, L // 2, L - 3), as vLLM takes them."""
    ids = raw.get("eagle_aux_hidden_state_layer_ids") or (raw.get("eagle_config") or {}).get(
        "eagle_aux_hidden_state_layer_ids")
    key = "eagle_aux_hidden_state_layer_ids"
    if ids is None:
        ids = [2, num_target_layers // 2, num_target_layers - 3]
        key = f"the default layers {ids} of a {num_target_layers}-layer target"
    if (not isinstance(ids, list) or len(ids) != 3
            or not all(isinstance(i, int) and 0 <= i < num_target_layers for i in ids)):
        raise _bad(config_path, f"{key}: expected three layer indices in [0, {num_target_layers}) of the target; "
                                f"got {ids}")
    return tuple(sorted(ids))


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        tensors = dict(iter_safetensors(safetensors_files(path)))
    except FileNotFoundError:
        bin_path = os.path.join(path, "pytorch_model.bin")
        if not os.path.isfile(bin_path):
            raise _bad(path, "no weights: expected model.safetensors (or an index of shards) or "
                             "pytorch_model.bin") from None
        tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
    # Some exports prefix the names with "model." or call the layer "layers.0" (speculators).
    return {name.removeprefix("model.").replace("layers.0.", "midlayer."): tensor for name, tensor in tensors.items()}


def _load_weights(head: Eagle3Head, tensors: dict[str, torch.Tensor], path: str, target: nn.Module) -> None:
    required = list(REQUIRED_TENSORS) + (["d2t"] if head.draft_vocab_size != head.vocab_size else [])
    missing = [name for name in required if name not in tensors]
    if missing:
        raise _bad(path, f"missing tensor(s) {missing}")
    params = dict(head.named_parameters())
    expectations = {"fc.weight": f"(hidden, 3 x the target's hidden size {target.config.hidden_size})",
                    "lm_head.weight": f"(draft_vocab_size {head.draft_vocab_size}, hidden)",
                    "embed_tokens.weight": f"(the target's vocabulary {head.vocab_size}, hidden)"}
    for name, tensor in tensors.items():
        if name in ("d2t", "t2d"):
            continue
        parts = name.split(".")
        merged, shard = _MERGED_PROJECTIONS.get(parts[-2], (None, None)) if len(parts) >= 2 else (None, None)
        our_name = ".".join(parts[:-2] + [merged, parts[-1]]) if merged else name
        if our_name not in params:
            raise _bad(path, f"unknown tensor {name!r}")
        param = params[our_name]
        module = head.get_submodule(our_name.rsplit(".", 1)[0])
        destination = module.shard(param.data, shard) if isinstance(module, MergedLinear) and shard else param.data
        if destination.shape != tensor.shape:
            raise _bad(path, f"tensor {name!r} has shape {tuple(tensor.shape)}; expected {tuple(destination.shape)} "
                             f"{expectations.get(name, '(from config.json)')}")
        destination.copy_(tensor)
    if "embed_tokens.weight" not in tensors:
        if target.config.hidden_size != head.config.hidden_size:
            raise _bad(path, f"no embed_tokens.weight, and the head's hidden size ({head.config.hidden_size}) "
                             f"differs from the target's ({target.config.hidden_size}), so it cannot share them")
        head.embed_tokens.share(target.model.embed_tokens)
    if "d2t" in tensors:
        d2t = tensors["d2t"]
        if tuple(d2t.shape) != (head.draft_vocab_size,) or d2t.dtype.is_floating_point:
            raise _bad(path, f"tensor 'd2t' has shape {tuple(d2t.shape)} ({d2t.dtype}); expected integer offsets, "
                             f"one per draft token ({head.draft_vocab_size},)")
        target_ids = torch.arange(head.draft_vocab_size) + d2t.long()
        if target_ids.min() < 0 or target_ids.max() >= head.vocab_size:
            raise _bad(path, f"tensor 'd2t' maps draft ids outside the target's vocabulary [0, {head.vocab_size})")
        head.d2t.copy_(d2t)
    if "t2d" in tensors and tuple(tensors["t2d"].shape) != (head.vocab_size,):
        raise _bad(path, f"tensor 't2d' has shape {tuple(tensors['t2d'].shape)}; expected one entry per target "
                         f"token ({head.vocab_size},)")
    if "t2d" in tensors:
        head.t2d.copy_(tensors["t2d"].bool())


def _bad(where: str, message: str) -> InvalidArgument:
    return InvalidArgument("speculative_config", f"invalid speculative_config: EAGLE-3 head {where}: {message}")
