"""An in-flight-batching LLM engine: one module per concept, as in nano-vllm.

config (EngineConfig) -> engine (LLMEngine: add/abort/step) -> scheduler (what runs next, a
plain value) -> block_manager (KV blocks per sequence) -> model_runner (tensors, the forward
pass, sampling) -> llama (the model). `loop` runs the engine on a thread for Triton.
"""

from python_backends.engine.config import EngineConfig
from python_backends.engine.engine import LLMEngine, RequestOutput
from python_backends.engine.errors import EngineError, InvalidRequestError
from python_backends.engine.sampling import SamplingParams

__all__ = [
    "EngineConfig",
    "EngineError",
    "InvalidRequestError",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
]
