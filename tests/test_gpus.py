"""Instance placement on GPUs (python_backends/tools/gpus.py) and serve's use of it.

This machine has no GPU: the GPU list comes from a recorded `nvidia-smi` answer, which is the
one input these functions take from the host; the placement arithmetic is all real.
"""

from __future__ import annotations

import pytest

from python_backends.tools import gpus as gpus_module
from python_backends.tools import serve
from python_backends.tools.gpus import GIB, Gpu, parse_nvidia_smi, plan_placements

# `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits` on a
# 2-GPU H100 host (memory in MiB).
SMI_TWO_H100 = "0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA H100 80GB HBM3, 81559\n"
H100 = Gpu(0, "NVIDIA H100 80GB HBM3", 81559 << 20)


def test_parse_nvidia_smi_reads_index_name_and_memory():
    gpus = parse_nvidia_smi(SMI_TWO_H100 + "garbage line\n\n")
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert gpus[0].memory_bytes == 81559 * 1024 * 1024


def test_no_gpus_places_every_instance_on_the_cpu():
    placements = plan_placements([], 3, model_bytes=10 * GIB)
    assert [p.gpu for p in placements] == [None, None, None]
    assert all(p.env() == {} for p in placements)
    assert placements[0].describe() == "CPU"


def test_one_instance_per_gpu_gets_the_gpu_share_less_weights_and_reserve():
    second = Gpu(1, H100.name, H100.memory_bytes)
    placements = plan_placements([H100, second], 2, model_bytes=3 * GIB,
                                 memory_fraction=0.5, reserve_bytes=GIB)
    assert [p.gpu.index for p in placements] == [0, 1]
    expected = int(H100.memory_bytes * 0.5) - 3 * GIB - GIB
    assert [p.kv_cache_bytes for p in placements] == [expected, expected]
    env = placements[1].env()
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["LLM_ENGINE_DEVICE"] == "cuda"
    assert env["LLM_ENGINE_GPU_KV_CACHE_BYTES"] == str(expected)


def test_instances_sharing_a_gpu_split_its_memory_evenly():
    placements = plan_placements([H100], 4, model_bytes=2 * GIB, memory_fraction=0.8,
                                 reserve_bytes=GIB)
    assert {p.gpu.index for p in placements} == {0}
    assert {p.sharing for p in placements} == {4}
    share = int(H100.memory_bytes * 0.8) // 4
    assert {p.kv_cache_bytes for p in placements} == {share - 3 * GIB}
    # Together they stay inside the fraction of the GPU they were given.
    total = sum(p.kv_cache_bytes + 2 * GIB + GIB for p in placements)
    assert total <= H100.memory_bytes * 0.8
    assert "shared by 4" in placements[0].describe()


def test_uneven_split_over_gpus_round_robin():
    second = Gpu(1, H100.name, H100.memory_bytes)
    placements = plan_placements([H100, second], 3, model_bytes=GIB)
    assert [p.gpu.index for p in placements] == [0, 1, 0]
    assert [p.sharing for p in placements] == [2, 1, 2]
    assert placements[1].kv_cache_bytes > placements[0].kv_cache_bytes


def test_too_many_instances_for_the_memory_is_a_clear_error():
    with pytest.raises(ValueError, match="leave no room for a KV cache"):
        plan_placements([H100], 40, model_bytes=2 * GIB)
    with pytest.raises(ValueError, match="memory fraction"):
        plan_placements([H100], 1, model_bytes=GIB, memory_fraction=1.5)
    with pytest.raises(ValueError, match="at least one"):
        plan_placements([H100], 0, model_bytes=GIB)


def test_visible_gpus_without_nvidia_smi_is_empty(monkeypatch):
    monkeypatch.setattr(gpus_module.shutil, "which", lambda name: None)
    assert gpus_module.visible_gpus() == []


