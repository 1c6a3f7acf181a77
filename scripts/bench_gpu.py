#!/usr/bin/env python3
"""GPU benchmark of the engine: CUDA graphs on/off vs transformers generate(), one run.

For each model shape (random bf16 weights in a real model's shapes: SmolLM2-135M and
Llama-3.2-1B; throughput does not depend on weight values):

  1. builds the model with transformers on the GPU and saves it as safetensors;
  2. correctness: greedy tokens of the engine (CUDA graphs and eager) against transformers
     on the same weights, in float32 (must match) and in bfloat16 (reported: how many
     leading tokens match; bf16 rounding may legitimately diverge);
  3. transformers generate() (eager, static batch, greedy) at each batch size;
  4. the engine with CUDA graphs on and off at each batch size: end-to-end tok/s
     (batch * new tokens / wall time, prefill included, like generate()), the median
     decode-step time (engine.step(), host work included), and with graphs the GPU time of
     one graph replay;
  5. the roofline: the weight bytes a decode step must read over the measured copy
     bandwidth, and the share of it achieved.

Writes <out-dir>/gpu.json and <out-dir>/gpu.md (the GPU name, versions, the exact command).
Needs a CUDA GPU with torch, triton and transformers. Batch sizes, token counts and shapes
are flags so that a run fits a time budget, e.g. a quick check:

    python3 scripts/bench_gpu.py --batches 1,8 --new-tokens 32 --shapes smollm2-135m
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from python_backends.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402

DEFAULT_OUT_DIR = REPO_ROOT / "docs" / "benchmarks"

# transformers LlamaConfig arguments of each shape (the published configs' sizes).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True,
    ),
}

# Targets from the engine issue.
TARGET_GRAPH_VS_EAGER_B1 = 3.0  # 135M shape, batch 1: graphs / eager decode
TARGET_ROOFLINE_B1 = 0.70  # 1B shape, batch 1: share of the weight-bandwidth roofline
TARGET_VS_HF_B64 = 10.0  # batch 64: engine (graphs) / transformers generate()


def log(msg: str) -> None:
    print(f"[bench-gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def free_gpu() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).tolist()


# ----------------------------------------------------------------------------- measurements


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> dict[str, float]:
    """A large device-to-device copy. Returns bytes copied per second and bytes moved
    (read + written) per second."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    assert torch.equal(dst[:4096], src[:4096])
    seconds = statistics.median(times)
    del src, dst
    free_gpu()
    return {"copy_bytes_per_s": nbytes / seconds, "read_write_bytes_per_s": 2 * nbytes / seconds}


def build_checkpoint(shape: str, directory: Path, seed: int) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)  # transformers' own random init (std 0.02)
    model = model.to(torch.bfloat16)
    model.save_pretrained(directory)
    unique = {p.data_ptr(): p for p in model.parameters()}
    info = {
        "params": sum(p.numel() for p in unique.values()),
        "weight_bytes": sum(p.numel() * p.element_size() for p in unique.values()),
        "kv_bytes_per_token": 2 * config.num_hidden_layers * config.num_key_value_heads
        * config.head_dim * 2,
    }
    del model
    free_gpu()
    return info


def load_hf(directory: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, device_map="cuda").eval()


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    ids = torch.tensor(prompts, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    # The configs have no EOS token, so every row runs to max_new_tokens.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate() made {out.shape[1] - ids.shape[1]} tokens, "
                           f"not {new_tokens}")
    return out[:, ids.shape[1]:].tolist(), elapsed


def make_engine(model_dir: Path, dtype: str, eager: bool, max_num_seqs: int) -> LLMEngine:
    config = EngineConfig(model_dir=str(model_dir), dtype=dtype, device="cuda",
                          enforce_eager=eager, max_num_seqs=max_num_seqs)
    start = time.perf_counter()
    engine = LLMEngine(config)
    log(f"  engine {dtype} {'eager' if eager else 'graphs'}: ready in "
        f"{time.perf_counter() - start:.1f} s, {engine.runner.num_blocks} KV blocks, "
        f"graphs {engine.runner.cuda_graph_sizes}")
    return engine


