"""One tritonserver for the whole integration session, plus what the tests share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from python_backends.paths import MODEL_REPOSITORY, default_model_dir
from python_backends.tools.triton_server import TritonServer

from .client import ENGINE_RUNNING, ENGINE_WAITING, read_metrics, wait_until

# `llm_bls` is `llm` set to call `engine` over BLS (engine_model), as it runs once a
# TensorRT-LLM engine replaces ours; `llm` itself runs its engine in process.
LLM_BLS = "llm_bls"
MODELS = ("engine", "llm", "preprocessing", "postprocessing", "ensemble", LLM_BLS)
# The engine that serves each model's requests, for its metrics.
ENGINE_OF = {"llm": "llm", LLM_BLS: "engine", "engine": "engine", "ensemble": "engine"}


def repository_with_llm_bls(root: Path) -> Path:
    """The project's model repository (symlinked) plus `llm_bls`."""
    for model in MODEL_REPOSITORY.iterdir():
        if (model / "config.pbtxt").exists():
            (root / model.name).symlink_to(model)
    bls = root / LLM_BLS
    bls.mkdir()
    (bls / "1").symlink_to(MODEL_REPOSITORY / "llm" / "1")
    config = (MODEL_REPOSITORY / "llm" / "config.pbtxt").read_text()
    old = 'parameters { key: "engine_model" value: { string_value: "" } }'
    assert old in config
    config = config.replace('name: "llm"', f'name: "{LLM_BLS}"').replace(
        old, old.replace('""', '"engine"'))
    (bls / "config.pbtxt").write_text(config)
    return root


@dataclass
class Stack:
    server: TritonServer
    log_path: str

    @property
    def url(self) -> str:
        return self.server.grpc_url

    def metrics(self, model: str = "engine") -> dict[str, float]:
        return read_metrics(self.server.metrics_port, model)

    def wait_engine_idle(self, model: str = "engine", deadline_s: float = 120.0
                         ) -> dict[str, float]:
        """Block until both engines (`engine`'s and `llm`'s) have nothing running or
        waiting; return the metrics of the one that serves `model`."""

        def idle() -> bool:
            return all(values.get(ENGINE_RUNNING) == 0 and values.get(ENGINE_WAITING, 0) == 0
                       for values in map(self.metrics, ("engine", "llm")))

        wait_until(idle, deadline_s, "the engines did not become idle")
        return self.metrics(ENGINE_OF[model])

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture(scope="session")
def stack(tmp_path_factory, model_dir) -> Iterator[Stack]:
    log_path = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    repository = repository_with_llm_bls(tmp_path_factory.mktemp("model_repository"))
    server = TritonServer(model_repository=repository, models=MODELS,
                          log_path=log_path).start()
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
