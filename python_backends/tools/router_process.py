"""Start and stop the router (`python -m router`) as a process, as serve, tests and
benchmarks do."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from python_backends.paths import REPO_ROOT
from python_backends.tools.triton_server import distinct_ports, free_port


@dataclass
class RouterProcess:
    instances: Sequence[str]  # "host:port" or "host:port,metrics_host:metrics_port"
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    extra_args: Sequence[str] = ()
    host: str = "127.0.0.1"
    log_path: Path | None = None
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.grpc_port, self.metrics_port = distinct_ports(self.grpc_port, self.metrics_port)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "router", "--host", self.host,
                "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port)]
        for instance in self.instances:
            args += ["--instance", instance]
        return args + list(self.extra_args)

    def start(self) -> RouterProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(self.command(), cwd=REPO_ROOT, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def health(self) -> tuple[int, dict] | None:
        try:
            with urllib.request.urlopen(f"{self.admin_url}/health", timeout=2) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except OSError:
            return None

    def wait_ready(self, healthy_instances: int = 1, timeout_s: float = 60.0) -> RouterProcess:
        """Until the router answers and at least `healthy_instances` instances are healthy."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the router exited with code {self.process.returncode}; "
                                   f"see {self.log_path or 'its output'}")
            answer = self.health()
            if answer is not None and answer[1].get("healthy_instances", 0) >= healthy_instances:
                return self
            time.sleep(0.2)
        raise TimeoutError(f"the router was not ready within {timeout_s:.0f} s")

    def admin(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.admin_url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.admin_url}/metrics", timeout=5) as response:
            return response.read().decode()

    def stop(self, timeout_s: float = 15.0) -> int | None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
