#!/usr/bin/env python3
"""Router overhead benchmark: what `python -m router` adds in front of Triton, next to nginx.

One run does up to four steps:

  1. trivial models: one tritonserver serving `echo` (unary) and `echo_stream` (decoupled)
     from tests/model_repository; nginx (Debian's package, installed with apt-get when it is
     missing; `grpc_pass` to the same instance, a config in a temporary directory, stopped at
     the end) and the router (one --instance, --policy least_connections) in front of it.
  2. perf_analyzer for each mode {unary echo, --streaming echo_stream} x concurrency
     {1, 4, 16} x target {direct, nginx, router}: throughput, p50 and p99 latency, and the CPU
     time nginx / the router / Triton spent per request. The three targets are measured side
     by side for each (mode, concurrency), --rounds times in a rotating order; each number is
     the median over rounds, and added latency and throughput ratios are paired by round
     (the median of each round's difference or ratio, which cancels drift between rounds).
     Targets (from the router issue): the router adds at most 2x the
     p50 latency nginx adds, and keeps at least 85% of nginx's throughput.
  3. with --profile: py-spy records the router (native frames too) during one extra unary and
     one extra streaming run at concurrency 4 (not used for the comparison: the sampler slows
     the router down); the collapsed stacks and a summary of the top functions are written
     next to the reports.
  4. the real `llm` model (default unless --quick): a tritonserver with the project's models
     and a router in front; GenAI-Perf time to first token (TTFT) at concurrency 1 and 8,
     direct vs through the router, with the same prompts (prefix caching off so that repeated
     prompts cost the same every time). Share = (router - direct) / router; target < 2%.
     Then the same under a mixed load: c tritonclient clients that switch between direct and
     the router on every request, so both paths are measured under the same conditions (on a
     busy machine, separate runs drift by more than the share being measured).

Writes <out-dir>/router_overhead.json (every number, the commands, machine facts) and
<out-dir>/router_overhead.md (tables, targets, the profile summary). Text below the line
`<!-- notes -->` in an existing router_overhead.md is kept. On a machine with few cores the
client, nginx, the router and Triton share them: compare only within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (REPO_ROOT, REPO_ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import bench_engine as be  # noqa: E402  (GenAI-Perf helpers, machine facts, process control)

from python_backends.paths import TOOLS_DIR, default_model_dir  # noqa: E402
from python_backends.tools.router_process import RouterProcess  # noqa: E402
from python_backends.tools.triton_server import TritonServer, free_port  # noqa: E402

TEST_MODEL_REPOSITORY = REPO_ROOT / "tests" / "model_repository"
PERF_ANALYZER = TOOLS_DIR / "bin" / "perf_analyzer"
PERF_ANALYZER_LIBS = TOOLS_DIR / "cudart" / "nvidia" / "cuda_runtime" / "lib"
TARGETS = ("direct", "nginx", "router", "router_python")
PROXIES = TARGETS[1:]
# The router as users get it (the native data plane, which `make setup` builds), and the
# same router with grpcio carrying the bytes, as a reference.
ROUTER_DATA_PLANES = {"router": "native", "router_python": "python"}
MODES = {"unary": {"model": "echo", "streaming": False},
         "streaming": {"model": "echo_stream", "streaming": True}}
DEFAULT_CONCURRENCY = (1, 4, 16)
QUICK_CONCURRENCY = (1, 4)
PROFILE_CONCURRENCY = 4
ROUTER_ARGS = ("--policy", "least_connections", "--log-level", "WARNING")
LLM_CONCURRENCY = (1, 8)
LLM_OUTPUT_TOKENS = 16
MIXED_MODEL = "llm"
# Targets from the router issue.
LATENCY_TARGET_RATIO = 2.0  # router's added p50 <= 2x nginx's added p50
THROUGHPUT_TARGET_FRACTION = 0.85  # router throughput >= 85% of nginx's
TTFT_SHARE_TARGET = 0.02  # the router's share of llm TTFT
NOTES_MARKER = "<!-- notes -->"


def log(msg: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else num / den


def portable(cmd: list[str]) -> str:
    """A command line with paths inside the checkout written relative to it."""
    return shlex.join(be.display_path(Path(a)) if a.startswith("/") else a for a in cmd)


# ----------------------------------------------------------------------------- CPU accounting


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of the live processes in process group `pgid`, from /proc.

    Every server here starts in its own session, so its group is it and its children
    (tritonserver's model stubs, nginx's workers).
    """
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # Fields after the comm: state ppid pgrp session ... utime(14th) stime(15th).
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def success_count(url: str, model: str) -> int:
    """Requests `model` has completed on the Triton at `url` (its statistics)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model_name=model, as_json=True)
    finally:
        client.close()
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


# ----------------------------------------------------------------------------- nginx


def ensure_nginx() -> str:
    """The nginx binary; installs Debian's `nginx` package with apt-get when there is none."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise be.BenchError("nginx is not installed and cannot be installed from here (needs "
                            "root and apt-get): run `apt-get install -y nginx` and try again")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends",
                                         "nginx"]):
        log(f"nginx: {shlex.join(cmd)} ...")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"    {line.rstrip()}", flush=True)
        if proc.wait() != 0:
            raise be.BenchError(f"`{shlex.join(cmd)}` failed (exit {proc.returncode}); install "
                                f"nginx by hand (apt-get install -y nginx) and try again")
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if not found:
        raise be.BenchError("apt-get installed nginx but there is no `nginx` binary on PATH")
    return found


def nginx_config(workdir: Path, port: int, upstream: str) -> str:
    """nginx as a user would put it in front of one Triton for gRPC (nginx 1.22 syntax)."""
    return f"""\
# Generated by scripts/bench_router_overhead.py: nginx as a plain gRPC proxy in front of
# one Triton instance. Runs in the foreground as a child of the benchmark.
daemon off;
master_process on;
worker_processes auto;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    # No per-request logging: the router logs only warnings in this benchmark.
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;

    upstream triton {{
        server {upstream};
        keepalive 64;                 # reuse upstream connections
        keepalive_requests 1000000;
        keepalive_timeout 1h;
    }}

    server {{
        listen 127.0.0.1:{port} http2;  # h2c: gRPC clients speak HTTP/2 without TLS
        client_max_body_size 0;         # no limit on request size, like Triton
        client_body_timeout 1h;         # streams may be quiet between requests
        keepalive_requests 1000000;     # else a GOAWAY after 1000 requests a connection
        keepalive_timeout 1h;

        location / {{
            grpc_pass grpc://triton;
            grpc_read_timeout 1h;       # long streams
            grpc_send_timeout 1h;
        }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground (daemon off) with a generated config in a temporary folder."""

    def __init__(self, binary: str, upstream: str, workdir: Path) -> None:
        self.binary, self.upstream, self.workdir = binary, upstream, workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.conf = workdir / "nginx.conf"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _command(self, *extra: str) -> list[str]:
        return [self.binary, "-p", str(self.workdir), "-c", str(self.conf),
                "-e", str(self.workdir / "error.log"), *extra]

    def start(self) -> Nginx:
        # The workers (user nobody) create their temp folders under it.
        self.workdir.chmod(0o755)
        self.conf.write_text(nginx_config(self.workdir, self.port, self.upstream))
        check = subprocess.run(self._command("-t"), capture_output=True, text=True)
        if check.returncode != 0:
            raise be.BenchError(f"nginx rejects its config {self.conf}:\n{check.stderr}")
        self.process = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 20.0) -> Nginx:
        """Until a tritonclient `is_server_ready()` goes through nginx to Triton."""
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise be.BenchError(f"nginx exited with code {self.process.returncode}; see "
                                    f"{self.workdir / 'error.log'}")
            client = grpcclient.InferenceServerClient(self.grpc_url)
            try:
                if client.is_server_ready():
                    return self
            except Exception as exc:  # not listening yet: keep polling until the deadline
                last = exc
            finally:
                client.close()
            time.sleep(0.2)
        raise be.BenchError(f"nginx did not forward is_server_ready() to Triton in "
                            f"{timeout_s:.0f} s ({last}); see {self.workdir / 'error.log'}")

    def version(self) -> str:
        out = subprocess.run([self.binary, "-v"], capture_output=True, text=True)
        return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")

    def stop(self) -> None:
        if self.process is not None:
            be._stop_process_group(self.process, timeout_s=5.0)


