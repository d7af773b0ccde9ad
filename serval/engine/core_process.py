"""The engine core in its own process (vLLM V1's EngineCore): LLMEngine and its step loop, fed by a connection to
the API process (serval.engine.core_client), with no event loop to share the GIL with.

Two threads, as in the in-process AsyncEngine: the main thread steps; a receiver thread reads the connection,
turns each request into the engine's RequestState (grammar states, the LoRA adapter read from disk), answers
blocking calls (add_lora, ...) and queues requests, aborts and the profiler's calls for the step loop, which alone
touches the scheduler. After every step the loop sends one message: the step's outputs as deltas (the engine
builds them: LLMEngine(delta_outputs=True)) and the engine's stats; an output thread pickles and sends it.

The core lives only as long as its parent: the connection closes when the parent exits or dies (even kill -9), and
the receiver then stops the loop. Ctrl-C reaches the whole process group; the core ignores it and lets the API
process drain and stop it.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from serval.config import EngineConfig
from serval.engine import core_messages as messages
from serval.engine.async_engine import _HANDOFF_TIMEOUT_S, ENGINE_SWITCH_INTERVAL_S, ArrivalGate
from serval.engine.engine import LLMEngine
from serval.engine.profiler import host_range

logger = logging.getLogger(__name__)

# How long the loop may take to stop once told (its step ends first); then the process exits regardless.
_STOP_GRACE_S = 10.0


@dataclass
class CoreArgs:
    connection: Connection
    config: EngineConfig
    log_level: int
    log_formatter: logging.Formatter | None


def core_main(args: CoreArgs) -> None:
    """The process's entry point (started from multiprocessing's fork server: serval.distributed.processes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _configure_logging(args.log_level, args.log_formatter)
    connection = args.connection
    if args.config.torch_device().type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # One core left to the API process. torch's intra-op threads meet at a barrier after every op; with one
        # on each core, the API process's streaming preempts one of them and the rest wait for it (measured on 2
        # cores: steps 7x slower than with one thread, or than the in-process engine, which streams between steps).
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
    try:
        engine = LLMEngine(args.config, delta_outputs=True)
    except BaseException as error:  # noqa: BLE001 - whatever stops the start goes to the user, not a hang
        if not isinstance(error, (ValueError, FileNotFoundError)):
            logger.exception("engine core failed to start")
        connection.send_bytes(messages.dumps([messages.StartupFailed(messages.PortableError.of(error))]))
        connection.close()
        return
    if engine.device.type == "cuda":  # see serval.engine.async_engine: the receiver thread takes the GIL too
        sys.setswitchinterval(min(sys.getswitchinterval(), ENGINE_SWITCH_INTERVAL_S))
    core = EngineCore(engine, connection)
    logger.info("engine core process ready", extra={"pid": os.getpid(), "parent_pid": os.getppid()})
    exit_code = core.run()
    connection.close()
    logging.shutdown()
    os._exit(exit_code)  # torch's teardown takes seconds and holds nothing worth waiting for


