#!/usr/bin/env python3
"""Engine benchmark: the served `llm` model under GenAI-Perf vs transformers `generate()`.

One run does these steps:

  1. serving: start a tritonserver with the model `llm` (its engine in process; or use --url),
     then run GenAI-Perf 0.0.16 against `llm` (vLLM-backend request shape, streaming, 64 input
     tokens, exactly 64 output tokens through min_tokens) at each concurrency; read its JSON
     export for output token throughput, request throughput, time to first token (TTFT) and
     inter-token latency (ITL) p50/p99. The server is then stopped so that step 2 has the
     cores to itself.
  2. baseline: transformers `generate()` on the same weights in fp32, a static batch of B
     prompts of 64 random token ids, greedy, exactly 64 new tokens, for each B in the same list.
     tok/s = B*64/elapsed; TTFT = a generate with max_new_tokens=1; ITL = (elapsed-TTFT)/63.
     p50/p99 are over --generate-repeats runs.
     Steps 1 and 2 then add, at concurrency 32, one run per --output-stddevs value: each
     request asks for a length GenAI-Perf draws around 64 with that standard deviation
     (exactly that many tokens), and generate() runs the same requests in static batches of
     32, each batch until its longest request is done (what static batching costs, and what
     in-flight batching saves by refilling a finished request's slot at once); six waves of
     requests (--variable-request-count), so the run's tail is a small part of it.
     Last, with the server still up, --paired-rounds times (default 3): a GenAI-Perf run at
     concurrency 32 then one generate() batch of 32 in this process, so that each ratio
     compares runs a minute apart; the throughput target is judged on their median. (Steps 1
     and 2 run up to 20 minutes apart, and on a shared machine the speed drifts by 10-40%
     over that.)
  3. engine alone: the same engine in this process with no server, on the serving step's
     workload (the same number of requests, at most N running): how much of the engine's own
     speed the serving path keeps. --skip-alone leaves it out.
  4. report: <out-dir>/engine.json (every number, the exact commands, machine facts) and
     <out-dir>/engine.md (a table and the targets: at concurrency 32 the engine makes >= 2x the
     tokens/s of generate at batch 32; single-stream ITL within 1.2x of generate at batch 1).

GenAI-Perf's own artifacts and the server log stay in --artifact-dir. Ctrl-C stops the run,
GenAI-Perf and the server cleanly; nothing is written then. A step that fails ends the run
with status 1, but the reports keep what the steps before it measured, and say so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from python_backends.paths import CACHE_DIR, MODEL_REPOSITORY, default_model_dir  # noqa: E402
from python_backends.triton_glue import in_process_engine_parameters  # noqa: E402

GENAI_PERF = REPO_ROOT / "scripts" / "genai-perf"
DEFAULT_OUT_DIR = REPO_ROOT / "docs" / "benchmarks"
MODEL = "llm"
SERVER_MODELS = ("llm",)  # its engine runs in its own process
INPUT_TOKENS = 64
OUTPUT_TOKENS = 64
DEFAULT_CONCURRENCY = (1, 4, 8, 32)
# Extra runs at the target concurrency whose requested output lengths vary around
# OUTPUT_TOKENS (GenAI-Perf's bounded normal, this standard deviation): a static batch runs
# until its longest request is done, in-flight batching refills a finished request's slot.
DEFAULT_OUTPUT_STDDEVS = (32, 64)
VARIABLE_WAVES = 6
QUICK_CONCURRENCY = (1, 4)
# Targets from the engine issue.
THROUGHPUT_TARGET_CONCURRENCY = 32
THROUGHPUT_TARGET_RATIO = 2.0
ITL_TARGET_RATIO = 1.2


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and where its log is."""


class ServerDied(BenchError):
    """The server (or one of its model processes) died: later measurements would be wrong."""


# ----------------------------------------------------------------------------- small helpers


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_stddev_list(text: str) -> list[int]:
    """`parse_int_list`, or 'none' (or nothing) for no value."""
    return [] if text.strip().lower() in ("", "none") else parse_int_list(text)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def default_request_count(concurrency: int, quick: bool = False) -> int:
    """Requests measured per concurrency: two full waves, and at least 8 (2 with --quick)."""
    return max(concurrency, 2) if quick else max(2 * concurrency, 8)


