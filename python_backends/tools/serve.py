"""Run the local serving stack in the foreground until Ctrl-C.

The stack: N `tritonserver` processes serving model_repository/ and the router in front of
them on the usual Triton ports, gRPC 8001 and metrics 8002, so Triton clients, perf_analyzer
and GenAI-Perf work unchanged. The router does not speak HTTP yet: HTTP 8000 is instance #0's
own HTTP endpoint (not routed). With --no-router, a single instance serves on 8000/8001/8002
itself.

On a GPU host every visible GPU gets one instance (CUDA graphs, bf16); --instances M > GPUs
puts several instances on each GPU, each with an even share of its memory. Without GPUs,
2 instances run on the CPU.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

from python_backends.paths import CACHE_DIR, MODEL_REPOSITORY, REPO_ROOT, default_model_dir
from python_backends.tools.gpus import (
    DEFAULT_MEMORY_FRACTION,
    DEFAULT_RESERVE_BYTES,
    GIB,
    Gpu,
    Placement,
    plan_placements,
    visible_gpus,
    weight_bytes,
)
from python_backends.tools.router_process import RouterProcess
from python_backends.tools.triton_server import TritonServer, free_port
from python_backends.triton_glue import config_parameters, hosts_engine
from router.config import ConfigError, load_config, with_policy_options

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
    parser.add_argument("--instances", type=int,
                        help="tritonserver processes behind the router (default: one per "
                             "GPU, 2 without GPUs); more than the GPUs share them")
    parser.add_argument("--gpus", default="auto",
                        help="GPUs to use: auto (every visible one, default), 0 (CPU only) "
                             "or a count N (the first N visible)")
    parser.add_argument("--gpu-memory-fraction", type=float, default=DEFAULT_MEMORY_FRACTION,
                        help="share of each GPU's memory for the instances on it together "
                             "(weights + KV cache; default %(default)s)")
    parser.add_argument("--gpu-reserve-gb", type=float, default=DEFAULT_RESERVE_BYTES / GIB,
                        help="GiB each GPU instance keeps for its CUDA context, activations "
                             "and CUDA graphs (default %(default)s)")
    parser.add_argument("--gpu-kv-cache-gb", type=float,
                        help="KV cache of each engine of a GPU instance, GiB (default: what "
                             "its memory share leaves after weights and reserve)")
    parser.add_argument("--model-dir", type=Path,
                        help="weights + tokenizer (safetensors, Llama architecture) to serve; "
                             "default: the project's SmolLM2-135M-Instruct")
    parser.add_argument("--no-router", action="store_true",
                        help="no router: one tritonserver on the usual ports")
    parser.add_argument("--policy", default="hybrid",
                        help="the router's routing policy (default hybrid; see "
                             "`python -m router --help`)")
    parser.add_argument("--policy-option", dest="policy_options", action="append", default=[],
                        metavar="NAME=VALUE",
                        help="an option of the router's policy (repeat), e.g. "
                             "load_weight=0.25; see `python -m router --help`")
    parser.add_argument("--router-config", type=Path,
                        help="a router TOML config file (see router/config.py)")
    parser.add_argument("--triton-arg", dest="triton_args", action="append", default=[],
                        help="extra tritonserver argument for every instance (repeat), e.g. "
                             "--triton-arg=--pinned-memory-pool-byte-size=0")
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated models to load (default: %(default)s). "
                             "`llm` and `engine` each run an engine of their own (weights "
                             "and KV cache): on a GPU, load only the one clients call, "
                             "e.g. --models llm, to give it the whole memory share")
    parser.add_argument("--log-dir", type=Path, default=CACHE_DIR / "logs",
                        help="where each instance writes its log (default: %(default)s)")
    parser.add_argument("--ready-timeout", type=float, default=300.0,
                        help="seconds to wait for every instance to be ready")
    return parser.parse_args(argv)


def select_gpus(spec: str) -> list[Gpu]:
    gpus = visible_gpus()
    if spec == "auto":
        return gpus
    if not spec.isdigit():
        raise ValueError(f"--gpus takes auto, 0 or a count, got {spec!r}")
    if int(spec) > len(gpus):
        raise ValueError(f"--gpus {spec}: only {len(gpus)} GPU(s) visible")
    return gpus[:int(spec)]


def router_args(args: argparse.Namespace) -> list[str]:
    """The router's flags besides its instances and ports."""
    flags = ["--policy", args.policy]
    for option in args.policy_options:
        flags += ["--policy-option", option]
    if args.router_config:
        flags += ["--config", str(args.router_config)]
    return flags


