#!/usr/bin/env python3
"""Engine feature benchmarks, side by side in one run, on the engine itself (no server).

1. Prefix caching: time to first token of a repeated ~1,000-token prompt with the prefix
   cache on and off (target: at least 5x lower with caching).
2. Chunked prefill: 8 sequences are decoding when a ~2,000-token prompt arrives; the
   inter-token latency p99 of the 8 streams while it is prefilled, with chunked prefill on
   and off (target: p99 at least 3x lower with it on, and the long prompt's time to first
   token at most 1.5x worse).

3. Decode speed of the engine alone at batch 1 and 32 (64-token prompts, 64 new tokens),
   for comparison with the served numbers of bench_engine.py.

Writes <out-dir>/engine_features.json and engine_features.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from python_backends.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from python_backends.paths import default_model_dir  # noqa: E402


def log(message: str) -> None:
    print(f"[features {time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def prompt_ids(n: int, seed: int) -> list[int]:
    # Plain token ids from the middle of the vocabulary: no special tokens, reproducible.
    return [1000 + (seed * 7919 + i * 104729) % 40000 for i in range(n)]


def time_to_first_token(engine: LLMEngine, ids: list[int], request_id: str) -> float:
    start = time.perf_counter()
    engine.add_request(request_id, ids, SamplingParams(max_tokens=1, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def bench_prefix_cache(model_dir: str, prompt_len: int, repeats: int) -> dict:
    results = {}
    for enabled in (False, True):
        engine = LLMEngine(EngineConfig(model_dir=model_dir, enable_prefix_caching=enabled))
        ids = prompt_ids(prompt_len, seed=1)
        cold = time_to_first_token(engine, ids, "cold")
        warm = [time_to_first_token(engine, ids, f"warm-{i}") for i in range(repeats)]
        hit = engine.block_manager.stats.hit_tokens
        results["on" if enabled else "off"] = {
            "first_request_ttft_s": cold,
            "repeat_ttft_s": warm,
            "repeat_ttft_p50_s": statistics.median(warm),
            "cached_tokens_total": hit,
        }
        log(f"prefix cache {'on ' if enabled else 'off'}: first {cold * 1000:.0f} ms, "
            f"repeat p50 {statistics.median(warm) * 1000:.0f} ms")
        del engine
    results["speedup"] = results["off"]["repeat_ttft_p50_s"] / results["on"]["repeat_ttft_p50_s"]
    return results


def bench_chunked_prefill(model_dir: str, long_len: int, streams: int, budget: int) -> dict:
    results = {}
    for chunked in (False, True):
        config = EngineConfig(model_dir=model_dir, enable_prefix_caching=False,
                              enable_chunked_prefill=chunked,
                              max_num_batched_tokens=budget if chunked else 0)
        engine = LLMEngine(config)
        params = SamplingParams(max_tokens=10_000 // 8, ignore_eos=True)
        for i in range(streams):
            engine.add_request(f"s{i}", prompt_ids(32, seed=10 + i), params)
        for _ in range(5):  # everyone is decoding
            engine.step()
        last = {f"s{i}": time.perf_counter() for i in range(streams)}
        gaps: list[float] = []
        arrival = time.perf_counter()
        engine.add_request("long", prompt_ids(long_len, seed=99),
                           SamplingParams(max_tokens=1, ignore_eos=True))
        long_ttft = None
        while long_ttft is None:
            for out in engine.step():
                now = time.perf_counter()
                if out.request_id == "long":
                    long_ttft = now - arrival
                elif out.new_token_ids:
                    gaps.append(now - last[out.request_id])
                    last[out.request_id] = now
        for _ in range(5):  # a few steps after, as a client would see them
            for out in engine.step():
                if out.request_id in last:
                    now = time.perf_counter()
                    gaps.append(now - last[out.request_id])
                    last[out.request_id] = now
        key = "on" if chunked else "off"
        results[key] = {
            "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99),
            "itl_max_s": max(gaps), "long_prompt_ttft_s": long_ttft,
            "max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
        }
        log(f"chunked prefill {key:3}: ITL p99 {results[key]['itl_p99_s'] * 1000:.0f} ms, "
            f"long-prompt TTFT {long_ttft * 1000:.0f} ms")
        del engine
    results["itl_p99_ratio_off_over_on"] = results["off"]["itl_p99_s"] / results["on"]["itl_p99_s"]
    results["long_ttft_ratio_on_over_off"] = (
        results["on"]["long_prompt_ttft_s"] / results["off"]["long_prompt_ttft_s"])
    return results


def bench_decode(model_dir: str, batches: list[int], new_tokens: int) -> dict:
    """The engine's own decode speed, no server: B sequences of 64-token prompts decoding
    together; what the served numbers would be without the serving processes' CPU use."""
    engine = LLMEngine(EngineConfig(model_dir=model_dir, enable_prefix_caching=False))
    results = {}
    for batch in batches:
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"d{batch}-{i}", prompt_ids(64, seed=100 + i), params)
        engine.step()  # the prefill step
        start, tokens = time.perf_counter(), 0
        while engine.has_unfinished():
            tokens += len(engine.step())
        elapsed = time.perf_counter() - start
        steps = tokens / batch
        results[str(batch)] = {"tok_per_s": tokens / elapsed, "step_ms": elapsed / steps * 1000}
        log(f"decode batch {batch}: {tokens / elapsed:.1f} tok/s, "
            f"{elapsed / steps * 1000:.1f} ms a step")
    return results


