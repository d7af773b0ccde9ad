"""The OpenAI API's request and response bodies (pydantic), and the step from a request to SamplingParams.

Field names and defaults are OpenAI's; the extras (top_k, min_p, repetition_penalty, ignore_eos, min_tokens,
stop_token_ids, skip_special_tokens, spaces_between_special_tokens, include_stop_str_in_output,
allowed_token_ids, bad_words) are vLLM's. Unknown fields are ignored, as OpenAI's SDKs send fields that a given
server may not know.

Types are strict, as OpenAI's are: `"max_tokens": true`, `"stream": "yes"` and `"temperature": "0.5"` are 400s,
not coerced (pydantic's lax mode would take all three). Numbers may be integers where OpenAI takes a float, and
`null` means the default for a field that has one, as OpenAI's optional fields do. Token ids are non-negative
integers here; their upper bound is the vocabulary's, which only the engine knows.
"""
from __future__ import annotations

import time
import typing
import uuid
from typing import Annotated, Literal

from pydantic import (AllowInfNan, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator,
                      model_validator)

from serval.openai.http import lone_surrogate_path
from serval.openai.tools import AssistantToolCall, ToolCallMessageFields, ToolRequestFields, tool_template_fields
from serval.sampling_params import STRUCTURED_KINDS, SamplingParams, StructuredOutputsParams

# OpenAI allows at most 20 alternatives per position.
MAX_TOP_LOGPROBS = 20
# torch's int64, as vLLM's protocol bounds seed: the engine seeds a torch.Generator with it.
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1

