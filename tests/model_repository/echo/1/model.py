"""Echo the input back with the serving instance's name (INSTANCE_NAME in the environment).

One file for both test models: `echo` answers once; `echo_stream` (decoupled; this file is
linked there) streams `count` echoes `delay_ms` apart and stops early when cancelled.
"""

import json
import os
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

INSTANCE = os.environ.get("INSTANCE_NAME", "unnamed").encode()
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def outputs(request):
    text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
    return [pb_utils.Tensor("text_output", text),
            pb_utils.Tensor("instance", np.array([INSTANCE], dtype=np.object_))]


def scalar(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else int(tensor.as_numpy().reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                threading.Thread(target=self.stream, args=(request,), daemon=True).start()
            return None
        responses = []
        for request in requests:
            delay_ms = scalar(request, "delay_ms", 0)
            if delay_ms:
                time.sleep(delay_ms / 1000)
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs(request)))
        return responses

    def stream(self, request):
        sender = request.get_response_sender()
        count, delay_ms = scalar(request, "count", 1), scalar(request, "delay_ms", 0)
        for i in range(count):
            if delay_ms:
                time.sleep(delay_ms / 1000)
            if sender.is_cancelled():
                break
            last = i == count - 1
            sender.send(pb_utils.InferenceResponse(output_tensors=outputs(request)),
                        flags=FINAL if last else 0)
            if last:
                return
        sender.send(flags=FINAL)
