"""The streaming chat client (`make chat`, `llm-chat`) against a real tritonserver."""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import sys
import termios
import time

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor

from python_backends.paths import REPO_ROOT, default_model_dir
from python_backends.tools import chat
from python_backends.tools.triton_server import TritonServer, free_port

SCRIPT = REPO_ROOT / "scripts" / "chat.py"
# Greedy and short: fast and deterministic.
FAST = ["--temperature", "0", "--max-tokens", "24"]


def run_script(*args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], input=stdin, capture_output=True, text=True,
        timeout=timeout, cwd=REPO_ROOT,
    )


# --- no server ----------------------------------------------------------------------------


def test_build_inputs() -> None:
    messages = [{"role": "user", "content": "hi"}]
    inputs = {t.name(): t for t in chat.build_inputs(messages, 24, temperature=0.0, seed=7)}
    assert {name: t.datatype() for name, t in inputs.items()} == {
        "text_input": "BYTES", "messages": "BYTES", "stream": "BOOL", "max_tokens": "INT32",
        "temperature": "FP32", "seed": "UINT64",
    }
    sent = deserialize_bytes_tensor(inputs["messages"]._get_content())
    assert json.loads(sent[0]) == messages
    assert np.frombuffer(inputs["max_tokens"]._get_content(), np.int32).tolist() == [24]


def test_unreachable_server_is_a_clear_error() -> None:
    result = run_script("--url", f"127.0.0.1:{free_port()}", "--prompt", "hi", timeout=60)
    assert result.returncode != 0
    assert "error: cannot reach Triton" in result.stderr
    assert "make serve" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --- with a server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (default_model_dir() / "tokenizer.json").exists():
        pytest.skip(f"no model in {default_model_dir()} (run scripts/setup.sh)")
    log = tmp_path_factory.mktemp("chat") / "tritonserver.log"
    srv = TritonServer(models=["engine", "llm"], log_path=log).start()
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.mark.server
def test_prompt_mode_keeps_history(server, monkeypatch, capsys) -> None:
    sent: list[list[dict[str, str]]] = []
    build = chat.build_inputs

    def spy(messages, *args, **kwargs):
        sent.append(json.loads(json.dumps(messages)))
        return build(messages, *args, **kwargs)

    monkeypatch.setattr(chat, "build_inputs", spy)
    first, second = "What is the capital of France?", "Repeat your previous answer in one word."
    code = chat.main(["--url", server.grpc_url, *FAST, "--prompt", first, "--prompt", second])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "Paris" in out.out
    assert len(sent) == 2
    assert sent[0] == [{"role": "user", "content": first}]
    answer = sent[1][1]["content"]
    assert "Paris" in answer
    assert sent[1] == [
        {"role": "user", "content": first},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": second},
    ]
    assert out.out.startswith(answer)


@pytest.mark.server
def test_system_prompt_and_cancel(server) -> None:
    """An answer cancelled mid-stream leaves no trace in the history; the next turn works."""
    client = chat.connect(server.grpc_url, "llm")
    try:
        conversation = chat.Chat(client, system="You are terse.", max_tokens=200)
        deltas: list[str] = []

        def interrupt(delta: str) -> None:
            deltas.append(delta)
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            conversation.ask("Tell me a long story about a dragon.", interrupt)
        assert len(deltas) == 1
        assert conversation.history == [{"role": "system", "content": "You are terse."}]
        conversation.max_tokens = 24
        reply = conversation.ask("What is the capital of France?")
        assert "Paris" in reply
        assert [m["role"] for m in conversation.history] == ["system", "user", "assistant"]
        conversation.reset()
        assert conversation.history == [{"role": "system", "content": "You are terse."}]
    finally:
        client.close()


@pytest.mark.server
def test_model_not_ready_is_a_clear_error(server) -> None:
    result = run_script("--url", server.grpc_url, "--model", "no_such_model", "--prompt", "hi")
    assert result.returncode != 0
    assert "model 'no_such_model' is not ready" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.server
def test_interactive_over_a_pipe(server) -> None:
    result = run_script("--url", server.grpc_url, *FAST, stdin="hello\n/reset\n/exit\n")
    assert result.returncode == 0, result.stderr
    prompts = result.stdout.split(">>> ")
    # banner, the answer to "hello", "(history cleared)", then /exit
    assert len(prompts) == 4, result.stdout
    assert prompts[1].strip(), "no answer streamed"
    assert "(history cleared)" in prompts[2]
    assert "Traceback" not in result.stderr


class Terminal:
    """The chat in a pseudo-terminal, so Ctrl-C reaches it as a real terminal's would."""

    def __init__(self, *args: str) -> None:
        master, slave = os.openpty()

        def own_terminal() -> None:  # after setsid: make the pty our controlling terminal
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args], stdin=slave, stdout=slave, stderr=slave,
            cwd=REPO_ROOT, start_new_session=True, preexec_fn=own_terminal,
        )
        os.close(slave)
        self.fd = master
        self.output = ""

    def expect(self, text: str, timeout: float = 60) -> str:
        """Read until `text` appears after what earlier calls consumed; return what came."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"no {text!r} within {timeout} s; got {self.output!r}")
            try:
                self.output += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:  # EIO: the child closed the terminal
                raise AssertionError(f"exited before {text!r}; got {self.output!r}") from None
        seen, _, self.output = self.output.partition(text)
        return seen

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def rest(self) -> str:
        """Everything still unread, once the child has exited."""
        while select.select([self.fd], [], [], 1)[0]:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: nothing more
                break
            if not chunk:
                break
            self.output += chunk.decode(errors="replace")
        return self.output

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


@pytest.mark.server
def test_interactive_ctrl_c_in_a_terminal(server) -> None:
    term = Terminal("--url", server.grpc_url, "--max-tokens", "1000")
    try:
        term.expect(">>> ")
        term.send("Write a very long essay about the history of Rome.\r")
        term.expect("Rome.\r\n")  # the echo of the line
        deadline = time.monotonic() + 60
        while not term.output.strip() and time.monotonic() < deadline:  # the answer streams
            if select.select([term.fd], [], [], 1)[0]:
                term.output += os.read(term.fd, 4096).decode(errors="replace")
        term.send("\x03")  # Ctrl-C while the answer streams: cancel it, back to the prompt
        term.expect("(answer cancelled)")
        term.expect(">>> ")
        term.send("hello\r")
        term.expect("hello\r\n")
        assert term.expect(">>> ").strip(), "no answer after the cancelled one"
        # At a person's pace: a Ctrl-C in the instant between the prompt's display and
        # input() waiting for a key is only seen at the next key (CPython's readline loop).
        time.sleep(0.5)
        term.send("\x03")  # Ctrl-C at the prompt: exit cleanly
        assert term.proc.wait(timeout=30) == 0
        assert "Traceback" not in term.rest()
    finally:
        term.close()
