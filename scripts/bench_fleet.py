#!/usr/bin/env python3
"""Fleet benchmark: every routing policy in front of one fleet of engines, on any host.

The fleet is the one `make serve` starts (python_backends/tools/serve.py, the same script a
user runs): one tritonserver per GPU, or --instances M sharing the GPUs (each with an even
share of memory), or CPU instances on a host without GPUs; the engine serves with prefix
caching (and CUDA graphs on a GPU). --random-weights SHAPE serves random bf16 weights in a
published model's shapes (weights cannot always travel to the host); the vocabulary is the
tokenizer's, so text round-trips (for llama-3.2-1b: 49,152 tokens instead of 128,256).

For each policy the benchmark starts a router (`python -m router --policy P`) in front of the
fleet's instances and runs, through it, with the project's own load generator:

  multi_tenant  T tenants, each with its own long system prompt (--system-tokens), and short
                user turns (--user-tokens): N requests, a tenant drawn at random for each,
                --concurrency at a time, --output-tokens each (min_tokens = max_tokens);
  multi_turn    S sessions of K turns; each turn's prompt is the session's history (system
                text, earlier turns and answers) plus a new message; --session-concurrency
                sessions at a time; the session id goes in the `session_id` parameter.

Why not GenAI-Perf: it cannot express the multi-turn workload (no history, sessions need a
perf_analyzer option the bundled one lacks; docs/benchmarks/router_quality.md), and on a
remote GPU host its dependencies may not be installable. The numbers are the same ones:
TTFT = first streamed token at the client.

Every policy sees the same prompts; each run's prompts start with a run tag, so no run finds
the previous runs' blocks in the engines' prefix caches. Reported per policy and workload:
prefix-cache hit rate (hit / queried tokens, deltas of the engines' counters), TTFT p50/p99,
output tokens/s (total and per GPU), goodput (requests/s whose TTFT met --ttft-slo-ms) and
whether TTFT p99 met it.

Reports: <out-dir>/fleet.json and fleet.md. Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

_SCRIPTS = Path(__file__).resolve().parent
for _path in (_SCRIPTS, _SCRIPTS.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_engine import (  # noqa: E402
    BenchError,
    add_output_args,
    display_path,
    interrupted,
    machine_facts,
    percentile,
    run_dirs,
    stop_on_sigterm,
)
from bench_router_quality import (  # noqa: E402
    ALL_POLICIES,
    Session,
    await_turn,
    drive_sessions,
    engine_counters,
    engine_delta,
    load_words,
    router_summary,
    streaming_client,
    synthetic_texts,
)

from python_backends.paths import CACHE_DIR, REPO_ROOT, default_model_dir  # noqa: E402
from python_backends.tools.gpus import visible_gpus  # noqa: E402
from python_backends.tools.router_process import RouterProcess  # noqa: E402
from python_backends.tools.triton_server import distinct_ports, free_port  # noqa: E402

WORKLOADS = ("multi_tenant", "multi_turn")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


@dataclass(frozen=True)
class Sizes:
    tenants: int = 48
    system_tokens: int = 1024
    user_tokens: int = 32
    output_tokens: int = 64
    requests: int = 768
    concurrency: int = 64
    sessions: int = 64
    turns: int = 4
    session_system_tokens: int = 256
    session_user_tokens: int = 64
    answer_tokens: int = 64
    session_concurrency: int = 32


QUICK_SIZES = Sizes(tenants=3, system_tokens=96, user_tokens=16, output_tokens=4, requests=8,
                    concurrency=2, sessions=2, turns=2, session_system_tokens=48,
                    session_user_tokens=16, answer_tokens=4, session_concurrency=2)


def log(msg: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- workload


def build_workload(sizes: Sizes, tokenizer_dir: Path, seed: int) -> dict[str, Any]:
    """Prompts for both workloads, as plain data (so they can be saved and carried)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = load_words()
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        return synthetic_texts(tokenizer, words, rng, tokens)

    tenants = [f"System: you are the assistant of tenant {t}. " + text(sizes.system_tokens)
               for t in range(sizes.tenants)]
    requests = [{"tenant": rng.randrange(sizes.tenants), "user": text(sizes.user_tokens)}
                for _ in range(sizes.requests)]
    sessions = [{"system": "System: " + text(sizes.session_system_tokens),
                 "users": [text(sizes.session_user_tokens) for _ in range(sizes.turns)]}
                for _ in range(sizes.sessions)]
    return {"sizes": asdict(sizes), "seed": seed, "tenants": tenants, "requests": requests,
            "sessions": sessions}


