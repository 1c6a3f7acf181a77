"""Ctrl-C (SIGINT) or SIGTERM to `serve` while requests stream stops the whole stack.

Each test starts its own stack with `python -m python_backends.tools.serve` on free ports,
opens two long streams, signals `serve` and checks that it exits with code 0 and that no
process of its tree (tritonserver, the Python-backend stubs) is left running, nor their
shared-memory regions.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from python_backends.paths import REPO_ROOT
from python_backends.text import encode_prompt
from python_backends.tools.triton_server import distinct_ports, free_port

from .client import Stream, engine_inputs, ensemble_inputs, llm_inputs, wait_until

pytestmark = pytest.mark.server

READY_LINE = "The stack is ready"
START_DEADLINE_S = 300.0
EXIT_DEADLINE_S = 40.0  # serve gives tritonserver 5 s for in-flight requests, then 20 s
STUB = "triton_python_backend_stub"


# ------------------------------------------------------------------ process bookkeeping


def _proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) from /proc, or None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def process_tree(root: int) -> dict[int, tuple[float, str]]:
    """Every live descendant of `root`: pid -> (start time, command line)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    tree: dict[int, tuple[float, str]] = {}
    if psutil is not None:
        try:
            children = psutil.Process(root).children(recursive=True)
        except psutil.NoSuchProcess:
            return tree
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                tree[child.pid] = (child.create_time(), " ".join(child.cmdline()))
        return tree
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))):
            parents.setdefault(stat[0], []).append(int(entry.name))
    todo = list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        stat = _proc_stat(pid)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if stat:
            tree[pid] = (float(stat[2]), cmdline.strip())
            todo.extend(parents.get(pid, []))
    return tree


def still_running(pid: int, start_time: float) -> bool:
    """True while this very process (not a later one reusing the pid) runs (zombies don't)."""
    try:
        import psutil
    except ImportError:
        stat = _proc_stat(pid)
        return stat is not None and float(stat[2]) == start_time and stat[1] != "Z"
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == start_time and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_mentioning(text: str) -> list[str]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        stat = _proc_stat(int(entry.name))
        if text in cmdline and stat and stat[1] != "Z":
            out.append(f"{entry.name}: {cmdline[:200]}")
    return out


# --------------------------------------------------------------------------- the test


class Serve:
    """`python -m python_backends.tools.serve` on free ports, its output read on a thread."""

    def __init__(self, log_dir: Path, *args: str) -> None:
        self.http, self.grpc, self.metrics = distinct_ports(free_port(), free_port(), free_port())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "python_backends.tools.serve",
             "--http-port", str(self.http), "--grpc-port", str(self.grpc),
             "--metrics-port", str(self.metrics), "--log-dir", str(log_dir), *args],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group, as a shell job has
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited early:\n{''.join(self.output)}")
            return any(READY_LINE in line for line in self.output)

        wait_until(ready, START_DEADLINE_S, "serve never printed that the stack is ready",
                   interval_s=0.5)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def kill(self, known: dict[int, tuple[float, str]]) -> None:
        """Clean up after a failure: serve, and whatever of its tree still runs."""
        tree = {**known, **process_tree(self.proc.pid)}
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid, (start, _) in tree.items():
            if still_running(pid, start):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(("sig", "stack"), [
    (signal.SIGINT, ()),  # the default stack: the router in front of two instances
    (signal.SIGTERM, ("--no-router",)),
], ids=["SIGINT-router-2-instances", "SIGTERM-no-router"])
def test_signal_during_streaming_stops_everything(tmp_path, tokenizer, sig, stack):
    serve = Serve(tmp_path, *stack)
    instances = 1 if stack else 2
    streams: list[Stream] = []
    tree: dict[int, tuple[float, str]] = {}
    try:
        serve.wait_ready()
        # Two long streams that are decoding when the signal comes.
        streams = [Stream(serve.url), Stream(serve.url)]
        streams[0].send("llm", llm_inputs("Tell me a story.", 1000, ignore_eos=True), "s-llm")
        if sig == signal.SIGINT:
            streams[1].send("ensemble", ensemble_inputs("Once upon a time", 1000,
                                                        ignore_eos=True), "s-ensemble")
        else:
            ids = encode_prompt(tokenizer, "Once upon a time")
            streams[1].send("engine", engine_inputs(ids, 1000, ignore_eos=True), "s-engine")
        for stream in streams:
            stream.wait_for(lambda rs: sum(bool(r.text or r.token_ids) for r in rs) >= 2)

        tree = process_tree(serve.proc.pid)
        stubs = [pid for pid, (_, cmd) in tree.items() if STUB in cmd]
        servers = [pid for pid, (_, cmd) in tree.items() if "--model-repository=" in cmd]
        routers = [pid for pid, (_, cmd) in tree.items() if "-m router" in cmd]
        assert len(servers) == instances, tree
        assert len(stubs) == 4 * instances, tree  # the four Python models
        assert len(routers) == (0 if stack else 1), tree

        if sig == signal.SIGINT:
            os.killpg(serve.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        else:
            serve.proc.send_signal(signal.SIGTERM)
        try:
            code = serve.proc.wait(timeout=EXIT_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve still running {EXIT_DEADLINE_S:.0f} s after {sig.name}:\n"
                        + "".join(serve.output))
        assert code == 0, "".join(serve.output)

        def tree_gone() -> bool:
            return not any(still_running(pid, start) for pid, (start, _) in tree.items())

        wait_until(tree_gone, 10.0, "processes of the stack outlived serve")
        assert not processes_mentioning(f"--http-port={serve.http}")
        assert not processes_mentioning(f"--grpc-port {serve.grpc}")
        # Nor the stubs' shared-memory regions (RAM in /dev/shm).
        regions = [arg for _, cmd in tree.values() for arg in cmd.split()
                   if arg.startswith("triton_python_backend_shm_region_")]
        assert len(regions) == len(stubs)
        assert not [r for r in regions if (Path("/dev/shm") / r).exists()]
        assert "stopped." in "".join(serve.output)
    finally:
        for stream in streams:
            with contextlib.suppress(Exception):
                stream.close()
        serve.kill(tree)
