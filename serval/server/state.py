"""What every handler of one server shares: the engine, the settings, metrics and tracer, the guard, the worker
thread for CPU-heavy request work, and the server's lifecycle (serving, draining, stopped)."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from serval.guard.guard import Guard
from serval.model.generation_config import GenerationDefaults
from serval.lora.registry import LoRARegistry
from serval.server.config import ServerConfig
from serval.server.fan_in import FanIn
from serval.guard.session import GuardMetricsObserver
from serval.server.metrics import ServerMetrics
from serval.server.tracing import RequestTracer

logger = logging.getLogger(__name__)


class ServerState:
    def __init__(self, engine, config: ServerConfig, guard: Guard | None = None,
                 tracer: RequestTracer | None = None, generation_defaults: GenerationDefaults | None = None) -> None:
        self.engine = engine
        # The model's sampling defaults (--generation-config) for the fields a request leaves out.
        self.generation_defaults = generation_defaults
        self.config = config
        self.guard = guard
        self.tracer = tracer
        self.tokenizer = engine.tokenizer
        self.model_name = config.model_name
        self.max_model_len = engine.config.max_model_len
        self.metrics = ServerMetrics(self.model_name, engine.get_stats)
        # The LoRA adapters a request's `model` may name (--lora-modules, then the load/unload routes).
        self.loras = LoRARegistry(config.lora_modules, config.served_model_names)
        # Tokenization, chat templating and detokenization run here, off the event loop. One thread: a tokenizer
        # is not safe to use from several at once, and one keeps them in arrival order.
        self.cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="serval-tokenize")
        self.draining = False
        self.num_in_flight = 0  # HTTP requests inside the app, /health and /metrics excepted
        self.idle = asyncio.Event()
        self.idle.set()
        self.open_fan_ins: set[FanIn] = set()
        if guard is not None:
            guard.observers.append(GuardMetricsObserver(self.metrics.guard_decisions, self.metrics.guard_latency,
                                                        tracer.tracer if tracer is not None else None))
            self.metrics.add_key_usage(guard.keys)
        if api_key_ignored(config, guard):
            logger.warning("--api-key is ignored: the policy file's keys decide who may call",
                           extra={"policy": guard.policy.source})

    async def off_loop(self, function, *args, **kwargs):
        """Run CPU-heavy request work (tokenizing, templating, detokenizing) on the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu, partial(function, *args, **kwargs))

    def enter(self) -> None:
        self.num_in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.num_in_flight -= 1
        if self.num_in_flight == 0:
            self.idle.set()

    def close(self) -> None:
        self.cpu.shutdown(wait=False, cancel_futures=True)


def api_key_ignored(config: ServerConfig, guard: Guard | None) -> bool:
    return config.api_key is not None and guard is not None and guard.requires_keys