def display_path(path: Path) -> str:
    """A path relative to the repository when it is inside it, so reports are portable."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- GenAI-Perf


def genai_perf_command(
    url: str, concurrency: int, request_count: int, tokenizer: Path, artifact_dir: Path,
    extra_args: Sequence[str] = (), genai_perf: Path | str = GENAI_PERF,
    input_tokens: int = INPUT_TOKENS, output_tokens: int = OUTPUT_TOKENS,
    output_stddev: int = 0, seed: int = 0,
) -> list[str]:
    """The GenAI-Perf 0.0.16 `profile` command for one concurrency against `llm`.

    Each request asks for exactly its output length (max_tokens = min_tokens): OUTPUT_TOKENS,
    or with `output_stddev` a length GenAI-Perf draws per request (normal, at least 1).
    GenAI-Perf draws its synthetic prompts from `seed`: runs with the same seed send the same
    prompts.

    No --warmup-request-count: with concurrency > 1 it makes perf_analyzer (tritonclient 2.50)
    send requests for ever; `warm_up()` warms the server instead.
    """
    cmd = [
        str(genai_perf), "profile", "-m", MODEL,
        "--endpoint-type", "kserve", "--backend", "vllm", "--streaming",
        "-u", url,
        "--concurrency", str(concurrency),
        "--request-count", str(request_count),
        "--synthetic-input-tokens-mean", str(input_tokens),
        "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(output_tokens),
        "--output-tokens-mean-deterministic",
        *(["--output-tokens-stddev", str(output_stddev)] if output_stddev else []),
        "--random-seed", str(seed),
        "--tokenizer", str(tokenizer),
        "--artifact-dir", str(artifact_dir),
    ]
    # Verbatim: GenAI-Perf options, then perhaps `--` and perf_analyzer options.
    return cmd + list(extra_args)


def find_genai_perf_export(artifact_dir: Path) -> Path:
    """GenAI-Perf nests its artifacts (e.g. llm-triton-vllm-concurrency4/); find the export."""
    found = sorted(Path(artifact_dir).rglob("profile_export_genai_perf.json"))
    if not found:
        raise BenchError(f"GenAI-Perf wrote no profile_export_genai_perf.json under {artifact_dir}")
    return found[-1]


def _stat(data: dict[str, Any], metric: str, key: str) -> float | None:
    value = data.get(metric, {}).get(key)
    return None if value is None else float(value)


def parse_genai_perf_export(data: dict[str, Any] | Path) -> dict[str, Any]:
    """The numbers this benchmark reports, from GenAI-Perf's profile_export_genai_perf.json.

    Throughputs are system-wide averages (GenAI-Perf gives only `avg` for them); TTFT and ITL
    are distributions over requests, in ms (ITL of a request = (last - first) / (tokens - 1)).
    """
    if isinstance(data, Path):
        data = json.loads(data.read_text())
    for metric in ("output_token_throughput", "time_to_first_token", "inter_token_latency"):
        if metric not in data:
            raise BenchError(f"GenAI-Perf export has no {metric!r}; keys: {sorted(data)}")
    return {
        "output_token_throughput": _stat(data, "output_token_throughput", "avg"),
        "request_throughput": _stat(data, "request_throughput", "avg"),
        "measured_requests": _stat(data, "request_count", "avg"),
        "ttft_ms": {q: _stat(data, "time_to_first_token", q) for q in ("avg", "p50", "p99")},
        "itl_ms": {q: _stat(data, "inter_token_latency", q) for q in ("avg", "p50", "p99")},
        "request_latency_ms": {q: _stat(data, "request_latency", q) for q in ("avg", "p50", "p99")},
        "output_sequence_length_avg": _stat(data, "output_sequence_length", "avg"),
        "input_sequence_length_avg": _stat(data, "input_sequence_length", "avg"),
    }


def _stop_process_group(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue


def dead_children(pid: int) -> list[int]:
    """Children of `pid` that have exited but not been reaped (zombies), from /proc.

    tritonserver does not exit when a Python-backend stub dies (e.g. a segfault): it keeps
    the zombie, and perf_analyzer then waits for ever for the lost responses.
    """
    dead = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z" and int(fields[1]) == pid:
            dead.append(int(stat.parent.name))
    return dead


def check_server(server_process: subprocess.Popen | None, during: str) -> None:
    """Raise ServerDied when our tritonserver or one of its model stub processes has died."""
    if server_process is None:
        return
    if server_process.poll() is not None:
        raise ServerDied(f"tritonserver exited (code {server_process.returncode}) during {during}")
    if dead_children(server_process.pid):
        raise ServerDied(f"a model stub process of tritonserver died during {during} (a crash: "
                         f"see the server log and dmesg)")


def run_tool(cmd: list[str], log_path: Path, timeout_s: float, what: str,
             server_process: subprocess.Popen | None = None,
             env: dict[str, str] | None = None, poll_s: float = 1.0) -> int:
    """Run a load tool (GenAI-Perf, perf_analyzer) with its output in `log_path`; return its
    exit code. With `server_process` (a server we started), stop early when it exits or one
    of its model stub processes dies, rather than waiting out the timeout."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        # Its own session: on Ctrl-C we stop it (and whatever it started) ourselves.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    return proc.wait(timeout=poll_s)
                except subprocess.TimeoutExpired:
                    pass
                check_server(server_process, what)
                if time.monotonic() > deadline:
                    raise BenchError(f"{what} ran past {timeout_s:.0f} s; log: {log_path}")
        finally:
            _stop_process_group(proc)


def run_genai_perf(cmd: list[str], log_path: Path, timeout_s: float,
                   server_process: subprocess.Popen | None = None) -> None:
    """Run one GenAI-Perf command (`run_tool`); raise BenchError when it fails."""
    rc = run_tool(cmd, log_path, timeout_s, "GenAI-Perf", server_process)
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise BenchError(f"GenAI-Perf exited with {rc}; log: {log_path}\n  " + "\n  ".join(tail))


def warm_up(url: str, requests: int, timeout_s: float = 600.0,
            server_process: subprocess.Popen | None = None,
            output_tokens: int = OUTPUT_TOKENS) -> float:
    """Send `requests` concurrent streaming requests of the benchmark's shape; wait for all.

    Done with tritonclient, not GenAI-Perf's --warmup-request-count: with concurrency > 1 that
    option makes perf_analyzer (tritonclient 2.50) send requests for ever.
    """
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    finals: queue.Queue = queue.Queue()

    def callback(result, error):
        if error is not None:
            finals.put(error)
            return
        final = result.get_response().parameters.get("triton_final_response")
        if final is None or final.bool_param:
            finals.put(None)

    prompt = "The quick brown fox jumps over the lazy dog. " * 6  # about 60 tokens
    sampling = json.dumps({"max_tokens": output_tokens, "min_tokens": output_tokens})
    client = grpcclient.InferenceServerClient(url)
    started = time.monotonic()
    try:
        client.start_stream(callback=callback)
        for i in range(requests):
            inputs = []
            for name, value, dtype in (("text_input", prompt, "BYTES"), ("stream", True, "BOOL"),
                                       ("sampling_parameters", sampling, "BYTES"),
                                       ("exclude_input_in_output", True, "BOOL")):
                tensor = grpcclient.InferInput(name, [1], dtype)
                tensor.set_data_from_numpy(np.array([value], dtype=object if dtype == "BYTES"
                                                    else bool))
                inputs.append(tensor)
            client.async_stream_infer(MODEL, inputs, request_id=f"warmup-{i}",
                                      enable_empty_final_response=True)
        done = 0
        while done < requests:
            try:
                error = finals.get(timeout=1.0)
            except queue.Empty:
                check_server(server_process, "the warm-up")
                if time.monotonic() - started > timeout_s:
                    raise BenchError(
                        f"warm-up requests did not finish in {timeout_s:.0f} s") from None
                continue
            if error is not None:
                raise BenchError(f"warm-up request failed: {error}")
            done += 1
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    return time.monotonic() - started