def engine_run(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    seqs = [engine.add_request(f"b{i}-{time.monotonic_ns()}", p, params)
            for i, p in enumerate(prompts)]
    steps: list[tuple[float, bool, int]] = []
    torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        batch = engine.last_schedule
        steps.append((time.perf_counter() - t0, not batch.prefill_seqs, len(batch.decode_seqs)))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    full = [t for t, decode_only, n in steps if decode_only and n == len(prompts)]
    return {
        "tokens": [s.output_token_ids for s in seqs],
        "elapsed_s": elapsed,
        "tok_per_s": len(prompts) * new_tokens / elapsed,
        "decode_step_ms": 1e3 * statistics.median(full) if full else None,
        "steps": len(steps),
    }


def graph_replay_ms(engine: LLMEngine, batch: int, repeats: int = 50) -> float | None:
    """GPU time of one replay of the graph that serves `batch` (the buffers hold the last
    step's inputs, so it computes a real decode step)."""
    runner = engine.runner
    sizes = [s for s in runner.cuda_graph_sizes if s >= batch]
    if not sizes:
        return None
    graph = runner._graphs[sizes[0]]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def kernel_breakdown(engine: LLMEngine, batch: int, repeats: int = 5, top: int = 8):
    """The GPU kernels of one decode-graph replay, by total time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    sizes = [s for s in runner.cuda_graph_sizes if s >= batch]
    if not sizes:
        return None
    graph = runner._graphs[sizes[0]]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None)
        if total is None:
            total = getattr(event, "cuda_time_total", 0)
        if total:
            rows.append({"kernel": event.key[:90], "us_per_step": total / repeats,
                         "calls_per_step": event.count / repeats})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"total_us_per_step": sum(r["us_per_step"] for r in rows),
            "kernels_per_step": sum(r["calls_per_step"] for r in rows), "top": rows[:top]}


def first_mismatch(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


# ----------------------------------------------------------------------------- one shape


def bench_shape(shape: str, args: argparse.Namespace, bandwidth: dict[str, float],
                workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"shape": shape, "config": SHAPES[shape]}
    model_dir = workdir / shape
    log(f"{shape}: building random bf16 weights")
    result.update(build_checkpoint(shape, model_dir, args.seed))
    vocab = SHAPES[shape]["vocab_size"]
    check_prompts = random_prompts(args.check_prompts, args.prompt_len, vocab, args.seed + 1)
    n_check = args.check_tokens

    # -- correctness: transformers references first (one model on the GPU at a time)
    log(f"{shape}: transformers references (float32, bfloat16)")
    references = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        hf = load_hf(model_dir, dtype)
        references[name], _ = hf_generate(hf, check_prompts, n_check)
        if name == "bfloat16":
            result["hf"] = bench_hf(hf, args, vocab) if not args.skip_hf else {}
        del hf
        free_gpu()

    checks: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        for eager in (False, True):
            label = f"{dtype}-{'eager' if eager else 'graphs'}"
            engine = make_engine(model_dir, dtype, eager, max_num_seqs=max(args.check_prompts, 1))
            got = engine.generate(check_prompts, SamplingParams(max_tokens=n_check,
                                                                ignore_eos=True))
            matched = [first_mismatch(g, r) for g, r in zip(got, references[dtype],
                                                             strict=True)]
            checks[label] = {"matched_tokens": matched, "of": n_check,
                             "exact": all(m == n_check for m in matched)}
            log(f"  check {label}: leading tokens matching transformers {matched} of {n_check}")
            del engine
            free_gpu()
    result["checks"] = checks

    # -- engine throughput, graphs on and off
    engine_results: dict[str, Any] = {}
    for eager in (False, True):
        mode = "eager" if eager else "graphs"
        engine = make_engine(model_dir, "bfloat16", eager, max_num_seqs=max(args.batches))
        rows = {}
        for batch in args.batches:
            # Fresh prompts each run, so the prefix cache cannot shorten a prefill.
            engine_run(engine, random_prompts(batch, args.prompt_len, vocab, 100 + batch),
                       min(8, args.new_tokens))
            run = engine_run(engine, random_prompts(batch, args.prompt_len, vocab, 200 + batch),
                             args.new_tokens)
            run.pop("tokens")
            if not eager:
                run["graph_replay_ms"] = graph_replay_ms(engine, batch)
                if batch in args.profile_batches:
                    try:
                        run["kernels"] = kernel_breakdown(engine, batch)
                    except Exception as exc:  # the profiler is a nicety
                        run["kernels"] = {"error": f"{type(exc).__name__}: {exc}"}
            rows[str(batch)] = run
            log(f"  engine {mode} batch {batch}: {run['tok_per_s']:.0f} tok/s, decode step "
                f"{fmt(run['decode_step_ms'], '.3f')} ms, replay "
                f"{fmt(run.get('graph_replay_ms'), '.3f')} ms")
        engine_results[mode] = rows
        del engine
        free_gpu()
    result["engine"] = engine_results

    # -- roofline
    roofline = {}
    for batch in args.batches:
        weights_ms = 1e3 * result["weight_bytes"] / bandwidth["read_write_bytes_per_s"]
        weights_ms_issue = 1e3 * result["weight_bytes"] / bandwidth["copy_bytes_per_s"]
        # KV read by an average decode step (context grows from prompt to prompt + new).
        kv_bytes = batch * (args.prompt_len + args.new_tokens / 2) * result["kv_bytes_per_token"]
        kv_ms = 1e3 * kv_bytes / bandwidth["read_write_bytes_per_s"]
        row = {"weights_ms": weights_ms, "weights_ms_copy_bw": weights_ms_issue,
               "weights_and_kv_ms": weights_ms + kv_ms}
        graphs = engine_results["graphs"][str(batch)]
        if graphs["decode_step_ms"]:
            row["achieved_step"] = weights_ms / graphs["decode_step_ms"]
            row["achieved_step_copy_bw"] = weights_ms_issue / graphs["decode_step_ms"]
        if graphs.get("graph_replay_ms"):
            row["achieved_replay"] = weights_ms / graphs["graph_replay_ms"]
        roofline[str(batch)] = row
    result["roofline"] = roofline
    return result


def bench_hf(model, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    rows = {}
    hf_batches = args.hf_batches or args.batches
    new_tokens = args.hf_new_tokens or args.new_tokens
    hf_generate(model, random_prompts(1, args.prompt_len, vocab, 7), 4)  # warm-up
    for batch in hf_batches:
        _, elapsed = hf_generate(model, random_prompts(batch, args.prompt_len, vocab, batch),
                                 new_tokens)
        rows[str(batch)] = {"elapsed_s": elapsed, "tok_per_s": batch * new_tokens / elapsed,
                            "new_tokens": new_tokens}
        log(f"  transformers generate batch {batch}: {batch * new_tokens / elapsed:.0f} tok/s")
    return rows


# ----------------------------------------------------------------------------- report


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    small, large = results["shapes"].get("smollm2-135m"), results["shapes"].get("llama-3.2-1b")
    if small and "1" in small.get("engine", {}).get("graphs", {}):
        g, e = small["engine"]["graphs"]["1"], small["engine"]["eager"]["1"]
        ratio = g["tok_per_s"] / e["tok_per_s"]
        out.append({"target": "135M, batch 1: CUDA graphs >= 3x the engine's eager decode",
                    "value": f"{ratio:.1f}x", "met": ratio >= TARGET_GRAPH_VS_EAGER_B1})
    if large and "1" in large.get("roofline", {}):
        row = large["roofline"]["1"]
        for key, what in (("achieved_step", "read+write copy bandwidth"),
                          ("achieved_step_copy_bw", "bytes-copied bandwidth (the issue's)")):
            if key in row:
                out.append({"target": f"1B, batch 1: >= 70% of the weight roofline ({what})",
                            "value": f"{100 * row[key]:.0f}%",
                            "met": row[key] >= TARGET_ROOFLINE_B1})
    for name, shape in results["shapes"].items():
        hf = shape.get("hf", {}).get("64")
        graphs = shape.get("engine", {}).get("graphs", {}).get("64")
        if hf and graphs:
            ratio = graphs["tok_per_s"] / hf["tok_per_s"]
            out.append({"target": f"{name}, batch 64: >= 10x transformers generate()",
                        "value": f"{ratio:.1f}x", "met": ratio >= TARGET_VS_HF_B64})
    return out


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    bw = results["bandwidth"]
    lines = [
        "# Engine on the GPU: CUDA graphs vs eager vs transformers generate()",
        "",
        f"Measured {results['date']} on {env['gpu']} (torch {env['torch']}, triton "
        f"{env['triton']}, transformers {env['transformers']}, Python {env['python']}), "
        "random bf16 weights in each model's shapes, "
        f"{results['prompt_len']}-token prompts, {results['new_tokens']} new tokens, greedy, "
        "EOS ignored.",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Copy bandwidth (1 GiB device-to-device): {bw['copy_bytes_per_s'] / 1e12:.2f} TB/s "
        f"copied = {bw['read_write_bytes_per_s'] / 1e12:.2f} TB/s read + written.",
        "",
        "tok/s = batch x new tokens / wall time (prefill included), for the engine and for "
        "generate() alike. Decode step: median `engine.step()` time of the full-batch decode "
        "steps (host work and sampling included). Replay: GPU time of one graph replay. "
        "Roofline: weight bytes / read+write copy bandwidth (the issue's figures divide by "
        "the bytes-copied rate, twice as long); achieved = roofline / decode step.",
        "",
    ]
    for name, shape in results["shapes"].items():
        if "error" in shape:
            lines += [f"## {name}", "", f"FAILED: {shape['error']}", ""]
            continue
        lines += [
            f"## {name} ({shape['params'] / 1e6:.0f}M parameters, "
            f"{shape['weight_bytes'] / 1e9:.2f} GB of weights)",
            "",
            "| batch | generate() tok/s | eager tok/s | graphs tok/s | graphs / eager | "
            "graphs / generate() | eager step ms | graphs step ms | replay ms | "
            "roofline ms | achieved (step) | achieved (replay) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for batch in results["batches"]:
            key = str(batch)
            hf = shape.get("hf", {}).get(key, {})
            eager = shape["engine"]["eager"][key]
            graphs = shape["engine"]["graphs"][key]
            roof = shape["roofline"][key]
            vs_hf = graphs["tok_per_s"] / hf["tok_per_s"] if hf else None
            lines.append(
                f"| {batch} | {fmt(hf.get('tok_per_s'))} | {eager['tok_per_s']:.0f} | "
                f"{graphs['tok_per_s']:.0f} | {graphs['tok_per_s'] / eager['tok_per_s']:.1f}x | "
                f"{fmt(vs_hf, '.1f')}{'x' if vs_hf else ''} | "
                f"{fmt(eager['decode_step_ms'], '.3f')} | {fmt(graphs['decode_step_ms'], '.3f')}"
                f" | {fmt(graphs.get('graph_replay_ms'), '.3f')} | {roof['weights_ms']:.3f} | "
                f"{fmt(100 * roof['achieved_step'] if 'achieved_step' in roof else None)}% | "
                f"{fmt(100 * roof['achieved_replay'] if 'achieved_replay' in roof else None)}% |"
            )
        checks = ", ".join(
            f"{label}: {min(c['matched_tokens'])}/{c['of']}" for label, c in shape["checks"].items()
        )
        lines += ["", f"Greedy tokens vs transformers (fewest leading tokens matching over "
                      f"the prompts): {checks}.", ""]
        for batch in results["batches"]:
            kernels = shape["engine"]["graphs"][str(batch)].get("kernels")
            if not kernels or "error" in kernels:
                continue
            lines += [
                f"Kernels of one graph replay at batch {batch} (torch.profiler): "
                f"{kernels['kernels_per_step']:.0f} launches, "
                f"{kernels['total_us_per_step']:.0f} us of kernel time.",
                "",
                "| kernel | us per step | calls per step |",
                "|---|---:|---:|",
            ]
            for row in kernels["top"]:
                name = row["kernel"].replace("|", "/")
                lines.append(f"| `{name}` | {row['us_per_step']:.1f} | "
                             f"{row['calls_per_step']:.0f} |")
            lines.append("")
    lines += ["## Targets", "", "| target | measured | met |", "|---|---:|:---:|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def environment() -> dict[str, str]:
    import transformers
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--batches", type=parse_int_list, default=[1, 8, 64, 256])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hf-batches", type=parse_int_list, default=None,
                        help="batches for generate() (default: --batches)")
    parser.add_argument("--hf-new-tokens", type=int, default=0,
                        help="new tokens for generate() (default: --new-tokens)")
    parser.add_argument("--skip-hf", action="store_true", help="no generate() timings")
    parser.add_argument("--profile-batches", type=parse_int_list, default=[1, 64],
                        help="batches whose graph replay is profiled kernel by kernel")
    parser.add_argument("--check-prompts", type=int, default=4)
    parser.add_argument("--check-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {list(SHAPES)}")

    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python3", "scripts/bench_gpu.py", *(argv or sys.argv[1:])]),
        "environment": environment(),
        "batches": args.batches,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "shapes": {},
    }
    log(f"{results['environment']}")
    results["bandwidth"] = copy_bandwidth()
    log(f"copy bandwidth {results['bandwidth']}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as workdir:
        for shape in shapes:
            try:
                results["shapes"][shape] = bench_shape(shape, args, results["bandwidth"],
                                                       Path(workdir))
            except Exception as exc:  # keep the other shape's numbers
                traceback.print_exc()
                results["shapes"][shape] = {"error": f"{type(exc).__name__}: {exc}"}
                failed = True
            free_gpu()
            results["targets"] = targets(results)
            (args.out_dir / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
            (args.out_dir / "gpu.md").write_text(markdown(results))
    print(markdown(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