def router_settings_problem(args: argparse.Namespace) -> str | None:
    """What the router would refuse in --policy, --policy-option and --router-config, checked
    before any instance starts (the router reads them again itself)."""
    try:
        with_policy_options(load_config(args.router_config, default_policy=args.policy),
                            args.policy_options)
    except ConfigError as exc:
        return str(exc)
    return None


def plan(args: argparse.Namespace) -> list[Placement]:
    """Where each instance runs (validates --gpus, --instances and the memory split)."""
    gpus = select_gpus(args.gpus)
    if args.instances is None:
        args.instances = 1 if args.no_router else (len(gpus) or 2)
    if args.instances < 1:
        raise ValueError("--instances must be at least 1")
    if not gpus:
        ignored = gpu_only_flags(args)
        if ignored:
            print(f"warning: no GPU in use, so {', '.join(ignored)} has no effect "
                  f"(the CPU KV cache is the engine's kv_cache_bytes)", file=sys.stderr)
    model_dir = args.model_dir or default_model_dir()
    engines = engines_per_instance(args.model_repository, model_names(args))
    placements = plan_placements(gpus, args.instances, weight_bytes(model_dir) if gpus else 0,
                                 args.gpu_memory_fraction, int(args.gpu_reserve_gb * GIB),
                                 engines=max(engines, 1))
    if args.gpu_kv_cache_gb is not None and gpus:
        wanted = int(args.gpu_kv_cache_gb * GIB)
        if wanted <= 0 or any(wanted > p.kv_cache_bytes for p in placements):
            raise ValueError(f"--gpu-kv-cache-gb {args.gpu_kv_cache_gb} must be positive and at "
                             f"most what each instance's memory share leaves "
                             f"({min(p.kv_cache_bytes for p in placements) / GIB:.1f} GiB)")
        placements = [replace(p, kv_cache_bytes=wanted) for p in placements]
    return placements


def gpu_only_flags(args: argparse.Namespace) -> list[str]:
    """The GPU memory flags given with values other than their defaults."""
    given = []
    if args.gpu_kv_cache_gb is not None:
        given.append("--gpu-kv-cache-gb")
    if args.gpu_memory_fraction != DEFAULT_MEMORY_FRACTION:
        given.append("--gpu-memory-fraction")
    if args.gpu_reserve_gb != DEFAULT_RESERVE_BYTES / GIB:
        given.append("--gpu-reserve-gb")
    return given


def model_names(args: argparse.Namespace) -> list[str]:
    return [m for m in args.models.split(",") if m]


