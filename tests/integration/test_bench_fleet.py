"""The fleet benchmark end to end on the CPU: `serve` starts the fleet (2 CPU instances and
its router), the benchmark runs both workloads through a router per policy and reports.

On a GPU host the same script places one instance per GPU (placement is unit-tested in
tests/test_gpus.py); CI has no GPU, so this is the path it can run.
"""

from __future__ import annotations

import json
import subprocess
import sys

from python_backends.paths import REPO_ROOT


def test_bench_fleet_quick_runs_every_workload_and_policy(tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "bench_fleet.py"), "--quick",
           "--policies", "round_robin,prefix", "--out-dir", str(out),
           "--artifact-dir", str(tmp_path / "artifacts"), "--run-timeout", "240"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((out / "fleet.json").read_text())
    settings = report["settings"]
    assert settings["instances"] == 2 and settings["gpu_count"] == 0
    assert "--instances" not in settings["serve_command"]  # serve's own default fleet
    sizes = settings["sizes"]
    for workload, requests in (("multi_tenant", sizes["requests"]),
                               ("multi_turn", sizes["sessions"] * sizes["turns"])):
        runs = report["runs"][workload]
        assert list(runs) == ["round_robin", "prefix"]
        for policy, run in runs.items():
            assert "error" not in run, run
            assert run["requests"] == requests
            assert run["output_tokens"] == requests * (
                sizes["output_tokens"] if workload == "multi_tenant" else sizes["answer_tokens"])
            assert run["ttft_ms"]["p50"] > 0 and run["ttft_ms"]["p99"] >= run["ttft_ms"]["p50"]
            assert 0 <= run["goodput_rps"] <= run["request_throughput"] + 1e-9
            # Requests share prompts (tenants' system prompts, sessions' history): under
            # `prefix` the engines' counters must show hits; the router decided every request.
            assert 0 <= run["engine"]["hit_rate"] <= 1
            if policy == "prefix":
                assert run["engine"]["hit_rate"] > 0
            assert sum(run["router"]["decisions_per_instance"].values()) == requests
    markdown = (out / "fleet.md").read_text()
    assert "## multi_tenant" in markdown and "## multi_turn" in markdown
    assert markdown.count("| prefix |") == 2
