"""Interactive streaming chat with the `llm` model over Triton's gRPC API.

Each turn sends the whole conversation as `messages` (JSON), so the model's chat template
sees the history, and prints the reply's delta text as it streams. Commands: /reset clears
the history, /exit (or Ctrl-D) quits. Ctrl-C while an answer streams cancels that answer;
Ctrl-C at the prompt quits. `--prompt TEXT` (repeatable) runs those turns without asking,
prints each answer and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

HINT = "Is the serving stack running? Start it with `make serve`."


class ChatError(Exception):
    """A failure to report in one line: no server, no model, or an error for a turn."""


def _input(name: str, value: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(value.shape), datatype)
    tensor.set_data_from_numpy(value)
    return tensor


def build_inputs(
    messages: list[dict[str, str]],
    max_tokens: int = 256,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> list[grpcclient.InferInput]:
    """The `llm` request for one streamed turn over the whole conversation `messages`."""
    def text(value: str) -> np.ndarray:
        return np.array([value.encode()], dtype=object)

    # text_input is required by the model's config; with `messages` the model ignores it.
    inputs = [
        _input("text_input", text(messages[-1]["content"]), "BYTES"),
        _input("messages", text(json.dumps(messages)), "BYTES"),
        _input("stream", np.array([True]), "BOOL"),
        _input("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32"),
    ]
    if temperature is not None:
        inputs.append(_input("temperature", np.array([temperature], dtype=np.float32), "FP32"))
    if top_p is not None:
        inputs.append(_input("top_p", np.array([top_p], dtype=np.float32), "FP32"))
    if seed is not None:
        inputs.append(_input("seed", np.array([seed], dtype=np.uint64), "UINT64"))
    return inputs


def stream_turn(
    client: grpcclient.InferenceServerClient,
    model: str,
    inputs: list[grpcclient.InferInput],
    on_delta: Callable[[str], None] = lambda delta: None,
    request_id: str = "",
    timeout_s: float = 120.0,
) -> str:
    """Send one request on a fresh stream and return its text, calling `on_delta` per piece.

    Ctrl-C (KeyboardInterrupt) cancels the request on the server and propagates; a server
    error raises ChatError. The stream is closed either way, so the next turn starts clean.
    """
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    cancel = True
    try:
        client.async_stream_infer(
            model, inputs, request_id=request_id, enable_empty_final_response=True
        )
        parts: list[str] = []
        deadline = time.monotonic() + timeout_s
        while True:
            # Short waits: a Ctrl-C that the OS hands to one of gRPC's threads only reaches
            # the main thread as KeyboardInterrupt once it runs Python code again.
            try:
                result, error = responses.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise ChatError(
                        f"no response from the server within {timeout_s:.0f} s") from None
                continue
            deadline = time.monotonic() + timeout_s
            if error is not None:
                raise ChatError(f"the server returned an error: {_message(error)}")
            output = result.as_numpy("text_output")
            if output is not None and output.size:
                delta = b"".join(output.reshape(-1)).decode("utf-8", errors="replace")
                parts.append(delta)
                on_delta(delta)
            params = result.get_response().parameters
            if "triton_final_response" in params and params["triton_final_response"].bool_param:
                cancel = False
                return "".join(parts)
    finally:
        client.stop_stream(cancel_requests=cancel)


def _message(error: Exception) -> str:
    if isinstance(error, InferenceServerException):
        return error.message() or str(error)
    return str(error)


def connect(url: str, model: str, timeout_s: float = 5.0) -> grpcclient.InferenceServerClient:
    """A client for `url` whose server is live and whose `model` is ready, else ChatError."""
    try:
        client = grpcclient.InferenceServerClient(url)
        live = client.is_server_live(client_timeout=timeout_s)
    except InferenceServerException as exc:
        raise ChatError(f"cannot reach Triton at {url}: {_message(exc)}\n{HINT}") from None
    if not live:
        raise ChatError(f"Triton at {url} is not live.\n{HINT}")
    try:
        ready = client.is_model_ready(model, client_timeout=timeout_s)
    except InferenceServerException as exc:
        raise ChatError(
            f"cannot ask Triton at {url} about model '{model}': {_message(exc)}"
        ) from None
    if not ready:
        raise ChatError(f"model '{model}' is not ready on Triton at {url}.\n{HINT}")
    return client


@dataclass
class Chat:
    """A conversation: the history and the options each turn is sent with."""

    client: grpcclient.InferenceServerClient
    model: str = "llm"
    system: str | None = None
    max_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=itertools.count, init=False, repr=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str, on_delta: Callable[[str], None] = lambda delta: None) -> str:
        """One turn. The history keeps it only when the answer completes."""
        messages = [*self.history, {"role": "user", "content": text}]
        inputs = build_inputs(
            messages, self.max_tokens, self.temperature, self.top_p, self.seed
        )
        reply = stream_turn(
            self.client, self.model, inputs, on_delta, request_id=f"chat-{next(self._ids)}"
        )
        self.history = [*messages, {"role": "assistant", "content": reply}]
        return reply


def _print_delta(delta: str) -> None:
    sys.stdout.write(delta)
    sys.stdout.flush()


def run_prompts(chat: Chat, prompts: list[str]) -> int:
    for prompt in prompts:
        try:
            chat.ask(prompt, _print_delta)
        except ChatError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\n(cancelled)", file=sys.stderr)
            return 130
        print(flush=True)
    return 0


def run_interactive(chat: Chat) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    print(f"Chatting with '{chat.model}'. /reset clears the history, /exit or Ctrl-D quits; "
          "Ctrl-C stops an answer.", flush=True)
    while True:
        try:
            line = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            chat.reset()
            print("(history cleared)", flush=True)
            continue
        try:
            chat.ask(line, _print_delta)
            print(flush=True)
        except KeyboardInterrupt:
            print("\n(answer cancelled)", flush=True)
        except ChatError as exc:
            print(f"\nerror: {exc}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llm-chat", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url", default="localhost:8001", help="Triton gRPC address (default localhost:8001)"
    )
    parser.add_argument("--model", default="llm", help="model name (default llm)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=256, help="per answer (default 256)")
    parser.add_argument("--temperature", type=float, help="0 is greedy (the model's default)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--prompt", action="append", default=[],
        help="ask this, print the answer and exit; repeat for more turns of one chat",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # A shell starts background jobs with SIGINT ignored, and Python then installs no
        # KeyboardInterrupt handler: Ctrl-C must stop an answer however we were started.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        client = connect(args.url, args.model)
    except ChatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    chat = Chat(
        client, args.model, args.system, args.max_tokens, args.temperature, args.top_p,
        args.seed,
    )
    try:
        return run_prompts(chat, args.prompt) if args.prompt else run_interactive(chat)
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
