"""Run the router: `python -m router --instance HOST:PORT [--instance ...]`.

It listens for Triton gRPC clients (KServe v2: tritonclient, perf_analyzer, GenAI-Perf) and
spreads their requests over the Triton instances given by --instance, a config file and/or a
DNS name (a Kubernetes headless Service). Metrics, /health and the instance admin API are on
the metrics port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path

from router.admin import AdminServer
from router.config import (
    DATA_PLANES,
    ConfigError,
    DnsConfig,
    ModelRouting,
    RouterConfig,
    load_config,
    with_policy_options,
)
from router.instances import instance_configs
from router.policies import POLICIES
from router.server import Router

log = logging.getLogger("router")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m router", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="TOML file (see router/config.py); flags "
                        "given here override it")
    parser.add_argument("--instance", action="append", default=[], metavar="HOST:PORT[,M:P]",
                        help="a Triton gRPC address, optionally with its metrics address "
                             "after a comma (engine load for kv_aware); repeatable")
    parser.add_argument("--dns", metavar="NAME", help="discover instances from the A records "
                        "of NAME (a headless Service), refreshed every --dns-interval s")
    parser.add_argument("--dns-grpc-port", type=int, default=8001)
    parser.add_argument("--dns-metrics-port", type=int, default=8002)
    parser.add_argument("--dns-interval", type=float, default=10.0)
    parser.add_argument("--host", help="listen address (default 0.0.0.0)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default 8001; 0: any)")
    parser.add_argument("--metrics-port", type=int,
                        help="metrics, /health and admin port (default 8002; 0: any)")
    parser.add_argument("--policy", choices=sorted(POLICIES),
                        help="routing policy for every model without its own "
                             "(default hybrid)")
    parser.add_argument("--model-policy", action="append", default=[], metavar="MODEL=POLICY",
                        help="routing policy for one model; repeatable")
    parser.add_argument("--policy-option", action="append", default=[], metavar="NAME=VALUE",
                        help="an option of the default policy, over the config file's "
                             "(e.g. load_weight=0.25 for prefix/hybrid, overlap_weight=4 "
                             "for kv_aware; docs/router.md lists them); repeatable")
    parser.add_argument("--max-concurrency-per-instance", type=int,
                        help="requests in flight per instance before requests queue "
                             "(default 64)")
    parser.add_argument("--max-queue-length", type=int,
                        help="requests that may wait; more get RESOURCE_EXHAUSTED (1024)")
    parser.add_argument("--max-queue-wait", type=float, dest="max_queue_wait_s",
                        help="seconds a request may wait; then UNAVAILABLE (default 30)")
    parser.add_argument("--health-interval", type=float, dest="health_interval_s",
                        help="seconds between active health checks (default 2)")
    parser.add_argument("--data-plane", choices=list(DATA_PLANES),
                        help="who carries inference bytes: native (the C++ proxy, built by "
                             "`make setup`), python (grpcio) or auto (native when built; "
                             "default)")
    parser.add_argument("--event-loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="uvloop (default, when installed) costs less CPU per request "
                             "than asyncio's own loop")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> RouterConfig:
    models = {}
    for item in args.model_policy:
        model, sep, policy = item.partition("=")
        if not sep or not model or policy not in POLICIES:
            raise ConfigError(f"--model-policy expects MODEL=POLICY with a policy in "
                              f"{sorted(POLICIES)}; got {item!r}")
        models[model] = ModelRouting(policy)
    config = load_config(
        args.config, instances=instance_configs(args.instance), host=args.host,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        default_policy=args.policy,
        max_concurrency_per_instance=args.max_concurrency_per_instance,
        max_queue_length=args.max_queue_length, max_queue_wait_s=args.max_queue_wait_s,
        health_interval_s=args.health_interval_s, data_plane=args.data_plane,
        dns=DnsConfig(args.dns, args.dns_grpc_port, args.dns_metrics_port,
                      args.dns_interval) if args.dns else None,
    )
    if models:
        config = replace(config, models={**config.models, **models})
    config = with_policy_options(config, args.policy_option)
    if not config.instances and config.dns is None:
        raise ConfigError("no instances: pass --instance HOST:PORT, --dns NAME or a --config "
                          "file with [[instances]]")
    return config


async def serve(config: RouterConfig) -> None:
    router = await Router(config).start()
    loop = asyncio.get_running_loop()
    admin = AdminServer(router, loop, config.host, config.metrics_port).start()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    healthy = sum(i.healthy for i in router.pool.instances.values())
    log.info("router listening: gRPC %s:%d, metrics/health/admin http://%s:%d "
             "(%d of %d instances healthy; policy %s; %s data plane)", config.host,
             router.grpc_port, config.host, admin.port, healthy, len(router.pool.instances),
             config.default_policy, router.data_plane)
    try:
        await stop.wait()
        log.info("stopping: finishing in-flight requests (5 s at most) ...")
    finally:
        admin.stop()
        await router.stop(grace_s=5.0)
    log.info("stopped")


def run_loop(coroutine, event_loop: str) -> None:
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed; using asyncio's event loop")
        else:
            uvloop.run(coroutine)
            return
    asyncio.run(coroutine)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        try:
            run_loop(serve(config), args.event_loop)
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0
