"""Triton model `engine`: the in-flight-batching engine behind the `tensorrt_llm` contract.

execute() only validates and queues; the engine loop thread steps every running request and
sends each one's responses through its response sender (decoupled mode).
"""

import logging

import triton_python_backend_utils as pb_utils

from python_backends.contracts import parse_engine_request
from python_backends.engine import InvalidRequestError
from python_backends.engine_responses import EngineResponseBuilder
from python_backends.engine_service import EngineService
from python_backends.triton_glue import (
    input_arrays,
    model_parameters,
    request_parameters,
    start_parent_watchdog,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
log = logging.getLogger("engine")


class TritonPythonModel:
    def initialize(self, args):
        start_parent_watchdog()
        params = model_parameters(args)
        self.exclude_input_default = params.get("exclude_input_in_output", "").lower() == "true"
        labels = {"model": args["model_name"], "version": str(args["model_version"])}
        self.service = EngineService.start(pb_utils, params, labels)
        self.engine, self.loop = self.service.engine, self.service.loop
        pb_utils.Logger.log_info(f"engine ready: {self.service.summary()}")

    def execute(self, requests):
        for request in requests:
            self._accept(request)
        return None

    def _accept(self, request):
        sender = request.get_response_sender()
        request_id = request.request_id() or ""
        try:
            parsed = parse_engine_request(
                input_arrays(request),
                default_end_id=self.engine.eos_token_id,
                exclude_input_default=self.exclude_input_default,
                parameters=request_parameters(request),
            )
            if parsed.stop:
                # TensorRT-LLM semantics: stop the in-flight request with the same id.
                self.loop.stop(request_id)
                sender.send(flags=FINAL)
                return
            builder = EngineResponseBuilder(parsed)

            def sink(out, builder=builder, sender=sender):
                arrays = builder.arrays(out)
                if arrays is None:
                    if out.finished:
                        sender.send(flags=FINAL)
                    return
                tensors = [pb_utils.Tensor(name, value) for name, value in arrays.items()]
                sender.send(
                    pb_utils.InferenceResponse(output_tensors=tensors),
                    flags=FINAL if out.finished else 0,
                )

            def on_error(exc, sender=sender):
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))),
                            flags=FINAL)

            self.loop.submit(
                request_id, parsed.prompt_token_ids, parsed.sampling, sink,
                priority=parsed.priority, is_cancelled=request.is_cancelled, on_error=on_error,
            )
        except InvalidRequestError as exc:
            error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
            sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
        except Exception as exc:  # never let one request take the model down
            log.exception("engine: unexpected error")
            sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {exc}")),
                flags=FINAL,
            )

    def finalize(self):
        self.service.shutdown()
