"""Token logprobs in OpenAI's two shapes: the legacy completions API's parallel lists and chat's list of tokens with
their top alternatives. Written once for whole responses and stream chunks alike."""
from __future__ import annotations

from typing import TYPE_CHECKING

from serval.openai import protocol

if TYPE_CHECKING:
    from serval.outputs import Logprob

# Positions without a rank (should not happen) sort after every ranked one.
_UNRANKED = 1 << 30


def token_text(token_id: int, position: "dict[int, Logprob] | None", tokenizer) -> str:
    """A token as text: the engine's decoding if it has one, else the tokenizer's, else the id."""
    if position is not None and token_id in position and position[token_id].decoded_token is not None:
        return position[token_id].decoded_token
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def top(position: "dict[int, Logprob]", k: int) -> "list[tuple[int, Logprob]]":
    """The k most likely (token id, Logprob) of one position."""
    ranked = sorted(position.items(), key=lambda item: item[1].rank if item[1].rank is not None else _UNRANKED)
    return ranked[:k]


def _position(positions: list | None, step: int):
    return positions[step] if positions is not None and step < len(positions) else None


def add_completion_logprobs(target: protocol.CompletionLogprobs, token_ids: list[int], positions: list | None,
                            k: int, tokenizer) -> None:
    """Append `token_ids` to `target`, continuing its text offsets."""
    offset = target.text_offset[-1] + len(target.tokens[-1]) if target.tokens else 0
    for step, token_id in enumerate(token_ids):
        position = _position(positions, step)
        token = token_text(token_id, position, tokenizer)
        target.tokens.append(token)
        target.text_offset.append(offset)
        offset += len(token)
        if position is None:
            target.token_logprobs.append(None)
            target.top_logprobs.append(None)
            continue
        target.token_logprobs.append(position[token_id].logprob if token_id in position else None)
        target.top_logprobs.append({token_text(t, position, tokenizer): lp.logprob for t, lp in top(position, k)}
                                   if k else None)


def chat_logprobs(token_ids: list[int], positions: list | None, k: int, tokenizer) -> protocol.ChatLogprobs:
    """Chat's logprobs of `token_ids`; positions the engine did not score are left out."""
    content = []
    for step, token_id in enumerate(token_ids):
        position = _position(positions, step)
        if position is None or token_id not in position:
            continue
        token = token_text(token_id, position, tokenizer)
        alternatives = []
        for alternative, logprob in top(position, k):
            text = token_text(alternative, position, tokenizer)
            alternatives.append(protocol.TopLogprob(token=text, logprob=logprob.logprob, bytes=list(text.encode())))
        content.append(protocol.TokenLogprob(token=token, logprob=position[token_id].logprob,
                                             bytes=list(token.encode()), top_logprobs=alternatives))
    return protocol.ChatLogprobs(content=content)