def engine_info(url: str) -> dict[str, Any]:
    """The serving side's facts: server version and the engine's config parameters."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    info: dict[str, Any] = {}
    try:
        info["server_version"] = client.get_server_metadata(as_json=True).get("version")
        config = client.get_model_config(MODEL, as_json=True).get("config", {})
        own = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        info["engine_parameters"] = in_process_engine_parameters(
            MODEL_REPOSITORY / MODEL, own)
    except Exception as exc:  # informational only: never fail the benchmark for it
        info["error"] = str(exc)
    finally:
        client.close()
    return info


def engine_kernels(server_log: str) -> str | None:
    """What the served engine computes with, from the model's ready line in the server log
    (device, dtype, kernels, GEMMs: which of them a machine gets depends on its processor)."""
    for line in server_log.splitlines():
        _, found, rest = line.partition("engine in process: ")
        if found:
            return rest.split("; settings", 1)[0].strip().strip('"')
    return None


def wait_model_ready(url: str, timeout_s: float = 30.0) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                if client.is_model_ready(MODEL):
                    return
            except Exception:  # server not up yet: keep polling until the deadline
                pass
            time.sleep(0.5)
    finally:
        client.close()
    raise BenchError(f"model {MODEL!r} is not ready at {url}")


def bench_serving(args: argparse.Namespace, artifact_dir: Path) -> dict[str, Any]:
    """Step 1: GenAI-Perf against `llm` at each concurrency. Stops its server before returning."""
    from python_backends.tools.triton_server import TritonServer

    server = None
    results: dict[str, Any] = {"runs": [], "variable_runs": [], "commands": []}
    try:
        if args.url:
            url = args.url
            log(f"serving: using the running server at {url}")
            wait_model_ready(url)
        else:
            log_path = artifact_dir / "tritonserver.log"
            server = TritonServer(models=list(SERVER_MODELS), log_path=log_path)
            log(f"serving: starting tritonserver ({','.join(SERVER_MODELS)}), log {log_path}")
            started = time.monotonic()
            server.start().wait_ready(timeout_s=args.ready_timeout)
            url = f"localhost:{server.grpc_port}"
            log(f"serving: ready in {time.monotonic() - started:.1f} s at {url}")
            results["server_log"] = display_path(log_path)
            with contextlib.suppress(OSError):
                results["engine_kernels"] = engine_kernels(log_path.read_text(errors="replace"))
        results["url"] = url
        results.update(engine_info(url))
        if args.warmup_requests:
            log(f"serving: warm-up: {args.warmup_requests} concurrent requests ...")
            took = warm_up(url, args.warmup_requests,
                           server_process=server.process if server else None)
            results["warmup_requests"] = args.warmup_requests
            log(f"serving: warm-up done in {took:.1f} s")
        process = server.process if server else None
        for c in args.concurrency:
            run = _serving_run(args, url, c, artifact_dir / f"genai-perf-c{c}", results,
                               process)
            results["runs"].append(run)
            if "error" in results:
                break
            mean_length = run.get("output_sequence_length_avg")
            # GenAI-Perf counts output tokens by re-tokenizing the text, so a run of exactly
            # 64 tokens each may average 63.9 or 64.1; warn only past that.
            if mean_length is not None and abs(mean_length - OUTPUT_TOKENS) > 0.5:
                log(f"serving: warning: mean output length {mean_length:.2f}, asked for "
                    f"{OUTPUT_TOKENS}")
        c = variable_length_concurrency(args.concurrency)
        for stddev in [] if "error" in results else args.output_stddevs:
            run_dir = artifact_dir / f"genai-perf-c{c}-stddev{stddev}"
            run = _serving_run(args, url, c, run_dir, results, process, stddev)
            results["variable_runs"].append(run)
            if "error" in results:
                break
        if args.paired_rounds and not args.skip_generate and "error" not in results:
            results["paired"] = bench_paired(args, url, artifact_dir, results, process)
    finally:
        if server is not None:
            log("serving: stopping tritonserver ...")
            server.stop()
    return results


def bench_paired(args: argparse.Namespace, url: str, artifact_dir: Path,
                 results: dict[str, Any], server_process: subprocess.Popen | None
                 ) -> dict[str, Any]:
    """Step 1b: the throughput target's pair measured in alternation, `args.paired_rounds`
    times: a GenAI-Perf run at concurrency N, then one generate() batch of N in this process
    (the server up and idle meanwhile), a minute apart. On a shared machine whose speed
    drifts by 10-40% between step 1 and step 2, ratios taken in pairs cancel most of that."""
    c = variable_length_concurrency(args.concurrency)
    baseline = GenerateBaseline(args.model_dir, seed=1)
    baseline.run(1, 8)  # warm-up
    rounds: list[dict[str, Any]] = []
    for i in range(args.paired_rounds):
        run = _serving_run(args, url, c, artifact_dir / f"genai-perf-c{c}-paired{i + 1}",
                           results, server_process)
        if "error" in run:
            rounds.append({"error": run["error"]})
            break
        generate_tok_s = c * OUTPUT_TOKENS / baseline.run(c, OUTPUT_TOKENS)
        engine_tok_s = run["output_token_throughput"]
        rounds.append({"engine_tok_s": engine_tok_s, "generate_tok_s": generate_tok_s,
                       "ratio": engine_tok_s / generate_tok_s, "engine_run": run})
        log(f"paired round {i + 1}/{args.paired_rounds}: engine {engine_tok_s:.1f} tok/s, "
            f"generate {generate_tok_s:.1f} tok/s: {engine_tok_s / generate_tok_s:.2f}x")
    ratios = [r["ratio"] for r in rounds if "ratio" in r]
    return {"concurrency": c, "rounds": rounds,
            "median_ratio": percentile(ratios, 50) if ratios else None}


def _serving_run(args: argparse.Namespace, url: str, c: int, run_dir: Path,
                 results: dict[str, Any], server_process: subprocess.Popen | None,
                 output_stddev: int = 0) -> dict[str, Any]:
    """One GenAI-Perf run at concurrency `c`; its command goes into results["commands"]. A
    dead server also sets results["error"]: later runs would measure a broken server."""
    count = (args.variable_request_count or variable_request_count(c)) if output_stddev else (
        args.request_count or default_request_count(c, args.quick))
    # A seed of its own for each run, so no run repeats an earlier run's prompts: with one
    # seed for all, the engine's prefix cache served every later run's prompts from the KV
    # blocks of the earlier ones (TTFT at c=32 1.2 s against 3.6 s cold), which generate()
    # has no way to do.
    seed = len(results["commands"])
    cmd = genai_perf_command(url, c, count, args.tokenizer, run_dir, args.genai_perf_args,
                             output_stddev=output_stddev, seed=seed)
    results["commands"].append(shlex.join(display_path(Path(a)) if a.startswith("/")
                                          else a for a in cmd))
    what = f"concurrency {c}" + (f", output stddev {output_stddev}" if output_stddev else "")
    log(f"serving: {what}: {count} requests ...")
    started = time.monotonic()
    run: dict[str, Any] = {"concurrency": c, "request_count": count,
                           "log": display_path(run_dir)}
    if output_stddev:
        run["output_stddev"] = output_stddev
    try:
        run_genai_perf(cmd, run_dir / "genai-perf.log", args.genai_perf_timeout,
                       server_process)
        export = find_genai_perf_export(run_dir)
        run.update(parse_genai_perf_export(export))
        run["export"] = display_path(export)
        if output_stddev:
            run["requested_lengths"] = requested_output_lengths(run_dir, count)
    except BenchError as exc:
        run["error"] = str(exc)
        log(f"serving: {what} FAILED: {exc}")
        if isinstance(exc, ServerDied):
            results["error"] = str(exc)
    run["wall_s"] = round(time.monotonic() - started, 1)
    if "error" not in run:
        log(f"serving: {what}: {run['output_token_throughput']:.1f} tok/s, "
            f"TTFT p50 {run['ttft_ms']['p50']:.0f} ms, ITL p50 {run['itl_ms']['p50']:.1f}"
            f" ms, output length {run['output_sequence_length_avg']:.1f} "
            f"({run['wall_s']:.0f} s)")
    return run


def variable_request_count(concurrency: int) -> int:
    """Requests of a variable-length run: six waves, so that the end of the run, when the
    last long requests finish with few others left to batch (static batching's loss, but
    also in-flight batching's once nothing is left to admit), is a small part of it."""
    return VARIABLE_WAVES * concurrency


def variable_length_concurrency(concurrencies: Sequence[int]) -> int:
    """Where the variable-length runs go: the target concurrency, else the largest run."""
    if THROUGHPUT_TARGET_CONCURRENCY in concurrencies:
        return THROUGHPUT_TARGET_CONCURRENCY
    return max(concurrencies)


def requested_output_lengths(run_dir: Path, count: int) -> list[int]:
    """The output lengths GenAI-Perf asked for, in the order it sends its requests (its
    inputs.json entries from the first; `max_tokens` of each sampling_parameters)."""
    found = sorted(Path(run_dir).rglob("inputs.json"))
    if not found:
        raise BenchError(f"GenAI-Perf wrote no inputs.json under {run_dir}")
    entries = json.loads(found[-1].read_text())["data"]
    lengths = []
    for entry in entries[:count]:
        params = json.loads(entry["sampling_parameters"][0])
        lengths.append(int(params["max_tokens"]))
    if len(lengths) < count:  # perf_analyzer cycles through the entries
        lengths = [lengths[i % len(lengths)] for i in range(count)]
    return lengths


# ----------------------------------------------------------------------------- generate()


def generate_stats(batch: int, elapsed_s: Sequence[float], ttft_s: Sequence[float],
                   new_tokens: int = OUTPUT_TOKENS) -> dict[str, Any]:
    """Throughput and latency of static-batch generate() from repeated timings (seconds).

    tok/s = batch*new_tokens/elapsed (median elapsed); ITL of a run = (elapsed - TTFT)/(n-1)
    with the median TTFT, so its p50/p99 are over the repeats, like the TTFT's.
    """
    ttft_med = percentile(ttft_s, 50)
    itl_ms = [(e - ttft_med) / (new_tokens - 1) * 1e3 for e in elapsed_s]
    ttft_ms = [t * 1e3 for t in ttft_s]
    return {
        "batch": batch,
        "repeats": len(elapsed_s),
        "elapsed_s": [round(e, 4) for e in elapsed_s],
        "ttft_s": [round(t, 4) for t in ttft_s],
        "output_token_throughput": batch * new_tokens / percentile(elapsed_s, 50),
        "ttft_ms": {"avg": sum(ttft_ms) / len(ttft_ms), "p50": percentile(ttft_ms, 50),
                    "p99": percentile(ttft_ms, 99)},
        "itl_ms": {"avg": sum(itl_ms) / len(itl_ms), "p50": percentile(itl_ms, 50),
                   "p99": percentile(itl_ms, 99)},
    }


class GenerateBaseline:
    """transformers generate() on the benchmark's weights: fp32, greedy, random prompts of
    INPUT_TOKENS ids, exactly the asked number of new tokens."""

    def __init__(self, model_dir: Path, seed: int = 0) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        log(f"generate: loading {display_path(model_dir)} (fp32) ...")
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.eval()
        pad_id = self.model.generation_config.eos_token_id
        self.pad_id = pad_id[0] if isinstance(pad_id, list) else pad_id
        self.generator = torch.Generator().manual_seed(seed)

    def run(self, batch: int, new_tokens: int) -> float:
        """Seconds for one static batch."""
        torch = self.torch
        # Random ids above the special tokens; equal lengths, so no padding.
        ids = torch.randint(100, self.model.config.vocab_size, (batch, INPUT_TOKENS),
                            generator=self.generator)
        mask = torch.ones_like(ids)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      pad_token_id=self.pad_id)
        elapsed = time.perf_counter() - start
        if out.shape[1] - INPUT_TOKENS != new_tokens:
            raise BenchError(f"generate made {out.shape[1] - INPUT_TOKENS} tokens, not "
                             f"{new_tokens}")
        return elapsed


