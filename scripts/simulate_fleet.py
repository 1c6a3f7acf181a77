#!/usr/bin/env python3
"""Routing policies at fleet sizes this machine cannot run: the fleet simulator.

`python_backends.fleet_sim` runs the router's real policies in front of engines whose
prefix caches are the engine's real `BlockManager`; only time is modelled (see that module).
This script runs every policy on the shared-prefix workload of the routing-quality benchmark
(long shared prefixes, many short questions each):

  1. the benchmark's own fleet (3 instances, its pool and workload), next to the hit rates
     measured on the real fleet, which says how far to trust the model;
  2. fleets of --instances sizes in the same regime: --prefixes-per-instance prefixes per
     instance, a pool per instance that holds its share plus its running requests, so one
     instance cannot hold every prefix but the fleet can when the prefixes are partitioned,
     and 2 requests in flight per instance.

Each number is the mean over --seeds workloads (different prefixes and arrival order).
Reports: <out-dir>/routing_simulation.json and routing_simulation.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from python_backends.fleet_sim import Fleet, Workload, compare, partitioned_fleet  # noqa: E402

POLICIES = ("round_robin", "least_connections", "prefix", "hybrid", "kv_aware")
DEFAULT_INSTANCES = (3, 4, 6, 8, 16)
HIT_RATE_TARGET, THROUGHPUT_TARGET = 4.0, 2.0
MEASURED_REPORT = REPO_ROOT / "docs" / "benchmarks" / "router_quality.json"


def log(msg: str) -> None:
    print(f"[simulate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mean_runs(policies: list[str], workload: Workload, fleet: Fleet, seeds: int
              ) -> dict[str, dict[str, Any]]:
    """Per policy: hit rate, its ratio to round_robin and the throughput ratio, averaged over
    `seeds` workloads, with the range of the hit-rate ratio."""
    per_seed = [compare(policies, replace(workload, seed=seed), fleet)
                for seed in range(seeds)]
    out = {}
    for i, policy in enumerate(policies):
        runs = [seed_runs[i] for seed_runs in per_seed]
        ratios = [r["hit_rate_x"] for r in runs if r["hit_rate_x"] is not None]
        out[policy] = {
            "hit_rate": statistics.fmean(r["hit_rate"] for r in runs),
            "hit_rate_x": statistics.fmean(ratios) if ratios else None,
            "hit_rate_x_range": [min(ratios), max(ratios)] if ratios else None,
            "throughput_x": statistics.fmean(r["throughput_x"] for r in runs),
            "prompt_tokens_computed": statistics.fmean(r["prompt_tokens_computed"]
                                                       for r in runs),
        }
    return out


def load_measured(path: Path = MEASURED_REPORT) -> dict[str, Any]:
    """The last real routing-quality report (empty if there is none)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def measured_hit_rates(report: dict[str, Any]) -> dict[str, float]:
    """Hit rates of a real routing-quality run, per policy."""
    runs = report.get("shared_prefix", {}).get("runs", {})
    return {p: r["engine"]["hit_rate"] for p, r in runs.items()
            if "error" not in r and (r.get("engine") or {}).get("hit_rate") is not None}


def benchmark_fleet(report: dict[str, Any]) -> tuple[Workload, Fleet]:
    """The routing-quality benchmark's own fleet and workload, from its report (the defaults
    when there is none)."""
    try:
        sizes = report["settings"]["sizes"]
        pool = report["engine"]["pool"]["blocks"]
    except KeyError:
        return Workload(), Fleet()
    workload = Workload(prefixes=sizes["prefix_prompts"], prefix_tokens=sizes["prefix_tokens"],
                        suffix_tokens=sizes["suffix_tokens"],
                        output_tokens=sizes["output_tokens"], requests=sizes["requests"],
                        concurrency=sizes["concurrency"])
    return workload, Fleet(instances=sizes["instances"], blocks_per_instance=pool,
                           block_size=sizes["block_size"])


