"""Workloads: the list of requests a benchmark sends, built from real text in the target's tokenizer.

Each request says what the user sends (an optional system prompt, a user message, or a turn of a multi-turn
conversation) and how many tokens to ask for. Prompt lengths are counted with the benchmark's tokenizer, without
special tokens; the server may add BOS or chat-template tokens, and the report uses the server's own `usage`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from serval.bench.text import generate_text
from serval.bench.tokenizer import BenchTokenizer

WORKLOADS = ("random", "shared-prefix", "long-context", "chat", "jsonl")


@dataclass
class BenchRequest:
    user: str
    output_len: int
    prompt_len: int  # benchmark-tokenizer tokens in system + user (+ history for later chat turns: not known yet)
    system: str | None = None
    conversation_id: int | None = None  # chat: turns of one conversation run in order, each seeing the replies
    turn: int = 0
    messages: list[dict] | None = None  # jsonl: a given conversation, sent as is


@dataclass
class WorkloadConfig:
    name: str = "random"
    num_prompts: int = 100
    input_len: int | None = None  # per workload default below
    output_len: int | None = None
    range_ratio: float = 0.0
    seed: int = 0
    prefix_len: int = 1024  # shared-prefix: the system prompt shared by a group
    num_groups: int = 4
    chat_turns: int = 3
    jsonl_path: str | None = None
    extra: dict = field(default_factory=dict)

    DEFAULTS = {"random": (1024, 128), "shared-prefix": (128, 128), "long-context": (32000, 128),
                "chat": (128, 128), "jsonl": (0, 128)}

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"invalid workload: {self.name!r}; allowed: {', '.join(WORKLOADS)}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"invalid --random-range-ratio: {self.range_ratio}; allowed: 0 <= r < 1")
        if self.num_prompts < 1:
            raise ValueError(f"invalid --num-prompts: {self.num_prompts}; allowed: >= 1")
        default_in, default_out = self.DEFAULTS[self.name]
        self.input_len = default_in if self.input_len is None else self.input_len
        self.output_len = default_out if self.output_len is None else self.output_len
        if self.name == "jsonl" and not self.jsonl_path:
            raise ValueError("invalid workload: jsonl needs --dataset-path FILE")


class PromptSampler:
    """Windows of a tokenized text, adjusted so that decode-then-encode gives exactly the asked length."""

    def __init__(self, tokenizer: BenchTokenizer, seed: int, min_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.rng = np.random.default_rng(seed)
        num_words = max(20000, int(min_tokens * 1.2) + 1000)
        self.ids = tokenizer.encode(generate_text(num_words, seed))
        while len(self.ids) < min_tokens * 2:
            self.ids = self.ids + self.ids

    def sample(self, length: int) -> tuple[str, int]:
        if length <= 0:
            return "", 0
        start = int(self.rng.integers(0, len(self.ids) - length))
        ids = self.ids[start:start + length]
        text = self.tokenizer.decode(ids)
        for _ in range(4):  # token merges across the window's edges change the count; a few trims settle it
            encoded = self.tokenizer.encode(text)
            if len(encoded) == length:
                break
            if len(encoded) > length:
                encoded = encoded[:length]
            else:
                encoded = encoded + self.ids[start + length:start + length + (length - len(encoded))]
            text = self.tokenizer.decode(encoded)
        return text, len(self.tokenizer.encode(text))


def sample_lengths(rng: np.random.Generator, length: int, ratio: float, count: int, minimum: int) -> list[int]:
    """vLLM's --random-range-ratio: uniform integers in [L(1-r), L(1+r)]."""
    low, high = int(length * (1 - ratio)), int(length * (1 + ratio))
    return [max(minimum, int(value)) for value in rng.integers(low, high + 1, size=count)]


def build_workload(config: WorkloadConfig, tokenizer: BenchTokenizer) -> list[BenchRequest]:
    if config.name == "jsonl":
        return _jsonl(config, tokenizer)
    rng = np.random.default_rng(config.seed)
    max_input = int(config.input_len * (1 + config.range_ratio)) + 1
    sampler = PromptSampler(tokenizer, config.seed, max(max_input, config.prefix_len))
    input_lens = sample_lengths(rng, config.input_len, config.range_ratio, config.num_prompts, 1)
    output_lens = sample_lengths(rng, config.output_len, config.range_ratio, config.num_prompts, 1)
    if config.name == "shared-prefix":
        return _shared_prefix(config, sampler, rng, input_lens, output_lens)
    requests = []
    for index, (input_len, output_len) in enumerate(zip(input_lens, output_lens)):
        text, length = sampler.sample(input_len)
        request = BenchRequest(user=text, output_len=output_len, prompt_len=length)
        if config.name == "chat":
            request.conversation_id, request.turn = divmod(index, config.chat_turns)
        requests.append(request)
    return requests


def _shared_prefix(config, sampler, rng, input_lens, output_lens) -> list[BenchRequest]:
    """SGLang's generated-shared-prefix: groups of prompts share a long system prompt; order shuffled."""
    prefixes = [sampler.sample(config.prefix_len) for _ in range(config.num_groups)]
    requests = []
    for index, (input_len, output_len) in enumerate(zip(input_lens, output_lens)):
        system, system_len = prefixes[index % config.num_groups]
        text, length = sampler.sample(input_len)
        requests.append(BenchRequest(user=text, output_len=output_len, prompt_len=system_len + length, system=system))
    order = rng.permutation(len(requests))
    return [requests[i] for i in order]


def _jsonl(config: WorkloadConfig, tokenizer: BenchTokenizer) -> list[BenchRequest]:
    """Lines of {"prompt": str} or {"messages": [...]}, with "output_len" (or "max_tokens"); cycled to num_prompts."""
    rows = []
    with open(config.jsonl_path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            output_len = row.get("output_len", row.get("max_tokens", row.get("expected_output_len", config.output_len)))
            if "messages" in row:
                text = "\n".join(str(m.get("content", "")) for m in row["messages"])
                rows.append(BenchRequest(user=row["messages"][-1].get("content", ""), output_len=int(output_len),
                                         prompt_len=len(tokenizer.encode(text)), messages=row["messages"]))
            elif "prompt" in row:
                rows.append(BenchRequest(user=row["prompt"], output_len=int(output_len),
                                         prompt_len=len(tokenizer.encode(row["prompt"]))))
            else:
                raise ValueError(f"invalid {config.jsonl_path} line {line_number}: needs 'prompt' or 'messages'")
    if not rows:
        raise ValueError(f"invalid --dataset-path: {config.jsonl_path} has no requests")
    return [rows[i % len(rows)] for i in range(config.num_prompts)]
