"""Place engine instances on the host's GPUs: one per GPU, or several sharing one.

`serve` (and the fleet benchmark, through it) asks `visible_gpus()` what the host has and
`plan_placements()` where each tritonserver goes. Instances that share a GPU each get a fixed
KV-cache budget (`LLM_ENGINE_GPU_KV_CACHE_BYTES`): an engine sizing its cache from the memory
that is free when it starts would race the others starting beside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
DEFAULT_MEMORY_FRACTION = 0.85  # of each GPU's memory, for every instance on it together
DEFAULT_RESERVE_BYTES = 2 * GIB  # per instance: CUDA context, activations, CUDA graphs


@dataclass(frozen=True)
class Gpu:
    index: int  # the CUDA ordinal (PCI bus order, as nvidia-smi numbers them)
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class Placement:
    """Where instance `instance` runs: a GPU with a KV-cache budget, or the CPU."""

    instance: int
    gpu: Gpu | None = None
    kv_cache_bytes: int = 0  # for each engine of the instance
    sharing: int = 1  # instances on this GPU, this one included
    engines: int = 1  # models of the instance that hold an engine (weights and KV cache)

    def env(self) -> dict[str, str]:
        """Environment for this instance's tritonserver (the engine reads LLM_ENGINE_*)."""
        if self.gpu is None:
            return {}
        return {
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # CUDA ordinals = nvidia-smi indices
            "CUDA_VISIBLE_DEVICES": str(self.gpu.index),
            "LLM_ENGINE_DEVICE": "cuda",
            "LLM_ENGINE_GPU_KV_CACHE_BYTES": str(self.kv_cache_bytes),
        }

    def describe(self) -> str:
        if self.gpu is None:
            return "CPU"
        shared = f", shared by {self.sharing}" if self.sharing > 1 else ""
        each = f" for each of {self.engines} engines" if self.engines > 1 else ""
        return (f"GPU {self.gpu.index} ({self.gpu.name}{shared}), KV cache "
                f"{self.kv_cache_bytes / GIB:.1f} GiB{each}")


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Rows of `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits`
    (memory in MiB)."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        try:
            memory = int(float(parts[2])) << 20
        except ValueError:
            continue
        gpus.append(Gpu(int(parts[0]), parts[1], memory))
    return gpus


def visible_gpus() -> list[Gpu]:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES respected); [] without any."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = parse_nvidia_smi(out)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [v.strip() for v in visible.split(",") if v.strip()]
        if all(v.isdigit() for v in wanted):
            by_index = {g.index: g for g in gpus}
            gpus = [by_index[int(v)] for v in wanted if int(v) in by_index]
    return gpus


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the model's weights on disk (safetensors): what each instance loads."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def plan_placements(gpus: list[Gpu], instances: int, model_bytes: int,
                    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
                    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
                    engines: int = 1) -> list[Placement]:
    """Instances over GPUs round-robin; each GPU's `memory_fraction` is split evenly between
    the instances on it, and each instance's share less its weights and `reserve_bytes` is its
    KV cache, split evenly between its `engines` (each engine holds its own weights and its
    own reserve). No GPUs: every instance on the CPU."""
    if instances < 1:
        raise ValueError("at least one instance is needed")
    if engines < 1:
        raise ValueError("an instance runs at least one engine")
    if not gpus:
        return [Placement(i, engines=engines) for i in range(instances)]
    if not 0.0 < memory_fraction <= 1.0:
        raise ValueError(f"the GPU memory fraction must be in (0, 1], got {memory_fraction}")
    counts = [0] * len(gpus)
    for i in range(instances):
        counts[i % len(gpus)] += 1
    placements = []
    for i in range(instances):
        gpu = gpus[i % len(gpus)]
        sharing = counts[i % len(gpus)]
        share = int(gpu.memory_bytes * memory_fraction) // sharing
        kv = share // engines - model_bytes - reserve_bytes
        if kv <= 0:
            each = f"each of its {engines} engines" if engines > 1 else "each"
            raise ValueError(
                f"{sharing} instance(s) on GPU {gpu.index} ({gpu.memory_bytes / GIB:.0f} GiB, "
                f"{memory_fraction:.0%} usable) leave no room for a KV cache: {each} needs "
                f"{model_bytes / GIB:.1f} GiB of weights + {reserve_bytes / GIB:.1f} GiB "
                f"reserve; run fewer instances per GPU"
                + (" or load one engine model (--models llm or --models engine)"
                   if engines > 1 else ""))
        placements.append(Placement(i, gpu, kv, sharing, engines))
    return placements
