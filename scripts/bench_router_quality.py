#!/usr/bin/env python3
"""Routing quality: each router policy in front of the same fleet of engines, same workloads.

A fleet of N (default 3) tritonservers serves the real model `llm` (its engine in process)
with prefix caching on and a deliberately small KV-cache pool per instance: it holds
--cache-fraction (default 0.4) of the workload's shared prompts as whole requests, the running
ones included, so no instance can cache every prefix but the fleet can when the prefixes are
partitioned.
That is the regime where cache-aware routing pays; with a large pool every policy ends up
with every prefix everywhere.

For each workload and each policy, with cold caches every time (engine reloaded, new router):

  1. start the fleet once (LLM_ENGINE_* environment overrides); before every later run,
     unload and load the `engine` model on each instance (a new engine: empty KV pool and
     prefix cache; --restart-each-run restarts the servers instead); warm each instance
     directly with one short request (the same for every policy); start
     `python -m router --policy P` with every instance's metrics address (kv_aware reads
     engine load from it); wait (bounded) for other work on the cores to calm down;
  2. shared-prefix workload: GenAI-Perf 0.0.16 (--num-prefix-prompts, --prefix-prompt-length,
     streaming, kserve/vllm request shape) through the router: TTFT p50/p99, output token
     and request throughput from its export;
     multi-turn workload: the project's own load generator (below), because GenAI-Perf
     0.0.16 cannot express it with its perf_analyzer;
  3. prefix-cache hit rate = delta hit tokens / delta queried tokens, summed over the
     instances' `llm_engine_prefix_cache_*_total` counters (their metrics ports); the
     router's routing decisions come from its own /metrics.

Why not GenAI-Perf for multi-turn sessions: GenAI-Perf 0.0.16 writes each turn as an
inputs.json entry with extra keys `session_id` (a UUID4 string) and `delay` (int, ms), and
each turn's `text_input` is a fresh synthetic prompt with no history (only the first turn
gets the shared prefix). It hands sessions to perf_analyzer's `--session-concurrency`, which
the bundled perf_analyzer does not have ("unrecognized option", exit 99); with
`--concurrency` instead perf_analyzer fails with "The input or output 'session_id' is not
found in the model configuration" (it treats the key as an input tensor). So no session id
ever reaches the router from it. The own generator runs S sessions of T turns,
--session-concurrency sessions at a time, each turn sent once the previous answer is
complete; a turn's prompt is the session's system text plus every earlier user message and
answer (history accumulated as a chat client does) plus a new user message; the session id
goes in the request parameter `session_id`, which the router reads. Greedy decoding, so every
policy sees the same conversation.

Reports: <out-dir>/router_quality.json (every number, commands, engine config, machine) and
<out-dir>/router_quality.md. Logs (servers, router, GenAI-Perf) stay in --artifact-dir.
Ctrl-C (or SIGTERM) stops GenAI-Perf, the router and every server cleanly; no report then.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import queue
import random
import re
import shlex
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (REPO_ROOT, REPO_ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_engine import (  # noqa: E402
    GENAI_PERF,
    MODEL,
    SERVER_MODELS,
    BenchError,
    add_output_args,
    check_server,
    display_path,
    find_genai_perf_export,
    genai_perf_command,
    interrupted,
    log,
    machine_facts,
    parse_genai_perf_export,
    percentile,
    run_dirs,
    run_genai_perf,
    stop_on_sigterm,
    warm_up,
)

from python_backends.paths import default_model_dir  # noqa: E402
from python_backends.tools.router_process import RouterProcess  # noqa: E402
from python_backends.tools.triton_server import TritonServer  # noqa: E402

ALL_POLICIES = ("round_robin", "least_connections", "prefix", "sticky", "hybrid", "kv_aware")
MULTI_TURN_POLICIES = ("round_robin", "prefix", "sticky", "hybrid")
QUICK_POLICIES = ("round_robin", "prefix", "hybrid")
QUICK_MULTI_TURN_POLICIES = ("round_robin", "sticky", "hybrid")
WORKLOADS = ("shared_prefix", "multi_turn")
BASELINE = "round_robin"
# Targets from the routing-quality issue.
CACHE_AWARE = ("prefix", "hybrid")
HIT_RATE_TARGET = 4.0
THROUGHPUT_TARGET = 2.0
# "hybrid no worse than sticky" on multi-turn: within this much of sticky (2 shared cores are
# noisy; the hit rate is not, so its tolerance is tighter).
NO_WORSE_TOLERANCE = {"hit_rate": 0.02, "output_token_throughput": 0.10, "ttft_p50": 0.10}
# Wall-clock verdicts between two runs are "inconclusive" when other work on the cores differed
# by more than this many cores between them (in the direction that could explain the outcome).
CONTENTION_GAP = 0.3
_CLK_TCK = os.sysconf("SC_CLK_TCK")  # /proc times are in these
GENAI_PERF_SESSIONS = (
    "GenAI-Perf 0.0.16 (--num-sessions/--session-turns-*) writes each turn as an inputs.json "
    "entry with two extra keys: `session_id` (a UUID4 string, the same for every turn of a "
    "session) and `delay` (int ms, on every turn but the last); each turn's `text_input` is a "
    "fresh synthetic prompt without the earlier turns (no history; only the first turn gets a "
    "prefix prompt). It relies on perf_analyzer's --session-concurrency, which the bundled "
    "perf_analyzer lacks (`unrecognized option '--session-concurrency'`, exit 99); with "
    "--concurrency instead, perf_analyzer treats `session_id` as an input tensor and stops: "
    "\"The input or output 'session_id' is not found in the model configuration\". No "
    "session id (parameter or header) reaches the router, and there is no sequence_id / "
    "sequence_start / sequence_end either (perf_analyzer sends those only to models with "
    "sequence batching, which `llm` does not have). Hence the project's own generator for "
    "the multi-turn workload, with a `session_id` request parameter and accumulated history.")


@dataclass(frozen=True)
class Sizes:
    """Workload and fleet sizes; QUICK_SIZES is the smoke-test version."""

    instances: int = 3
    engine_threads: int = 1  # torch threads per instance (3 instances share 2 cores)
    block_size: int = 16
    cache_fraction: float = 0.4  # of the shared prompts one instance's pool holds
    # shared-prefix workload (GenAI-Perf), shaped like SGLang's generated-shared-prefix
    # benchmark: long shared system prompts, each followed by many short questions
    prefix_prompts: int = 12
    prefix_tokens: int = 1024
    suffix_tokens: int = 64
    output_tokens: int = 8
    concurrency: int = 6
    requests: int = 144
    # multi-turn workload (own generator)
    sessions: int = 12
    turns: int = 4
    system_tokens: int = 128
    user_tokens: int = 64
    answer_tokens: int = 16
    session_concurrency: int = 6


QUICK_SIZES = Sizes(prefix_prompts=6, prefix_tokens=128, suffix_tokens=16, concurrency=3,
                    requests=18, sessions=4, turns=3, system_tokens=64, user_tokens=32,
                    answer_tokens=8, session_concurrency=3)


# ----------------------------------------------------------------------------- engine pool


def kv_bytes_per_block(model_dir: Path, block_size: int, element_size: int = 4) -> int:
    """Bytes of one KV block, as the engine computes it (fp32 on the CPU)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * element_size * block_size


