"""Pooling models of the Llama family: the decoder without its LM head (embedders such as Qwen3-Embedding), or
with a score head (cross-encoders such as Qwen3ForSequenceClassification), and how each pools (its PoolerConfig).

    embedder:    hidden states -> pool (last / mean / CLS) -> [L2-normalise]      compute_logits = identity
    classifier:  hidden states -> pool (last token)        -> score head [num_labels]

The pooling itself runs in the engine (serval.engine.pooling), chunk by chunk; the model only owns its head,
applied to the pooled rows, which the engine calls `compute_logits` like a generative model's LM head.

Checkpoints come as `Qwen3Model` / `LlamaModel` weights (no `model.` prefix, no lm_head), as sequence-classification
weights (`score.weight`), or as a causal LM served with --runner pooling (its lm_head is dropped). A Qwen3-Reranker
(a causal LM judging "yes"/"no") becomes a one-label classifier when its config.json says
`"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"]`: the score row is
lm_head["yes"] - lm_head["no"], so sigmoid(score) = P(yes) / (P(yes) + P(no)).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from serval.layers.pooling import PoolerConfig
from serval.model.llama import LlamaForCausalLM, LlamaModel, head_dim_of
from serval.openai.errors import InvalidArgument

# sentence-transformers' Pooling module flags -> our pooling type. The others (max, weighted mean, mean of
# sqrt length) have no equivalent here and are refused by name.
_SENTENCE_TRANSFORMERS_MODES = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN",
                                "pooling_mode_cls_token": "CLS"}


class LlamaForEmbedding(LlamaForCausalLM):
    """The decoder's final (normed) hidden states are the output; the family switches (qkv_bias, qk_norm) are the
    causal LM's, so every dense Llama-family model has its embedder below."""

    def __init__(self, config) -> None:
        nn.Module.__init__(self)  # the causal LM's constructor would allocate an LM head of vocab x hidden
        self.config = config
        self.model = LlamaModel(config, self.make_mlp, qkv_bias=self.qkv_bias_of(config),
                                o_bias=bool(getattr(config, "attention_bias", False)), qk_norm=self.qk_norm)
        self.tie_word_embeddings = False
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size

    def default_pooler_config(self) -> PoolerConfig:
        return PoolerConfig("LAST", normalize=True)

    @property
    def output_size(self) -> int:
        """The length of one pooled output: the hidden size (embedder) or the number of labels (classifier)."""
        return self.hidden_size

    def compute_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [N, hidden] -> the model's output [N, output_size] in float32."""
        return pooled.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(_as_decoder_names(weights))


class LlamaForSequenceClassification(LlamaForEmbedding):
    """transformers' *ForSequenceClassification: a bias-free linear score head on the last token's hidden state."""

    def __init__(self, config) -> None:
        super().__init__(config)
        # A yes/no reranker has one label whatever its config's num_labels (transformers' default is 2).
        num_labels = 1 if getattr(config, "classifier_from_token", None) is not None else config.num_labels
        # A plain nn.Linear: the quantized formats (serval.layers.linear.Linear) must not claim a 1-row head.
        self.score = nn.Linear(config.hidden_size, num_labels, bias=False)

    def default_pooler_config(self) -> PoolerConfig:
        return PoolerConfig("LAST", normalize=False)

    @property
    def output_size(self) -> int:
        return self.score.out_features

    def compute_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.score(pooled.to(self.score.weight.dtype)).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tokens = getattr(self.config, "classifier_from_token", None)
        if tokens is not None:
            weights = _yes_no_score_head(weights, _token_ids(self.config, tokens))
        super().load_weights(weights)


class MistralForEmbedding(LlamaForEmbedding):
    pass


class Qwen2ForEmbedding(LlamaForEmbedding):
    qkv_bias = True


class Qwen3ForEmbedding(LlamaForEmbedding):
    qk_norm = True


class Qwen2ForSequenceClassification(LlamaForSequenceClassification):
    qkv_bias = True


class Qwen3ForSequenceClassification(LlamaForSequenceClassification):
    qk_norm = True


def is_pooling_model(model: nn.Module) -> bool:
    return isinstance(model, LlamaForEmbedding)


