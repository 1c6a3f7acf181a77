"""scripts/bench_engine.py: GenAI-Perf export parsing and the report on fake numbers, no server."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from python_backends.paths import REPO_ROOT

_spec = importlib.util.spec_from_file_location("bench_engine", REPO_ROOT / "scripts" /
                                               "bench_engine.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _dist(p50: float, p99: float, unit: str = "ms") -> dict:
    """The shape GenAI-Perf 0.0.16 gives a per-request metric."""
    return {"unit": unit, "avg": p50, "p1": p50, "p5": p50, "p10": p50, "p25": p50, "p50": p50,
            "p75": p99, "p90": p99, "p95": p99, "p99": p99, "min": p50, "max": p99, "std": 1.0}


def fake_export(tok_s: float, ttft: tuple[float, float], itl: tuple[float, float]) -> dict:
    """A profile_export_genai_perf.json as GenAI-Perf 0.0.16 writes it (trimmed)."""
    return {
        "request_throughput": {"unit": "requests/sec", "avg": tok_s / 64},
        "request_latency": _dist(5000.0, 5200.0),
        "request_count": {"unit": "count", "avg": 8.0},
        "time_to_first_token": _dist(*ttft),
        "time_to_second_token": _dist(80.0, 90.0),
        "inter_token_latency": _dist(*itl),
        "output_token_throughput": {"unit": "tokens/sec", "avg": tok_s},
        "output_token_throughput_per_user": _dist(12.0, 13.0, "tokens/sec/user"),
        "output_sequence_length": _dist(64.0, 64.0, "tokens"),
        "input_sequence_length": _dist(64.0, 64.0, "tokens"),
        "input_config": {"model_names": ["llm"], "endpoint": {"backend": "vllm"}},
    }


def test_parse_genai_perf_export_from_nested_artifact_dir(tmp_path: Path):
    nested = tmp_path / "genai-perf-c4" / "llm-triton-vllm-concurrency4"
    nested.mkdir(parents=True)
    (nested / "profile_export_genai_perf.json").write_text(
        json.dumps(fake_export(40.0, (300.0, 450.0), (95.0, 110.0))))
    found = bench.find_genai_perf_export(tmp_path / "genai-perf-c4")
    parsed = bench.parse_genai_perf_export(found)
    assert parsed["output_token_throughput"] == 40.0
    assert parsed["request_throughput"] == pytest.approx(40.0 / 64)
    assert parsed["ttft_ms"]["p50"] == 300.0 and parsed["ttft_ms"]["p99"] == 450.0
    assert parsed["itl_ms"]["p50"] == 95.0 and parsed["itl_ms"]["p99"] == 110.0
    assert parsed["output_sequence_length_avg"] == 64.0


def test_parse_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(bench.BenchError, match="no profile_export_genai_perf.json"):
        bench.find_genai_perf_export(tmp_path)
    with pytest.raises(bench.BenchError, match="inter_token_latency"):
        bench.parse_genai_perf_export({"output_token_throughput": {"avg": 1.0},
                                       "time_to_first_token": _dist(1.0, 2.0)})


def test_generate_stats():
    stats = bench.generate_stats(4, elapsed_s=[6.4, 6.6, 7.0], ttft_s=[0.1, 0.2, 0.3])
    assert stats["output_token_throughput"] == pytest.approx(4 * 64 / 6.6)
    assert stats["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert stats["itl_ms"]["p50"] == pytest.approx((6.6 - 0.2) / 63 * 1e3)
    assert stats["itl_ms"]["p99"] == pytest.approx(((6.6 + 0.98 * 0.4) - 0.2) / 63 * 1e3)


def _report(engine: dict[int, dict], generate: dict[int, tuple[list, list]]) -> dict:
    serving = {"runs": [{"concurrency": c, **bench.parse_genai_perf_export(e)}
                        for c, e in engine.items()]}
    gen = {"runs": [bench.generate_stats(b, el, tt) for b, (el, tt) in generate.items()]}
    settings = {"quick": False, "concurrency": sorted(set(engine) | set(generate)),
                "input_tokens": 64, "output_tokens": 64, "generate_repeats": 1,
                "command": "scripts/bench_engine.py"}
    machine = {"nproc": 2, "cpu_model": "Test CPU", "torch": "2.x", "date": "2026-01-01"}
    return bench.build_report(serving, gen, machine, settings)


def test_report_targets_met():
    # generate: batch 1 -> 64 tok in 6.4 s (ITL (6.4-0.2)/63 = 98.4 ms); batch 32 -> 2048/20 s
    report = _report(
        engine={1: fake_export(12.0, (250.0, 300.0), (100.0, 120.0)),
                32: fake_export(250.0, (2000.0, 4000.0), (110.0, 150.0))},
        generate={1: ([6.4], [0.2]), 32: ([20.0], [3.0])},
    )
    throughput, latency = report["targets"]
    assert throughput["status"] == "met"
    assert throughput["ratio"] == pytest.approx(250.0 / (32 * 64 / 20.0))
    assert latency["status"] == "met"
    assert latency["ratio"] == pytest.approx(100.0 / ((6.4 - 0.2) / 63 * 1e3))
    md = bench.render_markdown(report)
    assert "| 1 | 12.0 | 10.0 | 1.20 | 250 / 300 | 200 / 200 | 100.0 / 120.0 |" in md
    assert "| 32 | 250.0 | 102.4 | 2.44 |" in md
    assert "**met** (measured 2.44x)" in md
    assert "not met" not in md
    # The JSON report is plain data.
    json.dumps(report)


def test_report_targets_not_met_and_missing_sides():
    report = _report(
        engine={1: fake_export(5.0, (500.0, 900.0), (200.0, 260.0)),
                4: fake_export(30.0, (600.0, 700.0), (130.0, 140.0)),
                32: fake_export(150.0, (2000.0, 4000.0), (200.0, 300.0))},
        generate={1: ([6.4], [0.2]), 8: ([9.0], [0.5]), 32: ([20.0], [3.0])},
    )
    throughput, latency = report["targets"]
    assert throughput["status"] == "not met" and throughput["ratio"] < 2.0
    assert latency["status"] == "not met" and latency["ratio"] > 1.2
    md = bench.render_markdown(report)
    assert "| 4 | 30.0 | - | - |" in md  # engine only
    assert "| 8 | - | 56.9 | - | - |" in md  # generate only
    assert md.count("**not met**") == 2


def test_report_without_target_sizes_and_with_failed_runs():
    serving = {"runs": [{"concurrency": 4, "error": "GenAI-Perf exited with 1; log: x\n  tail"}],
               "error": "a model stub process of tritonserver died during GenAI-Perf"}
    settings = {"quick": True, "concurrency": [4, 8], "input_tokens": 64, "output_tokens": 64,
                "generate_repeats": 1}
    report = bench.build_report(serving, None, {}, settings)
    assert [t["status"] for t in report["targets"]] == ["not measured", "not measured"]
    md = bench.render_markdown(report)
    assert "quick smoke run" in md
    assert "concurrency 4: FAILED: GenAI-Perf exited with 1; log: x" in md
    assert "concurrency 8: not run (a model stub process" in md


def test_genai_perf_command():
    cmd = bench.genai_perf_command("localhost:8001", 8, 16, Path("/m"), Path("/a"),
                                   extra_args=["-s", "25", "--", "--max-threads", "8"])
    joined = " ".join(cmd)
    for part in ("profile -m llm", "--endpoint-type kserve", "--backend vllm", "--streaming",
                 "-u localhost:8001", "--concurrency 8", "--request-count 16",
                 "--synthetic-input-tokens-mean 64", "--synthetic-input-tokens-stddev 0",
                 "--output-tokens-mean 64", "--output-tokens-mean-deterministic",
                 "--tokenizer /m", "--artifact-dir /a", "--random-seed 0"):
        assert part in joined
    assert "--warmup-request-count" not in cmd  # makes perf_analyzer 2.50 run for ever
    assert cmd[-5:] == ["-s", "25", "--", "--max-threads", "8"]


def test_paired_rounds_judge_the_throughput_target():
    """The table's ratio compares runs minutes apart; the paired rounds' median decides."""
    serving = {"runs": [{"concurrency": 32, **bench.parse_genai_perf_export(
        fake_export(150.0, (2000.0, 4000.0), (200.0, 300.0)))}]}
    serving["paired"] = {"concurrency": 32, "median_ratio": 2.1, "rounds": [
        {"engine_tok_s": 210.0, "generate_tok_s": 100.0, "ratio": 2.1},
        {"engine_tok_s": 190.0, "generate_tok_s": 95.0, "ratio": 2.0},
        {"engine_tok_s": 220.0, "generate_tok_s": 100.0, "ratio": 2.2},
    ]}
    gen = {"runs": [bench.generate_stats(32, [20.0], [3.0])]}
    settings = {"quick": False, "concurrency": [32], "input_tokens": 64, "output_tokens": 64,
                "generate_repeats": 1, "command": "scripts/bench_engine.py"}
    report = bench.build_report(serving, gen, {}, settings)
    throughput = report["targets"][0]
    assert throughput["status"] == "met" and throughput["ratio"] == 2.1
    assert "median of 3 paired rounds" in throughput["name"]
    md = bench.render_markdown(report)
    assert "| 2 | 190.0 | 95.0 | 2.00 |" in md and "| median | | | 2.10 |" in md
    assert "| 32 | 150.0 | 102.4 | 1.46 |" in md  # the unpaired row is still shown
    failed = dict(serving, paired={"concurrency": 32, "median_ratio": None,
                                   "rounds": [{"error": "server died\nlog"}]})
    report = bench.build_report(failed, gen, {}, settings)
    assert report["targets"][0]["status"] == "not met"  # falls back to the table's ratio
    assert "| 1 | FAILED: server died | - | - |" in bench.render_markdown(report)


def test_parse_args_defaults():
    full = bench.parse_args([])
    assert full.concurrency == [1, 4, 8, 32] and full.generate_repeats == 3
    assert [bench.default_request_count(c) for c in full.concurrency] == [8, 8, 16, 64]
    quick = bench.parse_args(["--quick"])
    assert quick.concurrency == [1, 4] and quick.generate_repeats == 1
    assert [bench.default_request_count(c, quick=True) for c in quick.concurrency] == [2, 4]
    assert full.paired_rounds == 3 and quick.paired_rounds == 0
    with pytest.raises(SystemExit):
        bench.parse_args(["--paired-rounds", "-1"])
    assert bench.parse_args(["--concurrency", "2,16"]).concurrency == [2, 16]
    with pytest.raises(SystemExit):
        bench.parse_args(["--concurrency", "0"])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_dead_children_sees_a_crashed_child():
    proc = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while proc.pid not in bench.dead_children(os.getpid()):
            assert time.monotonic() < deadline, "the exited child never showed as a zombie"
            time.sleep(0.02)
    finally:
        proc.wait()
    assert proc.pid not in bench.dead_children(os.getpid())


def test_report_shows_what_serving_keeps_of_the_engine_alone():
    report = _report(engine={32: fake_export(80.0, (2000.0, 4000.0), (300.0, 350.0))},
                     generate={32: ([20.0], [3.0])})
    alone = {"runs": [{"concurrency": 32, "requests": 64, "output_tokens": 4096,
                       "elapsed_s": 40.96, "output_token_throughput": 100.0}]}
    report = bench.build_report(report["serving"], report["generate"], report["machine"],
                                report["settings"], alone)
    assert report["comparison"][0]["served_share_of_engine_alone"] == pytest.approx(0.8)
    md = bench.render_markdown(report)
    assert "| 100.0 | 0.80 |" in md and "served / alone" in md
    json.dumps(report)


def test_engine_alone_runs_the_serving_workload_in_process(model_dir):
    """The real engine on the real weights: every request makes exactly 64 tokens, never more
    than N at once."""
    result = bench.bench_engine_alone(model_dir, [2], {2: 3})
    (run,) = result["runs"]
    assert (run["concurrency"], run["requests"], run["output_tokens"]) == (2, 3, 3 * 64)
    assert run["output_token_throughput"] > 0


def test_static_batch_stats_count_requested_tokens_and_the_waste():
    stats = bench.static_batch_stats(32, [([10, 30], 3.0), ([20, 20], 2.0)])
    # batch 1 runs 30 steps for both rows, batch 2 runs 20: 100 computed, 80 asked for.
    assert stats["requested_tokens"] == 80 and stats["computed_tokens"] == 100
    assert stats["wasted_share"] == pytest.approx(0.2)
    assert stats["output_token_throughput"] == pytest.approx(80 / 5.0)


def test_requested_output_lengths_read_genai_perf_inputs(tmp_path: Path):
    nested = tmp_path / "llm-triton-vllm-concurrency32"
    nested.mkdir()
    data = [{"text_input": ["x"], "sampling_parameters": [json.dumps(
        {"max_tokens": str(n), "min_tokens": str(n)})]} for n in (70, 12, 101)]
    (nested / "inputs.json").write_text(json.dumps({"data": data}))
    assert bench.requested_output_lengths(tmp_path, 2) == [70, 12]
    assert bench.requested_output_lengths(tmp_path, 5) == [70, 12, 101, 70, 12]
    with pytest.raises(bench.BenchError, match="inputs.json"):
        bench.requested_output_lengths(tmp_path / "nothing", 2)


def test_report_with_variable_output_lengths():
    report = _report(engine={32: fake_export(100.0, (2000.0, 4000.0), (250.0, 300.0))},
                     generate={32: ([20.0], [3.0])})
    lengths = [64, 128, 32, 32]
    report["serving"]["variable_runs"] = [
        {"concurrency": 32, "output_stddev": 64, "requested_lengths": lengths,
         **bench.parse_genai_perf_export(fake_export(120.0, (2100.0, 4100.0), (260.0, 310.0)))}]
    report["generate"]["variable_runs"] = [
        bench.static_batch_stats(64, [(lengths[:2], 4.0), (lengths[2:], 1.0)])]
    report = bench.build_report(report["serving"], report["generate"], report["machine"],
                                report["settings"])
    # generate: 256 asked for in 5 s = 51.2 tok/s; computed 2*128 + 2*32 = 320 (20% waste)
    *_, variable = report["targets"]
    assert variable["ratio"] == pytest.approx(120.0 / 51.2) and variable["status"] == "met"
    assert "stddev 64" in variable["name"]
    md = bench.render_markdown(report)
    assert "| 64 | 32 | 64.0 | 128 | 120.0 | 51.2 | 2.34 | 20% | 2100 / 4100 |" in md
    json.dumps(report)


def test_genai_perf_command_with_output_stddev_and_the_option():
    cmd = bench.genai_perf_command("h:1", 32, 64, Path("/m"), Path("/a"), output_stddev=32)
    assert "--output-tokens-stddev 32" in " ".join(cmd)
    assert "--output-tokens-stddev" not in bench.genai_perf_command("h:1", 1, 8, Path("/m"),
                                                                    Path("/a"))
    assert bench.parse_args([]).output_stddevs == [32, 64]
    assert bench.parse_args(["--quick"]).output_stddevs == []
    assert bench.parse_args(["--output-stddevs", "none"]).output_stddevs == []
    assert bench.parse_args(["--output-stddevs", "16"]).output_stddevs == [16]
    with pytest.raises(SystemExit):
        bench.parse_args(["--output-stddevs", "0"])
    assert bench.variable_length_concurrency([1, 4, 8, 32]) == 32
    assert bench.variable_length_concurrency([1, 4]) == 4
    assert bench.variable_request_count(32) == 192
    with pytest.raises(SystemExit):
        bench.parse_args(["--variable-request-count", "0"])


def test_each_serving_run_draws_its_own_prompts(tmp_path: Path, monkeypatch):
    """Runs with one seed would send the same prompts, and the prefix cache would serve the
    later runs from the earlier runs' blocks. GenAI-Perf itself is replaced here (its runs
    are the integration tests' and the benchmark's): the subject is the command."""
    seeds = []

    def record(cmd, log_path, timeout_s, server_process=None):
        seeds.append(cmd[cmd.index("--random-seed") + 1])
        raise bench.BenchError("not run")

    monkeypatch.setattr(bench, "run_genai_perf", record)
    args = bench.parse_args(["--out-dir", str(tmp_path)])
    results = {"runs": [], "variable_runs": [], "commands": []}
    for c in (1, 32, 32):
        run = bench._serving_run(args, "localhost:1", c, tmp_path / f"c{c}", results, None)
        assert run["error"] == "not run"
    assert len(set(seeds)) == 3 and len(results["commands"]) == 3


def test_a_late_failure_keeps_the_earlier_steps_numbers(tmp_path: Path, monkeypatch):
    """The engine-alone step comes last, after ~15 minutes of serving and generate() runs: if
    it raises, the report still holds those, says the run stopped early, and exits 1. The
    steps themselves are replaced here (they are the benchmark's and the integration tests');
    the subject is what main() keeps."""
    serving = {"runs": [{"concurrency": 1, **bench.parse_genai_perf_export(
        fake_export(12.0, (250.0, 300.0), (100.0, 120.0)))}]}
    monkeypatch.setattr(bench, "bench_serving", lambda args, artifact_dir: serving)
    monkeypatch.setattr(bench, "bench_generate", lambda *args: {
        "runs": [bench.generate_stats(1, [6.4], [0.2])]})

    def alone_fails(*args):
        raise ImportError("cannot import name 'gemm_tile'")

    monkeypatch.setattr(bench, "bench_engine_alone", alone_fails)
    out = tmp_path / "out"
    assert bench.main(["--concurrency", "1", "--out-dir", str(out),
                       "--artifact-dir", str(tmp_path / "art")]) == 1
    report = json.loads((out / "engine.json").read_text())
    assert report["error"] == "ImportError: cannot import name 'gemm_tile'"
    md = (out / "engine.md").read_text()
    assert "**This run stopped early** (ImportError: cannot import name 'gemm_tile')" in md
    assert "| 1 | 12.0 | 10.0 | 1.20 |" in md


def test_the_report_names_the_engines_kernels_from_its_ready_line(tmp_path: Path):
    log = ('I1126 llm] "llm ready, engine in process: cpu float32, fused kernels: cpu_kernels, '
           'GEMMs: cpu_kernels + AMX blocks (8x48 AVX-512 tile), 1456 KV blocks of 16 tokens; '
           'settings {\\"model_dir\\": \\"x\\"}"\n')
    kernels = bench.engine_kernels("other line\n" + log)
    assert kernels == ("cpu float32, fused kernels: cpu_kernels, GEMMs: cpu_kernels + AMX "
                       "blocks (8x48 AVX-512 tile), 1456 KV blocks of 16 tokens")
    assert bench.engine_kernels("no ready line\n") is None
    report = bench.build_report({"runs": [], "engine_kernels": kernels}, None,
                                bench.machine_facts(), {"input_tokens": 64, "output_tokens": 64})
    assert f"Engine: {kernels}." in bench.render_markdown(report)