# ----------------------------------------------------------------------------- perf_analyzer


def write_input_data(directory: Path) -> dict[str, Path]:
    """Explicit values for every input: perf_analyzer would fill the optional ones at random."""
    paths = {}
    for mode, spec in MODES.items():
        row: dict[str, Any] = {"text_input": {"content": ["hello"], "shape": [1]},
                               "delay_ms": [0]}
        if spec["streaming"]:
            row["count"] = [1]
        paths[mode] = directory / f"input-{mode}.json"
        paths[mode].write_text(json.dumps({"data": [row]}) + "\n")
    return paths


def perf_analyzer_command(mode: str, url: str, concurrency: int, input_data: Path,
                          csv_path: Path, window_ms: int, stability: int,
                          max_trials: int) -> list[str]:
    cmd = [str(PERF_ANALYZER), "-m", MODES[mode]["model"], "-u", url, "-i", "grpc",
           "--concurrency-range", str(concurrency), "--input-data", str(input_data),
           "-p", str(window_ms), "-s", str(stability), "-r", str(max_trials),
           "-f", str(csv_path)]
    return cmd + (["--streaming"] if MODES[mode]["streaming"] else [])


def parse_perf_analyzer(csv_path: Path, stdout: str) -> dict[str, Any]:
    """Throughput (infer/s) and latencies (us) of one perf_analyzer run: its CSV and stdout."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise be.BenchError(f"perf_analyzer wrote no rows to {csv_path}")
    row = rows[-1]
    result: dict[str, Any] = {
        "throughput": float(row["Inferences/Second"]),
        "p50_us": float(row["p50 latency"]),
        "p90_us": float(row["p90 latency"]),
        "p99_us": float(row["p99 latency"]),
        "csv": {k: float(v) for k, v in row.items() if v not in (None, "")},
    }
    avg = re.search(r"Avg latency: (\d+) usec", stdout)
    count = re.search(r"Request count: (\d+)", stdout)
    result["avg_us"] = float(avg.group(1)) if avg else None
    result["window_requests"] = int(count.group(1)) if count else None
    return result


class Bench:
    """The trivial-model part: one Triton, nginx and the router, and the measurements."""

    def __init__(self, args: argparse.Namespace, artifact_dir: Path,
                 stack: contextlib.ExitStack) -> None:
        self.args, self.artifact_dir, self.stack = args, artifact_dir, stack
        self.triton: TritonServer | None = None
        self.nginx: Nginx | None = None
        self.routers: dict[str, RouterProcess] = {}
        self.inputs: dict[str, Path] = {}
        self.run_index = 0

    # -- setup ----------------------------------------------------------------------------
    def start(self, nginx_binary: str) -> dict[str, Any]:
        a = self.artifact_dir
        self.triton = TritonServer(model_repository=TEST_MODEL_REPOSITORY,
                                   models=[spec["model"] for spec in MODES.values()],
                                   env={"INSTANCE_NAME": "bench"},
                                   log_path=a / "tritonserver-echo.log")
        log(f"starting tritonserver (echo, echo_stream), log {be.display_path(a)}/"
            f"tritonserver-echo.log ...")
        self.triton.start()
        self.stack.callback(self.triton.stop)
        self.triton.wait_ready(timeout_s=self.args.ready_timeout)
        workdir = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        self.stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        self.nginx = Nginx(nginx_binary, self.triton.grpc_url, workdir)
        log(f"starting nginx {self.nginx.version()} (grpc_pass to {self.triton.grpc_url}) ...")
        self.nginx.start()
        self.stack.callback(self.nginx.stop)
        self.nginx.wait_ready()
        # A copy of the config next to the other artifacts (the temporary folder goes).
        shutil.copy2(self.nginx.conf, a / "nginx.conf")
        for target, data_plane in ROUTER_DATA_PLANES.items():
            router = RouterProcess(instances=[self.triton.grpc_url],
                                   extra_args=(*ROUTER_ARGS, "--data-plane", data_plane),
                                   log_path=a / f"{target}-echo.log")
            log(f"starting the router ({data_plane} data plane) ...")
            router.start()
            self.stack.callback(router.stop)
            router.wait_ready(healthy_instances=1)
            self.routers[target] = router
        self.inputs = write_input_data(a)
        for target in TARGETS:
            check_echo(self.url(target))
        log(", ".join(f"{t} {self.url(t)}" for t in TARGETS) + ": each answers `echo`")
        return {"nginx_version": self.nginx.version(),
                "nginx_config": be.display_path(a / "nginx.conf"),
                "nginx_config_text": self.nginx.conf.read_text().replace(str(workdir),
                                                                         "$NGINX_TMPDIR"),
                "router_command": portable(self.routers["router"].command()),
                "router_python_command": portable(self.routers["router_python"].command())}

    @property
    def router(self) -> RouterProcess:
        return self.routers["router"]

    def url(self, target: str) -> str:
        assert self.triton and self.nginx
        if target in self.routers:
            return self.routers[target].grpc_url
        return {"direct": self.triton.grpc_url, "nginx": self.nginx.grpc_url}[target]

    def proxy_pgid(self, target: str) -> int | None:
        proc = (self.routers[target].process if target in self.routers
                else self.nginx and self.nginx.process if target == "nginx" else None)
        return proc.pid if proc else None

    # -- one measurement ------------------------------------------------------------------
    def measure(self, mode: str, target: str, concurrency: int, label: str,
                window_ms: int | None = None) -> dict[str, Any]:
        """One perf_analyzer run; on an unstable measurement, once more with 4x the tolerance."""
        assert self.triton is not None
        args = self.args
        self.run_index += 1
        run_dir = self.artifact_dir / "perf_analyzer"
        run_dir.mkdir(exist_ok=True)
        stability = args.stability
        result: dict[str, Any] = {"mode": mode, "target": target, "concurrency": concurrency}
        for attempt in (1, 2):
            name = f"{self.run_index:03d}-{label}-{mode}-c{concurrency}-{target}-try{attempt}"
            csv_path, log_path = run_dir / f"{name}.csv", run_dir / f"{name}.log"
            cmd = perf_analyzer_command(mode, self.url(target), concurrency, self.inputs[mode],
                                        csv_path, window_ms or args.window_ms, stability,
                                        args.max_trials)
            result.update(command=portable(cmd), stability_percent=stability,
                          log=be.display_path(log_path))
            model = MODES[mode]["model"]
            count_before = success_count(self.triton.grpc_url, model)
            cpu_before = {t: group_cpu_seconds(pgid) for t in PROXIES
                          if (pgid := self.proxy_pgid(t))}
            triton_before = group_cpu_seconds(self.triton.process.pid)
            client_before = children_cpu_seconds()
            started = time.monotonic()
            rc, stdout = run_perf_analyzer(cmd, log_path, args.run_timeout, self.triton)
            elapsed = time.monotonic() - started
            requests = success_count(self.triton.grpc_url, model) - count_before
            if rc == 0:
                result.update(parse_perf_analyzer(csv_path, stdout))
                result.pop("error", None)
                result["wall_s"] = round(elapsed, 1)
                result["requests"] = requests
                per_request = {t: (group_cpu_seconds(self.proxy_pgid(t)) - before) / requests
                               * 1e6 for t, before in cpu_before.items() if requests}
                if requests:
                    per_request["triton"] = ((group_cpu_seconds(self.triton.process.pid)
                                              - triton_before) / requests * 1e6)
                    per_request["perf_analyzer"] = ((children_cpu_seconds() - client_before)
                                                    / requests * 1e6)
                result["cpu_us_per_request"] = {k: round(v, 1) for k, v in per_request.items()}
                return result
            tail = "\n  ".join(stdout.strip().splitlines()[-6:])
            result["error"] = f"perf_analyzer exited with {rc} (log {log_path}):\n  {tail}"
            if "Failed to obtain stable measurement" not in stdout:
                break
            log(f"  unstable at {stability}%; once more at {stability * 4}% ...")
            stability *= 4
        return result


def check_echo(url: str) -> None:
    """A real `echo` inference through `url` (proves the path forwards inference too)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        tensor = grpcclient.InferInput("text_input", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([b"hello"], dtype=object))
        answer = client.infer("echo", [tensor]).as_numpy("text_output")
    except Exception as exc:
        raise be.BenchError(f"`echo` through {url} failed: {exc}") from exc
    finally:
        client.close()
    if answer is None or answer.reshape(-1)[0] != b"hello":
        raise be.BenchError(f"`echo` through {url} answered {answer!r}, not b'hello'")


