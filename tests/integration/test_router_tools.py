"""The real LLM and the real benchmark tools through the router, unchanged: tritonclient
streaming, perf_analyzer (unary and --streaming) and GenAI-Perf."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from python_backends.paths import REPO_ROOT, TOOLS_DIR, default_model_dir

from .client import Stream, llm_inputs
from .router_fleet import DATA_PLANES, EchoFleet, running_router

pytestmark = pytest.mark.server

PERF_ANALYZER = TOOLS_DIR / "bin" / "perf_analyzer"
CUDART = TOOLS_DIR / "cudart" / "nvidia" / "cuda_runtime" / "lib"

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from bench_engine import (  # noqa: E402
    find_genai_perf_export,
    genai_perf_command,
    parse_genai_perf_export,
    run_genai_perf,
)


@pytest.fixture(scope="module")
def llm_router(stack, tmp_path_factory) -> Iterator:
    with running_router([stack.url], tmp_path_factory.mktemp("llm-router")) as router:
        yield router


def _generate(url: str, prompt: str) -> str:
    with Stream(url) as stream:
        responses = stream.send("llm", llm_inputs(prompt, 12), "greedy-1").collect()
    assert not [r.error for r in responses if r.error]
    assert len(responses) > 2  # streamed token by token through the router
    return "".join(r.text for r in responses)


def test_llm_streams_the_same_text_through_the_router(stack, llm_router):
    prompt = "The three primary colors are"
    assert _generate(llm_router.grpc_url, prompt) == _generate(stack.url, prompt)


def test_genai_perf_runs_against_the_router(llm_router, tmp_path):
    run_dir = tmp_path / "genai-perf"
    cmd = genai_perf_command(llm_router.grpc_url, 2, 4, default_model_dir(), run_dir)
    cmd[cmd.index("--output-tokens-mean") + 1] = "8"
    run_genai_perf(cmd, run_dir / "genai-perf.log", timeout_s=300)
    report = parse_genai_perf_export(find_genai_perf_export(run_dir))
    assert report["measured_requests"] >= 4
    assert report["ttft_ms"]["avg"] > 0


@pytest.fixture(scope="module", params=DATA_PLANES)
def echo_router(tmp_path_factory, request) -> Iterator:
    fleet = EchoFleet(tmp_path_factory.mktemp("echo-tools")).start(["a", "b"])
    try:
        with running_router(fleet.urls(), fleet.log_dir, "--policy", "least_connections",
                            "--data-plane", request.param) as router:
            yield router
    finally:
        fleet.stop()


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
def test_perf_analyzer_runs_against_the_router(echo_router, tmp_path, streaming):
    data = {"data": [{"text_input": {"content": ["hello"], "shape": [1]}, "delay_ms": [0]}]}
    if streaming:
        data["data"][0]["count"] = [3]
    (tmp_path / "input.json").write_text(json.dumps(data))
    csv = tmp_path / "pa.csv"
    cmd = [str(PERF_ANALYZER), "-m", "echo_stream" if streaming else "echo",
           "-u", echo_router.grpc_url, "-i", "grpc", "--input-data", str(tmp_path / "input.json"),
           "--concurrency-range", "2", "--request-count", "200", "-f", str(csv)]
    if streaming:
        cmd.append("--streaming")
    env = dict(os.environ, LD_LIBRARY_PATH=str(CUDART))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    header, row = csv.read_text().splitlines()[:2]
    throughput = float(dict(zip(header.split(","), row.split(","), strict=False))
                       ["Inferences/Second"])
    assert throughput > 0
