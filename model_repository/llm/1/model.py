"""Triton model `llm`: text in, text out, streaming or not.

By default the engine runs in this model's own process (as Triton's vLLM backend does):
each token goes from the engine loop straight to the client's response sender, with no BLS
hop, and the engine is configured by the `engine` model's config.pbtxt (`engine_config`).
With `engine_model` set, `llm` instead calls that model over BLS, e.g. a TensorRT-LLM engine
swapped in for ours. Then each request runs on its own thread (the BLS response iterator
blocks), and, since Triton 2.51 does not pass a client's cancellation on to a BLS request, a
watcher thread polls every active request and, on cancellation, sends the engine a `stop`
for the inner request id.
"""

import itertools
import json
import logging
import os
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backends.contracts import InvalidRequestError, parse_engine_request, parse_text_request
from python_backends.engine.sequence import FinishReason
from python_backends.llm_pipeline import TextGeneration, engine_inputs, prompt_token_ids
from python_backends.text import load_tokenizer, resolve_tokenizer_dir
from python_backends.triton_glue import (
    engine_config_path,
    in_process_engine_parameters,
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
        self.tokenizer = load_tokenizer(params.get("tokenizer_dir") or None)
        limit = params.get("max_tokens_limit") or ""
        if not limit:
            config = json.loads((resolve_tokenizer_dir(params.get("tokenizer_dir") or None)
                                 / "config.json").read_text())
            limit = config.get("max_position_embeddings", 2048)
        self.max_tokens_limit = int(limit)
        self.engine_model = params.get("engine_model", "")
        if self.engine_model:
            self.service = None
            self._ids = itertools.count()
            self._active = {}
            self._lock = threading.Lock()
            self._stopping = threading.Event()
            threading.Thread(target=self._watch_cancellation, name="llm-cancel",
                             daemon=True).start()
            where = f"over BLS to `{self.engine_model}`"
        else:
            from python_backends.engine_service import EngineService

            engine_params = in_process_engine_parameters(args["model_repository"], params)
            if not engine_config_path(args["model_repository"], params).is_file():
                pb_utils.Logger.log_warn(
                    f"llm: engine_config {params.get('engine_config')!r} names no model config"
                    f" in this repository; the engine runs with its defaults and llm's own "
                    f"parameters")
            labels = {"model": args["model_name"], "version": str(args["model_version"])}
            self.service = EngineService.start(pb_utils, engine_params, labels)
            where = f"in process: {self.service.summary()}"
        # The stub's C++ side reads numpy arrays with numpy 1's layout: with numpy 2 every
        # BYTES input arrives corrupted. Say which numpy this process got.
        pb_utils.Logger.log_info(
            f"llm ready, engine {where}; numpy {np.__version__} ({np.__file__})")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                parsed = parse_text_request(
                    input_arrays(request), request_parameters(request), self.max_tokens_limit
                )
                prompt_ids = prompt_token_ids(self.tokenizer, parsed)
                inputs = engine_inputs(self.tokenizer, parsed, prompt_ids)
                if self.service is not None:
                    self._submit(request, sender, parsed, prompt_ids, inputs)
                else:
                    self._start_bls(request, sender, parsed, prompt_ids, inputs)
            except (InvalidRequestError, ValueError) as exc:
                _send_error(sender, str(exc), pb_utils.TritonError.INVALID_ARG)
            except Exception as exc:  # never let one request take the model down
                log.exception("llm: unexpected error")
                _send_error(sender, f"internal error: {exc}")
        return None

    # -- the engine in this process -------------------------------------------------------

    def _submit(self, request, sender, parsed, prompt_ids, inputs):
        """Queue the request on the engine loop; its thread then runs `sink` for each step."""
        engine_request = parse_engine_request(
            inputs, default_end_id=self.tokenizer.eos_token_id, exclude_input_default=True)
        generation = TextGeneration(self.tokenizer, parsed, len(prompt_ids))

        def sink(out):
            if out.finish_reason is FinishReason.ABORT:
                sender.send(flags=FINAL)  # cancelled: Triton releases the request only now
                return False
            reason = out.finish_reason.value if out.finished else None
            reply = generation.feed(out.new_token_ids, out.finished, out.num_cached_tokens,
                                    reason)
            if reply is not None:
                sender.send(_text_response(parsed, reply), flags=FINAL if reply.final else 0)
            return not generation.done  # a stop string ended it: free the slot now

        self.service.loop.submit(
            request.request_id() or "", engine_request.prompt_token_ids,
            engine_request.sampling, sink, priority=engine_request.priority,
            is_cancelled=request.is_cancelled,
            on_error=lambda exc: _send_error(sender, str(exc)),
        )

    # -- a separate engine model over BLS -------------------------------------------------

    def _start_bls(self, request, sender, parsed, prompt_ids, inputs):
        inner_id = f"llm-{os.getpid()}-{next(self._ids)}"
        active = _Active(request, sender, inner_id)
        with self._lock:
            self._active[inner_id] = active
        threading.Thread(
            target=self._generate, args=(active, parsed, prompt_ids, inputs),
            name=f"llm-{inner_id}", daemon=True,
        ).start()

    def _generate(self, active, parsed, prompt_ids, inputs):
        try:
            self._run(active, parsed, prompt_ids, inputs)
        except Exception as exc:  # one request's failure must not reach the others
            log.exception("llm: request failed")
            _send_error(active, f"internal error: {exc}")
        finally:
            active.done.set()
            with self._lock:
                self._active.pop(active.inner_id, None)

    def _run(self, active, parsed, prompt_ids, inputs):
        generation = TextGeneration(self.tokenizer, parsed, len(prompt_ids))
        request = pb_utils.InferenceRequest(
            model_name=self.engine_model,
            inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
            requested_output_names=ENGINE_OUTPUTS,
            request_id=active.inner_id,
        )
        finished = False
        for response in request.exec(decoupled=True):
            if finished or active.cancelled.is_set():
                continue  # drain: the engine is stopping this request
            if response.has_error():
                error = response.error()
                _send_error(active, error.message(), error.code())
                finished = True
                continue
            ids = pb_utils.get_output_tensor_by_name(response, "output_ids")
            if ids is None:
                continue  # the engine's empty final
            cached = pb_utils.get_output_tensor_by_name(response, "num_cached_tokens")
            last = cached is not None  # the engine sends it with its last tokens
            reply = generation.feed(ids.as_numpy().reshape(-1).tolist(), last,
                                    int(cached.as_numpy().reshape(-1)[0]) if last else 0)
            if generation.stopped and not last:
                self._stop_engine(active.inner_id)
            if reply is not None:
                active.send(_text_response(parsed, reply), reply.final)
            finished = generation.done
        if not finished:
            # Cancelled, or an engine without a final marker: close the stream.
            active.send()

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
        if self.service is not None:
            self.service.shutdown()
        else:
            self._stopping.set()


def _text_response(parsed, reply):
    tensors = [pb_utils.Tensor("text_output", np.array([reply.text.encode("utf-8")], dtype=object))]
    if reply.final:
        if parsed.return_finish_reason:
            tensors.append(pb_utils.Tensor(
                "finish_reason", np.array([reply.finish_reason.encode()], dtype=object)))
        if parsed.return_num_input_tokens:
            tensors.append(pb_utils.Tensor(
                "num_input_tokens", np.array([reply.num_input_tokens], np.uint32)))
        if parsed.return_num_output_tokens:
            tensors.append(pb_utils.Tensor(
                "num_output_tokens", np.array([reply.num_output_tokens], np.uint32)))
        tensors.append(pb_utils.Tensor(
            "num_cached_tokens", np.array([reply.num_cached_tokens], np.int32)))
    return pb_utils.InferenceResponse(output_tensors=tensors)


def _send_error(target, message, code=None):
    """`target`: an _Active (BLS mode), or a bare response sender."""
    code = pb_utils.TritonError.INTERNAL if code is None else code
    response = pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
    if isinstance(target, _Active):
        target.send(response, final=True)
    else:
        target.send(response, flags=FINAL)
