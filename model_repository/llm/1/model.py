"""Triton model `llm`: text in, text out; tokenizes, calls `engine` over BLS, streams text.

Each request runs on its own thread (the BLS response iterator blocks). Triton 2.51 does not
pass a client's cancellation on to a BLS request, so a watcher thread polls every active
request and, on cancellation, sends the engine a `stop` for the inner request id.
"""

import itertools
import json
import logging
import os
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backends.contracts import InvalidRequestError, parse_text_request
from python_backends.llm_pipeline import TextStream, engine_inputs, prompt_token_ids
from python_backends.text import load_tokenizer
from python_backends.triton_glue import (
    input_arrays,
    model_parameters,
    request_parameters,
    start_parent_watchdog,
    stop_engine_request,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
ENGINE_OUTPUTS = ["output_ids", "sequence_length", "num_cached_tokens"]
log = logging.getLogger("llm")


class _Active:
    """One request in flight: its sender, and whether its client went away."""

    def __init__(self, request, sender, inner_id):
        self.request = request
        self.sender = sender
        self.inner_id = inner_id
        self.cancelled = threading.Event()
        self.done = threading.Event()
        # Triton frees the response factory once the final flag is sent; asking it
        # is_cancelled() after that crashes the server. `closed` is guarded by `lock`.
        self.lock = threading.Lock()
        self.closed = False

    def send(self, response=None, final=False):
        with self.lock:
            if self.closed:
                return
            if response is None:
                self.sender.send(flags=FINAL)
            else:
                self.sender.send(response, flags=FINAL if final else 0)
            self.closed = final or response is None

    def client_cancelled(self):
        with self.lock:
            if self.closed:
                return False
            try:
                return self.sender.is_cancelled()
            except Exception:
                return True


class TritonPythonModel:
    def initialize(self, args):
        start_parent_watchdog()
        params = model_parameters(args)
        self.engine_model = params.get("engine_model") or "engine"
        self.tokenizer = load_tokenizer(params.get("tokenizer_dir") or None)
        limit = params.get("max_tokens_limit") or ""
        if not limit:
            from python_backends.text import resolve_tokenizer_dir

            config = json.loads((resolve_tokenizer_dir(params.get("tokenizer_dir") or None)
                                 / "config.json").read_text())
            limit = config.get("max_position_embeddings", 2048)
        self.max_tokens_limit = int(limit)
        self._ids = itertools.count()
        self._active = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        threading.Thread(target=self._watch_cancellation, name="llm-cancel", daemon=True).start()
        # The stub's C++ side reads numpy arrays with numpy 1's layout: with numpy 2 every
        # BYTES input arrives corrupted. Say which numpy this process got.
        pb_utils.Logger.log_info(f"llm ready: numpy {np.__version__} ({np.__file__})")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                parsed = parse_text_request(
                    input_arrays(request), request_parameters(request), self.max_tokens_limit
                )
                prompt_ids = prompt_token_ids(self.tokenizer, parsed)
                inputs = engine_inputs(self.tokenizer, parsed, prompt_ids)
            except (InvalidRequestError, ValueError) as exc:
                self._send_error(sender, str(exc), pb_utils.TritonError.INVALID_ARG)
                continue
            inner_id = f"llm-{os.getpid()}-{next(self._ids)}"
            active = _Active(request, sender, inner_id)
            with self._lock:
                self._active[inner_id] = active
            threading.Thread(
                target=self._generate, args=(active, parsed, prompt_ids, inputs),
                name=f"llm-{inner_id}", daemon=True,
            ).start()
        return None

    def _generate(self, active, parsed, prompt_ids, inputs):
        try:
            self._run(active, parsed, prompt_ids, inputs)
        except Exception as exc:  # one request's failure must not reach the others
            log.exception("llm: request failed")
            self._send_error(active, f"internal error: {exc}")
        finally:
            active.done.set()
            with self._lock:
                self._active.pop(active.inner_id, None)

    def _run(self, active, parsed, prompt_ids, inputs):
        stream = TextStream(self.tokenizer, parsed.stop, parsed.skip_special_tokens)
        request = pb_utils.InferenceRequest(
            model_name=self.engine_model,
            inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
            requested_output_names=ENGINE_OUTPUTS,
            request_id=active.inner_id,
        )
        pieces = []  # non-streaming: the whole answer, sent once
        finished = False
        finish_reason = "length"
        num_cached = 0
        for response in request.exec(decoupled=True):
            if finished or active.cancelled.is_set():
                continue  # drain: the engine is stopping this request
            if response.has_error():
                error = response.error()
                self._send_error(active, error.message(), error.code())
                finished = True
                continue
            ids = pb_utils.get_output_tensor_by_name(response, "output_ids")
            if ids is None:
                continue  # the engine's empty final
            tokens = ids.as_numpy().reshape(-1).tolist()
            cached = pb_utils.get_output_tensor_by_name(response, "num_cached_tokens")
            is_last = cached is not None
            if is_last:
                num_cached = int(cached.as_numpy().reshape(-1)[0])
                if stream.num_tokens + len(tokens) < parsed.max_tokens:
                    finish_reason = "stop"
            delta = stream.feed(tokens)
            if stream.stopped:
                finish_reason, is_last = "stop", True
                self._stop_engine(active.inner_id)
            if is_last:
                delta += stream.finish()
            if parsed.stream:
                if delta or is_last:
                    self._send_text(active, parsed, delta, is_last, finish_reason,
                                    len(prompt_ids), stream.num_tokens, num_cached)
            else:
                pieces.append(delta)
                if is_last:
                    text = "".join(pieces)
                    if not parsed.exclude_input_in_output:
                        text = (parsed.text or "") + text
                    self._send_text(active, parsed, text, True, finish_reason,
                                    len(prompt_ids), stream.num_tokens, num_cached)
            finished = finished or is_last
        if not finished:
            # Cancelled, or an engine without a final marker: close the stream.
            active.send()

    def _send_text(self, active, parsed, text, final, reason, n_in, n_out, n_cached):
        tensors = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=object))]
        if final:
            if parsed.return_finish_reason:
                tensors.append(pb_utils.Tensor(
                    "finish_reason", np.array([reason.encode()], dtype=object)))
            if parsed.return_num_input_tokens:
                tensors.append(pb_utils.Tensor("num_input_tokens", np.array([n_in], np.uint32)))
            if parsed.return_num_output_tokens:
                tensors.append(pb_utils.Tensor("num_output_tokens", np.array([n_out], np.uint32)))
            tensors.append(pb_utils.Tensor("num_cached_tokens", np.array([n_cached], np.int32)))
        active.send(pb_utils.InferenceResponse(output_tensors=tensors), final)

    @staticmethod
    def _send_error(target, message, code=None):
        """`target`: an _Active, or a bare response sender before one exists."""
        code = pb_utils.TritonError.INTERNAL if code is None else code
        error = pb_utils.TritonError(message, code)
        response = pb_utils.InferenceResponse(error=error)
        if isinstance(target, _Active):
            target.send(response, final=True)
        else:
            target.send(response, flags=FINAL)

    def _stop_engine(self, inner_id):
        stop_engine_request(pb_utils, self.engine_model, inner_id)

    def _watch_cancellation(self):
        while not self._stopping.is_set():
            time.sleep(0.05)
            with self._lock:
                active = list(self._active.values())
            for item in active:
                if item.cancelled.is_set() or item.done.is_set():
                    continue
                if item.client_cancelled():
                    item.cancelled.set()
                    try:
                        self._stop_engine(item.inner_id)
                    except Exception:
                        log.exception("llm: could not stop %s", item.inner_id)

    def finalize(self):
        self._stopping.set()
