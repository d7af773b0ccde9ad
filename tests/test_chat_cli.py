"""`serval chat` / `serval complete` driven through a pseudo-terminal, as a person types: against a real server
(the streamed answer is the server's own answer to the same conversation; /reset starts over, /exit leaves) and,
with no server at --url, with the model loaded in the process (greedy: the same text as the server's)."""
import os
import pty
import select
import sys
import time

import httpx
import pytest

from tests.e2e.server import REPO_ROOT, RemoteServer, free_port, tiny_model_dir

MODEL = "tiny"
ANSWER_TOKENS = 8
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "256", "--served-model-name", MODEL])
    yield remote
    remote.close()


class Terminal:
    """A command on a pseudo-terminal: lines typed in, everything it writes read back (with the echo)."""

    def __init__(self, *args: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the command, run from the repository as a user would
            os.chdir(REPO_ROOT)
            os.execv(sys.executable, [sys.executable, "-m", "serval.cli", *args])
        self.output = ""

    def read_until(self, text: str, start: int) -> str:
        """What was written from `start` until `text` appears after it."""
        deadline = time.monotonic() + TIMEOUT_S
        while text not in self.output[start:]:
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.output[-2000:]}"
            ready, _, _ = select.select([self.fd], [], [], 1.0)
            if ready:
                try:
                    self.output += os.read(self.fd, 4096).decode(errors="replace").replace("\r\n", "\n")
                except OSError:  # the child closed the terminal
                    break
        return self.output[start:]

    def turn(self, line: str) -> str:
        """Type a line; what the command wrote until its next prompt, without the echo."""
        start = len(self.output)
        os.write(self.fd, (line + "\n").encode())
        written = self.read_until("\n> ", start + len(line) + 1)
        return written[:written.rindex("\n> ")]

    def exit_code(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def server_answer(server: RemoteServer, messages: list[dict]) -> str:
    response = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": messages, "temperature": 0, "max_tokens": ANSWER_TOKENS})
    return response.json()["choices"][0]["message"]["content"]


def request_prompt_tokens(server: RemoteServer) -> list[int]:
    return [record["prompt_tokens"] for record in server.log_records()
            if record.get("message") == "request finished" and record.get("operation") == "chat"]


def test_chat_streams_the_servers_answer_and_resets(server):
    terminal = Terminal("chat", "--url", server.url + "/v1", "--temperature", "0", "--max-tokens",
                        str(ANSWER_TOKENS))
    terminal.read_until("> ", 0)
    first = terminal.turn("hello")
    second = terminal.turn("hello")
    assert terminal.turn("/reset") == "(conversation reset)"
    third = terminal.turn("hello")
    os.write(terminal.fd, b"/exit\n")
    assert terminal.exit_code() == 0
    answer = server_answer(server, [{"role": "user", "content": "hello"}])
    assert first == answer and third == answer
    assert second == server_answer(server, [{"role": "user", "content": "hello"},
                                            {"role": "assistant", "content": first},
                                            {"role": "user", "content": "hello"}])
    chat_prompts = request_prompt_tokens(server)
    assert chat_prompts[0] == chat_prompts[2] < chat_prompts[1]  # the third turn started over


def test_complete_streams_the_servers_completion(server):
    terminal = Terminal("complete", "--url", server.url + "/v1", "--temperature", "0", "--max-tokens",
                        str(ANSWER_TOKENS))
    terminal.read_until("> ", 0)
    completion = terminal.turn("The capital of France is")
    os.write(terminal.fd, b"/exit\n")
    assert terminal.exit_code() == 0
    expected = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "The capital of France is", "temperature": 0, "max_tokens": ANSWER_TOKENS})
    assert completion == expected.json()["choices"][0]["text"]


def test_without_a_server_the_model_runs_here(server):
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    terminal = Terminal("chat", "--url", nobody, "--model", tiny_model_dir(), "--max-model-len", "256",
                        "--temperature", "0", "--max-tokens", str(ANSWER_TOKENS))
    assert "No server at" in terminal.read_until("> ", 0)
    answer = terminal.turn("hello")
    os.write(terminal.fd, b"/exit\n")
    assert terminal.exit_code() == 0
    assert answer == server_answer(server, [{"role": "user", "content": "hello"}])