def engines_per_instance(repository: Path, models: list[str]) -> int:
    """How many of these models run an engine of their own (weights and KV cache each)."""
    return sum(hosts_engine(config_parameters(repository / name / "config.pbtxt"))
               for name in models)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model_dir is not None and not (args.model_dir / "config.json").exists():
        print(f"error: --model-dir {args.model_dir} has no config.json", file=sys.stderr)
        return 2
    try:
        placements = plan(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.no_router and args.instances > 1:
        print("error: --no-router serves one instance; drop --instances", file=sys.stderr)
        return 2
    if not args.no_router:
        problem = router_settings_problem(args)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    for name, port in (("HTTP", args.http_port), ("gRPC", args.grpc_port),
                       ("metrics", args.metrics_port)):
        if port_in_use(port):
            print(f"error: the {name} port {port} is already in use; stop what holds it or "
                  f"pass --{name.lower()}-port", file=sys.stderr)
            return 2
    args.log_dir.mkdir(parents=True, exist_ok=True)
    models = model_names(args)
    model_env = {"LLM_MODEL_DIR": str(args.model_dir.resolve())} if args.model_dir else {}
    if args.gpus == "0":
        model_env["CUDA_VISIBLE_DEVICES"] = ""  # the engine's device "auto" then means CPU
    servers = []
    # Every port handed out before anything binds it: the router's and each instance's.
    taken = {args.http_port, args.grpc_port, args.metrics_port}

    def fresh_port() -> int:
        port = free_port(avoid=taken)
        taken.add(port)
        return port

    for i, placement in enumerate(placements):
        if i == 0 and args.no_router:
            ports = (args.http_port, args.grpc_port, args.metrics_port)
        else:
            ports = (args.http_port if i == 0 else fresh_port(), fresh_port(), fresh_port())
        servers.append(TritonServer(
            model_repository=args.model_repository, http_port=ports[0], grpc_port=ports[1],
            metrics_port=ports[2], models=models, log_path=args.log_dir / f"triton-{i}.log",
            env={**model_env, **placement.env()}, extra_args=args.triton_args,
        ))
    router = None if args.no_router else RouterProcess(
        instances=[f"{s.grpc_url},127.0.0.1:{s.metrics_port}" for s in servers],
        grpc_port=args.grpc_port, metrics_port=args.metrics_port, host="0.0.0.0",
        extra_args=router_args(args), log_path=args.log_dir / "router.log")

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
            print(f"starting tritonserver #{i} on {placements[i].describe()} "
                  f"(log: {server.log_path}) ...", flush=True)
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
        if router is not None and not stopping:
            print(f"starting the router (log: {router.log_path}) ...", flush=True)
            router.start().wait_ready(healthy_instances=len(servers))
        if not stopping:
            print_ready(servers, router, args.policy)
        while not stopping:
            for i, server in enumerate(servers):
                if server.process.poll() is not None:
                    print(f"error: tritonserver #{i} exited with code "
                          f"{server.process.returncode}; see {server.log_path}", file=sys.stderr)
                    stopping = True
            if router is not None and router.process.poll() is not None:
                print(f"error: the router exited with code {router.process.returncode}; "
                      f"see {router.log_path}", file=sys.stderr)
                stopping = True
            time.sleep(0.5)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if router is not None:
            router.stop()
        for server in servers:
            server.stop()
        print("stopped.", flush=True)
    return 0


def print_ready(servers: list[TritonServer], router: RouterProcess | None,
                policy: str) -> None:
    grpc_port = router.grpc_port if router else servers[0].grpc_port
    print("\nThe stack is ready.")
    if router is not None:
        print(f"  router: gRPC {router.grpc_port}  metrics, /health and admin API "
              f"{router.metrics_port}  (policy: {policy})")
    for i, s in enumerate(servers):
        print(f"  tritonserver #{i}: HTTP {s.http_port}  gRPC {s.grpc_port}  "
              f"metrics {s.metrics_port}")
    if router is not None:
        print(f"  HTTP {servers[0].http_port} is instance #0 itself (the router speaks gRPC)")
    print("  models: llm (text in/out), ensemble (TensorRT-LLM contract), engine (token ids)")
    print("\nTry it:")
    print(f"  .venv/bin/python scripts/chat.py --url localhost:{grpc_port}")
    print(f"  scripts/genai-perf profile -m llm --endpoint-type kserve --backend vllm --streaming "
          f"-u localhost:{grpc_port} --concurrency 4 --request-count 20 "
          f"--synthetic-input-tokens-mean 64 --output-tokens-mean 64 "
          f"--tokenizer {default_model_dir().relative_to(REPO_ROOT)}")
    print("\nCtrl-C stops the stack.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