# Sizes a saved workload can be run with besides its own (counts only up to what it holds).
_LOAD_TIME = {"requests", "concurrency", "output_tokens", "sessions", "turns",
              "session_concurrency", "answer_tokens"}
_AT_MOST = {"requests", "sessions", "turns"}


def load_workload(path: Path, overrides: dict[str, int]) -> tuple[dict[str, Any], Sizes]:
    """A saved workload, cut to the requested counts; other sizes are fixed by its prompts."""
    prompts = json.loads(path.read_text())
    saved = Sizes(**prompts["sizes"])
    fixed = sorted(k for k in overrides if k not in _LOAD_TIME)
    if fixed:
        raise ValueError(f"{path} fixes {', '.join(fixed)} (its prompts are written): "
                         f"generate a new workload to change them")
    for key in _AT_MOST & set(overrides):
        if overrides[key] > getattr(saved, key):
            raise ValueError(f"--{key.replace('_', '-')} {overrides[key]}: {path} holds "
                             f"{getattr(saved, key)}")
    sizes = replace(saved, **overrides)
    prompts["requests"] = prompts["requests"][:sizes.requests]
    prompts["sessions"] = [dict(s, users=s["users"][:sizes.turns])
                           for s in prompts["sessions"][:sizes.sessions]]
    return prompts, sizes


def tenant_sessions(workload: dict[str, Any], tag: str) -> list[Session]:
    """Each multi-tenant request as a one-turn session (its own id: end users differ)."""
    return [Session(f"{tag}-req-{i:05d}", f"[{tag}] {workload['tenants'][r['tenant']]}",
                    [r["user"]])
            for i, r in enumerate(workload["requests"])]


def chat_sessions(workload: dict[str, Any], tag: str) -> list[Session]:
    return [Session(f"{tag}-session-{i:03d}", f"[{tag}] {s['system']}", list(s["users"]))
            for i, s in enumerate(workload["sessions"])]


@dataclass(frozen=True)
class GeneratorSizes:
    """What bench_router_quality's session generator reads (and the token-id worker)."""

    answer_tokens: int
    session_concurrency: int
    # --model engine: every text of the run already tokenized (tokenizers are not safe to
    # call from many threads at once), by text.
    token_ids: dict[str, list[int]] | None = None


def turn_text(message: str) -> str:
    """A user turn as appended to the history (bench_router_quality's format)."""
    return f"\nUser: {message}\nAssistant:"


def tokenize_sessions(tokenizer: Any, sessions: list[Session]) -> dict[str, list[int]]:
    texts = {s.system for s in sessions} | {turn_text(m) for s in sessions
                                             for m in s.user_messages}
    return {t: tokenizer.encode(t, add_special_tokens=False) for t in texts}


