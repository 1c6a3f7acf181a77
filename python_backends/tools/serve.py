"""Run the local serving stack in the foreground until Ctrl-C.

Today the stack is one or more `tritonserver` processes serving model_repository/. The first
instance listens on the usual Triton ports (HTTP 8000, gRPC 8001, metrics 8002) so Triton
clients, perf_analyzer and GenAI-Perf work unchanged; further instances take the next free
ports. The router (a later step) will take the usual ports in front of them.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from pathlib import Path

from python_backends.paths import CACHE_DIR, MODEL_REPOSITORY, REPO_ROOT, default_model_dir
from python_backends.tools.triton_server import TritonServer, free_port

DEFAULT_MODELS = ("engine", "llm", "preprocessing", "postprocessing", "ensemble")


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make serve", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="metrics (default 8002)")
    parser.add_argument("--instances", type=int, default=1,
                        help="tritonserver processes (default 1); extra ones on free ports")
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated models to load (default: %(default)s)")
    parser.add_argument("--log-dir", type=Path, default=CACHE_DIR / "logs",
                        help="where each instance writes its log (default: %(default)s)")
    parser.add_argument("--ready-timeout", type=float, default=300.0,
                        help="seconds to wait for every instance to be ready")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.instances < 1:
        print("error: --instances must be at least 1", file=sys.stderr)
        return 2
    for name, port in (("HTTP", args.http_port), ("gRPC", args.grpc_port),
                       ("metrics", args.metrics_port)):
        if port_in_use(port):
            print(f"error: the {name} port {port} is already in use; stop what holds it or "
                  f"pass --{name.lower()}-port", file=sys.stderr)
            return 2
    args.log_dir.mkdir(parents=True, exist_ok=True)
    models = [m for m in args.models.split(",") if m]
    servers = []
    for i in range(args.instances):
        ports = ((args.http_port, args.grpc_port, args.metrics_port) if i == 0
                 else (free_port(), free_port(), free_port()))
        servers.append(TritonServer(
            model_repository=args.model_repository, http_port=ports[0], grpc_port=ports[1],
            metrics_port=ports[2], models=models, log_path=args.log_dir / f"triton-{i}.log",
        ))

    stopping = False

    def request_stop(signum, _frame):
        nonlocal stopping
        if stopping:
            return
        stopping = True
        print(f"\n{signal.Signals(signum).name}: stopping the stack ...", flush=True)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        for i, server in enumerate(servers):
            print(f"starting tritonserver #{i} (log: {server.log_path}) ...", flush=True)
            server.start()
        started = time.monotonic()
        for i, server in enumerate(servers):
            while not stopping:
                remaining = args.ready_timeout - (time.monotonic() - started)
                try:
                    server.wait_ready(timeout_s=min(2.0, max(remaining, 0.1)))
                    break
                except TimeoutError:
                    if remaining <= 0:
                        raise
                    print(f"  waiting for #{i} to load its models "
                          f"({time.monotonic() - started:.0f} s) ...", flush=True)
        if not stopping:
            print_ready(servers)
        while not stopping:
            for i, server in enumerate(servers):
                if server.process.poll() is not None:
                    print(f"error: tritonserver #{i} exited with code "
                          f"{server.process.returncode}; see {server.log_path}", file=sys.stderr)
                    stopping = True
            time.sleep(0.5)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            server.stop()
        print("stopped.", flush=True)
    return 0


def print_ready(servers: list[TritonServer]) -> None:
    first = servers[0]
    print("\nThe stack is ready.")
    for i, s in enumerate(servers):
        print(f"  tritonserver #{i}: HTTP {s.http_port}  gRPC {s.grpc_port}  "
              f"metrics {s.metrics_port}")
    print("  models: llm (text in/out), ensemble (TensorRT-LLM contract), engine (token ids)")
    print("\nTry it:")
    print(f"  .venv/bin/python scripts/chat.py --url localhost:{first.grpc_port}")
    print(f"  scripts/genai-perf profile -m llm --endpoint-type kserve --backend vllm --streaming "
          f"-u localhost:{first.grpc_port} --concurrency 4 --request-count 20 "
          f"--synthetic-input-tokens-mean 64 --output-tokens-mean 64 "
          f"--tokenizer {default_model_dir().relative_to(REPO_ROOT)}")
    print("\nCtrl-C stops the stack.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
