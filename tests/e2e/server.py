"""Real `serval serve` processes for tests, and the tiny model they serve.

The tiny model is a random-weight Llama saved by transformers with the default model's tokenizer (and so its
chat template) beside it: text and chat work end to end, and a forward pass costs almost nothing on CPU.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import httpx

API_KEY = "test-key"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.cache
def tiny_model_dir() -> str:
    """Build once per test process: a 2-layer, 64-wide Llama with SmolLM2's 49,152-token tokenizer.
    SERVAL_TINY_MODEL_DIR names one built before, for machines without the default model (the GPU box)."""
    if os.environ.get("SERVAL_TINY_MODEL_DIR"):
        return os.environ["SERVAL_TINY_MODEL_DIR"]
    import torch
    import transformers

    from serval.model.default_model import default_model_path
    from tests.conftest import hf_gguf_tokenizer

    path = tempfile.mkdtemp(prefix="serval-tiny-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    gguf = default_model_path()
    tokenizer = hf_gguf_tokenizer(gguf)
    tokenizer.save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.08,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(process: subprocess.Popen, url: str, timeout: float, name: str, log_text,
                    needs_ok: bool = True) -> None:
    """Return once `url`/health answers (with 200 when needs_ok); raise with the log's tail if the process exits
    or the time runs out (the caller closes it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200 or not needs_ok:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{name} not ready after {timeout}s:\n{log_text()[-4000:]}")


def metric_samples(url: str) -> dict[tuple, float]:
    """(sample name, sorted label items) -> value, from url/metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def metric_sum(url: str, name: str, **labels) -> float:
    """Sum of the url/metrics samples called name whose labels include the given ones."""
    return sum(value for (sample, items), value in metric_samples(url).items()
               if sample == name and set(labels.items()) <= set(items))


def stop_process(process: subprocess.Popen, log_file, timeout: float) -> None:
    """Terminate (kill after timeout seconds), then delete its log."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log_file.close()
    os.unlink(log_file.name)


class RemoteServer:
    """`python -m serval.cli serve ARGS` on a free loopback port, ready when /health answers. `module` runs another
    entry point with the same arguments (tests/e2e/faulty_serve.py, which injects faults)."""

    def __init__(self, args: list[str], env: dict | None = None, api_key: str | None = None,
                 startup_timeout: float = 240.0, module: str = "serval.cli") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_file = tempfile.NamedTemporaryFile(prefix="serval-serve-", suffix=".log", delete=False)
        command = [sys.executable, "-m", module, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   *args]
        if api_key is not None:
            command += ["--api-key", api_key]
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                        env={**os.environ, **(env or {})})
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        try:
            wait_for_health(self.process, self.url, timeout, "serval serve", self.log_text)
        except TimeoutError:
            self.close()
            raise

    def client(self, **kwargs):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kwargs)

    def async_client(self, **kwargs):
        import openai
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0,
                                  **kwargs)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_text(self) -> str:
        with open(self.log_file.name, errors="replace") as f:
            return f.read()

    def log_records(self) -> list[dict]:
        records = []
        for line in self.log_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                records.append({"unparsed": line})
        return records

    def metrics(self) -> dict[tuple, float]:
        return metric_samples(self.url)

    def metric(self, name: str, **labels) -> float:
        return metric_sum(self.url, name, **labels)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """True once nothing runs or waits and the KV cache is empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.metric("serval:num_requests_running") == 0 and self.metric("serval:num_requests_waiting") == 0
                    and self.metric("serval:kv_cache_usage_perc") == 0):
                return True
            time.sleep(0.1)
        return False

    def wait_for_log(self, message: str, timeout: float = 60.0) -> dict:
        """The first log record whose message starts with `message`, once it is written."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.log_records():
                if str(record.get("message", "")).startswith(message):
                    return record
            time.sleep(0.1)
        raise AssertionError(f"no {message!r} log line after {timeout}s:\n{self.log_text()[-3000:]}")

    def close(self) -> None:
        stop_process(self.process, self.log_file, timeout=20)
