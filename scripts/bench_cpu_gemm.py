#!/usr/bin/env python3
"""CPU GEMM benchmark: the engine's C++ GEMM (`cpu_kernels.linear`) against oneDNN's (the
plain path's), on a model's linear layers, float32.

One "step" multiplies every linear layer of the model once, as a forward pass does: per layer
the fused q/k/v, o, gate/up and down projections, with fresh weights for each layer, so that,
as in the engine, the weights come from memory rather than cache (SmolLM2-135M: 540 MB of
float32 weights against a 32 MB L3). At up to 64 rows (a decode step: one row per sequence)
the step also has the vocabulary projection; at more rows (a prefill) it does not, since a
prefill projects only each prompt's last token.

Both GEMMs get the same random weights (the model's shapes, from its config.json) and the
same input, with weights packed ahead of time as the engine packs them. Each round times one
step with each, in alternation, so that each ratio compares runs seconds apart (this
machine's speed drifts); the table gives the median time of each and the median of the
per-round ratios. Writes <out-dir>/cpu_gemm.json and cpu_gemm.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (REPO_ROOT, REPO_ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import bench_engine as be  # noqa: E402  (machine facts, output folders, logging)

from python_backends.paths import default_model_dir  # noqa: E402

DEFAULT_ROWS = (1, 8, 32, 64, 2048)
DECODE_MAX_ROWS = 64


def layer_shapes(model_dir: Path) -> tuple[list[tuple[int, int]], int, int]:
    """([(out, in)] of one decoder layer's four products, layer count, vocabulary size)."""
    from python_backends.engine.llama import LlamaConfig

    try:
        cfg = LlamaConfig.from_model_dir(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise be.BenchError(f"cannot read the model's config in {model_dir}: {exc}") from exc
    hidden, head_dim = cfg.hidden_size, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head_dim
    shapes = [(qkv, hidden), (hidden, cfg.num_attention_heads * head_dim),
              (2 * cfg.intermediate_size, hidden), (hidden, cfg.intermediate_size)]
    return shapes, cfg.num_hidden_layers, cfg.vocab_size


def bench(model_dir: Path, rows_list: list[int], rounds: int, prefill_rounds: int,
          seed: int = 0) -> dict[str, Any]:
    import torch

    from python_backends.engine.llama import NATIVE_GEMM, ONEDNN_GEMM

    if NATIVE_GEMM is None or ONEDNN_GEMM is None:
        raise be.BenchError("needs both GEMMs: the C++ kernels (make setup) and PyTorch's "
                            "oneDNN")
    shapes, layers, vocab = layer_shapes(model_dir)
    hidden = shapes[0][1]
    torch.manual_seed(seed)
    be.log(f"packing {layers} layers of {shapes} and a {vocab} x {hidden} vocabulary "
           "projection for both GEMMs ...")
    weights = [(n, k) for _ in range(layers) for n, k in shapes]
    packed: dict[str, list[torch.Tensor]] = {"oneDNN": [], "cpu_kernels": []}
    for n, k in weights + [(vocab, hidden)]:
        w = torch.randn(n, k) * 0.05
        packed["oneDNN"].append(ONEDNN_GEMM.pack(w))
        packed["cpu_kernels"].append(NATIVE_GEMM.pack(w))
    gemms = {"oneDNN": ONEDNN_GEMM, "cpu_kernels": NATIVE_GEMM}
    from python_backends.engine import cpu_kernels

    results: dict[str, Any] = {"shapes": {"layer": shapes, "layers": layers, "vocab": vocab},
                               "gemm_tile": cpu_kernels.gemm_tile(), "runs": []}
    for rows in rows_list:
        decode = rows <= DECODE_MAX_ROWS
        products = weights + ([(vocab, hidden)] if decode else [])
        flops = sum(2 * rows * n * k for n, k in products)
        inputs = {k: torch.randn(rows, k) for k in {k for _, k in products}}

        def step(name: str, products=products, inputs=inputs) -> float:
            gemm, mats = gemms[name], packed[name]
            start = time.perf_counter()
            for (n, k), mat in zip(products, mats[:len(products)], strict=True):
                gemm.multiply(inputs[k], mat, n)
            return time.perf_counter() - start

        n_rounds = rounds if decode else prefill_rounds
        times: dict[str, list[float]] = {"oneDNN": [], "cpu_kernels": []}
        for name in times:
            step(name)  # warm-up: oneDNN builds its primitives on first use
        for i in range(n_rounds):
            order = ("oneDNN", "cpu_kernels") if i % 2 == 0 else ("cpu_kernels", "oneDNN")
            for name in order:
                times[name].append(step(name))
        ratios = [a / b for a, b in zip(times["oneDNN"], times["cpu_kernels"], strict=True)]
        run = {"rows": rows, "kind": "decode step" if decode else "prefill",
               "gflop": flops / 1e9, "rounds": n_rounds,
               "ms": {name: [round(t * 1e3, 2) for t in ts] for name, ts in times.items()},
               "median_ms": {name: statistics.median(ts) * 1e3 for name, ts in times.items()},
               "gflops": {name: flops / statistics.median(ts) / 1e9
                          for name, ts in times.items()},
               "speedup_paired_median": statistics.median(ratios)}
        results["runs"].append(run)
        be.log(f"{rows} rows ({run['kind']}): oneDNN {run['median_ms']['oneDNN']:.1f} ms, "
               f"cpu_kernels {run['median_ms']['cpu_kernels']:.1f} ms: "
               f"{run['speedup_paired_median']:.2f}x")
    return results


def render(report: dict[str, Any]) -> str:
    facts = report["machine"]
    shapes = report["results"]["shapes"]
    lines = [
        "# CPU GEMM benchmark",
        "",
        f"The engine's C++ GEMM (`cpu_kernels.linear`, the fused CPU path's) against oneDNN's "
        f"(the plain path's), float32, weights packed ahead of time for each: one step "
        f"multiplies each of {shapes['layers']} layers' four products "
        f"({', '.join(f'{n}x{k}' for n, k in shapes['layer'])}, out x in) with fresh weights "
        f"per layer, plus the {shapes['vocab']}-token vocabulary projection at up to "
        f"{DECODE_MAX_ROWS} rows (a decode step; a prefill projects only last tokens). "
        f"The C++ GEMM's register tile in this build (-march=native): "
        f"{report['results'].get('gemm_tile', '?')}. "
        f"Machine: {facts.get('nproc')} cores, {facts.get('cpu_model', '?')}, torch "
        f"{facts.get('torch', '?')}, {facts['date']}.",
        "",
        "| rows | step | GFLOP | oneDNN ms | cpu_kernels ms | oneDNN GFLOP/s | "
        "cpu_kernels GFLOP/s | speedup (paired median) | rounds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report["results"]["runs"]:
        lines.append(
            f"| {run['rows']} | {run['kind']} | {run['gflop']:.2f} | "
            f"{run['median_ms']['oneDNN']:.1f} | {run['median_ms']['cpu_kernels']:.1f} | "
            f"{run['gflops']['oneDNN']:.0f} | {run['gflops']['cpu_kernels']:.0f} | "
            f"{run['speedup_paired_median']:.2f}x | {run['rounds']} |")
    lines += [
        "",
        "Each round times one step with each GEMM, alternating which goes first; the speedup is "
        "the median over rounds of (oneDNN time / cpu_kernels time). Times are medians over "
        "rounds. Numbers and machine facts: `cpu_gemm.json`. Reproduce: "
        f"`{report['command']}`.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench_cpu_gemm.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=be.parse_int_list, default=list(DEFAULT_ROWS),
                        help="comma-separated row counts (default "
                             f"{','.join(map(str, DEFAULT_ROWS))})")
    parser.add_argument("--rounds", type=int, default=9,
                        help="rounds at up to 64 rows (default 9)")
    parser.add_argument("--prefill-rounds", type=int, default=3,
                        help="rounds at more rows (default 3)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="model whose shapes to use (default: the served model)")
    parser.add_argument("--out-dir", type=Path, default=be.DEFAULT_OUT_DIR,
                        help=f"where cpu_gemm.json/.md go (default "
                             f"{be.display_path(be.DEFAULT_OUT_DIR)})")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.prefill_rounds < 1:
        parser.error("--rounds and --prefill-rounds must be at least 1")
    if not args.rows or min(args.rows) < 1:
        parser.error("--rows must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    be.stop_on_sigterm()
    model_dir = args.model_dir or default_model_dir()
    try:
        results = bench(model_dir, args.rows, args.rounds, args.prefill_rounds)
    except KeyboardInterrupt:
        return be.interrupted()
    except be.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    argv_shown = sys.argv[1:] if argv is None else argv
    report = {"machine": be.machine_facts(),
              "command": " ".join(["scripts/bench_cpu_gemm.py", *argv_shown]),
              "results": results}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "cpu_gemm.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "cpu_gemm.md").write_text(render(report))
    be.log(f"wrote {be.display_path(args.out_dir / 'cpu_gemm.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