def kv_pool(sizes: Sizes) -> dict[str, int]:
    """KV blocks per instance: ceil(cache_fraction * prefix prompts) whole requests (prefix +
    suffix + output, +2 tokens for a BOS and the join), the running ones included (about
    concurrency / instances of them), so the rest caches a little less than cache_fraction
    of the prefixes. A multi-turn session's last turn must fit twice over."""
    bs = sizes.block_size
    request_blocks = math.ceil(
        (sizes.prefix_tokens + sizes.suffix_tokens + sizes.output_tokens + 2) / bs)
    requests = math.ceil(sizes.cache_fraction * sizes.prefix_prompts)
    blocks = max(requests * request_blocks, 2 * math.ceil(multi_turn_max_tokens(sizes) / bs))
    return {"blocks": blocks, "request_blocks": request_blocks, "whole_requests": requests,
            "running_requests": math.ceil(sizes.concurrency / sizes.instances)}


def multi_turn_max_tokens(sizes: Sizes) -> int:
    """A generous bound on the last turn's prompt + answer, in tokens."""
    per_turn = sizes.user_tokens + sizes.answer_tokens + 8  # "\nUser: ", "\nAssistant:"
    return sizes.system_tokens + sizes.turns * per_turn


def engine_env(sizes: Sizes, blocks: int, bytes_per_block: int) -> dict[str, str]:
    return {
        "LLM_ENGINE_DEVICE": "cpu",  # kv_cache_bytes is the CPU budget
        "LLM_ENGINE_BLOCK_SIZE": str(sizes.block_size),
        "LLM_ENGINE_KV_CACHE_BYTES": str(blocks * bytes_per_block),
        "LLM_ENGINE_ENABLE_PREFIX_CACHING": "true",
        "LLM_ENGINE_NUM_THREADS": str(sizes.engine_threads),
    }


# ----------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
ENGINE_COUNTERS = (
    "llm_engine_prefix_cache_queried_tokens_total", "llm_engine_prefix_cache_hit_tokens_total",
    "llm_engine_prompt_tokens_total", "llm_engine_generated_tokens_total",
    "llm_engine_requests_finished_total", "llm_engine_preemptions_total",
    "llm_engine_kv_blocks_total",
)


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        try:
            samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
        except ValueError:
            continue
    return samples


def engine_counters(metrics_address: str, model: str = MODEL) -> dict[str, float]:
    """The counters of the engine that serves `model` (`llm` runs its own) on one instance,
    by its metrics "host:port" (absent ones, never updated yet, are 0)."""
    url = f"http://{metrics_address}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values = dict.fromkeys(ENGINE_COUNTERS, 0.0)
    for name, labels, value in parse_prometheus(text):
        if name in values and labels.get("model") == model:
            values[name] += value
    return values


def engine_delta(before: list[dict], after: list[dict]) -> dict[str, Any]:
    per_instance = [{k.removeprefix("llm_engine_").removesuffix("_total"): a[k] - b[k]
                     for k in ENGINE_COUNTERS if k != "llm_engine_kv_blocks_total"}
                    for b, a in zip(before, after, strict=True)]
    total = {k: sum(d[k] for d in per_instance) for k in per_instance[0]}
    queried = total["prefix_cache_queried_tokens"]
    return {
        "hit_rate": total["prefix_cache_hit_tokens"] / queried if queried else None,
        "total": total,
        "per_instance": per_instance,
        "kv_blocks_total": [a["llm_engine_kv_blocks_total"] for a in after],
    }


def router_summary(text: str, names: dict[str, int]) -> dict[str, Any]:
    """Routing decisions by reason, and requests by instance index and outcome."""
    reasons: dict[str, float] = defaultdict(float)
    decisions_per_instance: dict[str, float] = defaultdict(float)
    outcomes: dict[str, float] = defaultdict(float)
    for name, labels, value in parse_prometheus(text):
        if name == "llm_router_routing_decisions_total":
            reasons[labels.get("reason", "?")] += value
            decisions_per_instance[str(names.get(labels.get("instance", ""), "?"))] += value
        elif name == "llm_router_requests_total":
            outcomes[labels.get("outcome", "?")] += value
    return {"decisions_by_reason": dict(reasons),
            "decisions_per_instance": dict(sorted(decisions_per_instance.items())),
            "requests_by_outcome": dict(outcomes)}


# ----------------------------------------------------------------------------- fleet


class Fleet:
    """N tritonservers (engine + llm) with the benchmark's engine settings."""

    def __init__(self, count: int, env: dict[str, str], log_dir: Path, tag: str) -> None:
        self.servers = [TritonServer(models=list(SERVER_MODELS), env=env,
                                     log_path=log_dir / f"{tag}-triton-{i}.log")
                        for i in range(count)]

    def reset(self, timeout_s: float) -> float:
        """Cold engines without a restart: unload and load `llm` (its engine in process) on
        every instance, together (a new engine: new KV pool, empty prefix cache; its counters
        go on)."""
        import tritonclient.grpc as grpcclient

        started = time.monotonic()

        def one(server: TritonServer) -> None:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            try:
                client.unload_model(MODEL)
                deadline = time.monotonic() + timeout_s
                while client.is_model_ready(MODEL):
                    if time.monotonic() > deadline:
                        raise BenchError(f"{server.grpc_url}: engine did not unload")
                    time.sleep(0.1)
                client.load_model(MODEL, client_timeout=timeout_s)
            finally:
                client.close()

        self._on_each(one, "engine reload")
        return time.monotonic() - started

    def start(self, timeout_s: float) -> float:
        started = time.monotonic()
        for server in self.servers:
            server.start()
        for server in self.servers:
            server.wait_ready(timeout_s=max(1.0, timeout_s - (time.monotonic() - started)))
        return time.monotonic() - started

    def stop(self) -> None:
        self._on_each(TritonServer.stop, "stop", raise_error=False)  # cleanup: never masks

    def _on_each(self, fn, what: str, raise_error: bool = True) -> None:
        """`fn(server)` for every server at once; the first error is raised here."""
        errors: list[BaseException] = []

        def guarded(server: TritonServer) -> None:
            try:
                fn(server)
            except BaseException as exc:  # re-raised below in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=guarded, args=(s,), daemon=True)
                   for s in self.servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors and raise_error:
            raise BenchError(f"{what} failed: {errors[0]}")

    def check(self, during: str) -> None:
        for server in self.servers:
            check_server(server.process, during)

    def counters(self) -> list[dict[str, float]]:
        return [engine_counters(f"127.0.0.1:{s.metrics_port}") for s in self.servers]

    def warm(self, output_tokens: int = 4) -> float:
        """One short request straight to each instance (not through the router), together."""
        started = time.monotonic()
        self._on_each(lambda server: warm_up(
            server.grpc_url, 1, timeout_s=120.0, server_process=server.process,
            output_tokens=output_tokens), "warm-up")
        return time.monotonic() - started

    def router_args(self) -> list[str]:
        return [f"{s.grpc_url},127.0.0.1:{s.metrics_port}" for s in self.servers]

    def names(self) -> dict[str, int]:
        return {s.grpc_url: i for i, s in enumerate(self.servers)}


