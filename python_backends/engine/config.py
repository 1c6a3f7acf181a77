"""EngineConfig: every engine setting in one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from python_backends.engine.errors import ConfigError

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings. Fill from Triton `config.pbtxt` parameters with `from_parameters`."""

    model_dir: str = ""
    dtype: str = "auto"  # auto: float32 on the CPU, bfloat16 on a GPU
    device: str = "auto"  # auto: cuda when available, else cpu
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_bytes: int = 1 << 30  # KV-cache budget on the CPU
    gpu_memory_utilization: float = 0.85  # share of free GPU memory for the KV cache
    # KV-cache bytes on the GPU; 0: gpu_memory_utilization x free memory. Set it when several
    # instances share one GPU: each measuring "free" memory at start-up would race.
    gpu_kv_cache_bytes: int = 0
    max_num_seqs: int = 64  # sequences decoded together (the running batch)
    max_num_batched_tokens: int = 0  # tokens per step; 0: max_model_len (2048 if chunked)
    max_model_len: int = 0  # prompt + output tokens; 0: the model's own limit
    num_threads: int = 0  # torch CPU threads; 0: every core
    enable_prefix_caching: bool = True  # reuse the KV blocks of shared prompt prefixes
    enable_chunked_prefill: bool = False  # split long prompts over steps (token budget)
    enforce_eager: bool = False  # GPU: no CUDA graphs for decode steps; CPU is always eager
    # CPU, float32: the C++ fused kernels (cpu_kernels) where `make setup` built them; off:
    # plain PyTorch ops (the reference path).
    native_cpu_kernels: bool = True
    # CPU with AMX, with the C++ kernels: multiply the weights that are exactly
    # block-quantized (a GGUF Q4_1/Q8_0 checkpoint dequantized to float32, as SmolLM2's is)
    # on AMX tiles, as accurately as float32 (engine/block_quant.py), weights in 2 bytes each.
    # Served at c=32 1.17x the float32 GEMM's tokens/s (median of 5 pairs). Without AMX, or
    # for other weights: no effect.
    blockq_gemm: bool = True
    # Served: hand each step's outputs to a sender thread, so that building and sending
    # responses (detokenizing, for `llm`) overlaps the next step instead of delaying it.
    # auto: on for the CPU (served c=32 on 2 cores: 1.20x the tokens/s, median of 3
    # alternating pairs; c=1 unchanged), off on a GPU, where the last measurement (no gain,
    # TTFT p50 ~90 -> ~240 ms) predates the loop's no longer waiting on a sending request
    # (docs/benchmarks/gpu-notes.md). Or true / false.
    output_thread: str = "auto"
    # Served: how often the loop asks Triton whether live requests were cancelled, and how
    # often it publishes its metrics while busy (at once when it falls idle). Each is a call
    # into the server per request or metric; the names and 100 ms defaults are the
    # TensorRT-LLM backend's.
    cancellation_check_period_ms: int = 100
    stats_check_period_ms: int = 100
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be auto or one of {_DTYPES}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        for name in ("block_size", "kv_cache_bytes", "max_num_seqs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_num_batched_tokens", "max_model_len", "num_threads",
                     "gpu_kv_cache_bytes", "cancellation_check_period_ms",
                     "stats_check_period_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.output_thread not in ("auto", "true", "false"):
            raise ConfigError(
                f"output_thread must be auto, true or false, got {self.output_thread!r}")
        if self.model_dir and not (Path(self.model_dir) / "config.json").exists():
            raise ConfigError(f"model_dir {self.model_dir!r} has no config.json")

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> EngineConfig:
        """Build from string parameters (Triton's `parameters { key, value { string_value } }`).

        Empty values mean "use the default" so a config.pbtxt can list every key.
        Environment variables `LLM_ENGINE_<KEY>` override, for tests and benchmarks.
        """
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        values: dict[str, Any] = {}
        merged = dict(parameters)
        for name in fields:
            env = os.environ.get(f"LLM_ENGINE_{name.upper()}")
            if env is not None:
                merged[name] = env
        for key, raw in merged.items():
            if key not in fields:
                continue
            raw = str(raw).strip()
            if raw == "":
                continue
            values[key] = _parse(key, raw, fields[key].type)
        return cls(**values)

    def sends_from_a_thread(self, device_type: str) -> bool:
        """Whether the served loop hands outputs to a sender thread, on this device type."""
        if self.output_thread == "auto":
            return device_type == "cpu"
        return self.output_thread == "true"

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k != "extra"})


def _parse(key: str, raw: str, annotation: Any) -> Any:
    kind = "auto or bool" if key == "output_thread" else str(annotation)
    try:
        if kind == "auto or bool":
            return "auto" if raw.lower() == "auto" else str(_parse_bool(raw)).lower()
        if kind == "bool":
            return _parse_bool(raw)
        if kind == "int":
            return int(float(raw)) if "e" in raw.lower() else int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"parameter {key!r}: cannot parse {raw!r} as {kind}") from None
    return raw


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