class EngineCore:
    def __init__(self, engine: LLMEngine, connection: Connection) -> None:
        self.engine = engine
        self.connection = connection
        self.send_lock = threading.Lock()
        # ("add", RequestState) | ("abort", id) | ("error", RequestError) | ("call", CallRequest) | ("stop", None)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        # Steps' messages for the output thread: ("step", StepMessage) | ("died", CoreDied) | ("stop", None)
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.num_added = 0  # sequences taken in (or refused), for the API process's num_waiting
        self.pending_errors: list[messages.RequestError] = []
        self.changed = False  # something the API process should hear about since the last message
        self.stopping = threading.Event()
        self.gate = ArrivalGate()
        # On CPU, wait for the API process to take a step's outputs before the next step (StepMessage.step).
        self.wait_for_handoff = engine.device.type == "cpu"
        self.num_steps = 0
        self.taken_step = -1
        self.taken = threading.Condition()

    def run(self) -> int:
        receiver = threading.Thread(target=self._receive, name="serval-core-receiver", daemon=True)
        receiver.start()
        output_thread = threading.Thread(target=self._send_outputs, name="serval-core-output", daemon=True)
        output_thread.start()
        self._send([messages.CoreReady(
            os.getpid(), self.engine.config, self.engine.tokenizer is not None, self.engine.vocab_size,
            self.engine.eos_token_id, self.engine.pooling_task,
            self.engine.pooling.prompts if self.engine.pooling is not None else None, self.engine.memory_usage(),
            self.engine.get_stats())])
        try:
            self._loop()
            return 0
        except BaseException as error:  # noqa: BLE001 - the engine is broken: say so, then exit
            logger.exception("engine core loop died")
            self.outbox.put(("died", messages.CoreDied(messages.PortableError.of(error))))
            return 1
        finally:
            self.outbox.put(("stop", None))
            output_thread.join(timeout=_STOP_GRACE_S)
            self._stop_engine()

    def _stop_engine(self) -> None:
        timer = threading.Timer(_STOP_GRACE_S, os._exit, args=(1,))
        timer.daemon = True
        timer.start()
        self.engine.shutdown()  # tensor-parallel workers stop with the core
        timer.cancel()

    # ---- the step loop (main thread) ----
    def _loop(self) -> None:
        engine = self.engine
        while not self.stopping.is_set():
            idle = not engine.has_unfinished_requests()
            self._drain(block=idle)
            if self.stopping.is_set():
                return
            if idle and engine.has_unfinished_requests():
                self.gate.gather(self.inbox, self._handle)
            if engine.has_unfinished_requests():
                started = time.monotonic()
                outputs = engine.step()
                self.gate.observe_step(time.monotonic() - started)
                with host_range("serval.send_step"):
                    self._send_step(outputs)
            elif self.changed:  # aborts and refusals while idle: the stats moved
                self._send_step([])

    def _drain(self, block: bool) -> None:
        while True:
            try:
                kind, payload = self.inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            self._handle(kind, payload)

    def _handle(self, kind: str, payload) -> None:
        self.changed = True
        if kind == "add":
            state, num_sequences = payload
            try:
                self.engine.add_processed(state)
            except ValueError as error:  # a request id already running
                self.pending_errors.append(messages.RequestError(state.request_id, messages.PortableError.of(error)))
            self.num_added += num_sequences
        elif kind == "abort":
            self.engine.abort_request(payload)
        elif kind == "error":
            error, num_sequences = payload
            self.pending_errors.append(error)
            self.num_added += num_sequences
        elif kind == "call":
            self._answer(payload)
        elif kind == "stop":
            self.stopping.set()

    def _send_step(self, outputs: list) -> None:
        """Hand the step's outputs, and the stats as they are now, to the output thread."""
        errors, self.pending_errors = self.pending_errors, []
        self.changed = False
        step = self.num_steps if self.wait_for_handoff and (outputs or errors) else None
        self.num_steps += 1
        self.outbox.put(("step", messages.StepMessage(outputs, errors, self.engine.get_stats(), self.num_added,
                                                      step)))
        if step is not None:
            with self.taken:
                self.taken.wait_for(lambda: self.taken_step >= step, timeout=_HANDOFF_TIMEOUT_S)

    # ---- the output thread ----
    def _send_outputs(self) -> None:
        """Pickle and send each step's message. On its own thread so that this work overlaps the next step's
        device time (the step loop waits on the GPU without the GIL) instead of delaying its launch."""
        while True:
            kind, payload = self.outbox.get()
            if kind == "step":
                with host_range("serval.encode_send"):  # the name earlier profiles used, so they compare
                    self._try_send([payload])
            elif kind == "died":
                self._try_send([payload])
            else:
                return

    # ---- the receiver thread ----
    def _receive(self) -> None:
        while True:
            try:
                batch = messages.loads(self.connection.recv_bytes())
            except (EOFError, OSError):  # the API process is gone: nobody will read another output
                logger.info("engine core: the API process closed the connection; stopping")
                self.inbox.put(("stop", None))
                return
            for message in batch:
                self._receive_one(message)

    def _receive_one(self, message) -> None:
        if isinstance(message, messages.AddRequest):
            num_sequences = getattr(message.params, "n", 1)
            try:
                with host_range("serval.process_inputs"):
                    state = self.engine.process_inputs(message.request_id, message.prompt, message.params,
                                                       message.priority, message.arrival_time,
                                                       message.lora_request)
            except Exception as error:  # noqa: BLE001 - one bad request, not the core
                self.inbox.put(("error", (messages.RequestError(message.request_id,
                                                                messages.PortableError.of(error)), num_sequences)))
                return
            self.inbox.put(("add", (state, num_sequences)))
        elif isinstance(message, messages.StepTaken):
            with self.taken:
                self.taken_step = max(self.taken_step, message.step)
                self.taken.notify()
        elif isinstance(message, messages.AbortRequest):
            self.inbox.put(("abort", message.request_id))
        elif isinstance(message, messages.CallRequest):
            if message.method in _STEP_THREAD_CALLS:
                self.inbox.put(("call", message))
            else:
                self._answer(message)
        elif isinstance(message, messages.Shutdown):
            self.inbox.put(("stop", None))

    def _answer(self, call: messages.CallRequest) -> None:
        try:
            result = _CALLS[call.method](self.engine, call.argument)
            reply = messages.CallReply(call.call_id, result)
        except Exception as error:  # noqa: BLE001 - the caller raises it
            reply = messages.CallReply(call.call_id, None, messages.PortableError.of(error))
        self._try_send([reply])

    # ---- sending (both threads) ----
    def _send(self, batch: list) -> None:
        data = messages.dumps(batch)
        with self.send_lock:
            self.connection.send_bytes(data)

    def _try_send(self, batch: list) -> None:
        try:
            self._send(batch)
        except (OSError, ValueError):  # the API process is gone
            pass


def _warm_grammar_compiler(engine: LLMEngine, _argument) -> None:
    engine.grammar_compiler().ll_tokenizer


_CALLS = {
    "start_profile": lambda engine, trace_dir: engine.start_profile(trace_dir),
    "stop_profile": lambda engine, _argument: engine.stop_profile(),
    "add_lora": lambda engine, lora_request: engine.add_lora(lora_request),
    "remove_lora": lambda engine, lora_int_id: engine.remove_lora(lora_int_id),
    "warm_grammar_compiler": _warm_grammar_compiler,
}

# Answered by the step loop between steps, not by the receiver: torch's profiler records the thread that starts it.
_STEP_THREAD_CALLS = frozenset({"start_profile", "stop_profile"})


def _configure_logging(level: int, formatter: logging.Formatter | None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if formatter is not None:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