def run_perf_analyzer(cmd: list[str], log_path: Path, timeout_s: float,
                      triton: TritonServer) -> tuple[int, str]:
    """Run perf_analyzer to `log_path`; returns (exit code, its output). Stops it on errors."""
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(
        p for p in (str(PERF_ANALYZER_LIBS), os.environ.get("LD_LIBRARY_PATH", "")) if p)}
    rc = be.run_tool(cmd, log_path, timeout_s, "perf_analyzer", triton.process, env=env,
                     poll_s=0.5)
    return rc, log_path.read_text(errors="replace")


def format_run(r: dict[str, Any]) -> str:
    if "error" in r:
        return "FAILED: " + r["error"].splitlines()[0]
    cpu = r.get("cpu_us_per_request", {}).get(r["target"])
    cpu_text = "" if cpu is None else f", {r['target']} CPU {cpu:.0f} us/request"
    return (f"{r['throughput']:.0f} infer/s, p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us"
            f"{cpu_text} ({r['wall_s']:.0f} s)")


def bench_trivial(bench: Bench, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Step 2: every (mode, concurrency), the three targets side by side, --rounds times."""
    runs = []
    total = len(MODES) * len(args.concurrency) * args.rounds * len(TARGETS)
    done = 0
    for mode in MODES:
        for target in TARGETS:  # a short warm-up per path (connections, first requests)
            bench.measure(mode, target, 1, "warmup", window_ms=500)
        for c in args.concurrency:
            for rnd in range(args.rounds):
                shift = (rnd + c) % len(TARGETS)
                for target in TARGETS[shift:] + TARGETS[:shift]:
                    done += 1
                    r = bench.measure(mode, target, c, "run")
                    r["round"] = rnd + 1
                    runs.append(r)
                    log(f"[{done}/{total}] {mode} c={c} round {rnd + 1} {target}: "
                        f"{format_run(r)}")
    return runs


# ----------------------------------------------------------------------------- comparison


def paired_median(rounds: list[dict[str, dict[str, Any]]], target: str, base: str, key: str,
                  combine: Callable[[float, float], float | None]) -> float | None:
    """Median over rounds of combine(target's value, base's value in the same round)."""
    values = [combine(rnd[target][key], rnd[base][key]) for rnd in rounds
              if rnd.get(target, {}).get(key) is not None
              and rnd.get(base, {}).get(key) is not None]
    values = [v for v in values if v is not None]
    return median(values) if values else None


def summarize(runs: list[dict[str, Any]], concurrency: list[int]) -> list[dict[str, Any]]:
    """Per (mode, concurrency): medians over rounds per target, added latency and ratios.

    Added latency and the throughput ratios are paired by round: the median over rounds of
    (this path's p50 - direct's p50 in the same round), and of the per-round ratios. A round
    measures its targets back to back, so this cancels the machine's drift between rounds,
    which on 2 shared cores moves a p50 by more than a proxy adds (at c=16: direct's p50
    ranged 11.4-15.1 ms over five rounds of one run)."""
    rows = []
    for mode in MODES:
        for c in concurrency:
            row: dict[str, Any] = {"mode": mode, "concurrency": c, "targets": {}}
            by_round: dict[int, dict[str, dict[str, Any]]] = {}
            for target in TARGETS:
                ok = [r for r in runs if r["mode"] == mode and r["concurrency"] == c
                      and r["target"] == target and "error" not in r]
                for r in ok:
                    by_round.setdefault(r.get("round", 0), {})[target] = r
                stats: dict[str, Any] = {"rounds": len(ok)}
                for key in ("throughput", "p50_us", "p99_us", "avg_us"):
                    stats[key] = median([r[key] for r in ok if r.get(key) is not None])
                stats["proxy_cpu_us_per_request"] = median(
                    [r["cpu_us_per_request"][target] for r in ok
                     if target in r.get("cpu_us_per_request", {})])
                stats["triton_cpu_us_per_request"] = median(
                    [r["cpu_us_per_request"]["triton"] for r in ok
                     if "triton" in r.get("cpu_us_per_request", {})])
                row["targets"][target] = stats
            rounds = list(by_round.values())
            t = row["targets"]
            for target in PROXIES:
                t[target]["added_p50_us"] = paired_median(rounds, target, "direct", "p50_us",
                                                          lambda a, b: a - b)
                t[target]["throughput_vs_direct"] = paired_median(rounds, target, "direct",
                                                                  "throughput", ratio)
            nginx_added, router_added = t["nginx"]["added_p50_us"], t["router"]["added_p50_us"]
            row["added_p50_ratio"] = ratio(router_added, nginx_added)
            row["router_throughput_vs_nginx"] = paired_median(rounds, "router", "nginx",
                                                              "throughput", ratio)
            row["router_python_added_p50_ratio"] = ratio(t["router_python"]["added_p50_us"],
                                                         nginx_added)
            row["router_python_throughput_vs_nginx"] = paired_median(
                rounds, "router_python", "nginx", "throughput", ratio)
            if router_added is None or nginx_added is None:
                row["latency_target"] = "not measured"
            else:
                row["latency_target"] = ("met" if router_added <= LATENCY_TARGET_RATIO
                                         * max(nginx_added, 0.0) else "not met")
            frac = row["router_throughput_vs_nginx"]
            row["throughput_target"] = ("not measured" if frac is None else
                                        "met" if frac >= THROUGHPUT_TARGET_FRACTION
                                        else "not met")
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- profile


def py_spy_binary() -> str:
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found:
        return found
    log("profile: installing py-spy into the virtual environment (pip) ...")
    subprocess.run([sys.executable, "-m", "pip", "install", "py-spy"], check=True)
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not found:
        raise be.BenchError("pip installed py-spy but there is no py-spy binary")
    return found


PY_SPY_OPTIONS = ("--rate", "100", "--native", "--nolineno", "--format", "raw")
PROFILE_WINDOW_FACTOR = 3  # profiled runs use 3x the window: more samples


def profile_router(bench: Bench, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Step 3: py-spy on the router during a unary and a streaming run at concurrency 4.

    Attaches to the running router (ptrace); where that is not allowed, starts a second
    router as a child of py-spy for each run instead.
    """
    py_spy = py_spy_binary()
    profile_dir = out_dir / "router_overhead_profile"
    profile_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"py_spy": subprocess.run([py_spy, "--version"], capture_output=True,
                                                        text=True).stdout.strip(),
                               "options": " ".join(PY_SPY_OPTIONS), "runs": []}
    how = args.profile_launch
    for mode in MODES:
        raw = profile_dir / f"{mode}-c{PROFILE_CONCURRENCY}.txt"
        raw.unlink(missing_ok=True)
        err_path = bench.artifact_dir / f"py-spy-{mode}.log"
        run: dict[str, Any] | None = None
        if how == "attach":
            run = profile_attached(bench, py_spy, mode, raw, err_path)
            if run is None:
                log("profile: py-spy cannot attach here (ptrace?); starting the router as a "
                    "child of py-spy instead")
                how = "child"
        if how == "child":
            run = profile_child(bench, py_spy, mode, raw, err_path)
        assert run is not None
        run["launch"] = how
        run["profile"] = be.display_path(raw)
        if raw.exists() and raw.stat().st_size:
            run["summary"] = summarize_profile(raw)
            (profile_dir / f"{mode}-c{PROFILE_CONCURRENCY}-summary.txt").write_text(
                scrub(render_profile_text(mode, run)))
            log(f"profile {mode}: {run['summary']['samples']} samples; "
                f"{format_run(run['measurement'])}")
        else:
            run["error"] = f"py-spy wrote no profile; see {be.display_path(err_path)}"
            log(f"profile {mode}: {run['error']}")
        results["runs"].append(run)
    return results


