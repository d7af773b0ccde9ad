"""The server's settings (`serval serve`'s flags that are not engine arguments), validated once at the edge."""
from __future__ import annotations

from dataclasses import dataclass, field

from serval.openai.errors import InvalidArgument

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Large enough for a full 128k-token context as JSON text with room to spare, small enough that a hostile body is
# refused before it costs memory or parsing time.
DEFAULT_MAX_REQUEST_BODY_BYTES = 8 * 1024 * 1024
# OpenAI's own bound on `n`.
DEFAULT_MAX_N = 128
# Under Kubernetes' default 30 s termination grace period, so the drain ends before the kill.
DEFAULT_SHUTDOWN_TIMEOUT_S = 20.0
# Stored Responses API responses kept before the oldest are evicted.
DEFAULT_RESPONSES_MAX_STORED = 10_000
# apply_chat_template's own arguments: chat_template_kwargs may add template variables, not change the call.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})


@dataclass
class ServerConfig:
    """What `serve` needs besides the engine. Field names are the flags' (`--max-waiting-requests` →
    max_waiting_requests)."""
    host: str = "0.0.0.0"
    port: int = 8000
    served_model_names: list[str] = field(default_factory=lambda: [DEFAULT_MODEL_NAME])
    api_key: str | None = None
    max_waiting_requests: int | None = None
    otlp_traces_endpoint: str | None = None
    log_requests: bool = True
    access_log: bool = True
    log_level: str = "info"
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    max_n: int = DEFAULT_MAX_N
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    # /metrics answers without a key unless this is set: Prometheus scrapers are usually configured without one.
    metrics_require_key: bool = False
    # Tool calling and reasoning (vLLM's flags): which formats the model's output is parsed with.
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    # The Responses API's store: a SQLite file (kept across restarts), or memory when None.
    responses_store: str | None = None
    responses_max_stored: int = DEFAULT_RESPONSES_MAX_STORED
    # LoRA adapters served by name from the start (--lora-modules), and whether /v1/load_lora_adapter and
    # /v1/unload_lora_adapter may change them while serving (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING).
    lora_modules: list = field(default_factory=list)  # serval.lora.registry.LoRAModulePath
    allow_runtime_lora_updating: bool = False
    # vLLM's --default-chat-template-kwargs: template variables every chat request gets unless it sets them in its
    # own chat_template_kwargs (e.g. {"enable_thinking": false} for a Qwen3 served without thinking).
    default_chat_template_kwargs: dict = field(default_factory=dict)
    # vLLM's --disable-fastapi-docs: no /openapi.json (the /docs and /redoc pages are never served).
    disable_fastapi_docs: bool = False

    def __post_init__(self) -> None:
        self._check_output_parsers()
        if not self.served_model_names:
            raise InvalidArgument("served_model_names", "invalid served_model_names: give at least one name")
        if self.max_request_body_bytes < 1:
            raise InvalidArgument("max_request_body_bytes", "invalid max_request_body_bytes "
                                  f"{self.max_request_body_bytes}: must be a positive number of bytes")
        if self.max_n < 1:
            raise InvalidArgument("max_n", f"invalid max_n {self.max_n}: must be at least 1")
        if self.shutdown_timeout < 0:
            raise InvalidArgument("shutdown_timeout", f"invalid shutdown_timeout {self.shutdown_timeout}: must be "
                                  "zero or more seconds")
        if self.responses_max_stored < 1:
            raise InvalidArgument("responses_max_stored", "invalid responses_max_stored "
                                  f"{self.responses_max_stored}: must be at least 1")
        self._check_default_chat_template_kwargs()
        if self.max_waiting_requests is not None and self.max_waiting_requests < 1:
            raise InvalidArgument("max_waiting_requests", "invalid max_waiting_requests "
                                  f"{self.max_waiting_requests}: must be at least 1")

    @property
    def model_name(self) -> str:
        """The name the server reports; the others are aliases it answers to."""
        return self.served_model_names[0]

    def _check_default_chat_template_kwargs(self) -> None:
        kwargs = self.default_chat_template_kwargs
        if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
            raise InvalidArgument("default_chat_template_kwargs", "invalid default_chat_template_kwargs "
                                  f"{kwargs!r}: must be a JSON object of template variables")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
        if reserved:
            raise InvalidArgument("default_chat_template_kwargs", f"default_chat_template_kwargs may not set "
                                  f"{', '.join(reserved)}: they are arguments of each request, not template "
                                  "variables")

    def _check_output_parsers(self) -> None:
        # imported here: the parser registries are only needed once a server is configured
        from serval.openai.reasoning import get_reasoning_parser
        from serval.openai.tool_parsers import get_tool_parser

        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)
        if self.reasoning_parser is not None:
            get_reasoning_parser(self.reasoning_parser)
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise InvalidArgument("tool_call_parser", "--enable-auto-tool-choice needs --tool-call-parser NAME")