def test_visible_gpus_respects_cuda_visible_devices(monkeypatch):
    class Done:
        stdout = SMI_TWO_H100

    monkeypatch.setattr(gpus_module.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(gpus_module.subprocess, "run", lambda *a, **k: Done())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [g.index for g in gpus_module.visible_gpus()] == [1]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [g.index for g in gpus_module.visible_gpus()] == [0, 1]


def _plan(monkeypatch, gpus: list[Gpu], *argv: str):
    monkeypatch.setattr(serve, "visible_gpus", lambda: gpus)
    return serve.plan(serve.parse_args(list(argv)))


def test_serve_defaults_two_cpu_instances_without_gpus(monkeypatch):
    placements = _plan(monkeypatch, [])
    assert len(placements) == 2 and all(p.gpu is None for p in placements)
    assert len(_plan(monkeypatch, [], "--no-router")) == 1


def test_serve_runs_one_instance_per_gpu_by_default(monkeypatch):
    second = Gpu(1, H100.name, H100.memory_bytes)
    placements = _plan(monkeypatch, [H100, second])
    assert [p.gpu.index for p in placements] == [0, 1]
    placements = _plan(monkeypatch, [H100, second], "--gpus", "1", "--instances", "3")
    assert [p.gpu.index for p in placements] == [0, 0, 0]
    assert all(p.gpu is None for p in _plan(monkeypatch, [H100, second], "--gpus", "0"))


def test_serve_kv_cache_override_and_its_bounds(monkeypatch):
    placements = _plan(monkeypatch, [H100], "--instances", "2", "--gpu-kv-cache-gb", "1.5")
    assert {p.kv_cache_bytes for p in placements} == {int(1.5 * GIB)}
    with pytest.raises(ValueError, match="gpu-kv-cache-gb"):
        _plan(monkeypatch, [H100], "--gpu-kv-cache-gb", "500")
    with pytest.raises(ValueError, match="only 1 GPU"):
        _plan(monkeypatch, [H100], "--gpus", "2")
    with pytest.raises(ValueError, match="--gpus takes"):
        _plan(monkeypatch, [H100], "--gpus", "many")


def test_ports_handed_out_together_are_distinct(monkeypatch):
    from python_backends.tools import triton_server

    # Where the ephemeral range leaves no room below it, the kernel chooses, and it may offer
    # a just-released port again: the helpers must not hand it out twice.
    monkeypatch.setattr(triton_server, "ephemeral_port_range", lambda: (1024, 60999))
    offers = iter([5000, 5000, 5000, 5001, 5002])
    monkeypatch.setattr(triton_server.socket, "socket", lambda: _FakeSocket(next(offers)))
    assert triton_server.free_port(avoid={5000}) == 5001
    assert triton_server.distinct_ports(7000, 7000, 7001) == (7000, 5002, 7001)


def test_free_ports_are_below_the_ephemeral_range_and_bindable(monkeypatch):
    """Outgoing connections take ports from the ephemeral range; a port chosen below it
    cannot be taken by one before the server binds it."""
    import socket

    from python_backends.tools import triton_server

    low, _ = triton_server.ephemeral_port_range()
    if low - 10000 < 1000:
        pytest.skip(f"the ephemeral range starts at {low}: no room below it")
    taken: set[int] = set()
    for _ in range(20):
        port = triton_server.free_port(avoid=taken)
        assert 10000 <= port < low and port not in taken
        taken.add(port)
        with socket.socket() as sock:
            sock.bind(("0.0.0.0", port))
    # A port something listens on, offered first, is passed over.
    busy = triton_server.free_port()
    with socket.socket() as held:
        held.bind(("0.0.0.0", busy))
        held.listen()
        offers = iter([busy, busy + 1 if busy + 1 < low else busy - 1])
        monkeypatch.setattr(triton_server._ports, "choice", lambda ports: next(offers))
        assert triton_server.free_port() != busy


class _FakeSocket:
    """Stands in for the OS's ephemeral-port choice, which tests cannot steer."""

    def __init__(self, port: int) -> None:
        self.port = port

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def bind(self, address) -> None:
        pass

    def getsockname(self):
        return ("127.0.0.1", self.port)


def test_two_engines_in_an_instance_split_its_share():
    one = plan_placements([H100], 2, model_bytes=2 * GIB, reserve_bytes=GIB)
    two = plan_placements([H100], 2, model_bytes=2 * GIB, reserve_bytes=GIB, engines=2)
    share = int(H100.memory_bytes * 0.85) // 2
    assert one[0].kv_cache_bytes == share - 3 * GIB
    assert two[0].kv_cache_bytes == share // 2 - 3 * GIB and two[0].engines == 2
    assert "each of 2 engines" in two[0].describe()
    with pytest.raises(ValueError, match="--models llm"):
        plan_placements([H100], 8, model_bytes=4 * GIB, engines=2)


def test_serve_counts_the_engines_of_the_models_it_loads(monkeypatch):
    """`engine` and `llm` (its engine in process by default) each hold one; the others
    none. Read from the project's own config files."""
    from python_backends.paths import MODEL_REPOSITORY

    assert serve.engines_per_instance(MODEL_REPOSITORY, list(serve.DEFAULT_MODELS)) == 2
    assert serve.engines_per_instance(MODEL_REPOSITORY, ["llm"]) == 1
    assert serve.engines_per_instance(MODEL_REPOSITORY, ["engine", "ensemble"]) == 1
    whole = _plan(monkeypatch, [H100])
    alone = _plan(monkeypatch, [H100], "--models", "llm")
    assert whole[0].engines == 2 and alone[0].engines == 1
    assert whole[0].kv_cache_bytes < alone[0].kv_cache_bytes / 2


def test_serve_says_when_gpu_flags_have_no_effect(monkeypatch, capsys):
    _plan(monkeypatch, [], "--gpu-kv-cache-gb", "2", "--gpu-reserve-gb", "1")
    err = capsys.readouterr().err
    assert "no GPU in use" in err and "--gpu-kv-cache-gb, --gpu-reserve-gb" in err
    _plan(monkeypatch, [])
    assert capsys.readouterr().err == ""
    _plan(monkeypatch, [H100], "--gpu-kv-cache-gb", "2")
    assert capsys.readouterr().err == ""


def test_serve_passes_policy_options_and_config_to_the_router():
    args = serve.parse_args(["--policy", "prefix", "--policy-option", "load_weight=0.25",
                             "--policy-option", "balance_abs_threshold=8",
                             "--router-config", "router.toml"])
    assert serve.router_args(args) == [
        "--policy", "prefix", "--policy-option", "load_weight=0.25",
        "--policy-option", "balance_abs_threshold=8", "--config", "router.toml"]
    assert serve.router_args(serve.parse_args([])) == ["--policy", "hybrid"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--policy", "prefix", "--policy-option", "bogus=1"], "unknown option 'bogus'"),
    (["--policy", "nope"], "unknown routing policy 'nope'"),
    (["--policy-option", "load_weight=-1"], "option 'load_weight' must be >= 0.0"),
    (["--policy-option", "load_weight"], "expects NAME=VALUE"),
])
def test_serve_refuses_bad_router_settings_before_starting_anything(argv, message, capsys):
    assert message in serve.router_settings_problem(serve.parse_args(argv))
    assert serve.main(argv) == 2
    assert message in capsys.readouterr().err


def test_serve_accepts_good_router_settings():
    args = serve.parse_args(["--policy", "kv_aware", "--policy-option", "overlap_weight=4"])
    assert serve.router_settings_problem(args) is None
