"""The small endpoints beside the OpenAI API: /tokenize, /detokenize (vLLM's) and /v1/models. Tokenizing and
detokenizing run off the event loop."""
from __future__ import annotations

from serval.openai import protocol
from serval.openai.errors import APIError
from serval.openai.protocol import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest
from serval.server.admission import apply_template_defaults, chat_prompt, check_model, require_tokenizer
from serval.server.state import ServerState


async def tokenize(state: ServerState, body: TokenizeRequest) -> dict:
    check_model(state, body.model)
    apply_template_defaults(state.config, body)
    return await state.off_loop(_tokenize, state.tokenizer, body, state.max_model_len)


def _tokenize(tokenizer, body: TokenizeRequest, max_model_len: int) -> dict:
    tokenizer = require_tokenizer(tokenizer)
    if body.messages is not None:
        messages = ChatCompletionRequest(messages=body.messages).template_messages()
        tokens = chat_prompt(tokenizer, messages, body.add_generation_prompt,
                             chat_template_kwargs=body.chat_template_kwargs)["prompt_token_ids"]
    else:
        tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens,
            "token_strs": tokenizer.convert_ids_to_tokens(tokens)}


async def detokenize(state: ServerState, body: DetokenizeRequest) -> dict:
    check_model(state, body.model)
    tokenizer = require_tokenizer(state.tokenizer)
    vocab_size = len(tokenizer)
    bad = [token for token in body.tokens if not 0 <= token < vocab_size]
    if bad:
        raise APIError(400, f"invalid token ids {bad[:5]}: allowed integers in [0, {vocab_size})",
                       param="tokens")
    return {"prompt": await state.off_loop(tokenizer.decode, body.tokens)}


def models(state: ServerState) -> dict:
    cards = [protocol.ModelCard(id=name, root=state.engine.config.model, max_model_len=state.max_model_len)
             for name in state.config.served_model_names]
    cards += [protocol.ModelCard(id=adapter.lora_name, root=adapter.lora_path, parent=state.model_name,
                                 max_model_len=state.max_model_len) for adapter in state.loras.adapters()]
    return protocol.ModelList(data=cards).model_dump()