def _engine_inputs(prompt_ids: list[int], answer_tokens: int) -> list:
    import numpy as np
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value, dtype in (
            ("input_ids", np.array([prompt_ids], dtype=np.int32), "INT32"),
            ("input_lengths", np.array([[len(prompt_ids)]], dtype=np.int32), "INT32"),
            ("request_output_len", np.array([[answer_tokens]], dtype=np.int32), "INT32"),
            ("min_tokens", np.array([[answer_tokens]], dtype=np.int32), "INT32"),
            ("streaming", np.array([[True]]), "BOOL")):
        tensor = grpcclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def run_token_session_worker(url: str, work: Any, records: list[dict], sizes: GeneratorSizes,
                             stop: Any, deadline: float) -> None:
    """`run_session_worker` for the `engine` model (TensorRT-LLM contract): the client
    tokenizes, the history is kept as token ids (the answer's ids appended as generated)."""
    import queue

    ids_of = sizes.token_ids
    with streaming_client(url) as (client, responses):
        while not stop.is_set():
            try:
                session = work.get_nowait()
            except queue.Empty:
                return
            history = ids_of[session.system]
            for turn, message in enumerate(session.user_messages, start=1):
                prompt = history + ids_of[turn_text(message)]
                sent = time.perf_counter()
                client.async_stream_infer(
                    "engine", _engine_inputs(prompt, sizes.answer_tokens),
                    request_id=f"{session.session_id}-{turn}",
                    parameters={"session_id": session.session_id},
                    enable_empty_final_response=True)
                got = await_turn(responses, stop, deadline, f"{session.session_id} turn {turn}")
                if got is None:
                    return
                done = time.perf_counter()
                first, answer, cached = None, [], None
                for at, result in got:
                    ids = result.as_numpy("output_ids")
                    if ids is not None and ids.size:
                        first = first or at
                        answer.extend(int(t) for t in ids.reshape(-1))
                    if result.as_numpy("num_cached_tokens") is not None:
                        cached = int(result.as_numpy("num_cached_tokens").reshape(-1)[0])
                records.append({
                    "session": session.session_id, "turn": turn,
                    "ttft_s": (first or done) - sent, "latency_s": done - sent,
                    "input_tokens": len(prompt), "output_tokens": len(answer),
                    "cached_tokens": cached, "prompt_chars": None,
                })
                history = prompt + answer


# ----------------------------------------------------------------------------- model


def prepare_random_model(shape: str, model_dir: Path, tokenizer_dir: Path, seed: int) -> dict:
    """Random bf16 weights in `shape`'s published sizes with the tokenizer's vocabulary
    (kept: a second run with the same shape reuses them)."""
    marker = model_dir / "random-weights.json"
    if marker.exists() and json.loads(marker.read_text()).get("shape") == shape:
        return json.loads(marker.read_text())
    import torch
    from bench_gpu import SHAPES
    from transformers import LlamaConfig, LlamaForCausalLM

    reference = json.loads((tokenizer_dir / "config.json").read_text())
    dims = dict(SHAPES[shape], vocab_size=reference["vocab_size"],
                bos_token_id=reference.get("bos_token_id"),
                eos_token_id=reference.get("eos_token_id"))
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**dims)).to(torch.bfloat16)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, model_dir / name)
    info = {"shape": shape, "seed": seed, "vocab_size": dims["vocab_size"],
            "params": sum(p.numel() for p in {p.data_ptr(): p
                                              for p in model.parameters()}.values())}
    del model
    marker.write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------- fleet