def _fmt(value: float | None, digits: int = 2, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if pct else f"{value:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    bench = report["benchmark_fleet"]
    lines = [
        "# Routing policies at larger fleets (simulated)", "",
        "The router's real policies (`router.policies`) in front of engines whose prefix "
        "caches are the engine's real block manager (block hashes, reference counts, LRU "
        "eviction); only time is modelled: an engine prefills one request at a time "
        f"({s['prefill_cost']:g} per prompt token computed; a prefill stalls decodes, as on "
        f"the CPU) and runs decode steps for all its prefilled requests at once "
        f"({s['decode_step_cost']:g} a step). Hit rates and prompt tokens computed come from "
        "the same cache and routing code as a real fleet; throughput (x RR: round_robin's "
        "simulated makespan over this policy's) is only as good as that cost model. Mean of "
        f"{s['seeds']} workloads each. Reproduce: `{s['command']}` (seconds).", "",
        "## The routing-quality benchmark's fleet, simulated and measured", "",
        f"{bench['workload']['prefixes']} prefixes of {bench['workload']['prefix_tokens']} "
        f"tokens, {bench['workload']['suffix_tokens']}-token questions, "
        f"{bench['workload']['requests']} requests, concurrency "
        f"{bench['workload']['concurrency']}, {bench['fleet']['instances']} instances of "
        f"{bench['fleet']['blocks_per_instance']} KV blocks (`router_quality.md`).", "",
        "| policy | hit rate, simulated | hit rate, measured | x RR simulated | x RR measured "
        "| tok/s x RR, simulated |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    measured = bench["measured_hit_rates"]
    base = measured.get("round_robin")
    for policy, run in bench["runs"].items():
        m = measured.get(policy)
        lines.append(f"| {policy} | {_fmt(run['hit_rate'], pct=True)} "
                     f"| {_fmt(m, pct=True)} | {_fmt(run['hit_rate_x'])} "
                     f"| {_fmt(m / base if m is not None and base else None)} "
                     f"| {_fmt(run['throughput_x'])} |")
    lines += [
        "", "## Fleet size", "",
        f"{s['prefixes_per_instance']} prefixes of {s['prefix_tokens']} tokens per instance, "
        f"{s['uses']} uses of each, {s['suffix_tokens']}-token questions, {s['output_tokens']} "
        "output tokens, 2 requests in flight per instance; each instance's pool holds its "
        "share of the prefixes plus its running requests and one more. Above 8 instances the "
        "policies weigh a random sample of the fleet (`sample_size`), seeded with the "
        "workload's seed, so every run of this script gives the same numbers.", "",
        "| instances | policy | hit rate | x RR (range over workloads) | tok/s x RR "
        "| prompt tokens computed |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for size in report["fleet_sizes"]:
        for policy, run in size["runs"].items():
            lo, hi = run["hit_rate_x_range"] or (None, None)
            lines.append(f"| {size['instances']} | {policy} | {_fmt(run['hit_rate'], pct=True)} "
                         f"| {_fmt(run['hit_rate_x'])} ({_fmt(lo)}-{_fmt(hi)}) "
                         f"| {_fmt(run['throughput_x'])} "
                         f"| {run['prompt_tokens_computed']:.0f} |")
    lines += ["", "## Where the routing-quality targets are reached", ""]
    for line in report["summary"]:
        lines.append(f"- {line}")
    return "\n".join(lines) + "\n"


def summarize(fleet_sizes: list[dict[str, Any]]) -> list[str]:
    out = []
    for policy in ("prefix", "hybrid"):
        reached = [f"{size['instances']} ({size['runs'][policy]['hit_rate_x']:.2f}x hit rate, "
                   f"{size['runs'][policy]['throughput_x']:.2f}x tok/s)"
                   for size in fleet_sizes if policy in size["runs"]
                   and (size["runs"][policy]["hit_rate_x"] or 0) >= HIT_RATE_TARGET
                   and size["runs"][policy]["throughput_x"] >= THROUGHPUT_TARGET]
        out.append(f"{policy}: >= {HIT_RATE_TARGET:g}x round_robin's hit rate and >= "
                   f"{THROUGHPUT_TARGET:g}x its tok/s at "
                   + (", ".join(reached) + " instances" if reached else "no simulated size"))
    return out


def reproduce_command(argv: list[str]) -> str:
    """The command line without --out-dir (where this run wrote is nobody else's business)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out-dir":
            skip = True
        elif not arg.startswith("--out-dir="):
            kept.append(arg)
    return " ".join(["scripts/simulate_fleet.py", *kept])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/simulate_fleet.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", default=",".join(map(str, DEFAULT_INSTANCES)),
                        help="fleet sizes, comma-separated (default 3,4,6,8,16)")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help=f"policies (default {','.join(POLICIES)})")
    parser.add_argument("--prefixes-per-instance", type=int, default=4)
    parser.add_argument("--uses", type=int, default=12, help="requests per prefix")
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--suffix-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3, help="workloads averaged per number")
    parser.add_argument("--prefill-cost", type=float, default=Fleet.prefill_cost,
                        help="engine time per prompt token computed (default 1)")
    parser.add_argument("--decode-step-cost", type=float, default=Fleet.decode_step_cost,
                        help="engine time per decode step, in the same unit (default 15: a "
                             "decode step of a small batch costs about 15 prompt tokens on "
                             "the CPU)")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    try:
        args.instances = [int(v) for v in args.instances.split(",") if v]
    except ValueError:
        parser.error("--instances: comma-separated integers")
    args.policies = [p for p in args.policies.split(",") if p]
    from router.policies import POLICIES as KNOWN

    unknown = [p for p in args.policies if p not in KNOWN]
    if unknown:
        parser.error(f"unknown policies {unknown}; known: {', '.join(KNOWN)}")
    if "round_robin" not in args.policies:
        args.policies.insert(0, "round_robin")
    numbers = (args.prefixes_per_instance, args.uses, args.prefix_tokens, args.output_tokens,
               args.seeds, *args.instances)
    if not args.instances or min(numbers) < 1 or args.suffix_tokens < 0:
        parser.error("sizes must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    cost = {"prefill_cost": args.prefill_cost, "decode_step_cost": args.decode_step_cost}
    measured = load_measured()
    workload, fleet = benchmark_fleet(measured)
    fleet = replace(fleet, **cost)
    log(f"the benchmark's fleet: {fleet.instances} instances ...")
    bench = {"workload": workload.__dict__, "fleet": fleet.__dict__,
             "measured_hit_rates": measured_hit_rates(measured),
             "runs": mean_runs(args.policies, workload, fleet, args.seeds)}
    sizes = []
    for k in args.instances:
        log(f"{k} instances ...")
        w, f = partitioned_fleet(k, args.prefixes_per_instance, args.uses, concurrency=2 * k,
                                 prefix_tokens=args.prefix_tokens,
                                 suffix_tokens=args.suffix_tokens,
                                 output_tokens=args.output_tokens)
        f = replace(f, **cost)
        sizes.append({"instances": k, "workload": w.__dict__, "fleet": f.__dict__,
                      "runs": mean_runs(args.policies, w, f, args.seeds)})
    report = {
        "settings": {"command": reproduce_command(argv if argv is not None else sys.argv[1:]),
                     "seeds": args.seeds, "prefixes_per_instance": args.prefixes_per_instance,
                     "uses": args.uses, "prefix_tokens": args.prefix_tokens,
                     "suffix_tokens": args.suffix_tokens, "output_tokens": args.output_tokens,
                     "policies": args.policies, **cost},
        "benchmark_fleet": bench,
        "fleet_sizes": sizes,
        "summary": summarize(sizes),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "routing_simulation.json").write_text(json.dumps(report, indent=2) + "\n")
    md = render_markdown(report)
    (args.out_dir / "routing_simulation.md").write_text(md)
    log(f"wrote routing_simulation.json/.md in {args.out_dir} "
        f"({time.monotonic() - started:.0f} s)")
    print(md)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: no report written.", file=sys.stderr)
        sys.exit(130)