def profile_attached(bench: Bench, py_spy: str, mode: str, raw: Path,
                     err_path: Path) -> dict[str, Any] | None:
    assert bench.router is not None and bench.router.process is not None
    cmd = [py_spy, "record", "--pid", str(bench.router.process.pid), *PY_SPY_OPTIONS,
           "-o", str(raw)]
    with open(err_path, "wb") as err:
        spy = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        time.sleep(1.0)
        if spy.poll() is not None:
            return None
        log(f"profile {mode}: py-spy attached to the router (pid {bench.router.process.pid})")
        measurement = bench.measure(mode, "router", PROFILE_CONCURRENCY, "profile",
                                    window_ms=bench.args.window_ms * PROFILE_WINDOW_FACTOR)
    finally:
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                be._stop_process_group(spy)
    return {"command": portable(cmd), "measurement": measurement}


def profile_child(bench: Bench, py_spy: str, mode: str, raw: Path,
                  err_path: Path) -> dict[str, Any]:
    """A second router under `py-spy record -- python -m router ...`, in place of the first."""
    assert bench.triton is not None
    router = RouterProcess(instances=[bench.triton.grpc_url], extra_args=ROUTER_ARGS)
    cmd = [py_spy, "record", *PY_SPY_OPTIONS, "-o", str(raw), "--", *router.command()]
    with open(err_path, "wb") as err:
        spy = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                               start_new_session=True)
    router.process = spy  # wait_ready() watches it
    main_router = bench.router
    try:
        router.wait_ready(healthy_instances=1)
        bench.routers["router"] = router  # measure() uses its URL; CPU includes py-spy's
        measurement = bench.measure(mode, "router", PROFILE_CONCURRENCY, "profile",
                                    window_ms=bench.args.window_ms * PROFILE_WINDOW_FACTOR)
    finally:
        bench.routers["router"] = main_router
        # Stop the router (py-spy's child): py-spy then writes the profile and exits.
        for pid in child_pids(spy.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            be._stop_process_group(spy)
    return {"command": portable(cmd), "measurement": measurement}


def child_pids(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<where>[^()]*)\)$")

# With --native, py-spy cannot tell a thread blocked in the kernel from a busy one: samples
# whose leaf is one of these waits are idle time (`syscall` is grpc's futex wait).
WAIT_LEAVES = frozenset({
    "epoll_wait", "epoll_pwait", "poll", "ppoll", "select", "pselect", "nanosleep",
    "clock_nanosleep", "pthread_cond_wait", "pthread_cond_timedwait", "sem_wait",
    "sem_timedwait", "syscall", "accept", "accept4", "__futex_abstimed_wait_common",
})
SOCKET_LEAVES = frozenset({"sendmsg", "recvmsg", "send", "recv", "write", "read", "writev",
                           "readv", "__libc_sendmsg", "__libc_recvmsg"})
# Where a busy sample's time goes: the leaf if it is a socket syscall, else the innermost
# frame with a known home (from the leaf outwards); first match wins.
CATEGORIES = (
    ("native data plane (C++ proxy, nghttp2)",
     lambda f, w: "_dataplane" in w or "nghttp2" in w or "Proxy::" in f),
    ("router code", lambda f, w: w.startswith("router/") or "/router/" in w),
    ("protobuf", lambda f, w: "protobuf" in w or "google/" in w or "_message" in w),
    ("prometheus_client", lambda f, w: "prometheus_client" in w),
    ("gRPC (grpcio: Python, Cython, C core)", lambda f, w: "grpc" in w.lower()),
    ("event loop (asyncio or uvloop/libuv)",
     lambda f, w: "asyncio" in w or "selectors" in w or "uvloop" in w or w in UVLOOP_FILES),
)
UVLOOP_FILES = frozenset({"loop.c", "core.c", "linux.c", "loop-watcher.c", "queue.h", "stream.c",
                          "handles.c", "idle.c", "check.c", "async.c", "uv-common.c", "timer.c"})
EVENT_LOOP_THREAD = "event loop thread (main)"
THREADS = (  # by a frame its stacks have; the event loop runs on the main thread
    (EVENT_LOOP_THREAD, "(router/__main__.py)"),
    ("gRPC poller thread", "cygrpc"),
    ("admin HTTP thread", "serve_forever"),
)