class Stack:
    """`serve.py` in a subprocess (its own process group); the instances it started."""

    def __init__(self, args: argparse.Namespace, log_dir: Path, attempt: int = 0) -> None:
        self.grpc_port, self.metrics_port, self.http_port = distinct_ports(
            free_port(), free_port(), free_port())
        self.command = [
            sys.executable, "-m", "python_backends.tools.serve",
            "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
            "--http-port", str(self.http_port),
            "--models", args.model,  # `llm` runs its engine in process
            "--log-dir", str(log_dir), "--policy", "round_robin",
            "--ready-timeout", str(args.ready_timeout), *args.serve_args]
        if args.instances:
            self.command += ["--instances", str(args.instances)]
        if args.model_dir:
            self.command += ["--model-dir", str(args.model_dir)]
        self.log_path = log_dir / (f"serve-{attempt}.log" if attempt else "serve.log")
        self.model = args.model
        self.process: subprocess.Popen | None = None
        self.instances: list[dict[str, Any]] = []

    def start(self, timeout_s: float) -> float:
        started = time.monotonic()
        with open(self.log_path, "wb") as out:  # a new file: readiness is read from it
            self.process = subprocess.Popen(self.command, cwd=REPO_ROOT, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"serve exited with code {self.process.returncode}; see "
                                 f"{display_path(self.log_path)}")
            if "The stack is ready." in self.log_path.read_text(errors="replace"):
                self.instances = self._admin("/v1/instances")
                return time.monotonic() - started
            time.sleep(1.0)
        raise BenchError(f"the fleet was not ready in {timeout_s:.0f} s; see "
                         f"{display_path(self.log_path)}")

    def _admin(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def router_args(self) -> list[str]:
        return [f"{i['address']},{i['metrics']}" for i in self.instances]

    def counters(self) -> list[dict[str, float]]:
        return [engine_counters(i["metrics"], self.model) for i in self.instances]

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self, during: str) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(f"the fleet stopped during {during}; see "
                             f"{display_path(self.log_path)}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # serve stops its servers and router in order
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# ----------------------------------------------------------------------------- runs


def summarize(records: list[dict], wall_s: float, slo_ms: float, gpus: int) -> dict[str, Any]:
    ttfts = [r["ttft_s"] * 1e3 for r in records]
    output = sum(r["output_tokens"] or 0 for r in records)
    good = sum(t <= slo_ms for t in ttfts)
    p99 = percentile(ttfts, 99) if ttfts else None
    return {
        "requests": len(records),
        "wall_s": round(wall_s, 2),
        "output_tokens": output,
        "output_token_throughput": output / wall_s if wall_s else None,
        "output_token_throughput_per_gpu": output / wall_s / gpus if wall_s and gpus else None,
        "request_throughput": len(records) / wall_s if wall_s else None,
        "ttft_ms": {"p50": percentile(ttfts, 50) if ttfts else None, "p99": p99},
        "latency_ms_p50": percentile([r["latency_s"] * 1e3 for r in records], 50)
        if records else None,
        "goodput_rps": good / wall_s if wall_s else None,
        "ttft_slo_met_share": good / len(records) if records else None,
        "ttft_p99_meets_slo": p99 is not None and p99 <= slo_ms,
    }


def run_one(stack: Stack, policy: str, workload: str, sessions: list[Session],
            gen: GeneratorSizes, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    router = RouterProcess(instances=stack.router_args(), extra_args=["--policy", policy],
                           log_path=log_dir / f"router-{workload}-{policy}.log")
    try:
        router.start().wait_ready(healthy_instances=len(stack.instances), timeout_s=60)
        before = stack.counters()
        records, wall = drive_sessions(
            router.grpc_url, sessions, gen, args.run_timeout, stack,
            run_token_session_worker if args.model == "engine" else None)
        time.sleep(1.0)  # the engines publish their counters after their last step
        engine = engine_delta(before, stack.counters())
        routed = router_summary(router.metrics_text(),
                                {i["address"]: n for n, i in enumerate(stack.instances)})
    finally:
        router.stop()
    result = summarize(records, wall, args.ttft_slo_ms, args.gpu_count)
    result.update(policy=policy, engine=engine, router=routed)
    return result


# ----------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# Fleet: every routing policy in front of one fleet",
        "",
        f"Measured {report['machine'].get('date')} on {s['host']}: {s['instances']} "
        f"tritonserver instance(s) on {s['gpu_count']} GPU(s) "
        f"({s['placement']}); model: {s['model']}.",
        "",
        f"Command: `{s['command']}`",
        "",
        f"TTFT objective for goodput: {s['ttft_slo_ms']:.0f} ms. Hit rate: the engines' "
        "prefix-cache hit tokens / queried tokens over the run. tok/s: output tokens over "
        "the run's wall time (and per GPU).",
        "",
    ]
    for workload in s["workloads"]:
        sizes = s["sizes"]
        if workload == "multi_tenant":
            lines.append(
                f"## multi_tenant: {sizes['tenants']} tenants x {sizes['system_tokens']}-token "
                f"system prompts, {sizes['user_tokens']}-token user turns, "
                f"{sizes['requests']} requests at concurrency {sizes['concurrency']}, "
                f"{sizes['output_tokens']} output tokens")
        else:
            lines.append(
                f"## multi_turn: {sizes['sessions']} sessions x {sizes['turns']} turns, "
                f"{sizes['session_concurrency']} at a time, {sizes['answer_tokens']}-token "
                f"answers")
        lines += ["", "| policy | hit rate | TTFT p50 ms | TTFT p99 ms | output tok/s | "
                      "tok/s per GPU | goodput req/s | TTFT <= SLO | p99 meets SLO | "
                      "hit rate / RR | tok/s / RR | requests per instance |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
        runs = report["runs"][workload]
        base = runs.get("round_robin") or {}
        for policy, run in runs.items():
            if "error" in run:
                lines.append(f"| {policy} | error: {run['error']} |||||||||||")
                continue
            hit = run["engine"]["hit_rate"]
            base_hit = (base.get("engine") or {}).get("hit_rate")
            base_tps = base.get("output_token_throughput")
            spread = "/".join(f"{v:.0f}" for v in
                              run["router"]["decisions_per_instance"].values())
            lines.append(
                f"| {policy} | {_fmt(None if hit is None else 100 * hit, '.1f')}% | "
                f"{_fmt(run['ttft_ms']['p50'])} | {_fmt(run['ttft_ms']['p99'])} | "
                f"{_fmt(run['output_token_throughput'])} | "
                f"{_fmt(run['output_token_throughput_per_gpu'])} | "
                f"{_fmt(run['goodput_rps'], '.2f')} | "
                f"{_fmt(100 * run['ttft_slo_met_share'], '.0f')}% | "
                f"{'yes' if run['ttft_p99_meets_slo'] else 'no'} | "
                f"{_fmt(hit / base_hit if hit is not None and base_hit else None, '.2f')} | "
                f"{_fmt(run['output_token_throughput'] / base_tps if base_tps else None, '.2f')}"
                f" | {spread} |")
        lines.append("")
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench_fleet.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke sizes (a few short requests); reports go to the artifact "
                             "directory unless --out-dir is given")
    parser.add_argument("--policies", default=",".join(ALL_POLICIES),
                        help="comma-separated (default: all)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated: multi_tenant, multi_turn (default both)")
    parser.add_argument("--model", choices=["llm", "engine"], default="llm",
                        help="what the load generator calls: llm (text in, text out; "
                             "default) or engine (token ids, the TensorRT-LLM contract; the "
                             "client tokenizes)")
    parser.add_argument("--instances", type=int,
                        help="tritonservers (default: one per GPU; 2 without GPUs)")
    parser.add_argument("--model-dir", type=Path,
                        help="model to serve (default: the project's SmolLM2-135M-Instruct)")
    parser.add_argument("--random-weights", choices=["llama-3.2-1b", "smollm2-135m"],
                        help="serve random bf16 weights in these shapes, written to "
                             "--model-dir (default .cache/models/random-<shape>)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer folder for prompts (and the random model's "
                             "vocabulary); default: the project's SmolLM2-135M-Instruct")
    parser.add_argument("--workload-file", type=Path,
                        help="read the prompts from this JSON (written by --save-workload) "
                             "instead of generating them")
    parser.add_argument("--save-workload", type=Path,
                        help="write the generated prompts here and exit")
    for field in asdict(Sizes()):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None,
                            help=f"(default {getattr(Sizes(), field)}; quick "
                                 f"{getattr(QUICK_SIZES, field)})")
    parser.add_argument("--ttft-slo-ms", type=float, default=500.0,
                        help="time-to-first-token objective for goodput (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-arg", dest="serve_args", action="append", default=[],
                        help="extra argument for serve.py (repeat), e.g. "
                             "--serve-arg=--gpu-kv-cache-gb=1")
    add_output_args(parser, "<report-name>.json/.md", "logs", "fleet")
    parser.add_argument("--report-name", default="fleet",
                        help="report file names: <out-dir>/<name>.json and .md (default fleet)")
    parser.add_argument("--run-timeout", type=float, default=900.0,
                        help="seconds one workload run may take (default 900)")
    parser.add_argument("--max-restarts", type=int, default=3,
                        help="times a fleet that died (a server crashed) is restarted for "
                             "the next policy before the benchmark gives up (default 3)")
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds for the fleet to load its models (default 600)")
    args = parser.parse_args(argv)
    base = QUICK_SIZES if args.quick else Sizes()
    overrides = {f: getattr(args, f) for f in asdict(base) if getattr(args, f) is not None}
    args.size_overrides = overrides
    args.sizes = replace(base, **overrides)
    if any(v < 1 for v in asdict(args.sizes).values()):
        parser.error("sizes must be positive")
    args.policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in args.policies if p not in ALL_POLICIES]
    if unknown or not args.policies:
        parser.error(f"--policies: choose from {', '.join(ALL_POLICIES)}")
    args.workloads = [w for w in args.workloads.split(",") if w]
    if not args.workloads or any(w not in WORKLOADS for w in args.workloads):
        parser.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    args.tokenizer = args.tokenizer or default_model_dir()
    if args.random_weights and args.model_dir is None:
        args.model_dir = CACHE_DIR / "models" / f"random-{args.random_weights}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes: Sizes = args.sizes
    if not (args.tokenizer / "tokenizer.json").exists():
        print(f"error: no tokenizer.json in {args.tokenizer} (run `make setup`)",
              file=sys.stderr)
        return 2
    if args.workload_file:
        try:
            prompts, sizes = load_workload(args.workload_file, args.size_overrides)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: cannot use --workload-file {args.workload_file}: {exc!r}",
                  file=sys.stderr)
            return 2
        args.sizes = sizes
    else:
        log("generating the prompts ...")
        prompts = build_workload(sizes, args.tokenizer, args.seed)
    if args.save_workload:
        args.save_workload.write_text(json.dumps(prompts))
        log(f"wrote {args.save_workload}")
        return 0
    artifact_dir, out_dir = run_dirs(args, "fleet")
    log_dir = artifact_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stop_on_sigterm()
    gpus = visible_gpus()
    args.gpu_count = len(gpus)
    model_info: dict[str, Any] = {}
    if args.random_weights:
        log(f"random {args.random_weights} weights in {display_path(args.model_dir)} ...")
        model_info = prepare_random_model(args.random_weights, args.model_dir, args.tokenizer,
                                          args.seed)
    tokenizer = None
    if args.model == "engine":
        from python_backends.text import load_tokenizer

        tokenizer = load_tokenizer(str(args.tokenizer))
    stack = Stack(args, log_dir)
    runs: dict[str, dict[str, Any]] = {w: {} for w in args.workloads}
    restarts = 0
    started = time.monotonic()
    try:
        log(f"starting the fleet: {shlex.join(stack.command[1:])}")
        took = stack.start(args.ready_timeout)
        log(f"{len(stack.instances)} instance(s) ready in {took:.0f} s on {len(gpus)} GPU(s); "
            f"log {display_path(stack.log_path)}")
        for workload in args.workloads:
            for n, policy in enumerate(args.policies):
                tag = f"run{n}"  # new prompt prefixes: no run hits an earlier run's blocks
                if workload == "multi_tenant":
                    sessions = tenant_sessions(prompts, tag)
                    gen = GeneratorSizes(sizes.output_tokens, sizes.concurrency)
                else:
                    sessions = chat_sessions(prompts, tag)
                    gen = GeneratorSizes(sizes.answer_tokens, sizes.session_concurrency)
                if tokenizer is not None:
                    gen = replace(gen, token_ids=tokenize_sessions(tokenizer, sessions))
                try:
                    run = run_one(stack, policy, workload, sessions, gen, args, log_dir)
                except (BenchError, RuntimeError, TimeoutError, OSError) as exc:
                    run = {"policy": policy, "error": str(exc)}
                    log(f"{workload}/{policy} FAILED: {exc}")
                if not stack.alive():
                    # A server crashed (the run says why): later policies get a new fleet.
                    restarts += 1
                    run["fleet_died"] = True
                    if restarts > args.max_restarts:
                        raise BenchError(f"the fleet died {restarts} times; see "
                                         f"{display_path(log_dir)}")
                    stack.stop()
                    stack = Stack(args, log_dir, attempt=restarts)
                    log(f"the fleet died during {workload}/{policy}: restarting it "
                        f"({restarts}/{args.max_restarts}) ...")
                    stack.start(args.ready_timeout)
                runs[workload][policy] = run
                (artifact_dir / "partial_results.json").write_text(json.dumps(runs, indent=1))
                if "error" not in run:
                    hit = run["engine"]["hit_rate"]
                    log(f"{workload}/{policy}: hit rate {_fmt(hit and 100 * hit, '.1f')}%, "
                        f"TTFT p50/p99 {_fmt(run['ttft_ms']['p50'])}/"
                        f"{_fmt(run['ttft_ms']['p99'])} ms, "
                        f"{_fmt(run['output_token_throughput'])} output tok/s, goodput "
                        f"{_fmt(run['goodput_rps'], '.2f')} req/s ({run['wall_s']:.0f} s)")
    except KeyboardInterrupt:
        return interrupted()
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        log("stopping the fleet ...")
        stack.stop()

    placement = sorted({line.split(" on ", 1)[1].split(" (log:")[0]
                        for line in stack.log_path.read_text(errors="replace").splitlines()
                        if line.startswith("starting tritonserver #")})
    settings = {
        "quick": args.quick,
        "command": shlex.join(["scripts/bench_fleet.py",
                               *(argv if argv is not None else sys.argv[1:])]),
        "serve_command": shlex.join(["python", *stack.command[1:]]),
        "total_wall_min": round((time.monotonic() - started) / 60, 1),
        "host": ", ".join(sorted({f"{g.name}" for g in gpus})) + f" x{len(gpus)}"
        if gpus else f"{machine_facts().get('nproc')} CPU cores, no GPU",
        "gpus": [asdict(g) for g in gpus],
        "gpu_count": len(gpus),
        "instances": len(stack.instances),
        "placement": "; ".join(placement),
        "model": (f"random bf16 weights, {args.random_weights} shapes with a "
                  f"{model_info.get('vocab_size')}-token vocabulary "
                  f"({model_info.get('params', 0) / 1e9:.2f} B parameters)"
                  if args.random_weights else display_path(args.model_dir or
                                                           default_model_dir())),
        "sizes": asdict(sizes),
        "policies": args.policies,
        "workloads": args.workloads,
        "ttft_slo_ms": args.ttft_slo_ms,
        "model_called": args.model,
        "fleet_restarts": restarts,
        "engine_env": {k: v for k, v in sorted(os.environ.items())
                       if k.startswith("LLM_ENGINE_")},
        "artifact_dir": display_path(artifact_dir),
    }
    report = {"settings": settings, "machine": machine_facts(), "runs": runs,
              "notes": report_notes(args)}
    json_path, md_path = write_report(report, out_dir, args.report_name)
    log(f"wrote {display_path(json_path)} and {display_path(md_path)}")
    markdown = md_path.read_text()
    print()
    print(markdown)
    return 1 if any("error" in r for w in runs.values() for r in w.values()) else 0


def write_report(report: dict[str, Any], out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def report_notes(args: argparse.Namespace) -> list[str]:
    notes = [
        "Load generator: the project's own (threads with tritonclient gRPC streams, "
        "greedy, min_tokens = max_tokens); each policy runs against the same fleet with a "
        "new router; each run's prompts carry a run tag at the start, so no run reuses "
        "another's cached blocks.",
        "Goodput: requests whose time to first token met the objective, per second of the "
        "run.",
    ]
    if args.gpu_count and args.instances and args.instances > args.gpu_count:
        notes.append("Several instances share each GPU: they time-share its compute, so "
                     "per-GPU throughput is the whole GPU's, not one instance's.")
    return notes


if __name__ == "__main__":
    sys.exit(main())