def bench_generate(model_dir: Path, batches: Iterable[int], repeats: int,
                   variable_lengths: dict[int, list[int]] | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """Step 2: transformers generate() baseline, fp32, greedy, exactly OUTPUT_TOKENS new tokens.

    `variable_lengths` (output stddev -> the lengths the serving run asked for): static batches
    of the same requests in the same order, each run until its longest request is done."""
    baseline = GenerateBaseline(model_dir, seed)
    run = baseline.run
    log("generate: warm-up ...")
    run(1, 8)
    results: dict[str, Any] = {"torch_threads": baseline.torch.get_num_threads(), "runs": []}
    for b in batches:
        ttft, elapsed = [], []
        for i in range(repeats):
            ttft.append(run(b, 1))
            elapsed.append(run(b, OUTPUT_TOKENS))
            log(f"generate: batch {b} run {i + 1}/{repeats}: {elapsed[-1]:.2f} s "
                f"({b * OUTPUT_TOKENS / elapsed[-1]:.1f} tok/s), TTFT {ttft[-1] * 1e3:.0f} ms")
        results["runs"].append(generate_stats(b, elapsed, ttft))
    results["variable_runs"] = []
    batch = variable_length_concurrency(list(batches))
    for stddev, lengths in (variable_lengths or {}).items():
        timings = []
        for start in range(0, len(lengths), batch):
            chunk = lengths[start:start + batch]
            timings.append((chunk, run(len(chunk), max(chunk))))
            log(f"generate: output stddev {stddev}: batch of {len(chunk)} run to "
                f"{max(chunk)} tokens for {sum(chunk)} requested: {timings[-1][1]:.2f} s")
        results["variable_runs"].append(static_batch_stats(stddev, timings))
    return results


def static_batch_stats(stddev: int, timings: Sequence[tuple[Sequence[int], float]]
                       ) -> dict[str, Any]:
    """Static batching on requests of different lengths, from (requested lengths, seconds) per
    batch: each batch runs as many steps as its longest request, so tok/s counts the tokens
    requested, and the rest of what it computed is waste."""
    requested = sum(sum(chunk) for chunk, _ in timings)
    computed = sum(len(chunk) * max(chunk) for chunk, _ in timings)
    elapsed = sum(seconds for _, seconds in timings)
    return {
        "output_stddev": stddev,
        "batches": [{"lengths": list(chunk), "elapsed_s": round(seconds, 4)}
                    for chunk, seconds in timings],
        "requested_tokens": requested,
        "computed_tokens": computed,
        "wasted_share": 1 - requested / computed,
        "output_token_throughput": requested / elapsed,
    }


def bench_engine_alone(model_dir: Path, concurrencies: Iterable[int],
                       request_counts: dict[int, int], seed: int = 0) -> dict[str, Any]:
    """Step 3: the engine in this process, no server, on the serving step's workload: the same
    number of requests (64 random token ids, exactly 64 new tokens), a new one admitted as
    soon as one finishes so that at most N run, as GenAI-Perf keeps N in flight. Served tok/s
    over this is what the serving path keeps of the engine's own speed."""
    import random

    from python_backends.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model_dir=str(model_dir)))
    rng = random.Random(seed)
    vocab = engine.runner.model_config.vocab_size
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, min_tokens=OUTPUT_TOKENS)
    results: dict[str, Any] = {"runs": []}
    for n in concurrencies:
        total, added, tokens = request_counts[n], 0, 0
        start = time.perf_counter()
        while added < total or engine.has_unfinished():
            while added < total and engine.num_running + engine.num_waiting < n:
                prompt = [rng.randrange(100, vocab) for _ in range(INPUT_TOKENS)]
                engine.add_request(f"alone-{n}-{added}", prompt, params)
                added += 1
            tokens += sum(len(out.new_token_ids) for out in engine.step())
        elapsed = time.perf_counter() - start
        results["runs"].append({"concurrency": n, "requests": total, "output_tokens": tokens,
                                "elapsed_s": round(elapsed, 3),
                                "output_token_throughput": tokens / elapsed})
        log(f"engine alone: concurrency {n}: {total} requests, {tokens / elapsed:.1f} tok/s "
            f"({elapsed:.0f} s)")
    return results