def render(report: dict) -> str:
    p, c = report["prefix_cache"], report["chunked_prefill"]
    ok = lambda met: "met" if met else "not met"  # noqa: E731
    lines = [
        "# Engine features (CPU, engine in-process)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}",
        "",
        f"## Prefix caching: repeated {report['args']['prompt_len']}-token prompt",
        "",
        "| prefix cache | first request TTFT | repeat TTFT p50 |",
        "|---|---:|---:|",
    ]
    for key in ("off", "on"):
        lines.append(f"| {key} | {p[key]['first_request_ttft_s'] * 1000:.0f} ms | "
                     f"{p[key]['repeat_ttft_p50_s'] * 1000:.0f} ms |")
    lines += [
        "",
        f"Repeat TTFT is {p['speedup']:.1f}x lower with caching "
        f"(target >= 5x: {ok(p['speedup'] >= 5)}).",
        "",
        f"## Chunked prefill: {report['args']['streams']} decoding streams, a "
        f"{report['args']['long_len']}-token prompt arrives",
        "",
        "| chunked prefill | token budget | ITL p50 | ITL p99 | long prompt TTFT |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in ("off", "on"):
        r = c[key]
        cells = [key, str(r["max_num_batched_tokens"])] + [
            f"{r[name] * 1000:.0f} ms" for name in ("itl_p50_s", "itl_p99_s", "long_prompt_ttft_s")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    ratio, worse = c["itl_p99_ratio_off_over_on"], c["long_ttft_ratio_on_over_off"]
    lines += [
        "",
        f"ITL p99 is {ratio:.1f}x lower with chunked prefill (target >= 3x: {ok(ratio >= 3)}); "
        f"the long prompt's TTFT is {worse:.2f}x (target <= 1.5x: {ok(worse <= 1.5)}).",
        "",
        "## Decode speed of the engine alone (no server)",
        "",
        "| batch | tok/s | ms a decode step |",
        "|---:|---:|---:|",
    ]
    for batch, r in report["decode"].items():
        lines.append(f"| {batch} | {r['tok_per_s']:.1f} | {r['step_ms']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def _relative(value: object) -> object:
    """Paths inside the checkout as relative paths, so reports name no machine's layout."""
    if isinstance(value, str | Path) and str(value).startswith(str(REPO)):
        return str(Path(value).relative_to(REPO))
    return str(value) if isinstance(value, Path) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(default_model_dir()))
    parser.add_argument("--prompt-len", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-len", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--chunk-budget", type=int, default=256,
                        help="max_num_batched_tokens with chunked prefill (default 256)")
    parser.add_argument("--decode-batches", default="1,32",
                        help="batch sizes for the decode-speed section (default 1,32)")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    try:
        report = {
            "command": "python scripts/bench_engine_features.py " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, "
                       f"{__import__('os').cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "args": {k: _relative(v) for k, v in vars(args).items()},
            "prefix_cache": bench_prefix_cache(args.model_dir, args.prompt_len, args.repeats),
            "chunked_prefill": bench_chunked_prefill(args.model_dir, args.long_len,
                                                     args.streams, args.chunk_budget),
            "decode": bench_decode(args.model_dir, [int(b) for b in args.decode_batches.split(",")],
                                   args.decode_tokens),
        }
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "engine_features.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render(report)
    (args.out_dir / "engine_features.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