def split_frame(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    return (match["func"], match["where"]) if match else (frame, "")


def summarize_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """Aggregate py-spy's raw (collapsed) stacks. Samples blocked in the kernel (epoll_wait
    and the like) count as waiting; the rest (busy) are broken down by thread, category,
    leaf function and innermost Python function, in percent of busy samples."""
    threads: Counter[str] = Counter()
    threads_waiting: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    python_frames: Counter[str] = Counter()
    samples = busy = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f]
        if not frames or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        thread = next((name for name, marker in THREADS if marker in stack), "other threads")
        leaf, _ = split_frame(frames[-1])
        if leaf in WAIT_LEAVES:
            threads_waiting[thread] += count
            continue
        busy += count
        threads[thread] += count
        if leaf.startswith("0x"):  # a stripped library: name the library
            self_time[f"{split_frame(frames[-1])[1]} (no symbols)"] += count
        else:
            self_time[frames[-1]] += count
        if leaf in SOCKET_LEAVES:
            category = "socket syscalls (sendmsg, recv, ...)"
        else:
            category = next((name for frame in reversed(frames) for name, test in CATEGORIES
                             if test(*split_frame(frame))), "other (interpreter, libc)")
        categories[category] += count
        for frame in reversed(frames):  # the innermost Python frame
            if split_frame(frame)[1].endswith(".py"):
                python_frames[frame] += count
                break

    def share(counter: Counter[str], n: int, of: int) -> list[dict[str, Any]]:
        return [{"name": k, "samples": v, "percent": round(100 * v / of, 1)}
                for k, v in counter.most_common(n)] if of else []

    loop = EVENT_LOOP_THREAD
    loop_samples = threads[loop] + threads_waiting[loop]
    return {
        "samples": samples,
        "busy_samples": busy,
        "event_loop_busy_percent": (round(100 * threads[loop] / loop_samples, 1)
                                    if loop_samples else None),
        "waiting_percent": round(100 * (samples - busy) / samples, 1) if samples else None,
        "busy_by_thread": share(threads, 5, busy),
        "waiting_by_thread": share(threads_waiting, 5, samples - busy),
        "categories": share(categories, 10, busy),
        "self": share(self_time, top, busy),
        "innermost_python": share(python_frames, top, busy),
    }


def render_profile_text(mode: str, run: dict[str, Any]) -> str:
    s = run["summary"]
    lines = [f"py-spy profile of the router, {mode} at concurrency {PROFILE_CONCURRENCY}: "
             f"{s['samples']} samples, {s['busy_samples']} busy, {s['waiting_percent']}% "
             f"blocked in epoll_wait/poll/futex; the event loop thread busy in "
             f"{s['event_loop_busy_percent']}% of its samples ({run['command']})",
             f"Measured under the profiler: {format_run(run['measurement'])}", ""]
    for title, key in (("Busy samples by thread", "busy_by_thread"),
                       ("Waiting samples by thread", "waiting_by_thread"),
                       ("Busy samples by category (socket syscall leaf, else innermost frame "
                        "with a known home)", "categories"),
                       ("Busy samples by leaf function (self time)", "self"),
                       ("Busy samples by innermost Python function", "innermost_python")):
        lines += [title + ":"]
        lines += [f"  {e['percent']:5.1f}%  {e['name']}" for e in s[key]]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- llm TTFT


def bench_llm(args: argparse.Namespace, artifact_dir: Path) -> dict[str, Any]:
    """Step 4: GenAI-Perf TTFT for `llm`, direct vs through the router, same prompts."""
    results: dict[str, Any] = {"runs": [], "output_tokens": LLM_OUTPUT_TOKENS,
                               "input_tokens": be.INPUT_TOKENS,
                               "engine_env": {"LLM_ENGINE_ENABLE_PREFIX_CACHING": "false"}}
    with contextlib.ExitStack() as stack:
        server = TritonServer(models=list(be.SERVER_MODELS), env=results["engine_env"],
                              log_path=artifact_dir / "tritonserver-llm.log")
        log(f"llm: starting tritonserver ({','.join(be.SERVER_MODELS)}; takes up to a minute) ...")
        started = time.monotonic()
        server.start()
        stack.callback(server.stop)
        server.wait_ready(timeout_s=args.ready_timeout)
        log(f"llm: ready in {time.monotonic() - started:.0f} s")
        router = RouterProcess(instances=[server.grpc_url], extra_args=ROUTER_ARGS,
                               log_path=artifact_dir / "router-llm.log")
        router.start()
        stack.callback(router.stop)
        router.wait_ready(healthy_instances=1)
        urls = {"direct": server.grpc_url, "router": router.grpc_url}
        for target, url in urls.items():
            log(f"llm: warm-up through {target} ...")
            be.warm_up(url, 2, server_process=server.process)
        for c in LLM_CONCURRENCY:
            count = max(args.llm_requests or max(16, 4 * c), c)  # perf_analyzer needs >= c
            for rnd in range(args.llm_rounds):
                for target in (("direct", "router") if (rnd + c) % 2 else ("router", "direct")):
                    run_dir = artifact_dir / f"genai-perf-c{c}-r{rnd + 1}-{target}"
                    cmd = be.genai_perf_command(urls[target], c, count, args.tokenizer, run_dir)
                    cmd[cmd.index("--output-tokens-mean") + 1] = str(LLM_OUTPUT_TOKENS)
                    run: dict[str, Any] = {"concurrency": c, "round": rnd + 1, "target": target,
                                           "request_count": count, "command": portable(cmd)}
                    t0 = time.monotonic()
                    cpu0 = {"router": group_cpu_seconds(router.process.pid),
                            "triton": group_cpu_seconds(server.process.pid)}
                    try:
                        be.run_genai_perf(cmd, run_dir / "genai-perf.log", args.genai_perf_timeout,
                                          server.process)
                        run.update(be.parse_genai_perf_export(be.find_genai_perf_export(run_dir)))
                        wall = time.monotonic() - t0
                        run["wall_s"] = round(wall, 1)
                        # CPU the router took from the cores the engine runs on (idle health
                        # checks only when the run is direct).
                        run["cpu_s"] = {
                            "router": round(group_cpu_seconds(router.process.pid)
                                            - cpu0["router"], 2),
                            "triton": round(group_cpu_seconds(server.process.pid)
                                            - cpu0["triton"], 2)}
                        log(f"llm c={c} round {rnd + 1} {target}: TTFT p50 "
                            f"{run['ttft_ms']['p50']:.1f} ms, avg {run['ttft_ms']['avg']:.1f} ms "
                            f"({time.monotonic() - t0:.0f} s)")
                    except be.BenchError as exc:
                        run["error"] = str(exc)
                        log(f"llm c={c} {target}: FAILED: {str(exc).splitlines()[0]}")
                        if isinstance(exc, be.ServerDied):
                            results["runs"].append(run)
                            results["error"] = str(exc)
                            return results
                    results["runs"].append(run)
        if args.llm_mixed_requests:
            results["mixed"] = []
            for c in LLM_CONCURRENCY:
                n = max(args.llm_mixed_requests, c)
                log(f"llm mixed c={c}: {n} requests each way, direct and router alternating ...")
                t0 = time.monotonic()
                mixed = mixed_ttft(urls, c, n, server)
                results["mixed"].append(mixed)
                log(f"llm mixed c={c}: TTFT p50 direct {mixed['direct']['p50']:.1f} ms, router "
                    f"{mixed['router']['p50']:.1f} ms ({time.monotonic() - t0:.0f} s)")
    return results


