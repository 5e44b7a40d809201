"""The supervisor side of process isolation: spawn, feed, watch, kill and restart the inference worker.

Inputs and outputs travel through one :class:`~device.runtime.worker.SharedBlock` laid out by
:func:`device.runtime.worker.layout`; the control path is a 16-byte frame each way on a socket pair.

Failure handling:

- the worker dies (signal or exit) while loading or serving: the request fails with
  :class:`WorkerCrashed`, the crash is counted against the model file, and the next request starts a fresh
  worker;
- the worker does not answer within ``deadline_s``: it is SIGKILLed, the request fails with
  :class:`WorkerTimeout`, and the hang counts like a crash;
- after ``Quarantine.threshold`` consecutive failures on one file, the file is quarantined
  (:class:`ModelQuarantined`) and never loaded again until an operator releases it or the file changes.

The worker's stderr (its native fd 2, where the interpreter prints ``INFO: Created TensorFlow Lite XNNPACK
delegate`` and where a fatal signal's Python traceback goes) is a pipe: each line is logged at debug level
under ``device.runtime.worker``, and the last lines are kept so that a crash's error names what the worker
said before it died.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from typing import Sequence

from device.runtime import errors as E
from device.runtime import zygote
from device.runtime.engine import EngineBase, InferResult, check_input_count
from device.runtime.quarantine import Quarantine
from device.runtime.tensors import TensorSpec, write_input
from device.runtime.worker import (FRAME, MSG_ATTACH, MSG_ATTACHED, MSG_FAILED, MSG_LOADING, MSG_READY,
                                   OP_INFER, OP_STOP, ST_ERROR, Channel, SharedBlock, WorkerSpec, arrays_in,
                                   layout, stamps_in)

log = logging.getLogger(__name__)
worker_log = logging.getLogger("device.runtime.worker")

_FAILED_CODES = {cls.code: cls for cls in (E.ModelInvalid, E.BackendUnavailable, E.InputInvalid,
                                           E.ModelQuarantined, E.DelegateUnavailable)}


def _worker_env() -> dict:
    """The worker's environment: ours, with this package's parent directory first on PYTHONPATH, and without
    systemd's notification variables (only the agent speaks to systemd)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


