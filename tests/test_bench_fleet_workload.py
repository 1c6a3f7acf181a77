"""bench_fleet's saved workloads: what a run may change, and clear errors for bad files."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import pytest

from python_backends.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import bench_fleet  # noqa: E402


@pytest.fixture
def saved(tmp_path):
    sizes = bench_fleet.Sizes(tenants=2, requests=4, sessions=3, turns=3)
    workload = {
        "sizes": asdict(sizes),
        "tenants": ["t0", "t1"],
        "requests": [{"tenant": i % 2, "user": f"u{i}"} for i in range(4)],
        "sessions": [{"system": f"s{i}", "users": ["a", "b", "c"]} for i in range(3)],
    }
    path = tmp_path / "workload.json"
    path.write_text(json.dumps(workload))
    return path


def test_a_saved_workload_is_cut_to_the_counts_asked_for(saved):
    prompts, sizes = bench_fleet.load_workload(
        saved, {"requests": 2, "sessions": 1, "turns": 2, "concurrency": 7})
    assert (sizes.requests, sizes.sessions, sizes.turns, sizes.concurrency) == (2, 1, 2, 7)
    assert len(prompts["requests"]) == 2
    assert prompts["sessions"] == [{"system": "s0", "users": ["a", "b"]}]


def test_a_saved_workload_refuses_what_its_prompts_fix(saved):
    with pytest.raises(ValueError, match="fixes tenants"):
        bench_fleet.load_workload(saved, {"tenants": 5})
    with pytest.raises(ValueError, match="holds 4"):
        bench_fleet.load_workload(saved, {"requests": 5})


@pytest.mark.parametrize("content", [None, "not json", '{"sizes": {"nope": 1}}', "[]"])
def test_bad_workload_files_are_clear_errors(tmp_path, capsys, content):
    path = tmp_path / "w.json"
    if content is not None:
        path.write_text(content)
    assert bench_fleet.main(["--workload-file", str(path)]) == 2
    assert "cannot use --workload-file" in capsys.readouterr().err