def mixed_ttft(urls: dict[str, str], concurrency: int, per_target: int,
               server: TritonServer) -> dict[str, Any]:
    """TTFT direct and through the router under one load: `concurrency` clients, each sending
    streaming `llm` requests one after another and switching target every request (client i
    starts with target i % 2), so both targets see the same machine at the same time; about
    `per_target` requests each way in all.

    Returns per-target TTFT stats (ms) and, for consecutive pairs of one client, the median
    router - direct difference.
    """
    import queue
    import threading

    import numpy as np
    import tritonclient.grpc as grpcclient

    prompt = "The quick brown fox jumps over the lazy dog. " * 6  # about 60 tokens
    sampling = json.dumps({"max_tokens": LLM_OUTPUT_TOKENS, "min_tokens": LLM_OUTPUT_TOKENS})
    ttft: dict[str, list[float]] = {"direct": [], "router": []}
    pairs: list[float] = []
    errors: list[str] = []

    def inputs() -> list:
        tensors = []
        for name, value, dtype in (("text_input", prompt, "BYTES"), ("stream", True, "BOOL"),
                                   ("sampling_parameters", sampling, "BYTES"),
                                   ("exclude_input_in_output", True, "BOOL")):
            tensor = grpcclient.InferInput(name, [1], dtype)
            tensor.set_data_from_numpy(np.array([value], dtype=object if dtype == "BYTES"
                                                else bool))
            tensors.append(tensor)
        return tensors

    def client_loop(index: int) -> None:
        events: dict[str, queue.Queue] = {t: queue.Queue() for t in urls}
        clients = {}
        try:
            for target, url in urls.items():
                clients[target] = grpcclient.InferenceServerClient(url)
                clients[target].start_stream(
                    callback=lambda result, error, q=events[target]: q.put(
                        (time.perf_counter(), result, error)))
            last: dict[str, float] = {}
            for k in range(per_client):
                target = ("direct", "router")[(index + k) % 2]
                sent = time.perf_counter()
                clients[target].async_stream_infer(MIXED_MODEL, inputs(),
                                                   request_id=f"{index}-{k}",
                                                   enable_empty_final_response=True)
                first = None
                while True:
                    at, result, error = events[target].get(timeout=120)
                    if error is not None:
                        raise be.BenchError(f"{target} request failed: {error}")
                    first = first if first is not None else (at - sent) * 1e3
                    final = result.get_response().parameters.get("triton_final_response")
                    if final is None or final.bool_param:
                        break
                ttft[target].append(first)
                last[target] = first
                if k % 2 == 1:  # a pair: one request each way, back to back
                    pairs.append(last["router"] - last["direct"])
        except Exception as exc:  # reported; the other clients go on
            errors.append(f"client {index}: {exc}")
        finally:
            for client in clients.values():
                client.stop_stream(cancel_requests=True)
                client.close()

    per_client = 2 * -(-per_target // concurrency)  # even: pairs; about per_target each way
    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True)
               for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(timeout=1.0)
            be.check_server(server.process, "the mixed TTFT run")
    result: dict[str, Any] = {"concurrency": concurrency, "requests_per_target": per_target,
                              "errors": errors, "paired_diff_ms_median": median(pairs),
                              "pairs": len(pairs)}
    for target, values in ttft.items():
        result[target] = {"count": len(values), "p50": median(values),
                          "avg": statistics.mean(values) if values else None,
                          "p99": be.percentile(values, 99) if values else None}
    for q in ("p50", "avg"):
        d, r = result["direct"][q], result["router"][q]
        result[f"share_{q}"] = None if d is None or not r else (r - d) / r
    share = result["share_p50"]
    result["target"] = ("not measured" if share is None else
                        "met" if share < TTFT_SHARE_TARGET else "not met")
    return result


