"""What a request must pass before it reaches the engine (served model, capacity, context length, `n`),
and its prompts in the engine's form: each `{"prompt": text, "prompt_token_ids": ids}`.

The prompt builders are synchronous and CPU-bound (tokenizing, templating): handlers run them through
`ServerState.off_loop`.
"""
from __future__ import annotations

from dataclasses import dataclass

from serval.openai.errors import APIError
from serval.server.state import ServerState

@dataclass
class ContextParams:
    """Which body fields a context-length error names: the prompt's, and the token limit the client sent."""
    prompt: str = "prompt"
    max_tokens: str = "max_tokens"


def check_model(state: ServerState, name: str | None) -> str:
    names = state.config.served_model_names
    if name is None or name in names:
        return state.model_name
    raise APIError(404, f"The model `{name}` does not exist; this server serves {names}.", param="model",
                   code="model_not_found")


def check_capacity(state: ServerState) -> None:
    limit = state.config.max_waiting_requests
    if limit is None:
        return
    waiting = state.engine.num_waiting  # the engine's inbox included
    if waiting >= limit:
        raise APIError.overloaded(f"The server is overloaded: {waiting} requests are waiting, the limit is {limit} "
                                  "(--max-waiting-requests). Retry later.")


def check_n(state: ServerState, n: int) -> None:
    if n > state.config.max_n:
        raise APIError(400, f"invalid n {n}: at most {state.config.max_n} choices per request (--max-n)", param="n")


def check_context(state: ServerState, num_prompt_tokens: int, max_tokens: int | None, where: str,
                  params: ContextParams) -> None:
    limit = state.max_model_len
    if num_prompt_tokens >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your {where} "
                            f"has {num_prompt_tokens} tokens; at most {limit - 1} leave room for one to be "
                            "generated. Please reduce the length of the " + where + ".",
                       param=params.prompt, code="context_length_exceeded")
    if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {where}, "
                            f"{max_tokens} in the completion). Please reduce the length of the {where} or "
                            "completion.", param=params.max_tokens, code="context_length_exceeded")


def token_reservation(state: ServerState, prompts: list[dict], params) -> tuple[int, int]:
    """(prompt tokens, the most tokens all choices can generate) of a request: what its key must have room for."""
    num_prompt_tokens = [len(prompt["prompt_token_ids"]) for prompt in prompts]
    caps = [params.max_tokens if params.max_tokens is not None else state.max_model_len - n for n in num_prompt_tokens]
    return sum(num_prompt_tokens), sum(caps) * params.n


def require_tokenizer(tokenizer):
    if tokenizer is None:
        raise APIError(400, "This model was loaded without a tokenizer: send prompts as token ids to "
                            "/v1/completions.", param="prompt")
    return tokenizer


def prompt_texts(tokenizer, prompts: list[str | list[int]]) -> list[str | None]:
    """Each prompt as text (token ids decoded, so ids are no way around the input rails); None without a
    tokenizer."""
    return [p if isinstance(p, str) else tokenizer.decode(p) if tokenizer is not None else None for p in prompts]


def completion_prompts(tokenizer, prompts: list[str | list[int]], texts: list[str | None],
                       checked: list[str | None]) -> list[dict]:
    """The engine's prompts: text prompts tokenized, id prompts kept (re-encoded only where a rail changed their
    text)."""
    built = []
    for prompt, text, new_text in zip(prompts, texts, checked):
        if isinstance(prompt, str):
            built.append({"prompt": new_text, "prompt_token_ids": require_tokenizer(tokenizer).encode(new_text)})
        elif new_text != text:
            built.append({"prompt": new_text, "prompt_token_ids": tokenizer.encode(new_text)})
        else:
            built.append({"prompt": text or "", "prompt_token_ids": list(prompt)})
    return built


def chat_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> dict:
    """`tools` (chat-completions function tools) are rendered as the template renders them."""
    tokenizer = require_tokenizer(tokenizer)
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as error:  # jinja's TemplateError and raise_exception() in templates: bad messages
        raise APIError(400, f"The chat template rejected the messages: {error}", param="messages") from error
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