# A float that takes integers (JSON has one number type) but not booleans, strings or non-finite values.
Float = Annotated[float, Field(strict=True), AllowInfNan(False)]
Int = StrictInt
Bool = StrictBool
TokenId = Annotated[int, Field(strict=True, ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Seed = Annotated[int, Field(strict=True, ge=SEED_MIN, le=SEED_MAX)]
# vLLM's request priority (lower is scheduled first, with --scheduling-policy priority), bounded as seeds are.
Priority = Annotated[int, Field(strict=True, ge=SEED_MIN, le=SEED_MAX)]
# vLLM's cache_salt: requests share prefix-cache blocks only with requests of the same salt.
CacheSalt = Annotated[str, Field(strict=True, min_length=1, max_length=1024)]
# vLLM's bad_words, bounded so that tokenizing them (twice each) stays a small part of a request, far above a real
# block list's size. (SamplingParams refuses a word of whitespace alone.)
MAX_BAD_WORDS = 1000
MAX_BAD_WORD_CHARS = 1000
BadWords = Annotated[list[Annotated[str, Field(strict=True, max_length=MAX_BAD_WORD_CHARS)]],
                     Field(max_length=MAX_BAD_WORDS)]
# vLLM's truncate_prompt_tokens: keep the prompt's last k tokens; -1 keeps up to the context length. (0 is refused.)
TruncatePromptTokens = Annotated[int, Field(strict=True, ge=-1)]


def _keep_some_tokens(value):
    if value == 0:
        raise ValueError("truncate_prompt_tokens must be -1 (the context length) or at least 1")
    return value
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]


class OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        """`"n": null` is n's default, as in OpenAI's API, where these fields are optional. (A field that takes
        null keeps it: completions' `"max_tokens": null` means up to the context, as in vLLM.)"""
        if not isinstance(data, dict) or None not in data.values():
            return data
        fields = cls.model_fields
        return {key: value for key, value in data.items()
                if value is not None or key not in fields or fields[key].is_required()
                or type(None) in typing.get_args(fields[key].annotation)}


class RequestBody(OpenAIBase):
    """A top-level request body: strings in it must be valid Unicode, wherever they are."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data):
        where = lone_surrogate_path(data)
        if where is not None:
            raise ValueError(f"{where or 'the body'} holds a lone UTF-16 surrogate, which is not valid Unicode")
        return data


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- errors
class ErrorInfo(OpenAIBase):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBase):
    error: ErrorInfo


# ---------------------------------------------------------------- requests
class StreamOptions(OpenAIBase):
    include_usage: Bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict | None = Field(default=None, alias="schema")
    strict: Bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), json_object, or json_schema with a schema."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_for_json_schema(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise ValueError("type 'json_schema' needs json_schema.schema, a JSON schema object")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs request field. Options Serval doesn't implement are rejected, not ignored."""
    model_config = ConfigDict(extra="forbid")
    json_: dict | StrictStr | None = Field(default=None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None
    json_object: Bool | None = None


# vLLM's removed guided_* fields and the structured-output options Serval lacks: a client sending them expects
# a constraint, so ignoring them would silently return unconstrained text.
UNSUPPORTED_STRUCTURED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                 "guided_decoding_backend", "guided_whitespace_pattern", "guided_json_object",
                                 "structural_tag", "guided_options_request")


def unsupported_structured_field(data) -> str | None:
    """The first structured-output field of a raw body that Serval rejects, or None."""
    if isinstance(data, dict):
        return next((name for name in UNSUPPORTED_STRUCTURED_FIELDS if data.get(name) is not None), None)
    return None


def unsupported_structured_message(name: str) -> str:
    return (f"{name} is not supported; use structured_outputs with one of {', '.join(STRUCTURED_KINDS)}, "
            "or response_format")


class SamplingFields(RequestBody):
    """What completions and chat share: the sampling parameters and the stream switch."""
    model: StrictStr | None = None
    # Only n >= 1 here: the server bounds it from above (a setting, OpenAI's 128 by default).
    n: PositiveInt = 1
    temperature: Float | None = None
    top_p: Float | None = None
    top_k: Int | None = None
    min_p: Float | None = None
    seed: Seed | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    repetition_penalty: Float | None = None
    logit_bias: dict[str, Float] | None = None
    allowed_token_ids: TokenIds | None = None
    bad_words: BadWords | None = None
    ignore_eos: Bool = False
    min_tokens: Annotated[int, Field(strict=True, ge=0)] = 0
    skip_special_tokens: Bool = True
    # vLLM's; a slow tokenizer's option (fast tokenizers never put spaces there, as in transformers)
    spaces_between_special_tokens: Bool = True
    include_stop_str_in_output: Bool = False
    user: StrictStr | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    priority: Priority = 0
    cache_salt: CacheSalt | None = None

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported_structured_fields(cls, data):
        name = unsupported_structured_field(data)
        if name is not None:
            raise ValueError(unsupported_structured_message(name))
        return data

    @model_validator(mode="after")
    def _one_structured_constraint(self):
        wants_format = self.response_format is not None and self.response_format.type != "text"
        if wants_format and self.structured_outputs is not None:
            raise ValueError("give either response_format or structured_outputs, not both")
        if self.structured_outputs is not None:
            given = [k for k in STRUCTURED_KINDS if getattr(self.structured_outputs, k + ("_" if k == "json" else ""))
                     not in (None, False)]
            if len(given) != 1:
                raise ValueError(f"structured_outputs needs exactly one of {', '.join(STRUCTURED_KINDS)}; got "
                                 f"{given or 'none'}")
        return self

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        if self.response_format is not None and self.response_format.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.response_format is not None and self.response_format.type == "json_schema":
            return StructuredOutputsParams(json=self.response_format.json_schema.json_schema)
        so = self.structured_outputs
        if so is None:
            return None
        return StructuredOutputsParams(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                                       json_object=so.json_object)

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_keys_are_token_ids(cls, value):
        if value is None:
            return value
        for key, bias in value.items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys must be token ids (non-negative integers), got {key[:40]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must be in [-100, 100], got {bias} for token {key}")
        return value

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
        """Raises ValueError naming the argument for a value out of range (SamplingParams checks them)."""
        given = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                     presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                     repetition_penalty=self.repetition_penalty, allowed_token_ids=self.allowed_token_ids,
                     bad_words=self.bad_words)
        return SamplingParams(
            n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            skip_special_tokens=self.skip_special_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            structured_outputs=self.structured_outputs_params(),
            **{name: value for name, value in given.items() if value is not None})


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[TokenId] | list[TokenIds]
    # 0 with echo and logprobs scores the prompt and generates nothing (SamplingParams refuses it otherwise).
    max_tokens: NonNegativeInt | None = 16
    logprobs: Int | None = None
    echo: Bool = False
    truncate_prompt_tokens: TruncatePromptTokens | None = None
    return_token_ids: Bool = False  # vLLM's: each choice carries prompt_token_ids and token_ids
    _truncate = field_validator("truncate_prompt_tokens")(_keep_some_tokens)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_form(cls, value):
        """Checked before the union, so a bad token id is named once (pydantic would report every member of the
        union) and a list mixing forms is refused."""
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError("the prompt list is empty; give a string, strings, token ids or lists of token ids")
        if all(isinstance(item, list) for item in value):
            for index, ids in enumerate(value):
                _check_token_ids(ids, f"prompt[{index}]")
        elif not all(isinstance(item, str) for item in value):
            _check_token_ids(value, "prompt")
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs_range(cls, value):
        if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {value}")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(item, int) for item in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    def to_sampling_params(self) -> SamplingParams:
        # Echo with logprobs also scores the prompt, as OpenAI's legacy API did.
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling_params(self.max_tokens, self.logprobs, prompt_logprobs)


class TextPart(OpenAIBase):
    type: StrictStr
    text: StrictStr | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text" or self.text is None:
            raise ValueError(f"content part type {self.type!r} is not supported; allowed: 'text' with a 'text' field")
        return self


class ChatMessage(OpenAIBase, ToolCallMessageFields):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_call_id: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields, ToolRequestFields):
    messages: list[ChatMessage] = Field(min_length=1)
    parallel_tool_calls: Bool = True  # strict, as every flag of the body is here
    # extra variables for the chat template (vLLM's name), e.g. {"enable_thinking": false} for Qwen3
    chat_template_kwargs: dict | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: Bool = False
    top_logprobs: Int | None = None
    add_generation_prompt: Bool = True
    # vLLM's: the last (assistant) message is left open and the model continues it, as a prefill
    continue_final_message: Bool = False
    truncate_prompt_tokens: TruncatePromptTokens | None = None
    # vLLM's: the response carries prompt_token_ids (a stream: in its first chunk) and each choice token_ids
    return_token_ids: Bool = False
    _truncate = field_validator("truncate_prompt_tokens")(_keep_some_tokens)

    @model_validator(mode="after")
    def _continue_or_open_a_turn(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt to be false: the model either "
                             "continues the last message or starts a new turn")
        return self

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ValueError("top_logprobs needs logprobs to be true")
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        return self

    def template_messages(self) -> list[dict]:
        """Messages as chat templates expect them: content a string; 'developer' is OpenAI's new 'system'."""
        rendered = []
        for message in self.messages:
            item = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
            if message.name is not None:
                item["name"] = message.name
            if message.tool_call_id is not None:
                item["tool_call_id"] = message.tool_call_id
            rendered.append({**item, **tool_template_fields(message)})
        return rendered

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The body field the token limit came from, for errors about it (the context-length check): OpenAI's new
        name when it was sent. Its type and range errors name it already, at parse time."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def to_sampling_params(self) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(self.requested_max_tokens, logprobs)