def summarize_llm(llm: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    if not llm:
        return rows
    for c in sorted({r["concurrency"] for r in llm["runs"]}):
        row: dict[str, Any] = {"concurrency": c}
        for target in ("direct", "router"):
            ok = [r for r in llm["runs"] if r["concurrency"] == c and r["target"] == target
                  and "error" not in r]
            row[target] = {q: median([r["ttft_ms"][q] for r in ok
                                      if r["ttft_ms"].get(q) is not None])
                           for q in ("p50", "avg", "p99")}
            row[target]["itl_p50"] = median([r["itl_ms"]["p50"] for r in ok
                                             if r["itl_ms"].get("p50") is not None])
            row[target]["rounds"] = len(ok)
        for q in ("p50", "avg"):
            d, r = row["direct"][q], row["router"][q]
            row[f"share_{q}"] = None if d is None or not r else (r - d) / r
        # The router adds nothing to a token's path but its hop: an ITL ratio far from 1 says
        # the whole machine ran slower during one side's runs (noise), not the router.
        row["itl_ratio"] = ratio(row["router"]["itl_p50"], row["direct"]["itl_p50"])
        row["router_cpu_s"] = median([r["cpu_s"]["router"] for r in llm["runs"]
                                      if r["concurrency"] == c and r["target"] == "router"
                                      and "cpu_s" in r])
        row["triton_cpu_s"] = median([r["cpu_s"]["triton"] for r in llm["runs"]
                                      if r["concurrency"] == c and r["target"] == "router"
                                      and "cpu_s" in r])
        share = row["share_p50"]
        row["target"] = ("not measured" if share is None else
                         "met" if share < TTFT_SHARE_TARGET else "not met")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- report


def _f(value: float | None, digits: int = 0, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def render_markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    title = "# Router overhead" + (" (quick smoke run)" if s["quick"] else "")
    lines = [
        title,
        "",
        f"What the router (`python -m router`, {' '.join(ROUTER_ARGS)}, one instance) adds "
        f"in front of one tritonserver, next to {report['setup'].get('nginx_version', 'nginx')}"
        f" (`grpc_pass`, upstream keepalive; config in `router_overhead.json`), on trivial "
        f"Python-backend models from `tests/model_repository`: perf_analyzer, "
        f"{s['window_ms']} ms windows, stability {s['stability']}%, median of "
        f"{s['rounds']} round(s) with the targets measured side by side; added latency and "
        f"the throughput ratios are paired by round (the median over rounds of this path's p50 "
        f"minus direct's in the same round, and of the per-round ratios), since the machine's "
        f"speed drifts between rounds by more than a proxy adds. `router` is the "
        f"router as shipped (native data plane: the C++ proxy in `router/native/` carries the "
        f"bytes, Python routes); `router_python` is the same router with `--data-plane "
        f"python` (grpcio carries the bytes), for reference; the targets are judged on "
        f"`router`.",
        "",
        f"Machine: {m.get('nproc')} cores ({m.get('cpu_model', 'unknown CPU')}), shared by "
        f"perf_analyzer, nginx, the router and Triton, so numbers are noisy; compare within "
        f"one run. {m.get('date')}. Command: `{s['command']}`.",
        "",
        "Proxy CPU: CPU time of nginx (master + workers) or the router process per request "
        "completed by Triton during the run.",
    ]
    rows = report["comparison"]
    for mode, spec in MODES.items():
        flag = " with `--streaming`" if spec["streaming"] else ""
        lines += [
            "",
            f"## {mode.capitalize()}: `{spec['model']}`{flag}",
            "",
            "| c | target | infer/s | p50 us | p99 us | added p50 us | throughput vs direct "
            "| proxy CPU us/req |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in (r for r in rows if r["mode"] == mode):
            for target in TARGETS:
                t = row["targets"][target]
                lines.append(
                    f"| {row['concurrency']} | {target} | {_f(t['throughput'])} "
                    f"| {_f(t['p50_us'])} | {_f(t['p99_us'])} | {_f(t.get('added_p50_us'))} "
                    f"| {_pct(t.get('throughput_vs_direct'))} "
                    f"| {_f(t.get('proxy_cpu_us_per_request'))} |")
        lines += [
            "",
            f"| c | router added p50 / nginx added p50 (target <= {LATENCY_TARGET_RATIO:g}x) "
            f"| router throughput / nginx (target >= {THROUGHPUT_TARGET_FRACTION:.0%}) "
            f"| router_python: added p50 / nginx's, throughput / nginx |",
            "|---:|---:|---:|---:|",
        ]
        for row in (r for r in rows if r["mode"] == mode):
            lines.append(
                f"| {row['concurrency']} | {_f(row['added_p50_ratio'], 2, 'x')} "
                f"**{row['latency_target']}** | {_pct(row['router_throughput_vs_nginx'])} "
                f"**{row['throughput_target']}** "
                f"| {_f(row.get('router_python_added_p50_ratio'), 2, 'x')}, "
                f"{_pct(row.get('router_python_throughput_vs_nginx'))} |")
    failed = [r for r in report["trivial_runs"] if "error" in r]
    if failed:
        lines += ["", "Runs that produced no numbers:", ""]
        lines += [f"- {r['mode']} c={r['concurrency']} {r['target']} round {r.get('round')}: "
                  f"{r['error'].splitlines()[0]}" for r in failed]
    met = sum(r[k] == "met" for r in rows for k in ("latency_target", "throughput_target"))
    lines += ["", f"Targets met: {met} of {2 * len(rows)} (mode x concurrency x "
                  f"{{latency, throughput}})."]

    llm_rows = report.get("llm_comparison") or []
    lines += ["", "## Router's share of `llm` time to first token", ""]
    if not report.get("llm"):
        lines.append("Not measured in this run (`--no-llm` or `--quick`).")
    else:
        llm = report["llm"]
        lines += [
            f"GenAI-Perf, streaming, {llm['input_tokens']} input tokens, {llm['output_tokens']} "
            f"output tokens, the same prompts (seed 0) direct and through the router, prefix "
            f"caching off; median of {s['llm_rounds']} round(s) in alternating order. Share = "
            f"(router - direct) / router. On {m.get('nproc')} shared cores a difference this "
            f"small may be inside the noise (a negative share means the router runs happened to "
            f"be faster). ITL ratio: inter-token latency p50 router / direct; the router adds "
            f"only its hop to each token, so a ratio far from 1 means the machine was slower "
            f"during one side's runs. Router / Triton CPU: CPU seconds each used during a "
            f"router run (median).",
            "",
            f"| c | direct TTFT p50 / avg ms | router TTFT p50 / avg ms | share p50 | share avg "
            f"| target < {TTFT_SHARE_TARGET:.0%} | ITL ratio | router / Triton CPU |",
            "|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for row in llm_rows:
            d, r = row["direct"], row["router"]
            lines.append(
                f"| {row['concurrency']} | {_f(d['p50'], 1)} / {_f(d['avg'], 1)} "
                f"| {_f(r['p50'], 1)} / {_f(r['avg'], 1)} | {_f(_x100(row['share_p50']), 2, '%')}"
                f" | {_f(_x100(row['share_avg']), 2, '%')} | **{row['target']}** "
                f"| {_f(row.get('itl_ratio'), 2)} | {_f(row.get('router_cpu_s'), 1, ' s')} / "
                f"{_f(row.get('triton_cpu_s'), 1, ' s')} |")
        lines += ["", "TTFT p50 per round, in the order measured (ms):", ""]
        for c in sorted({r["concurrency"] for r in llm["runs"]}):
            cells = [f"{r['target']} {_f(r['ttft_ms']['p50'])}" if "error" not in r
                     else f"{r['target']} failed" for r in llm["runs"] if r["concurrency"] == c]
            lines.append(f"- c={c}: " + ", ".join(cells))
        if llm.get("mixed"):
            lines += [
                "",
                "Mixed load (the steadier measure here): tritonclient streaming requests of the "
                "same shape (one ~60-token prompt), c clients each switching between direct and "
                "the router on every request, so both paths run under the same load at the same "
                "time. Paired diff: median over consecutive direct/router pairs of one client of "
                "(router TTFT - direct TTFT).",
                "",
                f"| c | requests each way | direct TTFT p50 / avg ms | router TTFT p50 / avg ms "
                f"| share p50 | share avg | paired diff ms | target < {TTFT_SHARE_TARGET:.0%} |",
                "|---:|---:|---:|---:|---:|---:|---:|---|",
            ]
            for row in llm["mixed"]:
                d, r = row["direct"], row["router"]
                lines.append(
                    f"| {row['concurrency']} | {row['requests_per_target']} "
                    f"| {_f(d['p50'], 1)} / {_f(d['avg'], 1)} | {_f(r['p50'], 1)} / "
                    f"{_f(r['avg'], 1)} | {_f(_x100(row['share_p50']), 2, '%')} "
                    f"| {_f(_x100(row['share_avg']), 2, '%')} "
                    f"| {_f(row['paired_diff_ms_median'], 1)} | **{row['target']}** |")
                if row["errors"]:
                    lines.append(f"\nErrors at c={row['concurrency']}: {row['errors'][0]}")
        if llm.get("error"):
            lines += ["", f"Stopped early: {llm['error'].splitlines()[0]}"]

    profile = report.get("profile")
    lines += ["", "## Profile of the router", ""]
    if not profile:
        lines.append("Not profiled in this run (`--profile`).")
    else:
        lines += [f"{profile['py_spy']} (`{profile['options']}`), samples of the router "
                  f"process during one extra run per mode at concurrency {PROFILE_CONCURRENCY} "
                  f"(the sampler pauses the router, so these runs are not in the tables above). "
                  f"Raw stacks and a longer summary: `router_overhead_profile/`.", ""]
        for run in profile["runs"]:
            mode = run["measurement"]["mode"]
            if "summary" not in run:
                lines += [f"- {mode}: {run.get('error')}"]
                continue
            summary = run["summary"]
            cats = ", ".join(f"{e['name']} {e['percent']:.0f}%" for e in summary["categories"])
            by_thread = ", ".join(f"{e['name']} {e['percent']:.0f}%"
                                  for e in summary["busy_by_thread"])
            lines += [f"**{mode}** ({format_run(run['measurement'])} under the profiler; "
                      f"{summary['samples']} samples, {_f(summary['waiting_percent'])}% of them "
                      f"blocked in epoll_wait/poll/futex; the event loop thread was busy in "
                      f"{_f(summary['event_loop_busy_percent'])}% of its samples). Busy samples "
                      f"by thread: {by_thread}. "
                      f"By category: {cats}.", "",
                      "| % of busy | leaf function (self time) |", "|---:|---|"]
            lines += [f"| {e['percent']:.1f} | `{e['name']}` |" for e in summary["self"][:10]]
            lines += ["", "| % of busy | innermost Python function |", "|---:|---|"]
            lines += [f"| {e['percent']:.1f} | `{e['name']}` |"
                      for e in summary["innermost_python"][:10]]
            lines.append("")
    lines += ["", f"Every number, command and log path: `router_overhead.json`; artifacts in "
                  f"`{s['artifact_dir']}`.", ""]
    return "\n".join(lines)


def _x100(value: float | None) -> float | None:
    return None if value is None else 100 * value


def scrub(text: str) -> str:
    """Paths inside the checkout relative to it (error messages, logs named in them)."""
    return text.replace(str(REPO_ROOT) + "/", "")


def write_reports(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "router_overhead.json", out_dir / "router_overhead.md"
    json_path.write_text(scrub(json.dumps(report, indent=2)) + "\n")
    markdown = scrub(render_markdown(report))
    if md_path.exists():  # keep hand-written notes below the marker
        old = md_path.read_text()
        if NOTES_MARKER in old:
            markdown = markdown.rstrip("\n") + "\n\n" + NOTES_MARKER + old.split(NOTES_MARKER,
                                                                              1)[1]
    md_path.write_text(markdown)
    return json_path, md_path


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench_router_overhead.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: concurrency 1,4, 1 s windows, one round, no llm part; "
                             "reports go to the artifact directory unless --out-dir is given")
    parser.add_argument("--concurrency", type=be.parse_int_list, default=None,
                        help="comma-separated concurrencies (default 1,4,16; --quick 1,4)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="times each (mode, concurrency, target) is measured, in a rotating "
                             "order; the report gives medians (default 3; --quick 1)")
    parser.add_argument("--window-ms", type=int, default=None,
                        help="perf_analyzer measurement window (-p; default 2000; --quick 1000)")
    parser.add_argument("--stability", type=int, default=25,
                        help="perf_analyzer -s (percent, default 25); an unstable run is "
                             "repeated once with 4x the tolerance")
    parser.add_argument("--max-trials", type=int, default=None,
                        help="perf_analyzer -r (default 10; --quick 6)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the router during a unary and a streaming run at "
                             f"concurrency {PROFILE_CONCURRENCY}")
    parser.add_argument("--profile-launch", choices=["attach", "child"], default="attach",
                        help="attach py-spy to the running router (default; falls back to "
                             "child when ptrace is not allowed) or start a router under it")
    parser.add_argument("--llm", action=argparse.BooleanOptionalAction, default=None,
                        help="measure the router's share of llm TTFT (default: on, off with "
                             "--quick)")
    parser.add_argument("--llm-rounds", type=int, default=3,
                        help="times each llm (concurrency, target) is measured (default 3)")
    parser.add_argument("--llm-mixed-requests", type=int, default=24,
                        help="requests each way per concurrency in the mixed-load TTFT "
                             "measurement (default 24; 0: skip it)")
    parser.add_argument("--llm-requests", type=int, default=None,
                        help="GenAI-Perf requests per llm run (default max(16, 4*c); at "
                             "least c)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer for GenAI-Perf (default: the project's "
                             "SmolLM2-135M-Instruct)")
    be.add_output_args(parser, "router_overhead.json/.md",
                       "logs, perf_analyzer CSVs, GenAI-Perf artifacts", "router-overhead")
    parser.add_argument("--run-timeout", type=float, default=300.0,
                        help="seconds one perf_analyzer run may take (default 300)")
    parser.add_argument("--genai-perf-timeout", type=float, default=900.0,
                        help="seconds one GenAI-Perf run may take (default 900)")
    parser.add_argument("--ready-timeout", type=float, default=300.0,
                        help="seconds to wait for a tritonserver to load its models")
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or list(QUICK_CONCURRENCY if args.quick
                                                else DEFAULT_CONCURRENCY)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.window_ms = args.window_ms or (1000 if args.quick else 2000)
    args.max_trials = args.max_trials or (6 if args.quick else 10)
    if args.llm is None:
        args.llm = not args.quick
    args.tokenizer = args.tokenizer or default_model_dir()
    if (args.rounds < 1 or args.llm_rounds < 1 or args.window_ms < 100 or args.max_trials < 3
            or args.stability < 1):
        parser.error("--rounds and --llm-rounds >= 1, --window-ms >= 100, --max-trials >= 3, "
                     "--stability >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    artifact_dir, out_dir = be.run_dirs(args, "router-overhead")
    for path, what in ((PERF_ANALYZER, "perf_analyzer"), (be.GENAI_PERF, "GenAI-Perf")):
        if not path.exists() and (what == "perf_analyzer" or args.llm):
            print(f"error: {what} is missing at {path} (run `make setup`)", file=sys.stderr)
            return 2
    if args.llm and not (args.tokenizer / "tokenizer.json").exists():
        print(f"error: no tokenizer in {args.tokenizer} (run `make setup`)", file=sys.stderr)
        return 2
    artifact_dir.mkdir(parents=True, exist_ok=True)
    be.stop_on_sigterm()
    machine = be.machine_facts()
    settings = {
        "quick": args.quick,
        "command": shlex.join(["scripts/bench_router_overhead.py",
                               *(argv if argv is not None else sys.argv[1:])]),
        "concurrency": args.concurrency, "rounds": args.rounds, "window_ms": args.window_ms,
        "llm_rounds": args.llm_rounds,
        "stability": args.stability, "max_trials": args.max_trials,
        "router_args": list(ROUTER_ARGS), "profile": args.profile, "llm": args.llm,
        "artifact_dir": be.display_path(artifact_dir),
        "targets": {"latency": f"router added p50 <= {LATENCY_TARGET_RATIO:g}x nginx added p50",
                    "throughput": f"router throughput >= {THROUGHPUT_TARGET_FRACTION:.0%} of "
                                  f"nginx",
                    "llm_ttft_share": f"(router - direct) / router TTFT p50 < "
                                      f"{TTFT_SHARE_TARGET:.0%}"},
    }
    log(f"artifacts: {be.display_path(artifact_dir)}; reports: {be.display_path(out_dir)}")
    log(f"machine: {machine.get('nproc')} cores, {machine.get('cpu_model')}, load average "
        f"{machine.get('load_average_at_start')}")
    report: dict[str, Any] = {"settings": settings, "machine": machine}
    try:
        nginx_binary = ensure_nginx()
        with contextlib.ExitStack() as stack:
            bench = Bench(args, artifact_dir, stack)
            report["setup"] = bench.start(nginx_binary)
            runs = bench_trivial(bench, args)
            report["trivial_runs"] = runs
            report["comparison"] = summarize(runs, args.concurrency)
            if args.profile:
                report["profile"] = profile_router(bench, args, out_dir)
            log("stopping the router, nginx and tritonserver ...")
        report["llm"] = bench_llm(args, artifact_dir) if args.llm else None
        report["llm_comparison"] = summarize_llm(report["llm"])
    except KeyboardInterrupt:
        return be.interrupted()
    except (be.BenchError, RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    json_path, md_path = write_reports(report, out_dir)
    log(f"wrote {be.display_path(json_path)} and {be.display_path(md_path)}")
    print()
    print(render_markdown(report))
    failed = any("error" in r for r in report["trivial_runs"]) or bool(
        report["llm"] and any("error" in r for r in report["llm"]["runs"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
