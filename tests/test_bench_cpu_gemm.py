"""scripts/bench_cpu_gemm.py on a tiny model's shapes: both GEMMs run, every row count gets its
paired rounds, and the report says what was measured."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from engine_helpers import make_tiny_llama

from python_backends.engine.llama import NATIVE_GEMM, ONEDNN_GEMM
from python_backends.paths import REPO_ROOT

_spec = importlib.util.spec_from_file_location("bench_cpu_gemm",
                                               REPO_ROOT / "scripts" / "bench_cpu_gemm.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.skipif(NATIVE_GEMM is None or ONEDNN_GEMM is None,
                    reason="needs the C++ kernels and PyTorch's oneDNN")
def test_bench_writes_paired_results_for_decode_and_prefill_rows(tmp_path: Path):
    model = make_tiny_llama(tmp_path / "model")
    out = tmp_path / "out"
    assert bench.main(["--model-dir", model, "--rows", "3,70", "--rounds", "2",
                       "--prefill-rounds", "1", "--out-dir", str(out)]) == 0
    report = json.loads((out / "cpu_gemm.json").read_text())
    shapes = report["results"]["shapes"]
    # Tiny model: hidden 128, 8 heads of 16, 2 kv heads, intermediate 256, 2 layers.
    assert shapes["layer"] == [[192, 128], [128, 128], [512, 128], [128, 256]]
    assert shapes["layers"] == 2 and shapes["vocab"] == 512
    decode, prefill = report["results"]["runs"]
    assert (decode["rows"], decode["kind"], decode["rounds"]) == (3, "decode step", 2)
    assert (prefill["rows"], prefill["kind"], prefill["rounds"]) == (70, "prefill", 1)
    # The decode step has the vocabulary projection; the prefill does not.
    layer_flop = 2 * (192 * 128 + 128 * 128 + 512 * 128 + 128 * 256) * 2
    assert decode["gflop"] * 1e9 == pytest.approx(3 * (layer_flop + 2 * 512 * 128))
    assert prefill["gflop"] * 1e9 == pytest.approx(70 * layer_flop)
    for run in (decode, prefill):
        assert all(len(run["ms"][name]) == run["rounds"] for name in ("oneDNN", "cpu_kernels"))
        assert run["speedup_paired_median"] > 0
    table = (out / "cpu_gemm.md").read_text()
    assert "| 3 | decode step |" in table and "| 70 | prefill |" in table
    assert "scripts/bench_cpu_gemm.py --model-dir" in table
    from python_backends.engine import cpu_kernels

    assert report["results"]["gemm_tile"] == cpu_kernels.gemm_tile()
    assert f"register tile in this build (-march=native): {cpu_kernels.gemm_tile()}." in table


def test_a_missing_model_is_a_clear_error(tmp_path: Path, capsys):
    assert bench.main(["--model-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path)]) == 1
    assert "cannot read the model's config" in capsys.readouterr().err
    assert not (tmp_path / "cpu_gemm.json").exists()


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "0,4"])
