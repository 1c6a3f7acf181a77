"""One tritonserver for the whole integration session, plus what the tests share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from python_backends.paths import default_model_dir
from python_backends.tools.triton_server import TritonServer

from .client import ENGINE_RUNNING, ENGINE_WAITING, read_metrics, wait_until

MODELS = ("engine", "llm", "preprocessing", "postprocessing", "ensemble")


@dataclass
class Stack:
    server: TritonServer
    log_path: str

    @property
    def url(self) -> str:
        return self.server.grpc_url

    def metrics(self, model: str = "engine") -> dict[str, float]:
        return read_metrics(self.server.metrics_port, model)

    def wait_engine_idle(self, deadline_s: float = 120.0) -> dict[str, float]:
        """Block until the engine has nothing running or waiting; return the metrics."""

        def idle() -> bool:
            values = self.metrics()
            return values.get(ENGINE_RUNNING) == 0 and values.get(ENGINE_WAITING, 0) == 0

        wait_until(idle, deadline_s, "the engine did not become idle")
        return self.metrics()

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture(scope="session")
def stack(tmp_path_factory, model_dir) -> Iterator[Stack]:
    log_path = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = TritonServer(models=MODELS, log_path=log_path).start()
    stack = Stack(server, str(log_path))
    try:
        server.wait_ready(timeout_s=300)
    except Exception as exc:
        server.stop()
        pytest.fail(f"tritonserver did not start: {exc}\n{stack.log_tail()}")
    try:
        yield stack
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from python_backends.text import load_tokenizer

    return load_tokenizer(default_model_dir())
