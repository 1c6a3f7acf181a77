"""The fleet simulator: the real policies and block manager under a modelled clock."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from python_backends.fleet_sim import Fleet, Workload, compare, partitioned_fleet, simulate
from python_backends.paths import REPO_ROOT

SMALL = Workload(prefixes=6, prefix_tokens=64, suffix_tokens=16, output_tokens=4,
                 requests=72, concurrency=6)


def test_one_instance_hits_every_later_use_of_a_prefix():
    # Concurrency 1 and a pool that never evicts: each prefix misses once, then every use
    # finds its 4 full prefix blocks (the question's block is new each time).
    workload = Workload(prefixes=3, prefix_tokens=64, suffix_tokens=16, output_tokens=2,
                        requests=20, concurrency=1)
    run = simulate("round_robin", workload, Fleet(instances=1, blocks_per_instance=64))
    first_uses = len({tuple(p[:64]) for p in workload.prompts()})
    assert run["hit_rate"] == pytest.approx((20 - first_uses) * 64 / (20 * 80))
    assert run["prompt_tokens_computed"] == 20 * 80 - (20 - first_uses) * 64
    assert run["requests_per_instance"] == [20]


def test_cache_aware_policies_partition_prefixes_round_robin_does_not():
    # Each pool holds 3 whole requests: 2 of the 6 prefixes plus a running one.
    fleet = Fleet(instances=3, blocks_per_instance=3 * 5)
    runs = {r["policy"]: r for r in compare(["round_robin", "prefix", "hybrid"], SMALL, fleet)}
    rr, prefix = runs["round_robin"], runs["prefix"]
    assert rr["requests_per_instance"] == [24, 24, 24]
    assert prefix["hit_rate"] > 1.5 * rr["hit_rate"]
    assert prefix["hit_rate_x"] == pytest.approx(prefix["hit_rate"] / rr["hit_rate"])
    assert prefix["prompt_tokens_computed"] < rr["prompt_tokens_computed"]
    assert prefix["throughput_x"] > 1.0 and rr["throughput_x"] == 1.0
    assert sum(prefix["routing_decisions"].values()) == 72
    assert runs["hybrid"]["hit_rate"] == pytest.approx(prefix["hit_rate"])  # no session ids


def test_every_policy_finishes_every_request():
    fleet = Fleet(instances=4, blocks_per_instance=20)
    for run in compare(["round_robin", "least_connections", "prefix", "sticky", "hybrid",
                        "kv_aware"], SMALL, fleet):
        assert sum(run["requests_per_instance"]) == SMALL.requests, run["policy"]
        assert 0.0 <= run["hit_rate"] < 1.0 and run["makespan"] > 0


def test_a_request_larger_than_a_pool_is_an_error():
    with pytest.raises(ValueError, match="needs 5 KV blocks"):
        simulate("round_robin", SMALL, Fleet(instances=2, blocks_per_instance=4))


def test_partitioned_fleet_scales_prefixes_and_pool_with_the_fleet():
    workload, fleet = partitioned_fleet(8, prefixes_per_instance=4, uses=12, concurrency=16,
                                        prefix_tokens=1024, suffix_tokens=64, output_tokens=8)
    assert (workload.prefixes, workload.requests, fleet.instances) == (32, 384, 8)
    # 4 prefixes + 2 running + 1 spare whole requests of 69 blocks
    assert fleet.blocks_per_instance == 7 * 69


def _script():
    spec = importlib.util.spec_from_file_location("simulate_fleet",
                                                  REPO_ROOT / "scripts" / "simulate_fleet.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_script_writes_its_reports(tmp_path):
    script = _script()
    argv = ["--instances", "2,4", "--policies", "prefix", "--prefixes-per-instance", "2",
            "--uses", "4", "--prefix-tokens", "64", "--suffix-tokens", "16", "--seeds", "1",
            "--out-dir", str(tmp_path)]
    assert script.main(argv) == 0
    report = json.loads((tmp_path / "routing_simulation.json").read_text())
    assert report["settings"]["command"] == "scripts/simulate_fleet.py " + " ".join(argv[:-2])
    assert [s["instances"] for s in report["fleet_sizes"]] == [2, 4]
    assert set(report["fleet_sizes"][0]["runs"]) == {"round_robin", "prefix"}
    md = (tmp_path / "routing_simulation.md").read_text()
    assert "| 4 | prefix |" in md and "## Where the routing-quality targets are reached" in md
    with pytest.raises(SystemExit):
        script.parse_args(["--policies", "nope"])
    with pytest.raises(SystemExit):
        script.parse_args(["--instances", "0"])


def test_a_simulation_repeats_exactly_at_fleets_that_sample():
    # 12 instances: the policies weigh a random sample of 8, seeded with the workload's seed.
    workload = Workload(prefixes=12, prefix_tokens=32, suffix_tokens=16, output_tokens=2,
                        requests=60, concurrency=12)
    fleet = Fleet(instances=12, blocks_per_instance=12)
    for policy in ("least_connections", "prefix", "kv_aware"):
        assert simulate(policy, workload, fleet) == simulate(policy, workload, fleet), policy