def load_pooler_config(model_dir: str, model: LlamaForEmbedding) -> PoolerConfig:
    """The model's pooling: sentence-transformers' modules.json and its Pooling module's config.json where the
    checkpoint has them (a Normalize module turns normalisation on), else the model's default."""
    modules_file = os.path.join(model_dir, "modules.json") if os.path.isdir(model_dir) else ""
    if not os.path.isfile(modules_file):
        return model.default_pooler_config()
    with open(modules_file) as f:
        modules = json.load(f)
    known = ("Transformer", "Pooling", "Normalize")
    unknown = [m.get("type") for m in modules if not str(m.get("type", "")).endswith(known)]
    if unknown:  # a Dense projection (say) would change every embedding: refuse rather than serve wrong vectors
        raise ValueError(f"modules.json lists sentence-transformers modules Serval does not run: {unknown}; "
                         f"supported: {list(known)}")
    pooling = next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    if pooling is None:
        return PoolerConfig(model.default_pooler_config().pooling_type, normalize)
    with open(os.path.join(model_dir, pooling.get("path", ""), "config.json")) as f:
        flags = json.load(f)
    chosen = [mode for flag, mode in _SENTENCE_TRANSFORMERS_MODES.items() if flags.get(flag)]
    unsupported = [flag for flag, on in flags.items()
                   if flag.startswith("pooling_mode_") and on and flag not in _SENTENCE_TRANSFORMERS_MODES]
    if unsupported or len(chosen) != 1:
        raise ValueError(f"{pooling.get('path')}/config.json asks for pooling {unsupported or chosen or 'none'}; "
                         f"supported: exactly one of {sorted(_SENTENCE_TRANSFORMERS_MODES)}")
    return PoolerConfig(chosen[0], normalize)


@dataclass(frozen=True)
class InstructionPrompts:
    """sentence-transformers' named prompts (config_sentence_transformers.json): text put before an input, such as
    Qwen3-Embedding's "query" instruction. default_name applies when a request names none."""
    prompts: dict[str, str] = field(default_factory=dict)
    default_name: str | None = None

    def prefix(self, name: str | None) -> str:
        name = self.default_name if name is None else name
        if name is None:
            return ""
        if name not in self.prompts:
            raise InvalidArgument("prompt_name", f"invalid prompt_name {name!r}: this model's prompts are "
                                                 f"{sorted(self.prompts)} (config_sentence_transformers.json)")
        return self.prompts[name]


def load_instruction_prompts(model_dir: str) -> InstructionPrompts:
    path = os.path.join(model_dir, "config_sentence_transformers.json") if os.path.isdir(model_dir) else ""
    if not os.path.isfile(path):
        return InstructionPrompts()
    with open(path) as f:
        saved = json.load(f)
    prompts = saved.get("prompts") or {}
    return InstructionPrompts({str(k): str(v) for k, v in prompts.items()}, saved.get("default_prompt_name"))


def _as_decoder_names(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint names as the causal LM's loader knows them: a bare decoder's (`layers.0...`, saved from
    `Qwen3Model`) get the `model.` prefix; a causal LM's lm_head has no place in a pooling model."""
    for name, tensor in weights:
        if name.startswith("lm_head."):
            continue
        yield (name if name.startswith(("model.", "score.")) else "model." + name), tensor


def _yes_no_score_head(weights: Iterable[tuple[str, torch.Tensor]],
                       no_yes: tuple[int, int]) -> Iterator[tuple[str, torch.Tensor]]:
    """A reranker's causal-LM checkpoint as a one-label classifier's: score = lm_head[yes] - lm_head[no] (the
    embedding's rows where the head is tied to it)."""
    head = embedding = None
    for name, tensor in weights:
        if name == "lm_head.weight":
            head = tensor
            continue
        if name in ("model.embed_tokens.weight", "embed_tokens.weight"):
            embedding = tensor
        yield name, tensor
    rows = head if head is not None else embedding
    if rows is None:
        raise ValueError("classifier_from_token needs the checkpoint's lm_head (or tied embedding) weights")
    no, yes = no_yes
    yield "score.weight", (rows[yes].float() - rows[no].float()).to(rows.dtype)[None]


def _token_ids(config, tokens) -> tuple[int, int]:
    """classifier_from_token ["no", "yes"] as token ids, through the checkpoint's tokenizer."""
    if not isinstance(tokens, (list, tuple)) or len(tokens) != 2:
        raise ValueError(f"classifier_from_token {tokens!r}: expected two tokens, [no, yes]")
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(config._name_or_path)
    ids = [tokenizer.convert_tokens_to_ids(token) for token in tokens]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"classifier_from_token {tokens!r}: not single tokens of the checkpoint's vocabulary")
    return ids[0], ids[1]
