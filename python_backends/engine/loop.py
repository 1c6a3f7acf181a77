"""EngineLoop: runs an LLMEngine on its own thread for a server (Triton's decoupled model).

Other threads `submit()` requests with a sink that receives each RequestOutput, and `stop()`
them by their external id; the loop thread is the only one that touches the engine. Each
iteration drains the inbox (so new requests join the running batch at once), polls
cancellation, runs one engine step and hands outputs to the sinks: directly, or with
`output_thread` through a queue to a sender thread, which then builds and sends responses
while the loop runs the next step (torch releases the GIL while it computes). Either way a
request's outputs reach its sink in order, and its `is_cancelled` is never asked once its
sink has ended it (Triton frees a request's state with its final response).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from python_backends.engine.engine import LLMEngine, RequestOutput
from python_backends.engine.errors import EngineError
from python_backends.engine.sampling import SamplingParams
from python_backends.engine.sequence import FinishReason

log = logging.getLogger(__name__)

# Receives each output of its request; returning False ends the request at once (its slot is
# freed, no final output follows): e.g. a stop string found by the caller.
Sink = Callable[[RequestOutput], bool | None]


@dataclass
class LoopTimes:
    """Seconds the loop thread spent in each part of its iterations, since it started: what
    a served step costs beyond the engine's own (`step`)."""

    step: float = 0.0  # engine.step(): schedule, forward pass, sampling
    outputs: float = 0.0  # handing outputs to the sinks (or to the sender thread)
    cancellation: float = 0.0  # asking live requests whether they were cancelled
    on_step: float = 0.0  # the on_step callback (metrics)
    steps: int = 0

    def summary(self) -> str:
        busy = self.step + self.outputs + self.cancellation + self.on_step
        if not self.steps or busy <= 0:
            return "no steps"
        parts = ", ".join(f"{name} {seconds:.1f} s ({seconds / busy:.0%})" for name, seconds in
                          (("step", self.step), ("outputs", self.outputs),
                           ("cancellation polls", self.cancellation),
                           ("on_step", self.on_step)))
        return f"{self.steps} steps in {busy:.1f} s busy: {parts}"