class TokenizeRequest(RequestBody):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Bool = True
    add_generation_prompt: Bool = True
    chat_template_kwargs: dict | None = None  # with messages: rendered as chat renders them (vLLM's field)

    @model_validator(mode="after")
    def _one_of_prompt_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(RequestBody):
    model: StrictStr | None = None
    tokens: list[TokenId]


def _check_token_ids(ids, where: str) -> None:
    """A non-empty list of non-negative integers (not booleans), or ValueError naming the first bad one."""
    if not isinstance(ids, list) or not ids:
        raise ValueError(f"{where} must be a non-empty list of token ids")
    for index, token_id in enumerate(ids):
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise ValueError(f"{where}[{index}] must be a token id (an integer >= 0), got {str(token_id)[:40]}")


# ---------------------------------------------------------------- responses
class UsageInfo(OpenAIBase):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details={"cached_tokens": cached_tokens})


class CompletionLogprobs(OpenAIBase):
    """The legacy completions API's logprobs: parallel lists, one entry per token."""
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIBase):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids (a stream: in a choice's first chunk)
    token_ids: list[int] | None = None  # with return_token_ids: the generated ids (a stream: this chunk's)


class CompletionResponse(OpenAIBase):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(OpenAIBase):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIBase):
    content: list[TokenLogprob] | None = None


class ChatResponseMessage(OpenAIBase):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[AssistantToolCall] = Field(default_factory=list)


class ChatChoice(OpenAIBase):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # with return_token_ids: the generated ids, before any parsing


class ChatCompletionResponse(OpenAIBase):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids


class DeltaFunctionCall(OpenAIBase):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OpenAIBase):
    """A stream's piece of a tool call: the first for a call carries id, type and name, the rest arguments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(OpenAIBase):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(OpenAIBase):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None  # with return_token_ids: this chunk's generated ids


class ChatCompletionChunk(OpenAIBase):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids, in the stream's first chunk


class ModelCard(OpenAIBase):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "serval"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model (vLLM's)
    max_model_len: int | None = None


class ModelList(OpenAIBase):
    object: Literal["list"] = "list"
    data: list[ModelCard]
