"""Start and stop real `tritonserver` processes from the nvidia-pytriton wheel.

The wheel ships the C++ server, the Python backend and a stub per Python minor version; the
stub must be copied next to the backend and run with the wheel's shared libraries on
LD_LIBRARY_PATH. This module owns that recipe so `serve`, the tests and the benchmarks start
Triton the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from python_backends.paths import MODEL_REPOSITORY, REPO_ROOT, TOOLS_DIR

DEFAULT_BACKEND_DIR = TOOLS_DIR / "triton" / "backends"


def pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise RuntimeError("nvidia-pytriton is not installed (run `make setup`)")
    return Path(spec.origin).parent / "tritonserver"


def pytriton_libs() -> Path:
    return pytriton_dir().parent.parent / "nvidia_pytriton.libs"


def prepare_backend_dir(backend_dir: Path = DEFAULT_BACKEND_DIR) -> Path:
    """Copy the Python backend and the stub for this interpreter into `backend_dir`."""
    source = pytriton_dir()
    python_dir = backend_dir / "python"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"the pytriton wheel has no Python-backend stub for Python {version}")
    marker = python_dir / ".stub-version"
    if marker.exists() and marker.read_text() == version:
        return backend_dir
    if python_dir.exists():
        shutil.rmtree(python_dir)
    shutil.copytree(source / "backends" / "python", python_dir)
    shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    marker.write_text(version)
    return backend_dir


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections and to bind(port 0)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


# Below the ephemeral range: no outgoing connection (a client's, a stub's) can take such a
# port between free_port() and the server's bind, as one can take a port that bind(0) chose.
_LISTEN_PORTS_FROM = 10000
_ports = random.Random()


def free_port(avoid: set[int] | None = None) -> int:
    """A port nothing listens on now, not in `avoid` (ports the caller has handed out but
    that nothing has bound yet), below the ephemeral range where it has room (else the
    kernel's choice, which may offer a just-released port again)."""
    avoid = avoid or set()
    low, _ = ephemeral_port_range()
    below = range(_LISTEN_PORTS_FROM, low) if low - _LISTEN_PORTS_FROM >= 1000 else None
    for _ in range(200):
        with socket.socket() as sock:
            if below is None:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            else:
                port = _ports.choice(below)
                if port in avoid:
                    continue
                try:
                    sock.bind(("0.0.0.0", port))
                except OSError:
                    continue
        if port not in avoid:
            return port
    raise RuntimeError("no free port found outside the ones already handed out")


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    libs = [str(pytriton_libs())]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    # The stub imports packages from whichever python is first on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = ":".join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if extra:
        env.update(extra)
    return env


def distinct_ports(*ports: int) -> tuple[int, ...]:
    """`ports`, with any repeat of an earlier one replaced by another free port (two
    `free_port()` calls can return the same just-released port)."""
    seen: set[int] = set()
    out = []
    for port in ports:
        if port in seen:
            port = free_port(avoid=seen)
        seen.add(port)
        out.append(port)
    return tuple(out)


@dataclass
class TritonServer:
    """One tritonserver process; `start()` then `wait_ready()`, `stop()` when done."""

    model_repository: Path = MODEL_REPOSITORY
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    models: Sequence[str] | None = None  # None: load every model in the repository
    extra_args: Sequence[str] = ()
    env: dict[str, str] | None = None
    log_path: Path | None = None
    exit_timeout_s: int = 5
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.http_port, self.grpc_port, self.metrics_port = distinct_ports(
            self.http_port, self.grpc_port, self.metrics_port)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        args = [
            str(pytriton_dir() / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={prepare_backend_dir()}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-verbose=0",
        ]
        if self.models is not None:
            args.append("--model-control-mode=explicit")
            args.extend(f"--load-model={name}" for name in self.models)
        return args + list(self.extra_args)

    def start(self) -> TritonServer:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        # A new session: Ctrl-C in the terminal reaches only our supervisor, which then
        # stops the server (and its stub processes) in order.
        self.process = subprocess.Popen(
            self.command(), env=server_env(self.env), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def is_ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = 180.0) -> TritonServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with code {self.process.returncode}; "
                    f"see {self.log_path or 'its output'}"
                )
            if self.is_ready():
                return self
            time.sleep(0.2)
        raise TimeoutError(f"tritonserver not ready within {timeout_s:.0f} s")

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL the whole process group if it outlives `timeout_s`.

        Default: twice the exit timeout (in-flight requests, then model unloading) plus 5 s.
        A client that keeps a gRPC stream open makes tritonserver 2.51 hang for ever once
        its exit timeout expires (its gRPC server waits for every open stream on exit), so
        waiting longer gains nothing.
        """
        proc = self.process
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        if timeout_s is None:
            timeout_s = 2 * self.exit_timeout_s + 5.0
        regions = _shm_regions(proc.pid)
        try:
            proc.send_signal(signal.SIGTERM)
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            # Stub processes share the group; none may outlive the server.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            # A killed stub leaves its shared-memory region behind (RAM in /dev/shm).
            for region in regions:
                region.unlink(missing_ok=True)
        return proc.wait()


def _shm_regions(pgid: int) -> list[Path]:
    """The Python-backend shared-memory regions of the stubs in this process group."""
    regions = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        regions += [Path("/dev/shm") / a.decode() for a in args
                    if a.startswith(b"triton_python_backend_shm_region_")]
    return regions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare Triton's backend directory.")
    parser.add_argument("--backend-dir", type=Path, default=DEFAULT_BACKEND_DIR)
    args = parser.parse_args(argv)
    path = prepare_backend_dir(args.backend_dir)
    print(f"tritonserver: {pytriton_dir() / 'bin' / 'tritonserver'}")
    print(f"python backend + stub {sys.version_info.major}.{sys.version_info.minor}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