@dataclass(eq=False)
class _Submission:
    key: str
    external_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    sink: Sink
    is_cancelled: Callable[[], bool] | None
    on_error: Callable[[Exception], None]
    # Set once the sink has had the request's last word (final output, False or an error);
    # guarded by `lock`, which is also held while the sink or is_cancelled runs.
    ended: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class EngineLoop:
    def __init__(self, engine: LLMEngine, cancel_poll_interval_s: float = 0.05,
                 output_thread: bool = False) -> None:
        self.engine = engine
        self.cancel_poll_interval_s = cancel_poll_interval_s
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._live: dict[str, _Submission] = {}
        self._keys = itertools.count()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._outbox: queue.SimpleQueue[tuple[_Submission, object] | None] | None = None
        self._sender: threading.Thread | None = None
        if output_thread:
            self._outbox = queue.SimpleQueue()
            self._sender = threading.Thread(target=self._send_outputs, name="engine-outputs",
                                            daemon=True)
        self._last_cancel_poll = 0.0
        self.num_aborted = 0  # requests ended early: cancelled, stopped or client gone
        # Called on the loop thread after every iteration, idle ones included (about every
        # 0.5 s), so it also sees aborts: e.g. to publish metrics.
        self.on_step: Callable[[LLMEngine], None] | None = None
        self.times = LoopTimes()

    def start(self) -> EngineLoop:
        if self._sender is not None:
            self._sender.start()
        self._thread.start()
        return self

    @classmethod
    def build_and_start(cls, build: Callable[[], LLMEngine], **options: Any) -> EngineLoop:
        """Build the engine on the loop's own thread, then run it there; return once it is
        built, raising what `build` raised. `options`: the constructor's.

        What a server should use. PyTorch runs its CPU kernels on an OpenMP team per calling
        thread, so a model loaded on one thread and run on another leaves two teams, more
        OpenMP threads than cores on a small machine; libgomp then waits for the next
        parallel region with about 100 spins instead of 300,000 before it sleeps, and a
        decode step is a few hundred such regions. Served at c=32 on 2 cores, with the model
        loaded on the stub's main thread, the OpenMP worker was busy 79% of the time against
        the loop thread's 92%; built on the loop thread, 94% and 94%.
        """
        loop = cls(None, **options)  # type: ignore[arg-type]
        built = threading.Event()
        failure: list[BaseException] = []

        def build_then_run() -> None:
            try:
                loop.engine = build()
            except BaseException as exc:  # handed to the caller, which re-raises it
                failure.append(exc)
                return
            finally:
                built.set()
            loop._run()

        loop._thread = threading.Thread(target=build_then_run, name="engine-loop", daemon=True)
        loop.start()
        built.wait()
        if failure:
            loop.shutdown()
            raise failure[0]
        return loop

    def submit(
        self,
        external_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        sink: Sink,
        *,
        priority: int = 1,
        is_cancelled: Callable[[], bool] | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> str:
        """Queue a request; raises InvalidRequestError at once if it can never be served."""
        self.engine.validate(prompt_token_ids, params)
        key = f"{external_id}#{next(self._keys)}"
        submission = _Submission(
            key, external_id, list(prompt_token_ids), params, priority, sink, is_cancelled,
            on_error or (lambda exc: log.error("request %s failed: %s", external_id, exc)),
        )
        self._inbox.put(("add", submission))
        return key

    def stop(self, external_id: str) -> None:
        """Stop every in-flight request with this external id (the TensorRT-LLM `stop`)."""
        self._inbox.put(("stop", external_id))

    def abort(self, key: str) -> None:
        self._inbox.put(("abort", key))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        self._inbox.put(("wake", None))
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._sender is not None and self._outbox is not None:
            self._outbox.put(None)
            self._sender.join(timeout_s)

    @property
    def num_live(self) -> int:
        return len(self._live)

    def _run(self) -> None:
        clock, times = time.perf_counter, self.times
        while not self._stopping.is_set():
            try:
                self._drain_inbox(block=not self.engine.has_unfinished())
                if self._stopping.is_set():
                    break
                started = clock()
                self._poll_cancellation()
                polled = clock()
                outputs = self.engine.step()
            except Exception as exc:  # the loop must survive anything one step throws
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            stepped = clock()
            for out in outputs:
                self._deliver(out)
            delivered = clock()
            if self.on_step is not None:
                self.on_step(self.engine)
            times.cancellation += polled - started
            schedule = self.engine.last_schedule
            if schedule is not None and not schedule.is_empty:
                times.steps += 1
                times.step += stepped - polled
                times.outputs += delivered - stepped
                times.on_step += clock() - delivered
        self._fail_all(EngineError("the engine is shutting down"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload: object) -> None:
        if kind == "add":
            sub = payload  # type: ignore[assignment]
            assert isinstance(sub, _Submission)
            try:
                self.engine.add_request(sub.key, sub.prompt_token_ids, sub.params, sub.priority)
            except EngineError as exc:
                self._emit(sub, exc)
                return
            self._live[sub.key] = sub
        elif kind == "stop":
            for key, sub in list(self._live.items()):
                if sub.external_id == payload:
                    self._finish_aborted(key)
        elif kind == "abort":
            self._finish_aborted(str(payload))
        elif kind == "ended":  # its sink ended it on the sender thread: free the slot
            self._finish_aborted(str(payload), notify=False)

    def _poll_cancellation(self) -> None:
        now = time.monotonic()
        if now - self._last_cancel_poll < self.cancel_poll_interval_s:
            return
        self._last_cancel_poll = now
        for key, sub in list(self._live.items()):
            if sub.is_cancelled is None:
                continue
            # Busy: the sender thread is handing it an output right now; ask next time
            # rather than stall the loop (and so every request) behind that send.
            if not sub.lock.acquire(blocking=False):
                continue
            try:
                if sub.ended:
                    continue
                try:
                    cancelled = sub.is_cancelled()
                except Exception:  # a dead client connection reads as cancelled
                    cancelled = True
            finally:
                sub.lock.release()
            if cancelled:
                # Still send the final flag: Triton releases the request only then.
                self._finish_aborted(key)

    def _finish_aborted(self, key: str, notify: bool = True) -> None:
        seq = self.engine.abort_request(key)
        sub = self._live.pop(key, None)
        if sub is not None or seq is not None:
            self.num_aborted += 1
        if sub is None or not notify:
            return
        out = RequestOutput(
            request_id=key, new_token_ids=(), finished=True, finish_reason=FinishReason.ABORT,
            num_prompt_tokens=len(sub.prompt_token_ids),
            num_output_tokens=seq.num_output_tokens if seq else 0,
            num_cached_tokens=seq.num_cached_tokens if seq else 0,
        )
        self._emit(sub, out)

    def _deliver(self, out: RequestOutput) -> None:
        sub = self._live.get(out.request_id)
        if sub is None:
            return
        if out.finished:
            del self._live[out.request_id]
        self._emit(sub, out)

    def _emit(self, sub: _Submission, item: RequestOutput | Exception) -> None:
        """Hand an output (or the request's error) to its sink, now or on the sender thread."""
        if self._outbox is not None:
            self._outbox.put((sub, item))
        elif not self._to_sink(sub, item):
            # The client is gone, or the sink is done with it: free the slot now rather than
            # decode for nobody.
            self._finish_aborted(sub.key, notify=False)

    def _send_outputs(self) -> None:
        assert self._outbox is not None
        while (entry := self._outbox.get()) is not None:
            sub, item = entry
            if not self._to_sink(sub, item):
                self._inbox.put(("ended", sub.key))

    def _to_sink(self, sub: _Submission, item: RequestOutput | Exception) -> bool:
        """Run the sink (or on_error); False when a still running request should end: the
        sink said so, or could not deliver."""
        with sub.lock:
            if sub.ended:
                return True
            if isinstance(item, Exception):
                sub.ended = True
                try:
                    sub.on_error(item)
                except Exception:
                    log.exception("on_error failed for %s", sub.external_id)
                return True
            try:
                keep = sub.sink(item) is not False
            except Exception as exc:
                log.warning("could not deliver output of %s: %s", sub.external_id, exc)
                keep = False
            sub.ended = item.finished or not keep
            return keep or item.finished

    def _fail_all(self, exc: Exception) -> None:
        for key, sub in list(self._live.items()):
            self.engine.abort_request(key)
            self._live.pop(key, None)
            self._emit(sub, exc)
