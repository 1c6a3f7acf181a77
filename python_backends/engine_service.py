"""An engine served inside a Triton Python model: its config, loop thread and metrics.

`engine` (token ids in and out) and `llm` (text, with the engine in its own process) both
start one this way. `pb_utils` is passed in: it exists only inside Triton.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from python_backends.engine import EngineConfig, LLMEngine
from python_backends.engine.loop import EngineLoop
from python_backends.engine.model_runner import resolve_device
from python_backends.engine_metrics import EngineMetrics
from python_backends.paths import default_model_dir


@dataclass
class EngineService:
    config: EngineConfig
    engine: LLMEngine
    loop: EngineLoop
    metrics: EngineMetrics
    log_info: Callable[[str], None]

    @classmethod
    def start(cls, pb_utils: Any, parameters: dict[str, str],
              labels: dict[str, str]) -> EngineService:
        """Load the model, size the KV cache and start the loop thread."""
        parameters = dict(parameters)
        if not parameters.get("model_dir"):
            parameters["model_dir"] = str(default_model_dir())
        config = EngineConfig.from_parameters(parameters)
        # Built on the thread that runs it: see EngineLoop.build_and_start.
        sender = config.sends_from_a_thread(resolve_device(config).type)
        loop = EngineLoop.build_and_start(
            lambda: LLMEngine(config), output_thread=sender,
            cancel_poll_interval_s=config.cancellation_check_period_ms / 1000)
        metrics = EngineMetrics(pb_utils, labels,
                                min_interval_s=config.stats_check_period_ms / 1000)
        loop.on_step = lambda served: metrics.update(served, loop)
        return cls(config, loop.engine, loop, metrics, pb_utils.Logger.log_info)

    def summary(self) -> str:
        """One line for the model's ready log: where and how it computes, and its settings."""
        runner = self.engine.runner
        return (f"{runner.device} {str(runner.dtype).removeprefix('torch.')}, "
                f"{runner.kernels_description()}, {runner.num_blocks} KV blocks of "
                f"{runner.block_size} tokens; settings {self.config.to_json()}")

    def shutdown(self) -> None:
        """Stop the loop thread; log where its time went (a served step's cost beyond the
        engine's own)."""
        self.loop.shutdown()
        self.log_info(f"engine loop: {self.loop.times.summary()}")
