"""What a request must pass before it reaches the engine (served model, capacity, context length, `n`),
and its prompts in the engine's form: each `{"prompt": text, "prompt_token_ids": ids}`.

The prompt builders are synchronous and CPU-bound (tokenizing, templating): handlers run them through
`ServerState.off_loop`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import partial

from serval.openai.errors import APIError, InvalidArgument
from serval.openai.reasoning import get_reasoning_parser
from serval.openai.tool_grammar import json_schema_grammar, tool_call_grammar
from serval.openai.tool_parsers.chat_output import ChatOutputParser, chat_output_parser
from serval.openai.tools import NamedToolChoice
from serval.sampling_params import SamplingParams, StructuredOutputsParams
from serval.server.config import RESERVED_TEMPLATE_KWARGS, ServerConfig
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
    if state.loras.get(name) is not None:
        return name  # a LoRA adapter: the request runs with it (Call.lora_request)
    adapters = [adapter.lora_name for adapter in state.loras.adapters()]
    raise APIError(404, f"The model `{name}` does not exist; this server serves {names}"
                        f"{f' and the LoRA adapters {adapters}' if adapters else ''}.", param="model",
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


def truncate_prompt(state: ServerState, prompt: dict, keep: int | None) -> dict:
    """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens (-1: the context length), its text decoded
    from them (what echo shows). Runs on the tokenizer's thread."""
    if keep is None:
        return prompt
    if keep > state.max_model_len:
        raise APIError(400, f"truncate_prompt_tokens {keep} is more than the model's context length "
                            f"({state.max_model_len})", param="truncate_prompt_tokens")
    keep = state.max_model_len if keep == -1 else keep
    ids = prompt["prompt_token_ids"]
    if len(ids) <= keep:
        return prompt
    ids = ids[-keep:]
    return {"prompt": state.tokenizer.decode(ids) if state.tokenizer is not None else "", "prompt_token_ids": ids}


def check_priority(state: ServerState, priority: int) -> int:
    """A request's priority, which only the priority scheduler reads: elsewhere anything but 0 is a 400, as in vLLM,
    rather than an order silently not kept."""
    if priority != 0 and state.engine.config.scheduling_policy != "priority":
        raise APIError(400, f"priority {priority} needs a server started with --scheduling-policy priority (this "
                            f"one schedules {state.engine.config.scheduling_policy})", param="priority")
    return priority


def apply_template_defaults(config: ServerConfig, body) -> None:
    """The server's --default-chat-template-kwargs under the request's own chat_template_kwargs (the request's
    win), set on the body before anything reads it: the template, and the reasoning parser's thinking switch."""
    if config.default_chat_template_kwargs:
        body.chat_template_kwargs = {**config.default_chat_template_kwargs, **(body.chat_template_kwargs or {})}


def chat_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                chat_template_kwargs: dict | None = None, continue_final_message: bool = False) -> dict:
    """`tools` (chat-completions function tools) are rendered as the template renders them; with
    continue_final_message the last message is left open for the model to continue."""
    tokenizer = require_tokenizer(tokenizer)
    kwargs = chat_template_kwargs or {}
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}: they are arguments of the "
                            "request itself", param="chat_template_kwargs")
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)
    except Exception as error:  # jinja's TemplateError and raise_exception() in templates: bad messages
        raise APIError(400, f"The chat template rejected the messages: {error}", param="messages") from error
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


# ---------------------------------------------------------------- tools and reasoning
def chat_output_parsers(config: ServerConfig, body) -> partial:
    """A factory of per-choice output parsers (reasoning, then tool calls) for a chat request. Building one here
    checks the request against the server's flags: "auto" without --enable-auto-tool-choice is a 400."""
    factory = partial(chat_output_parser, config.tool_call_parser, config.reasoning_parser, body.tool_dicts(),
                      body.resolved_tool_choice(), config.enable_auto_tool_choice, body.chat_template_kwargs)
    factory()
    return factory


def thinking_enabled(config: ServerConfig, body) -> bool:
    # the parser's own switch: deepseek_v3 thinks only when asked, the others unless told not to
    return (config.reasoning_parser is not None
            and get_reasoning_parser(config.reasoning_parser).thinking_enabled(body.chat_template_kwargs))


def chat_sampling_params(config: ServerConfig, tokenizer, body, params: SamplingParams,
                         parser: ChatOutputParser) -> SamplingParams:
    """`params` with what tool calling and reasoning need: the grammar that forces tool_choice "required" or a
    named function, structured outputs moved after the think section, and special tokens kept in the text when
    the tool call format's markers are special tokens. Runs on the tokenizer's thread (it reads the vocabulary)."""
    changes: dict = {}
    if parser.reads_special_tokens:
        changes["skip_special_tokens"] = False
    stop_token_ids = parser.stop_token_ids(tokenizer.get_added_vocab(), params.stop_token_ids)
    if stop_token_ids != (params.stop_token_ids or []):
        changes["stop_token_ids"] = stop_token_ids
    grammar = _tool_choice_grammar(config, tokenizer, body, params, parser)
    thinking = thinking_enabled(config, body)
    # a format that reads its own reasoning (harmony) has the reasoning in its grammar already
    after_reasoning = thinking and not (grammar is not None and parser.tools.reads_reasoning)
    if grammar is None and thinking:
        grammar = _json_grammar(params.structured_outputs)
    if grammar is not None:
        if after_reasoning:
            reasoning = get_reasoning_parser(config.reasoning_parser)
            grammar = reasoning.constrain_after_reasoning(grammar, tokenizer.get_added_vocab())
        changes["structured_outputs"] = StructuredOutputsParams(grammar=grammar)
    return dataclasses.replace(params, **changes) if changes else params


def _tool_choice_grammar(config: ServerConfig, tokenizer, body, params: SamplingParams,
                         parser: ChatOutputParser) -> str | None:
    choice = body.resolved_tool_choice()
    if parser.tools is None or not (choice == "required" or isinstance(choice, NamedToolChoice)):
        return None
    if params.structured_outputs is not None:
        raise InvalidArgument("tool_choice", 'tool_choice "required" or a named function constrains the output '
                              "already; it cannot be combined with response_format or structured_outputs")
    choice = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice
    # in the parser's own format, so the calls the grammar forces are the calls the parser reads back
    return tool_call_grammar(config.tool_call_parser, body.tool_dicts(), choice, body.parallel_tool_calls,
                             tokenizer.get_added_vocab())


def _json_grammar(structured: StructuredOutputsParams | None) -> str | None:
    """A JSON constraint as a grammar with a `constraint` rule, so it can follow a think section."""
    if structured is None:
        return None
    if structured.json_object:
        return json_schema_grammar({"type": "object"})
    schema = structured.json
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError:
            return None  # the engine refuses it with its own message
    return json_schema_grammar(schema) if isinstance(schema, dict) else None