class _Launcher:
    """Starts worker processes from one long-lived thread.

    The worker asks for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), and Linux ties that to the
    *thread* that forked it: a worker started from a short-lived thread (a hot swap run in the background)
    would be killed when that thread ends. So every ``Popen`` happens on this thread, which lives as long
    as the agent.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, args, **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fieldnode-launcher", daemon=True)
                self._thread.start()
        box: dict = {}
        done = threading.Event()
        self._jobs.put((args, kwargs, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["proc"]

    def _run(self) -> None:
        while True:
            args, kwargs, box, done = self._jobs.get()
            try:
                box["proc"] = subprocess.Popen(args, **kwargs)
            except BaseException as exc:  # handed to the caller, who raises it
                box["error"] = exc
            done.set()


_LAUNCHER = _Launcher()


def _launch(child_fd: int):
    """Starts a worker serving on ``child_fd``: forked by the zygote when this process has one
    (:mod:`device.runtime.zygote`, ``fieldnode run``), else by exec, which also takes over from a zygote
    that failed (the zygote module says so)."""
    z = zygote.current()
    if z is not None:
        try:
            return z.spawn(child_fd)
        except zygote.ZygoteGone:
            pass
    return _LAUNCHER.popen([sys.executable, "-m", "device.runtime.worker", str(child_fd)],
                           pass_fds=(child_fd,), env=_worker_env(), stdin=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, close_fds=True)


class StderrTail:
    """Reads a worker's stderr on its own thread until EOF: every line goes to the ``device.runtime.worker``
    logger at debug level (the interpreter's chatter is not the agent's business), the last ones are kept.

    Args:
        stream: the read end of the worker's stderr pipe (binary).
        pid: the worker's process id, for the log lines.
        keep: how many lines to keep.
    """

    MAX_LINE = 4096

    def __init__(self, stream, pid: int, keep: int = 40) -> None:
        self.lines: collections.deque = collections.deque(maxlen=keep)
        self._thread = threading.Thread(target=self._run, args=(stream, pid), name=f"worker-{pid}-stderr",
                                        daemon=True)
        self._thread.start()

    def _run(self, stream, pid: int) -> None:
        try:
            for raw in iter(lambda: stream.readline(self.MAX_LINE), b""):
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    self.lines.append(line)
                    worker_log.debug("worker %d: %s", pid, line)
        except (OSError, ValueError):  # the pipe was closed under us: nothing more to read
            pass
        finally:
            stream.close()

    def last_words(self, wait_s: float = 1.0) -> str:
        """What the worker said that explains its end, in one line: the fatal error and the innermost Python
        frame of a faulthandler dump, and other lines, without the interpreter's ``INFO:`` chatter; "" when
        it said nothing. Waits up to ``wait_s`` for the reader to reach EOF (call it after the worker ended).
        """
        self._thread.join(wait_s)
        kept: list[str] = []
        frames = 0  # after a dump's thread header: how many frames to keep (innermost first)
        for line in list(self.lines):
            text = line.strip()
            if not text or text.startswith(("INFO: ", "Extension modules:")):
                continue
            if text.startswith(("Current thread ", "Thread 0x")):
                frames = 1
            elif text.startswith("File "):
                if frames:
                    kept.append(text)
                    frames -= 1
            else:
                kept.append(text)
        out = " | ".join(kept[-6:])
        return out if len(out) <= 600 else "..." + out[-597:]


def describe_exit(returncode: int | None) -> str:
    """``was killed by signal SIGSEGV`` / ``exited with status 1`` / ``did not exit``."""
    if returncode is None:
        return "did not exit"
    if returncode < 0:
        try:
            return f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class ProcessEngine(EngineBase):
    """Serves one model variant from an isolated worker process.

    Args:
        spec: what the worker loads.
        quarantine: crash accounting shared by every engine of a runtime.
        deadline_s: how long one inference may take before the worker is killed.
        start_timeout_s: how long the worker may take to load and warm up.
    """

    isolation = "process"

    def __init__(self, spec: WorkerSpec, quarantine: Quarantine | None = None, deadline_s: float = 5.0,
                 start_timeout_s: float = 60.0) -> None:
        super().__init__(spec, quarantine)
        self.deadline_s = deadline_s
        self.start_timeout_s = start_timeout_s
        self._proc = None
        self._conn = None
        self._fd = -1
        self._poller = None
        self._shm = None
        self._shm_layout: tuple | None = None
        self._shm_in: list = []
        self._shm_out: list = []
        self._scratch: list = []
        self._seq = 0
        self._stamps = None  # the worker's clock readings of the latest request, in shared memory
        self._times: tuple | None = None  # ours: entered, sent, reply read, returned
        self._suspect = False  # the loaded file has crashed before: a success should reset its count
        self._tail: StderrTail | None = None  # the latest worker's stderr
        self._aborted = False  # abort(): the request in flight is given up, not counted against the model

    # ----- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawns the worker and waits until its model is loaded and warm.

        Raises:
            ModelInvalid: the model file was refused cleanly by the worker.
            ModelQuarantined: every candidate file is quarantined, or this start quarantined one.
            WorkerCrashed: the worker died while loading.
            WorkerTimeout: loading took longer than ``start_timeout_s``.
        """
        with self._lock:
            if self._closed:
                raise E.RuntimeClosed("engine is closed")
            if self._proc is None:
                self._spawn()

    @property
    def pid(self) -> int | None:
        """The worker's process id, or None when no worker is running."""
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        """Stops the worker (politely, then SIGKILL) and frees the shared memory."""
        with self._lock:
            self._closed = True
            if self._proc is not None:
                try:
                    os.write(self._fd, FRAME.pack(OP_STOP, 0, 0))
                except OSError:
                    pass
                try:
                    self._proc.wait(2.0)
                except subprocess.TimeoutExpired:
                    pass
                self._teardown()
            if self._shm is not None:
                self._shm_in = self._shm_out = []
                self._stamps = None
                self._shm.close()
                try:
                    self._shm.unlink()
                except FileNotFoundError:
                    pass
                self._shm = None

    def abort(self) -> None:
        """Gives up the request in flight, from another thread (the agent is stopping and must not wait for a
        worker that does not answer): the worker is killed without taking the request lock, and the request
        fails with :class:`RuntimeClosed`, which is not counted against the model file."""
        self._aborted = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    # ----- the request path ------------------------------------------------------------------------------

    def infer(self, values: Sequence) -> InferResult:
        """Runs one inference in the worker.

        Args:
            values: one array per input tensor, in its dtype, or float for a quantized tensor.

        Raises:
            InputInvalid: wrong count, shape or dtype (the worker is not involved).
            WorkerCrashed, WorkerTimeout, ModelQuarantined: see the module docstring.
            InferenceFailed: the interpreter reported an error (the worker stays up).
        """
        with self._lock:
            entered = time.perf_counter_ns()
            if self._closed:
                raise E.RuntimeClosed("engine is closed")
            if self._proc is None:
                self.restarts += 1
                self._spawn()
                entered = time.perf_counter_ns()
            check_input_count(values, self.inputs)
            for spec, dest, scratch, v in zip(self.inputs, self._shm_in, self._scratch, values):
                write_input(spec, v, dest, scratch)
            self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
            t0 = time.perf_counter_ns()
            try:
                os.write(self._fd, FRAME.pack(OP_INFER, seq, 0))
            except OSError:
                self._crashed("before the request reached it")
            frame = self._await_reply()
            got = time.perf_counter_ns()
            if len(frame) != FRAME.size:
                self._crashed("during inference")
            status, rseq, ns = FRAME.unpack(frame)
            if status == ST_ERROR:
                os.set_blocking(self._fd, True)
                text = self._conn.recv_bytes().decode(errors="replace")
                os.set_blocking(self._fd, False)
                raise E.InferenceFailed(f"the interpreter failed: {text}")
            outs = [a.copy() for a in self._shm_out]
            done = time.perf_counter_ns()
            latency = done - t0
            self.requests += 1
            self.invoke_histogram.record(ns)
            if self._suspect:
                self._suspect = False
                self.quarantine.succeeded(self.info["path"])
            self._times = (entered, t0, got, done)
            return InferResult(outs, ns, latency)

    def last_stages(self) -> dict | None:
        """Where the latest request's time went, in ns, from both processes' clocks: ``agent_in`` (checking
        and copying inputs), ``to_worker`` (the request reaching the worker), ``worker_in`` (inputs into the
        interpreter), ``invoke``, ``worker_out`` (outputs back), ``to_agent`` (the reply reaching the agent,
        waking it included) and ``agent_out`` (copying the outputs). None before the first request. Valid
        until the next request."""
        with self._lock:
            if self._times is None or self._stamps is None:
                return None
            entered, sent, got, done = self._times
            received, start, end, replied = (int(x) for x in self._stamps)
        return {"agent_in": sent - entered, "to_worker": received - sent, "worker_in": start - received,
                "invoke": end - start, "worker_out": replied - end, "to_agent": got - replied,
                "agent_out": done - got}

    # ----- internals -------------------------------------------------------------------------------------

    def _await_reply(self) -> bytes:
        """Waits for the worker's reply (b"" when the worker is gone); kills the worker at the deadline."""
        # Sleeping here, not polling: the interpreter uses the CPUs while it runs, and a poller steals from
        # it (measured: a yielding poll over the last 250 µs slowed MobileNetV2's invoke by ~60 µs).
        if not self._poller.poll(self._deadline_ms):
            self._hung()
        try:
            frame = os.read(self._fd, FRAME.size)
        except OSError:  # a reset, or readable yet empty (cannot happen: only we read): the worker is gone
            frame = b""
        return self._complete(frame)

    def _complete(self, frame: bytes) -> bytes:
        # A 16-byte write arrives whole in practice; finish a split one rather than misread it.
        while 0 < len(frame) < FRAME.size:
            if not self._poller.poll(self._deadline_ms):
                self._hung()
            more = os.read(self._fd, FRAME.size - len(frame))
            if not more:
                return b""
            frame += more
        return frame

    def _spawn(self) -> None:
        q = self.quarantine
        cands = self.usable_candidates()
        skipped = [f"{c.delegate} candidate {os.path.basename(c.path)} is quarantined"
                   for c in self.spec.candidates if c not in cands]
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = _launch(child.fileno())
        finally:
            child.close()
        self._tail = StderrTail(proc.stderr, proc.pid)
        parent = Channel(parent)
        parent.send_bytes(replace(self.spec, candidates=tuple(cands)).to_json())
        self._proc, self._conn, self._fd = proc, parent, parent.fileno()
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        loading = cands[0].path
        end = time.monotonic() + self.start_timeout_s
        while True:
            msg = self._recv_start(end, loading)
            tag, body = msg[:1], msg[1:]
            if tag == MSG_LOADING:
                loading = body.decode()
            elif tag == MSG_FAILED:
                err = json.loads(body)
                try:
                    self._proc.wait(2.0)
                except subprocess.TimeoutExpired:
                    pass
                self._teardown()
                raise _FAILED_CODES.get(err.get("code"), E.RuntimeFault)(err.get("message", "worker failed"))
            elif tag == MSG_READY:
                break
        info = json.loads(body)
        info["fallbacks"] = skipped + info["fallbacks"]
        inputs = tuple(TensorSpec.from_dict(d) for d in info["inputs"])
        outputs = tuple(TensorSpec.from_dict(d) for d in info["outputs"])
        self._ensure_shm(inputs, outputs)
        self._conn.send_bytes(MSG_ATTACH + self._shm.name.encode(), fds=(self._shm.fd,))
        if self._recv_start(end, loading) != MSG_ATTACHED:
            self._crashed("while attaching shared memory", info["path"])
        os.set_blocking(self._fd, False)  # from here on the request path reads it directly
        self.info, self.inputs, self.outputs = info, inputs, outputs
        self._times = None
        self._suspect = q.crashes(info["path"]) > 0

    @property
    def _deadline_ms(self) -> int:
        return max(1, int(self.deadline_s * 1000))

    def _recv_start(self, end: float, loading: str) -> bytes:
        remaining = end - time.monotonic()
        if remaining <= 0 or not self._conn.poll(remaining):
            self._kill()
            self.timeouts += 1
            self._fail(loading, f"did not finish loading {os.path.basename(loading)} within "
                                f"{self.start_timeout_s:g} s and was killed", E.WorkerTimeout)
        try:
            return self._conn.recv_bytes()
        except (EOFError, OSError):
            proc = self._proc
            self._teardown()
            self._fail(loading, f"(pid {proc.pid}) {describe_exit(proc.returncode)} while loading "
                                f"{os.path.basename(loading)}", E.WorkerCrashed)

    def _crashed(self, when: str, path: str | None = None):
        proc = self._proc
        self._teardown()
        if self._aborted:
            self._closed = True
            raise E.RuntimeClosed("the agent is stopping: the inference in flight was given up")
        self._fail(path or self.info.get("path", ""), f"(pid {proc.pid}) {describe_exit(proc.returncode)} {when} on "
                                              f"{self._what()}; the request failed, and the next one restarts "
                                              f"the worker", E.WorkerCrashed)

    def _hung(self):
        pid = self._proc.pid
        self._kill()
        self.timeouts += 1
        self._fail(self.info.get("path", ""), f"(pid {pid}) gave no answer within {self._deadline_ms} ms on "
                                              f"{self._what()} and was killed; the next request restarts it",
                   E.WorkerTimeout)

    def _what(self) -> str:
        return f"variant {self.info.get('variant')!r} ({os.path.basename(self.info.get('path', ''))})"

    def _fail(self, path: str, text: str, cls):
        self.crashes += cls is E.WorkerCrashed
        message = f"inference worker {text}"
        said = self._tail.last_words() if self._tail is not None else ""
        if said:
            message += f" (its stderr: {said})"
        self.last_error = message
        log.error("%s", message)
        if path and self.quarantine.crashed(path, message):
            exc = E.ModelQuarantined(f"{message}; model file {path} is now quarantined after "
                                     f"{self.quarantine.threshold} consecutive failures", newly=True)
        else:
            exc = cls(message)
        exc.path = path  # the file to blame, for the runtime's event
        raise exc

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._teardown()

    def _teardown(self) -> None:
        """Reaps the worker (killing it if needed) and closes the socket; keeps the shared memory."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        if self._conn is not None:
            self._conn.close()
        self._conn, self._fd, self._poller = None, -1, None

    def _ensure_shm(self, inputs, outputs) -> None:
        specs = list(inputs) + list(outputs)
        offsets, stamps_at, size = layout(specs)
        key = tuple((s.shape, s.dtype) for s in specs)
        if self._shm is None or self._shm_layout != key:
            if self._shm is not None:
                self._shm_in = self._shm_out = []
                self._stamps = None
                self._shm.close()
                self._shm.unlink()
                self._shm = None
            self._shm = SharedBlock(size)
            self._shm_layout = key
        arrays = arrays_in(self._shm.buf, specs, offsets)
        self._shm_in, self._shm_out = arrays[: len(inputs)], arrays[len(inputs):]
        self._stamps = stamps_in(self._shm.buf, stamps_at)
        import numpy as np

        self._scratch = [np.empty(s.shape, np.float32) if s.quantized else None for s in inputs]
