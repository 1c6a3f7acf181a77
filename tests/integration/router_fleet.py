"""Real tritonserver instances and a real router process, for the router's tests.

The instances serve the trivial `echo` models of tests/model_repository, which answer with
the name of the instance that served them (INSTANCE_NAME), so a test sees every routing
decision in the responses.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from python_backends.paths import REPO_ROOT
from python_backends.tools.router_process import RouterProcess
from python_backends.tools.triton_server import TritonServer
from router import dataplane

from .client import i32, text

ECHO_REPOSITORY = REPO_ROOT / "tests" / "model_repository"
ECHO_MODELS = ("echo", "echo_stream")


@dataclass
class EchoFleet:
    """Named instances; `names[address]` tells which one served a response."""

    log_dir: Path
    servers: dict[str, TritonServer] = field(default_factory=dict)

    def start(self, names: Sequence[str]) -> EchoFleet:
        for name in names:
            self.servers[name] = self._server(name).start()
        for server in self.servers.values():
            server.wait_ready(timeout_s=120)
        return self

    def _server(self, name: str, like: TritonServer | None = None) -> TritonServer:
        ports = {} if like is None else {"http_port": like.http_port,
                                         "grpc_port": like.grpc_port,
                                         "metrics_port": like.metrics_port}
        return TritonServer(model_repository=ECHO_REPOSITORY, models=ECHO_MODELS,
                            env={"INSTANCE_NAME": name},
                            log_path=self.log_dir / f"triton-{name}.log", **ports)

    def urls(self, names: Sequence[str] | None = None) -> list[str]:
        return [self.servers[n].grpc_url for n in (names or list(self.servers))]

    def name_of(self, address: str) -> str:
        return next(n for n, s in self.servers.items() if s.grpc_url == address)

    def kill(self, name: str) -> None:
        """SIGKILL the whole instance (server and stubs), as a crash would."""
        server = self.servers[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
        server.stop()  # cleans up the stubs' shared memory

    def restart(self, name: str) -> None:
        """A fresh process on the same ports."""
        self.servers[name] = self._server(name, like=self.servers[name]).start()
        self.servers[name].wait_ready(timeout_s=120)

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


@contextlib.contextmanager
def running_router(instances: Sequence[str], log_dir: Path, *args: str,
                   healthy: int | None = None) -> Iterator[RouterProcess]:
    router = RouterProcess(instances=list(instances), extra_args=["--health-interval", "0.5",
                                                                   *args],
                           log_path=log_dir / "router.log")
    router.start()
    try:
        router.wait_ready(healthy_instances=len(instances) if healthy is None else healthy)
        yield router
    finally:
        router.stop()


# Both ways the router carries inference bytes; tests that take `data_plane` run with each.
DATA_PLANES = [
    pytest.param("native", marks=pytest.mark.skipif(
        not dataplane.available(),
        reason=f"native data plane not built: {dataplane.IMPORT_ERROR}")),
    "python",
]


def echo_inputs(prompt: str = "hello", delay_ms: int = 0, count: int | None = None) -> list:
    inputs = [text("text_input", prompt), i32("delay_ms", delay_ms)]
    if count is not None:
        inputs.append(i32("count", count))
    return inputs


def served_by(result: grpcclient.InferResult) -> str:
    return result.as_numpy("instance")[0].decode()


def echo(client: grpcclient.InferenceServerClient, prompt: str = "hello", **kwargs
         ) -> grpcclient.InferResult:
    delay_ms = kwargs.pop("delay_ms", 0)
    return client.infer("echo", echo_inputs(prompt, delay_ms), **kwargs)


def echoed_text(result: grpcclient.InferResult) -> str:
    return b"".join(np.asarray(result.as_numpy("text_output")).reshape(-1)).decode()