# ----------------------------------------------------------------------------- report


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError, subprocess.CalledProcessError, ValueError):
        facts["nproc"] = int(subprocess.check_output(["nproc"], text=True).strip())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with contextlib.suppress(OSError):
        facts["load_average_at_start"] = list(os.getloadavg())
    try:
        import torch
        import transformers

        facts["torch"] = torch.__version__
        facts["transformers"] = transformers.__version__
    except ImportError:
        pass
    return facts


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def compare(serving: dict[str, Any] | None, generate: dict[str, Any] | None,
            alone: dict[str, Any] | None = None) -> list[dict]:
    """One row per concurrency/batch size present in any side."""
    eng = {r["concurrency"]: r for r in (serving or {}).get("runs", []) if "error" not in r}
    gen = {r["batch"]: r for r in (generate or {}).get("runs", [])}
    solo = {r["concurrency"]: r for r in (alone or {}).get("runs", [])}
    rows = []
    for n in sorted(set(eng) | set(gen) | set(solo)):
        e, g, a = eng.get(n), gen.get(n), solo.get(n)
        rows.append({
            "n": n,
            "engine": e,
            "generate": g,
            "alone": a,
            "throughput_ratio": _ratio(e and e["output_token_throughput"],
                                       g and g["output_token_throughput"]),
            "served_share": _ratio(e and e["output_token_throughput"],
                                   a and a["output_token_throughput"]),
        })
    return rows