# ----------------------------------------------------------------------------- multi-turn


@dataclass
class Session:
    session_id: str
    system: str
    user_messages: list[str]


def synthetic_texts(tokenizer: Any, words: Sequence[str], rng: random.Random,
                    tokens: int) -> str:
    """Random words cut to `tokens` tokens (as the llm model's tokenizer counts them)."""
    text = " ".join(rng.choice(words) for _ in range(tokens))
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    return tokenizer.decode(ids).strip()


def load_words() -> list[str]:
    """GenAI-Perf's own corpus (Shakespeare), so both workloads read alike."""
    found = sorted(REPO_ROOT.glob(
        "tools/genai-perf-venv/lib/python3*/site-packages/genai_perf/inputs/retrievers/"
        "shakespeare.txt"))
    if not found:
        raise BenchError("GenAI-Perf's shakespeare.txt is missing (run `make setup`)")
    return found[0].read_text(errors="ignore").split()


def build_sessions(sizes: Sizes, tokenizer_dir: Path, seed: int = 0) -> list[Session]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = load_words()
    rng = random.Random(seed)
    sessions = []
    for i in range(sizes.sessions):
        system = "System: " + synthetic_texts(tokenizer, words, rng, sizes.system_tokens)
        users = [synthetic_texts(tokenizer, words, rng, sizes.user_tokens)
                 for _ in range(sizes.turns)]
        sessions.append(Session(f"session-{seed}-{i:03d}", system, users))
    return sessions


def _request_inputs(prompt: str, answer_tokens: int) -> list:
    import numpy as np
    import tritonclient.grpc as grpcclient

    sampling = json.dumps({"max_tokens": answer_tokens, "min_tokens": answer_tokens,
                           "temperature": 0})
    inputs = []
    for name, value, dtype in (("text_input", prompt, "BYTES"), ("stream", True, "BOOL"),
                               ("sampling_parameters", sampling, "BYTES"),
                               ("exclude_input_in_output", True, "BOOL"),
                               ("return_num_input_tokens", True, "BOOL"),
                               ("return_num_output_tokens", True, "BOOL")):
        tensor = grpcclient.InferInput(name, [1], dtype)
        tensor.set_data_from_numpy(np.array([value], dtype=object if dtype == "BYTES" else bool))
        inputs.append(tensor)
    return inputs


def _scalar(result: Any, name: str) -> int | None:
    value = result.as_numpy(name)
    return None if value is None or value.size == 0 else int(value.reshape(-1)[0])


@contextlib.contextmanager
def streaming_client(url: str):
    """A tritonclient gRPC stream whose responses land, time-stamped, in a queue:
    yields (client, queue of (time, result, error)); cancels what is left on exit."""
    import tritonclient.grpc as grpcclient

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put(
        (time.perf_counter(), result, error)))
    try:
        yield client, responses
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def await_turn(responses: queue.Queue, stop: threading.Event, deadline: float,
               label: str) -> list[tuple[float, Any]] | None:
    """Every (time, result) of the request just sent, up to its final response; None when
    `stop` is set meanwhile."""
    got = []
    while not stop.is_set():
        if time.perf_counter() > deadline:
            raise BenchError("the run passed its time limit")
        try:
            at, result, error = responses.get(timeout=0.5)
        except queue.Empty:
            continue
        if error is not None:
            raise BenchError(f"{label}: {error}")
        got.append((at, result))
        final = result.get_response().parameters.get("triton_final_response")
        if final is None or final.bool_param:
            return got
    return None


def run_session_worker(url: str, work: queue.Queue, records: list[dict], sizes: Sizes,
                       stop: threading.Event, deadline: float) -> None:
    """Take sessions off `work` until it is empty; run each one's turns in order."""
    with streaming_client(url) as (client, responses):
        while not stop.is_set():
            try:
                session = work.get_nowait()
            except queue.Empty:
                return
            history = session.system
            for turn, message in enumerate(session.user_messages, start=1):
                prompt = f"{history}\nUser: {message}\nAssistant:"
                sent = time.perf_counter()
                client.async_stream_infer(
                    MODEL, _request_inputs(prompt, sizes.answer_tokens),
                    request_id=f"{session.session_id}-{turn}",
                    parameters={"session_id": session.session_id},
                    enable_empty_final_response=True)
                got = await_turn(responses, stop, deadline, f"{session.session_id} turn {turn}")
                if got is None:
                    return
                done = time.perf_counter()
                first, pieces = None, []
                for at, result in got:
                    text = result.as_numpy("text_output")
                    if text is not None and text.size:
                        first = first or at
                        pieces.extend(t.decode("utf-8", "replace") if isinstance(t, bytes)
                                      else str(t) for t in text.reshape(-1))
                last = got[-1][1]
                records.append({
                    "session": session.session_id, "turn": turn,
                    "ttft_s": (first or done) - sent, "latency_s": done - sent,
                    "input_tokens": _scalar(last, "num_input_tokens"),
                    "output_tokens": _scalar(last, "num_output_tokens"),
                    "cached_tokens": _scalar(last, "num_cached_tokens"),
                    "prompt_chars": len(prompt),
                })
                history = prompt + "".join(pieces)


def run_multi_turn(url: str, sessions: list[Session], sizes: Sizes, timeout_s: float,
                   fleet: Fleet) -> dict[str, Any]:
    return summarize_turns(*drive_sessions(url, sessions, sizes, timeout_s, fleet))


def drive_sessions(url: str, sessions: list[Session], sizes: Sizes, timeout_s: float,
                   fleet: Fleet, session_worker=None) -> tuple[list[dict], float]:
    """Run every session (sizes.session_concurrency at a time); one record per turn and the
    wall time. `fleet.check(what)` raises if the servers died meanwhile. `session_worker`
    (default `run_session_worker`, the `llm` text protocol) runs on each thread."""
    session_worker = session_worker or run_session_worker
    work: queue.Queue = queue.Queue()
    for session in sessions:
        work.put(session)
    records: list[dict] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    deadline = time.perf_counter() + timeout_s

    def worker() -> None:
        try:
            session_worker(url, work, records, sizes, stop, deadline)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            stop.set()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True)
               for _ in range(min(sizes.session_concurrency, len(sessions)))]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.5)
            fleet.check("the multi-turn run")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    wall = time.perf_counter() - started
    if errors:
        raise BenchError(f"multi-turn generator: {errors[0]}")
    return records, wall


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"avg": None, "p50": None, "p99": None}
    return {"avg": sum(values) / len(values), "p50": percentile(values, 50),
            "p99": percentile(values, 99)}


