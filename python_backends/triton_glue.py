"""Small helpers shared by the Triton Python models, and their config files."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def model_parameters(args: dict) -> dict[str, str]:
    """`parameters { key: ..., value { string_value: ... } }` of config.pbtxt as a dict."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


# `parameters { key: "k" value: { string_value: "v" } }`, the form this project's configs
# use. Read with a pattern, not protobuf: a Python stub may not see tritonclient's protos.
_PARAMETER = re.compile(
    r'parameters\s*:?\s*\{\s*key\s*:\s*"((?:[^"\\]|\\.)*)"\s*'
    r'value\s*:?\s*\{\s*string_value\s*:\s*"((?:[^"\\]|\\.)*)"\s*\}\s*\}')
_COMMENT = re.compile(r"^\s*#.*$", re.MULTILINE)


def config_parameters(config_path: str | Path) -> dict[str, str]:
    """String parameters of a config.pbtxt file; {} when there is no such file."""
    path = Path(config_path)
    if not path.is_file():
        return {}
    text = _COMMENT.sub("", path.read_text())
    return {key: value for key, value in _PARAMETER.findall(text)}


def engine_config_path(model_dir: str | Path, parameters: dict[str, str]) -> Path:
    """The config.pbtxt of `llm`'s `engine_config` model, in the same repository as `llm`
    (`model_dir` is llm's own folder, Triton's args["model_repository"])."""
    return Path(model_dir).parent / (parameters.get("engine_config") or "engine") / "config.pbtxt"


def in_process_engine_parameters(model_dir: str | Path,
                                 parameters: dict[str, str]) -> dict[str, str]:
    """The settings of `llm`'s in-process engine: those of its `engine_config` model,
    overridden by `llm`'s own non-empty parameters."""
    merged = config_parameters(engine_config_path(model_dir, parameters))
    merged.update({key: value for key, value in parameters.items() if value})
    return merged


def hosts_engine(parameters: dict[str, str]) -> bool:
    """Whether a model with these config parameters runs an engine in its own process:
    `engine` (it has the engine's settings) or `llm` without an `engine_model` to call.
    `llm` is told apart by `engine_config`, which only it has (`postprocessing` has an
    `engine_model` too: where its `stop` requests go)."""
    if "engine_config" in parameters:
        return not parameters.get("engine_model")
    return "kv_cache_bytes" in parameters


def input_arrays(request: Any) -> dict[str, np.ndarray]:
    return {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}


def request_parameters(request: Any) -> dict[str, Any]:
    try:
        params = json.loads(request.parameters() or "{}")
    except (TypeError, ValueError):
        return {}
    return params if isinstance(params, dict) else {}


def start_parent_watchdog(interval_s: float = 1.0) -> None:
    """Exit this stub process when the Triton server that started it is gone.

    If the server exits while streams are open (past --exit-timeout-secs) it never calls
    finalize(), and the stub's threads would block on the dead server for ever.
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                logging.getLogger(__name__).warning("Triton server is gone; stub exiting")
                os._exit(0)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def stop_engine_request(pb_utils: Any, engine_model: str, request_id: str) -> None:
    """Send the engine a TensorRT-LLM `stop` for `request_id` and wait for its answer.

    Triton 2.51 passes no cancellation to BLS requests or running ensemble steps, so the
    models that notice a cancelled client (`llm`, `postprocessing`) free the engine's slot
    this way. `pb_utils` is passed in: it exists only inside a Triton stub.
    """
    stop = pb_utils.InferenceRequest(
        model_name=engine_model,
        inputs=[pb_utils.Tensor(n, v) for n, v in engine_stop_inputs().items()],
        requested_output_names=["output_ids"],
        request_id=request_id,
    )
    for _ in stop.exec(decoupled=True):
        pass


def engine_stop_inputs() -> dict[str, np.ndarray]:
    """Inputs of a TensorRT-LLM `stop` request: it ends the in-flight request with its id.

    The contract's required inputs are filled with placeholders; only `stop` matters.
    """
    return {
        "input_ids": np.zeros((1, 1), np.int32),
        "input_lengths": np.ones((1, 1), np.int32),
        "request_output_len": np.ones((1, 1), np.int32),
        "stop": np.ones((1, 1), bool),
    }