def compare_variable(serving: dict[str, Any] | None, generate: dict[str, Any] | None
                     ) -> list[dict]:
    """One row per output stddev of the variable-length runs."""
    eng = {r["output_stddev"]: r for r in (serving or {}).get("variable_runs", [])
           if "error" not in r}
    gen = {r["output_stddev"]: r for r in (generate or {}).get("variable_runs", [])}
    return [{"output_stddev": sd, "engine": eng.get(sd), "generate": gen.get(sd),
             "throughput_ratio": _ratio(eng.get(sd) and eng[sd]["output_token_throughput"],
                                        gen.get(sd) and gen[sd]["output_token_throughput"])}
            for sd in sorted(set(eng) | set(gen))]


def _status(ratio: float | None, met: bool) -> str:
    return "not measured" if ratio is None else ("met" if met else "not met")


def evaluate_targets(rows: list[dict], variable: list[dict] = (),
                     paired: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The issue's two targets, each with the measured ratio and met / not met / not measured;
    the throughput target again for each set of variable output lengths. With paired rounds
    at the target's concurrency, the throughput target is judged on their median ratio."""
    by_n = {r["n"]: r for r in rows}
    targets = []
    row = by_n.get(THROUGHPUT_TARGET_CONCURRENCY, {})
    ratio = row.get("throughput_ratio")
    name = (f"throughput: engine tok/s at concurrency {THROUGHPUT_TARGET_CONCURRENCY} >= "
            f"{THROUGHPUT_TARGET_RATIO:g}x generate() at batch {THROUGHPUT_TARGET_CONCURRENCY}")
    if (paired and paired.get("median_ratio") is not None
            and paired["concurrency"] == THROUGHPUT_TARGET_CONCURRENCY):
        ratio = paired["median_ratio"]
        name += f", median of {len(paired['rounds'])} paired rounds"
    targets.append({
        "name": name,
        "ratio": ratio,
        "status": _status(ratio, ratio is not None and ratio >= THROUGHPUT_TARGET_RATIO),
    })
    row = by_n.get(1, {})
    e, g = row.get("engine"), row.get("generate")
    ratio = _ratio(e and e["itl_ms"]["p50"], g and g["itl_ms"]["p50"])
    targets.append({
        "name": (f"single-stream latency: engine ITL p50 at concurrency 1 <= "
                 f"{ITL_TARGET_RATIO:g}x generate() ITL at batch 1"),
        "ratio": ratio,
        "status": _status(ratio, ratio is not None and ratio <= ITL_TARGET_RATIO),
    })
    for row in variable:
        ratio = row["throughput_ratio"]
        c = (row["engine"] or {}).get("concurrency", THROUGHPUT_TARGET_CONCURRENCY)
        targets.append({
            "name": (f"throughput, output lengths ~{OUTPUT_TOKENS} with stddev "
                     f"{row['output_stddev']}: engine tok/s at concurrency {c} >= "
                     f"{THROUGHPUT_TARGET_RATIO:g}x static-batch generate() on the same "
                     f"requests"),
            "ratio": ratio,
            "status": _status(ratio, ratio is not None and ratio >= THROUGHPUT_TARGET_RATIO),
        })
    return targets


def build_report(serving: dict[str, Any] | None, generate: dict[str, Any] | None,
                 machine: dict[str, Any], settings: dict[str, Any],
                 alone: dict[str, Any] | None = None) -> dict[str, Any]:
    rows = compare(serving, generate, alone)
    variable = compare_variable(serving, generate)
    return {
        "settings": settings,
        "machine": machine,
        "serving": serving,
        "generate": generate,
        "engine_alone": alone,
        "comparison": [{"n": r["n"], "throughput_ratio": r["throughput_ratio"],
                        "served_share_of_engine_alone": r["served_share"]} for r in rows],
        "variable_comparison": [{"output_stddev": r["output_stddev"],
                                 "throughput_ratio": r["throughput_ratio"]} for r in variable],
        "targets": evaluate_targets(rows, variable, (serving or {}).get("paired")),
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pair(stats: dict[str, Any] | None, key: str, digits: int = 0) -> str:
    if not stats:
        return "-"
    return f"{_fmt(stats[key]['p50'], digits)} / {_fmt(stats[key]['p99'], digits)}"


def render_markdown(report: dict[str, Any]) -> str:
    """The short table for docs/benchmarks/engine.md."""
    s, m = report["settings"], report["machine"]
    rows = compare(report.get("serving"), report.get("generate"), report.get("engine_alone"))
    title = "# Engine benchmark" + (" (quick smoke run)" if s.get("quick") else "")
    lines = [title, ""]
    if report.get("error"):
        lines += [f"**This run stopped early** ({report['error']}): what follows is what it "
                  "measured before that.", ""]
    lines += [
        f"`llm` served by tritonserver (engine with in-flight batching), measured with GenAI-Perf "
        f"0.0.16 (streaming, {s['input_tokens']} input tokens, exactly {s['output_tokens']} "
        f"output tokens, concurrency N), against transformers `generate()` on the same weights "
        f"(fp32, greedy, static batch of N). Machine: {m.get('nproc')} cores, "
        f"{m.get('cpu_model', 'unknown CPU')}, torch {m.get('torch', '?')}, {m.get('date')}."
        + (f" Engine: {kernels}." if (kernels := (report.get("serving") or {}).get(
            "engine_kernels")) else ""),
        "",
        "| N | engine tok/s | generate tok/s | ratio (engine/generate) | engine TTFT p50/p99 ms "
        "| generate TTFT p50/p99 ms | engine ITL p50/p99 ms | generate ITL p50/p99 ms "
        "| engine alone tok/s | served / alone |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e, g, a = r["engine"], r["generate"], r["alone"]
        lines.append(
            f"| {r['n']} | {_fmt(e and e['output_token_throughput'])} "
            f"| {_fmt(g and g['output_token_throughput'])} | {_fmt(r['throughput_ratio'], 2)} "
            f"| {_pair(e, 'ttft_ms')} | {_pair(g, 'ttft_ms')} "
            f"| {_pair(e, 'itl_ms', 1)} | {_pair(g, 'itl_ms', 1)} "
            f"| {_fmt(a and a['output_token_throughput'])} | {_fmt(r['served_share'], 2)} |"
        )
    serving = report.get("serving") or {}
    notes = [f"- concurrency {r['concurrency']}: FAILED: {r['error'].splitlines()[0]}"
             for r in serving.get("runs", []) if "error" in r]
    done = {r["concurrency"] for r in serving.get("runs", [])}
    if serving.get("error"):
        notes += [f"- concurrency {c}: not run ({serving['error']})"
                  for c in s["concurrency"] if c not in done]
    if notes:
        lines += ["", "Serving runs that produced no numbers:", "", *notes]
    variable = compare_variable(report.get("serving"), report.get("generate"))
    if variable:
        lines += [
            "",
            "Output lengths that vary: the same, but each request asks for its own length "
            f"(GenAI-Perf's bounded normal around {s['output_tokens']}: "
            "`--output-tokens-stddev`, still exactly that many tokens each), and generate() "
            "runs the same requests in static batches of N in the same order, each batch until "
            "its longest request is done; its tok/s counts the tokens the requests asked for.",
            "",
            "| output stddev | N | mean length | longest | engine tok/s | generate tok/s "
            "| ratio (engine/generate) | generate: computed past a request's end "
            "| engine TTFT p50/p99 ms | engine ITL p50/p99 ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in variable:
            e, g = r["engine"], r["generate"]
            lengths = (e or {}).get("requested_lengths") or []
            mean = sum(lengths) / len(lengths) if lengths else None
            wasted = "-" if not g else f"{g['wasted_share']:.0%}"
            lines.append(
                f"| {r['output_stddev']} | {(e or {}).get('concurrency', '-')} | {_fmt(mean)} "
                f"| {max(lengths) if lengths else '-'} "
                f"| {_fmt(e and e['output_token_throughput'])} "
                f"| {_fmt(g and g['output_token_throughput'])} | {_fmt(r['throughput_ratio'], 2)} "
                f"| {wasted} "
                f"| {_pair(e, 'ttft_ms')} | {_pair(e, 'itl_ms', 1)} |")
    paired = (report.get("serving") or {}).get("paired")
    if paired and paired["rounds"]:
        lines += [
            "",
            f"Paired rounds at N={paired['concurrency']}: a GenAI-Perf run (64 requests), then "
            f"one `generate()` batch of {paired['concurrency']}, alternating with the server up, "
            f"so each ratio compares runs a minute apart (the tables above compare runs up to "
            f"20 minutes apart, and this machine's speed drifts over that).",
            "",
            "| round | engine tok/s | generate tok/s | ratio |",
            "|---:|---:|---:|---:|",
        ]
        for i, r in enumerate(paired["rounds"], 1):
            if "error" in r:
                lines.append(f"| {i} | FAILED: {r['error'].splitlines()[0]} | - | - |")
            else:
                lines.append(f"| {i} | {r['engine_tok_s']:.1f} | {r['generate_tok_s']:.1f} "
                             f"| {r['ratio']:.2f} |")
        lines.append(f"| median | | | {_fmt(paired['median_ratio'], 2)} |")
    lines += ["", "Targets:", ""]
    for t in report["targets"]:
        ratio = "" if t["ratio"] is None else f" (measured {t['ratio']:.2f}x)"
        lines.append(f"- {t['name']}: **{t['status']}**{ratio}")
    lines += [
        "",
        f"Engine p50/p99 are over requests (GenAI-Perf); generate() p50/p99 are over "
        f"{s.get('generate_repeats')} repeated runs. Engine alone: the same engine in the "
        f"benchmark's own process with no server, the serving run's number of requests with "
        f"at most N running; served / alone is the share of the engine's own speed that "
        f"serving keeps. Numbers, commands and machine facts: "
        f"`engine.json`. Reproduce: `{s.get('command', 'scripts/bench_engine.py')}`.",
        "",
    ]
    return "\n".join(lines)


def write_reports(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "engine.json", out_dir / "engine.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench_engine.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--concurrency", type=parse_int_list, default=None,
                        help="comma-separated concurrencies, also the generate() batch sizes "
                             "(default 1,4,8,32; with --quick 1,4)")
    parser.add_argument("--request-count", type=int, default=None,
                        help="requests measured per concurrency (default max(2*N, 8); with "
                             "--quick max(N, 2))")
    parser.add_argument("--warmup-requests", type=int, default=None,
                        help="concurrent requests sent once before the GenAI-Perf runs to warm "
                             "the server up (default 4; with --quick 2; 0: none)")
    parser.add_argument("--generate-repeats", type=int, default=None,
                        help="timed generate() runs per batch size (default 3; with --quick 1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run in a couple of minutes: concurrency/batch 1,4, few "
                             "requests, one generate() repeat; reports go to the artifact "
                             "directory unless --out-dir is given")
    parser.add_argument("--output-stddevs", type=parse_stddev_list, default=None,
                        help="extra runs at concurrency 32 (else the largest) whose requested "
                             f"output lengths vary around {OUTPUT_TOKENS} with these standard "
                             "deviations, against static-batch generate() on the same lengths "
                             f"(default {','.join(map(str, DEFAULT_OUTPUT_STDDEVS))}; with "
                             "--quick none; 'none': none)")
    parser.add_argument("--paired-rounds", type=int, default=None,
                        help="GenAI-Perf runs at concurrency 32 (else the largest) alternating "
                             "with one generate() batch each, the server up: the throughput "
                             "target's ratio from pairs a minute apart (default 3; with "
                             "--quick 0)")
    parser.add_argument("--variable-request-count", type=int, default=None,
                        help=f"requests per variable-length run (default {VARIABLE_WAVES}x "
                             "the concurrency)")
    parser.add_argument("--url", default=None,
                        help="gRPC host:port of a running server with `llm` loaded; default: "
                             "start one (models engine,llm) on free ports")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="weights for generate() (default: the project's "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer folder for GenAI-Perf (default: --model-dir)")
    add_output_args(parser, "engine.json and engine.md",
                    "GenAI-Perf artifacts, its logs and the server log", "engine")
    parser.add_argument("--skip-serving", action="store_true", help="only the generate() side")
    parser.add_argument("--skip-generate", action="store_true",
                        help="no generate() baseline")
    parser.add_argument("--skip-alone", action="store_true",
                        help="no engine-alone run (the engine in this process, no server)")
    parser.add_argument("--genai-perf-args", default="",
                        help="extra arguments appended to every GenAI-Perf command, e.g. "
                             "'--stability-percentage 25' or '-- --max-threads 8' (after `--`: "
                             "passed to perf_analyzer). Not needed by default: with "
                             "--request-count perf_analyzer takes one measurement of that many "
                             "requests, stability 999%%, so no 'Failed to obtain stable "
                             "measurement' on 2 cores. --measurement-interval cannot be combined "
                             "with --request-count")
    parser.add_argument("--genai-perf-timeout", type=float, default=1800.0,
                        help="seconds one GenAI-Perf run may take (default 1800)")
    parser.add_argument("--ready-timeout", type=float, default=300.0,
                        help="seconds to wait for the server to load its models (default 300)")
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or list(QUICK_CONCURRENCY if args.quick
                                                else DEFAULT_CONCURRENCY)
    if args.generate_repeats is None:
        args.generate_repeats = 1 if args.quick else 3
    if args.output_stddevs is None:
        args.output_stddevs = [] if args.quick else list(DEFAULT_OUTPUT_STDDEVS)
    if args.warmup_requests is None:
        args.warmup_requests = 2 if args.quick else 4
    if args.paired_rounds is None:
        args.paired_rounds = 0 if args.quick else 3
    if args.generate_repeats < 1:
        parser.error("--generate-repeats must be at least 1")
    if args.paired_rounds < 0:
        parser.error("--paired-rounds must be 0 or more")
    for name in ("request_count", "variable_request_count"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.skip_serving and args.skip_generate:
        parser.error("--skip-serving and --skip-generate leave nothing to run")
    args.model_dir = args.model_dir or default_model_dir()
    args.tokenizer = args.tokenizer or args.model_dir
    args.genai_perf_args = shlex.split(args.genai_perf_args)
    return args


def add_output_args(parser: argparse.ArgumentParser, reports: str, artifacts: str,
                    name: str) -> None:
    """--out-dir and --artifact-dir, as every benchmark script takes them."""
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"where {reports} go (default {display_path(DEFAULT_OUT_DIR)}; "
                             f"with --quick the artifact directory's report/)")
    parser.add_argument("--artifact-dir", type=Path, default=None,
                        help=f"{artifacts} (default .cache/bench/{name}-<time>)")


def run_dirs(args: argparse.Namespace, name: str) -> tuple[Path, Path]:
    """(artifact directory, report directory) of this run; see `add_output_args`."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    artifact_dir = (args.artifact_dir or CACHE_DIR / "bench" / f"{name}-{stamp}").resolve()
    out_dir = args.out_dir or (artifact_dir / "report" if args.quick else DEFAULT_OUT_DIR)
    return artifact_dir, out_dir


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM stops a benchmark as Ctrl-C does: everything started is stopped in order."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def interrupted() -> int:
    print("\ninterrupted: stopping everything; no report written.", file=sys.stderr,
          flush=True)
    return 130


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    artifact_dir, out_dir = run_dirs(args, "engine")
    if not (args.model_dir / "config.json").exists():
        print(f"error: no model in {args.model_dir} (run `make setup`)", file=sys.stderr)
        return 2
    if not args.skip_serving and not GENAI_PERF.exists():
        print(f"error: {GENAI_PERF} is missing", file=sys.stderr)
        return 2
    artifact_dir.mkdir(parents=True, exist_ok=True)
    stop_on_sigterm()
    settings = {
        "quick": args.quick,
        "command": shlex.join(["scripts/bench_engine.py", *(argv if argv is not None
                                                             else sys.argv[1:])]),
        "concurrency": args.concurrency,
        "input_tokens": INPUT_TOKENS,
        "output_tokens": OUTPUT_TOKENS,
        "generate_repeats": args.generate_repeats,
        "output_stddevs": args.output_stddevs,
        "model_dir": display_path(args.model_dir),
        "artifact_dir": display_path(artifact_dir),
        "generate_call": (f"AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)"
                          f".generate(input_ids[B,{INPUT_TOKENS}] random ids, do_sample=False, "
                          f"max_new_tokens={OUTPUT_TOKENS}, min_new_tokens={OUTPUT_TOKENS}); "
                          f"TTFT: the same with max_new_tokens=1"),
    }
    machine = machine_facts()
    log(f"artifacts: {artifact_dir}; reports: {out_dir}")
    log(f"machine: {machine.get('nproc')} cores, {machine.get('cpu_model')}, load average "
        f"{machine.get('load_average_at_start')}")
    serving = generate = alone = None
    failed = False
    error = None
    try:
        if not args.skip_serving:
            serving = bench_serving(args, artifact_dir)
            failed = "error" in serving or any("error" in r for r in serving["runs"])
        if not args.skip_generate:
            variable = {r["output_stddev"]: r["requested_lengths"]
                        for r in (serving or {}).get("variable_runs", []) if "error" not in r}
            generate = bench_generate(args.model_dir, args.concurrency, args.generate_repeats,
                                      variable)
        if not args.skip_alone:
            alone = bench_engine_alone(args.model_dir, args.concurrency, {
                n: args.request_count or default_request_count(n, args.quick)
                for n in args.concurrency})
    except KeyboardInterrupt:
        return interrupted()
    except Exception as exc:  # the steps done before it keep their numbers
        error = f"{type(exc).__name__}: {exc}"
        print(f"error: {error}", file=sys.stderr)
        failed = True
        if serving is None and generate is None:
            return 1
    report = build_report(serving, generate, machine, settings, alone)
    if error:
        report["error"] = error
    json_path, md_path = write_reports(report, out_dir)
    log(f"wrote {display_path(json_path)} and {display_path(md_path)}")
    print()
    print(render_markdown(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