def summarize_turns(records: list[dict], wall_s: float) -> dict[str, Any]:
    later = [r for r in records if r["turn"] > 1]

    def hit(rows: list[dict]) -> float | None:
        queried = sum(r["input_tokens"] or 0 for r in rows)
        return sum(r["cached_tokens"] or 0 for r in rows) / queried if queried else None

    output = sum(r["output_tokens"] or 0 for r in records)
    by_turn = defaultdict(list)
    for r in records:
        by_turn[r["turn"]].append(r)
    return {
        "requests": len(records),
        "wall_s": round(wall_s, 2),
        "output_tokens": output,
        "output_token_throughput": output / wall_s if wall_s else None,
        "request_throughput": len(records) / wall_s if wall_s else None,
        "ttft_ms": _pcts([r["ttft_s"] * 1e3 for r in records]),
        "ttft_ms_later_turns": _pcts([r["ttft_s"] * 1e3 for r in later]),
        "request_latency_ms": _pcts([r["latency_s"] * 1e3 for r in records]),
        "client_hit_rate": hit(records),
        "client_hit_rate_later_turns": hit(later),
        "hit_rate_by_turn": {t: hit(rows) for t, rows in sorted(by_turn.items())},
        "input_tokens_avg_by_turn": {
            t: sum(r["input_tokens"] or 0 for r in rows) / len(rows)
            for t, rows in sorted(by_turn.items())},
    }


# ----------------------------------------------------------------------------- one run


def cpu_busy(interval_s: float = 1.0) -> float:
    """Busy share of all cores over `interval_s`, from /proc/stat (0..1)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(interval_s)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def busy_cpu_seconds() -> float:
    """CPU-seconds all cores have been busy since boot (/proc/stat, not idle or iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / _CLK_TCK


def group_cpu_seconds(pgids: set[int]) -> float:
    """CPU-seconds used so far by the live processes of these process groups."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) in pgids:
                total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            continue
    return total / _CLK_TCK



def settle(max_wait_s: float, threshold: float) -> dict[str, float]:
    """Wait (at most `max_wait_s`) until the cores are mostly idle: our fleet is idle now,
    so what is busy is other work, which would slow this run and not the others."""
    started = time.monotonic()
    busy = cpu_busy()
    while busy > threshold and time.monotonic() - started < max_wait_s:
        busy = cpu_busy(2.0)
    return {"cpu_busy_at_start": round(busy, 3),
            "settle_wait_s": round(time.monotonic() - started, 1)}


def fresh_fleet(args: argparse.Namespace, env: dict[str, str], artifact_dir: Path,
                tag: str) -> tuple[Fleet, float]:
    fleet = Fleet(args.sizes.instances, env, artifact_dir / "logs", tag)
    log(f"starting {args.sizes.instances} tritonservers (logs {tag}-triton-*.log) ...")
    try:
        took = fleet.start(args.ready_timeout)
    except BaseException:
        fleet.stop()
        raise
    return fleet, took


def run_policy(workload: str, policy: str, args: argparse.Namespace, fleet: Fleet,
               artifact_dir: Path, sessions: list[Session] | None) -> dict[str, Any]:
    """One workload through a fresh router in front of `fleet` (already cold: just started
    or reset); engine and router numbers. Always stops the router."""
    sizes: Sizes = args.sizes
    tag = f"{workload}-{policy}"
    run: dict[str, Any] = {"policy": policy}
    router = None
    try:
        run["warmup_s"] = round(fleet.warm(), 1)
        router = RouterProcess(instances=fleet.router_args(),
                               extra_args=["--policy", policy],
                               log_path=artifact_dir / "logs" / f"{tag}-router.log")
        router.start().wait_ready(healthy_instances=sizes.instances, timeout_s=60)
        if args.settle_max_wait > 0:
            run.update(settle(args.settle_max_wait, args.settle_cpu))
        run["load_average_at_start"] = list(os.getloadavg())
        log(f"{tag}: warm-up {run['warmup_s']:.0f} s, router at {router.grpc_url}, cores "
            f"{100 * run.get('cpu_busy_at_start', 0):.0f}% busy after waiting "
            f"{run.get('settle_wait_s', 0):.0f} s; load average "
            f"{run['load_average_at_start'][0]:.1f}")
        before = fleet.counters()
        ours = {s.process.pid for s in fleet.servers if s.process} | {router.process.pid}
        cpu_before = (busy_cpu_seconds(), group_cpu_seconds(ours))
        started = time.monotonic()
        if workload == "shared_prefix":
            run.update(run_shared_prefix(router.grpc_url, args, artifact_dir / tag))
        else:
            assert sessions is not None
            run.update(run_multi_turn(router.grpc_url, sessions, sizes, args.run_timeout,
                                      fleet))
        run["run_wall_s"] = round(time.monotonic() - started, 1)
        busy, fleet_cpu = (busy_cpu_seconds() - cpu_before[0],
                           group_cpu_seconds(ours) - cpu_before[1])
        # The rest is the load generator (GenAI-Perf or ours) plus any other work.
        run["cpu_seconds"] = {"all": round(busy, 1), "fleet_and_router": round(fleet_cpu, 1),
                              "rest": round(busy - fleet_cpu, 1)}
        fleet.check(f"the {workload} run")
        time.sleep(1.0)  # the engines publish their counters after their last step
        run["engine"] = engine_delta(before, fleet.counters())
        # CPU the fleet spent per request: the work a policy leaves the engines, which other
        # work on the cores does not inflate the way it inflates wall-clock numbers.
        finished = run["engine"]["total"]["requests_finished"]
        run["fleet_cpu_s_per_request"] = fleet_cpu / finished if finished else None
        run["router"] = router_summary(router.metrics_text(), fleet.names())
        run["router_log"] = display_path(router.log_path)
    finally:
        if router is not None:
            router.stop()
    return run


def run_shared_prefix(url: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    sizes: Sizes = args.sizes
    extra = ["--num-prefix-prompts", str(sizes.prefix_prompts),
             "--prefix-prompt-length", str(sizes.prefix_tokens),
             "--num-dataset-entries", str(sizes.requests)]
    cmd = genai_perf_command(url, sizes.concurrency, sizes.requests, args.tokenizer, run_dir,
                             extra, input_tokens=sizes.suffix_tokens,
                             output_tokens=sizes.output_tokens)
    run_genai_perf(cmd, run_dir / "genai-perf.log", args.run_timeout)
    export = find_genai_perf_export(run_dir)
    result = parse_genai_perf_export(export)
    inputs = sorted(run_dir.rglob("inputs.json"))
    result["genai_perf"] = {
        "command": shlex.join(display_path(Path(a)) if a.startswith("/") else a for a in cmd),
        "export": display_path(export),
        # The same seed gives the same prompts for every policy: this proves it.
        "inputs_sha256": hashlib.sha256(inputs[-1].read_bytes()).hexdigest() if inputs else None,
    }
    return result


# ----------------------------------------------------------------------------- report


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def hit_rate(run: dict[str, Any]) -> float | None:
    return (run.get("engine") or {}).get("hit_rate")


def ttft_p50(run: dict[str, Any]) -> float | None:
    return (run.get("ttft_ms") or {}).get("p50")


def ratios_vs_baseline(runs: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    base = runs.get(BASELINE)
    if not base or "error" in base:
        return {}
    out = {}
    for policy, run in runs.items():
        if "error" in run:
            continue
        out[policy] = {
            "hit_rate_x": _ratio(hit_rate(run), hit_rate(base)),
            "output_token_throughput_x": _ratio(run.get("output_token_throughput"),
                                                base.get("output_token_throughput")),
            "ttft_p50_x": _ratio(ttft_p50(run), ttft_p50(base)),
            # > 1: fewer fleet CPU-seconds per request than round_robin (more capacity).
            "fleet_capacity_x": _ratio(base.get("fleet_cpu_s_per_request"),
                                       run.get("fleet_cpu_s_per_request")),
        }
    return out


def other_work(run: dict[str, Any]) -> float | None:
    """Cores' worth of CPU used during the run by all but the fleet and the router."""
    rest = (run.get("cpu_seconds") or {}).get("rest")
    wall = run.get("run_wall_s")
    return rest / wall if rest is not None and wall else None


def timing_verdict(ok: bool, run: dict[str, Any], reference: dict[str, Any]) -> str:
    """met / not met for a wall-clock comparison of `run` against `reference`, unless other
    work on the cores differed by more than CONTENTION_GAP between the two runs in the
    direction that could explain the outcome: then "inconclusive"."""
    mine, theirs = other_work(run), other_work(reference)
    if mine is not None and theirs is not None:
        gap = mine - theirs
        if (gap > CONTENTION_GAP and not ok) or (gap < -CONTENTION_GAP and ok):
            return (f"inconclusive (other work {mine:.2f} vs {theirs:.2f} cores during the "
                    f"two runs)")
    return "met" if ok else "not met"


def evaluate_targets(shared: dict[str, dict], multi: dict[str, dict],
                     instances: int) -> list[dict[str, Any]]:
    targets = []
    ratios = ratios_vs_baseline(shared)
    base = shared.get(BASELINE, {})
    for policy in CACHE_AWARE:
        for key, target, label in (("hit_rate_x", HIT_RATE_TARGET, "prefix-cache hit rate"),
                                   ("output_token_throughput_x", THROUGHPUT_TARGET,
                                    "output tokens/s")):
            value = ratios.get(policy, {}).get(key)
            bound = (f" (about {instances}x at most with {instances} instances: see the notes)"
                     if key == "hit_rate_x" else "")
            if value is None:
                status = "not measured"
            elif key == "hit_rate_x":  # counted by the engines: other work does not move it
                status = "met" if value >= target else "not met"
            else:
                status = timing_verdict(value >= target, shared[policy], base)
            targets.append({
                "name": f"shared prefix: {policy} {label} >= {target:g}x round_robin{bound}",
                "measured": value,
                "status": status,
            })
    hybrid, sticky = multi.get("hybrid"), multi.get("sticky")
    checks = []
    if hybrid and sticky and "error" not in hybrid and "error" not in sticky:
        tol = NO_WORSE_TOLERANCE
        h_hit, s_hit = hit_rate(hybrid), hit_rate(sticky)
        hit_ok = h_hit is not None and s_hit is not None and h_hit >= s_hit - tol["hit_rate"]
        tps_ok = (hybrid["output_token_throughput"]
                  >= (1 - tol["output_token_throughput"]) * sticky["output_token_throughput"])
        ttft_ok = ttft_p50(hybrid) <= (1 + tol["ttft_p50"]) * ttft_p50(sticky)
        checks = [
            ("hit rate", h_hit, s_hit, "met" if hit_ok else "not met"),
            ("output tokens/s", hybrid["output_token_throughput"],
             sticky["output_token_throughput"], timing_verdict(tps_ok, hybrid, sticky)),
            ("TTFT p50 ms", ttft_p50(hybrid), ttft_p50(sticky),
             timing_verdict(ttft_ok, hybrid, sticky)),
        ]
    verdicts = [v for *_, v in checks]
    status = ("not measured" if not checks else "not met" if "not met" in verdicts
              else "met" if all(v == "met" for v in verdicts) else "inconclusive")
    targets.append({
        "name": (f"multi-turn: hybrid no worse than sticky (hit rate within "
                 f"{NO_WORSE_TOLERANCE['hit_rate']:g}, output tokens/s within "
                 f"{NO_WORSE_TOLERANCE['output_token_throughput']:.0%}, TTFT p50 within "
                 f"{NO_WORSE_TOLERANCE['ttft_p50']:.0%})"),
        "measured": {name: {"hybrid": h, "sticky": s, "verdict": v}
                     for name, h, s, v in checks},
        "status": status,
    })
    return targets


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _pair(stats: dict | None, digits: int = 0) -> str:
    if not stats:
        return "-"
    return f"{_fmt(stats.get('p50'), digits)} / {_fmt(stats.get('p99'), digits)}"


def _spread(run: dict[str, Any]) -> str:
    per = (run.get("router") or {}).get("decisions_per_instance") or {}
    return "/".join(str(int(v)) for v in per.values()) or "-"


def _reasons(run: dict[str, Any]) -> str:
    reasons = (run.get("router") or {}).get("decisions_by_reason") or {}
    return ", ".join(f"{k} {int(v)}" for k, v in sorted(reasons.items())) or "-"


def _load(run: dict[str, Any]) -> str:
    busy = run.get("cpu_busy_at_start")
    rest = (run.get("cpu_seconds") or {}).get("rest")
    wall = run.get("run_wall_s")
    share = rest / wall if rest is not None and wall else None
    return f"{_pct(busy)} / {_fmt(share, 2)}"


def render_markdown(report: dict[str, Any]) -> str:
    s, m, e = report["settings"], report["machine"], report["engine"]
    sz = s["sizes"]
    pool = e["pool"]
    title = "# Routing quality" + (" (quick smoke run)" if s.get("quick") else "")
    lines = [
        title, "",
        f"Every router policy in front of the same fleet of {sz['instances']} tritonservers "
        f"(model `llm` with its engine in process, SmolLM2-135M on the CPU, prefix caching on, "
        f"{sz['engine_threads']} torch thread each), with cold caches for every run (engine "
        f"reloaded, fresh router). Machine: {m.get('nproc')} cores, "
        f"{m.get('cpu_model', 'unknown CPU')}, {m.get('date')}.", "",
        f"Reproduce: `{s['command']}` (about {s.get('total_wall_min', '?')} min).", "",
        "## Regime: KV pool vs shared prefixes", "",
        f"Each instance gets {pool['blocks']} KV blocks of {sz['block_size']} tokens "
        f"({e['kv_cache_bytes'] / 2**20:.0f} MiB, `LLM_ENGINE_KV_CACHE_BYTES`): "
        f"{pool['whole_requests']} whole requests of the shared-prefix workload "
        f"({pool['request_blocks']} blocks each), {sz['cache_fraction']:g} of its "
        f"{sz['prefix_prompts']} prefixes; about {pool['running_requests']} of them are "
        f"running at a time, so an instance caches roughly "
        f"{pool['whole_requests'] - pool['running_requests']} prefixes (1/"
        f"{sz['prefix_prompts'] / max(1, pool['whole_requests'] - pool['running_requests']):.1f}"
        f"). One instance cannot hold every prefix; the fleet can "
        f"({sz['instances']} x {pool['whole_requests']} >= {sz['prefix_prompts']} + "
        f"{sz['concurrency']} running) if the prefixes are partitioned, which is what a "
        f"cache-aware router does. With a pool that holds every prefix, every policy would "
        f"end up caching everything everywhere and the comparison would show nothing.", "",
        "## Shared-prefix workload (GenAI-Perf)", "",
        f"GenAI-Perf 0.0.16, `--num-prefix-prompts {sz['prefix_prompts']} "
        f"--prefix-prompt-length {sz['prefix_tokens']}`, {sz['suffix_tokens']} more random "
        f"tokens per prompt, exactly {sz['output_tokens']} output tokens, streaming, "
        f"concurrency {sz['concurrency']}, {sz['requests']} requests (each prefix used about "
        f"{sz['requests'] / sz['prefix_prompts']:.0f} times, picked at random; "
        + ("the same prompts for every policy: identical inputs.json hashes"
           if report["shared_prefix"].get("identical_inputs")
           else "WARNING: the policies' inputs.json differ")
        + "). Hit rate: the engines' "
        "prefix-cache hit tokens / queried tokens over the run, summed over the instances.",
        "",
        "| policy | hit rate | x RR | output tok/s | x RR | req/s | TTFT p50 / p99 ms "
        "| prompt tokens computed | fleet CPU-s / request (RR / this) "
        "| requests per instance | routing decisions "
        "| other work: before / during |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    shared = report["shared_prefix"]["runs"]
    ratios = report["shared_prefix"]["ratios_vs_round_robin"]
    for policy, run in shared.items():
        if "error" in run:
            lines.append(f"| {policy} | FAILED: {run['error'].splitlines()[0]} |||||||||||")
            continue
        r = ratios.get(policy, {})
        lines.append(
            f"| {policy} | {_pct(hit_rate(run))} | {_fmt(r.get('hit_rate_x'), 2)} "
            f"| {_fmt(run.get('output_token_throughput'))} "
            f"| {_fmt(r.get('output_token_throughput_x'), 2)} "
            f"| {_fmt(run.get('request_throughput'), 2)} | {_pair(run.get('ttft_ms'))} "
            f"| {int(run['engine']['total']['prompt_tokens'])} "
            f"| {_fmt(run.get('fleet_cpu_s_per_request'), 2)} "
            f"({_fmt(r.get('fleet_capacity_x'), 2)}) | {_spread(run)} "
            f"| {_reasons(run)} | {_load(run)} |")
    multi = report["multi_turn"]["runs"]
    if multi:
        lines += [
            "", "## Multi-turn sessions (the project's load generator)", "",
            f"{sz['sessions']} sessions of {sz['turns']} turns, {sz['session_concurrency']} "
            f"sessions at a time, each turn sent when the previous answer is complete. A turn's "
            f"prompt is the session's own system text ({sz['system_tokens']} tokens) plus all "
            f"earlier turns (user messages of {sz['user_tokens']} tokens and the answers, "
            f"exactly {sz['answer_tokens']} tokens, greedy) plus a new user message; the "
            f"session id goes in the request parameter `session_id`. Hit rate: engines' "
            f"counters; \"later turns\": the `num_cached_tokens` / `num_input_tokens` the "
            f"`llm` model returns, over turns 2+. Output tok/s: output tokens / wall time.",
            "",
            "| policy | hit rate | later turns hit rate | output tok/s | req/s "
            "| TTFT p50 / p99 ms | later turns TTFT p50 / p99 ms "
            "| fleet CPU-s / request | requests per instance "
            "| routing decisions | other work: before / during |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
        ]
        for policy, run in multi.items():
            if "error" in run:
                lines.append(f"| {policy} | FAILED: {run['error'].splitlines()[0]} ||||||||||")
                continue
            lines.append(
                f"| {policy} | {_pct(hit_rate(run))} "
                f"| {_pct(run.get('client_hit_rate_later_turns'))} "
                f"| {_fmt(run.get('output_token_throughput'))} "
                f"| {_fmt(run.get('request_throughput'), 2)} | {_pair(run.get('ttft_ms'))} "
                f"| {_pair(run.get('ttft_ms_later_turns'))} "
                f"| {_fmt(run.get('fleet_cpu_s_per_request'), 2)} | {_spread(run)} "
                f"| {_reasons(run)} | {_load(run)} |")
    lines += ["", "## Targets", ""]
    for t in report["targets"]:
        measured = t["measured"]
        if isinstance(measured, float):
            detail = f" (measured {measured:.2f}x)"
        elif isinstance(measured, dict) and measured:
            detail = " (" + "; ".join(
                f"{k}: hybrid {_fmt(v['hybrid'], 3 if k == 'hit rate' else 1)} vs sticky "
                f"{_fmt(v['sticky'], 3 if k == 'hit rate' else 1)}: {v['verdict']}"
                for k, v in measured.items()) + ")"
        else:
            detail = ""
        lines.append(f"- {t['name']}: **{t['status']}**{detail}")
    lines += ["", "## Notes and caveats", "", *[f"- {n}" for n in report["notes"]], ""]
    return "\n".join(lines)


def report_notes(sizes: Sizes) -> list[str]:
    k = sizes.instances
    return [
        f"The 4x hit-rate target cannot be met with {k} instances and uniformly popular "
        f"prefixes, whatever the router. round_robin sends every prefix to every instance; "
        f"an LRU pool that caches a fraction c of the prefixes then hits about c of the "
        f"time (less on each instance's first sight of a prefix), and the fleet can hold "
        f"every prefix only when c >= 1/{k}. A perfect partition hits on all but the first "
        f"use of each prefix, (n-1)/n for n uses. So the ratio is about (n-1)/n / c <= {k}x, "
        f"and lower for small n; with block-level caching, running requests and suffix "
        f"blocks in the same pool it is less. SGLang's "
        f"3.8x comes from a larger fleet: the bound grows with the number of instances. The "
        f"throughput ratio is bounded by the share of the work that prefill is (here "
        f"{sizes.output_tokens} decode steps per request, each slowed by the prefills they "
        f"share the engine step with).",
        f"Why this shape: it follows SGLang's generated-shared-prefix benchmark (e.g. "
        f"`--gsp-num-groups 64 --gsp-prompts-per-group 16 --gsp-system-prompt-len 2048`: "
        f"long shared system prompts, each followed by many short questions), scaled to this "
        f"CPU: {sizes.prefix_prompts} prefixes of {sizes.prefix_tokens} tokens, questions of "
        f"{sizes.suffix_tokens}, about {sizes.requests / sizes.prefix_prompts:.0f} requests "
        f"per prefix. The throughput a cache hit saves grows with the prefix's share of the "
        f"prompt and with the uses per prefix. An earlier version of this benchmark used 24 "
        f"prefixes of 256 tokens, 32-token questions and about 3 uses per prefix: there "
        f"prefix / hybrid reached 1.53x / 1.66x round_robin's hit rate and 1.21x / 1.43x its "
        f"tok/s (2026-11-25), because the first use of each prefix and the decode steps were "
        f"most of the work.",
        "sticky and hybrid get no session id from GenAI-Perf (see below), so on the "
        "shared-prefix workload sticky is least-loaded routing and hybrid is the prefix "
        "policy (it remembers no session).",
        f"GenAI-Perf and sessions: {GENAI_PERF_SESSIONS}",
        f"2 CPU cores shared by {k} instances ({sizes.engine_threads} torch thread each), the "
        f"router, GenAI-Perf "
        f"and whatever else runs on the machine: absolute numbers are small, and tok/s and "
        f"TTFT move by up to 2-3x between runs when other work comes and goes (see \"other "
        f"work\" and the verdicts); hit rates and prompt tokens computed do not. Prefill on "
        f"the CPU "
        f"is slow (a few ms per token), which is exactly the work a prefix hit saves, so "
        f"hit rate drives TTFT and throughput here more than on a GPU.",
        "Each run starts cold: the `llm` model (and so its engine) is unloaded and loaded "
        "again on every "
        "instance (a new KV pool with an empty prefix cache; `--restart-each-run` restarts "
        "the tritonservers instead) and the router is a new process (empty radix tree and "
        "session table); each instance then gets one short warm-up request sent to it "
        "directly, the same for every policy and excluded from the counters.",
        "Fleet CPU-s / request: CPU-seconds the tritonservers (with their model stubs) and the "
        "router used during the run, per request the engines finished; RR / this > 1 means "
        "the policy left the fleet less work per request than round_robin. It moves much "
        "less than tok/s and TTFT when other work shares the cores (though contention "
        "inflates it too, by ~10-15% here). It understates the gain in throughput at a fixed "
        "concurrency, which also depends on latency: a prefill stalls every decode in its "
        "engine (no chunked prefill), and per-request costs (tokenizing, sending each "
        "token, decode) do not shrink with cache hits.",
        f"Wall-clock verdicts (tok/s, TTFT) between two runs are \"inconclusive\" when other "
        f"work during them differed by more than {CONTENTION_GAP:g} cores in the direction "
        f"that could explain the outcome; hit-rate verdicts are engine counts and always "
        f"stand.",
        "Requests per instance are the router's routing decisions per instance (instance "
        "index order). Other work, before: how busy the cores were just before the run "
        "(our fleet idle, so this is other work; each run first waits up to "
        "--settle-max-wait s for it to drop below --settle-cpu); during: cores' worth of CPU "
        "used during the run by everything except the fleet and the router, i.e. the load "
        "generator (GenAI-Perf with perf_analyzer about 0.15 with its start-up, the own "
        "generator about 0.05) plus other work. A "
        "high value means other work slowed that run only: compare throughput and TTFT "
        "with it in mind; hit rates are not affected.",
    ]


def write_reports(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "router_quality.json", out_dir / "router_quality.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


# ----------------------------------------------------------------------------- main


def parse_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in ALL_POLICIES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown policies {unknown}; known: {', '.join(ALL_POLICIES)}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench_router_quality.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a few prefixes, requests and sessions, policies "
                             f"{','.join(QUICK_POLICIES)} (multi-turn "
                             f"{','.join(QUICK_MULTI_TURN_POLICIES)}); reports go to the "
                             "artifact directory unless --out-dir is given")
    parser.add_argument("--policies", type=parse_list, default=None,
                        help=f"shared-prefix policies (default all: {','.join(ALL_POLICIES)})")
    parser.add_argument("--multi-turn-policies", type=parse_list, default=None,
                        help=f"multi-turn policies (default "
                             f"{','.join(MULTI_TURN_POLICIES)}, only those in --policies "
                             f"when that is given)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated: shared_prefix, multi_turn (default both)")
    for field, help_text in (
            ("instances", "tritonservers in the fleet"),
            ("prefix_prompts", "shared prefixes (GenAI-Perf --num-prefix-prompts)"),
            ("prefix_tokens", "tokens per shared prefix"),
            ("suffix_tokens", "random tokens after the prefix in each prompt"),
            ("output_tokens", "output tokens per shared-prefix request"),
            ("requests", "shared-prefix requests per policy"),
            ("concurrency", "shared-prefix concurrency"),
            ("sessions", "multi-turn sessions per policy"),
            ("turns", "turns per session"),
            ("session_concurrency", "sessions in flight at once"),
            ("engine_threads", "torch threads per instance")):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None,
                            help=f"{help_text} (default {getattr(Sizes(), field)}; quick "
                                 f"{getattr(QUICK_SIZES, field)})")
    parser.add_argument("--cache-fraction", type=float, default=None,
                        help="share of the shared prompts one instance's KV pool holds "
                             "besides its running requests (default 0.4)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer folder (default: the project's SmolLM2-135M-Instruct)")
    add_output_args(parser, "router_quality.json/.md", "logs and GenAI-Perf artifacts",
                    "router-quality")
    parser.add_argument("--restart-each-run", action="store_true",
                        help="restart the tritonservers before every run instead of "
                             "reloading the `engine` model (both give cold caches; reloading "
                             "is faster)")
    parser.add_argument("--settle-max-wait", type=float, default=30.0,
                        help="before each run, wait up to this many seconds for the cores to "
                             "be less busy than --settle-cpu (other work); 0: don't wait")
    parser.add_argument("--settle-cpu", type=float, default=0.35,
                        help="busy share of all cores that counts as settled (default 0.35)")
    parser.add_argument("--run-timeout", type=float, default=1800.0,
                        help="seconds one workload run may take (default 1800)")
    parser.add_argument("--ready-timeout", type=float, default=300.0,
                        help="seconds for the fleet to load its models (default 300)")
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else Sizes()
    overrides = {f: getattr(args, f) for f in asdict(sizes) if getattr(args, f, None) is not None}
    args.sizes = replace(sizes, **overrides)
    if any(v < 1 for k, v in asdict(args.sizes).items() if k != "cache_fraction"):
        parser.error("sizes must be positive")
    if not 0 < args.sizes.cache_fraction <= 1:
        parser.error("--cache-fraction must be in (0, 1]")
    args.workloads = [w for w in args.workloads.split(",") if w]
    if not args.workloads or any(w not in WORKLOADS for w in args.workloads):
        parser.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    given = args.policies
    args.policies = given or list(QUICK_POLICIES if args.quick else ALL_POLICIES)
    if args.multi_turn_policies is None:
        default = QUICK_MULTI_TURN_POLICIES if args.quick else MULTI_TURN_POLICIES
        args.multi_turn_policies = [p for p in default if not given or p in given]
    args.tokenizer = args.tokenizer or default_model_dir()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes: Sizes = args.sizes
    artifact_dir, out_dir = run_dirs(args, "router-quality")
    if not (args.tokenizer / "config.json").exists() and not (
            args.tokenizer / "tokenizer.json").exists():
        print(f"error: no tokenizer in {args.tokenizer} (run `make setup`)", file=sys.stderr)
        return 2
    if "shared_prefix" in args.workloads and not GENAI_PERF.exists():
        print(f"error: {display_path(GENAI_PERF)} is missing", file=sys.stderr)
        return 2
    (artifact_dir / "logs").mkdir(parents=True, exist_ok=True)
    stop_on_sigterm()

    model_dir = default_model_dir()
    bytes_per_block = kv_bytes_per_block(model_dir, sizes.block_size)
    pool = kv_pool(sizes)
    env = engine_env(sizes, pool["blocks"], bytes_per_block)
    plan = [("shared_prefix", p) for p in args.policies if "shared_prefix" in args.workloads]
    plan += [("multi_turn", p) for p in args.multi_turn_policies
             if "multi_turn" in args.workloads]
    machine = machine_facts()
    log(f"artifacts: {display_path(artifact_dir)}; reports: {display_path(out_dir)}")
    log(f"machine: {machine.get('nproc')} cores, {machine.get('cpu_model')}, load average "
        f"{machine.get('load_average_at_start')}")
    log(f"engine pool: {pool['blocks']} blocks x {bytes_per_block} bytes per instance "
        f"({pool['whole_requests']} requests of the {sizes.prefix_prompts} shared prompts, "
        f"running ones included); {len(plan)} runs: "
        + ", ".join(f"{w}/{p}" for w, p in plan))
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {w: {} for w in WORKLOADS}
    sessions = None
    fleet: Fleet | None = None
    try:
        if any(w == "multi_turn" for w, _ in plan):
            sessions = build_sessions(sizes, args.tokenizer)
        for i, (workload, policy) in enumerate(plan, start=1):
            log(f"run {i}/{len(plan)}: {workload} / {policy}")
            reset: dict[str, float] = {}
            try:
                if fleet is not None and args.restart_each_run:
                    fleet.stop()
                    fleet = None
                if fleet is None:
                    fleet, took = fresh_fleet(args, env, artifact_dir, f"{workload}-{policy}")
                    reset = {"fleet_start_s": round(took, 1)}
                else:
                    reset = {"engine_reload_s": round(fleet.reset(args.ready_timeout), 1)}
                log(f"{workload}/{policy}: cold fleet in {next(iter(reset.values())):.0f} s "
                    f"({next(iter(reset))})")
                run = run_policy(workload, policy, args, fleet, artifact_dir, sessions)
                run.update(reset)
            except (BenchError, RuntimeError, TimeoutError, OSError) as exc:
                run = {"policy": policy, "error": str(exc), **reset}
                log(f"{workload}/{policy} FAILED: {exc}")
                if fleet is not None:  # the next run starts a fresh fleet
                    fleet.stop()
                    fleet = None
            results[workload][policy] = run
            # Kept if a later run is interrupted: the numbers so far, not a report.
            (artifact_dir / "partial_results.json").write_text(json.dumps(results, indent=2))
            if "error" not in run:
                log(f"{workload}/{policy}: hit rate {_pct(hit_rate(run))}, "
                    f"{_fmt(run.get('output_token_throughput'))} output tok/s, TTFT p50/p99 "
                    f"{_pair(run.get('ttft_ms'))} ms, per instance {_spread(run)}, "
                    f"{run['run_wall_s']:.0f} s (elapsed {(time.monotonic() - started) / 60:.1f}"
                    f" min)")
    except KeyboardInterrupt:
        return interrupted()
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if fleet is not None:
            log("stopping the fleet ...")
            fleet.stop()

    command = shlex.join(["scripts/bench_router_quality.py",
                          *(argv if argv is not None else sys.argv[1:])])
    settings = {
        "quick": args.quick,
        "command": command,
        "total_wall_min": round((time.monotonic() - started) / 60, 1),
        "sizes": asdict(sizes),
        "policies": args.policies,
        "multi_turn_policies": args.multi_turn_policies,
        "workloads": args.workloads,
        "tokenizer": display_path(args.tokenizer),
        "artifact_dir": display_path(artifact_dir),
        "router_options": "defaults (python -m router --policy P --instance GRPC,METRICS ...)",
    }
    report = {
        "settings": settings,
        "machine": machine,
        "engine": {"env": env, "pool": pool, "kv_bytes_per_block": bytes_per_block,
                   "kv_cache_bytes": pool["blocks"] * bytes_per_block,
                   "model_dir": display_path(model_dir)},
        "genai_perf_sessions": GENAI_PERF_SESSIONS,
        "shared_prefix": {"runs": results["shared_prefix"],
                          "ratios_vs_round_robin": ratios_vs_baseline(
                              results["shared_prefix"])},
        "multi_turn": {"runs": results["multi_turn"],
                       "ratios_vs_round_robin": ratios_vs_baseline(results["multi_turn"])},
        "targets": evaluate_targets(results["shared_prefix"], results["multi_turn"],
                                    sizes.instances),
        "notes": report_notes(sizes),
    }
    hashes = {r.get("genai_perf", {}).get("inputs_sha256")
              for r in results["shared_prefix"].values() if "error" not in r}
    report["shared_prefix"]["identical_inputs"] = len(hashes) <= 1
    json_path, md_path = write_reports(report, out_dir)
    log(f"wrote {display_path(json_path)} and {display_path(md_path)}")
    print()
    print(render_markdown(report))
    failed = any("error" in r for w in results.values() for r in w.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
