"""The supervisor side of process isolation: spawn, feed, watch, kill and restart the inference worker.

Inputs and outputs travel through one :class:`~device.runtime.worker.SharedBlock` laid out by
:func:`device.runtime.worker.layout`; the control path is a 16-byte frame each way on a socket pair.

Failure handling:

- the worker dies of a fault (a fault signal: SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS, SIGTRAP; or an
  exit) while loading or serving: the request fails with :class:`WorkerCrashed`, the crash is counted against
  the model file, and the next request starts a fresh worker;
- the worker is killed from outside (SIGKILL, SIGTERM...: an operator, the OOM killer) while loading or
  serving: a load starts again at once, a request fails with :class:`WorkerCrashed`; neither is counted
  against the file unless such kills come at a rate (:data:`device.runtime.quarantine.KILLS_PER_CRASH` within
  :data:`~device.runtime.quarantine.KILL_WINDOW_S`: a model that is OOM-killed at every load);
- the worker dies while idle, whatever the signal: it ran no model code, so it is restarted for the next
  request, which is served, and nothing is counted;
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

import json
import logging
import os
import select
import socket
import subprocess
import time
from dataclasses import replace
from typing import Sequence

from device.runtime import errors as E
from device.runtime.engine import EngineBase, InferResult, check_input_count
from device.runtime.quarantine import KILLS_PER_CRASH, Quarantine
from device.runtime.tensors import TensorSpec, write_input
from device.runtime.launch import StderrTail, describe_exit, killed_from_outside, launch
from device.runtime.worker import (FRAME, MSG_ATTACH, MSG_ATTACHED, MSG_FAILED, MSG_LOADING, MSG_READY,
                                   OP_INFER, OP_STOP, ST_ERROR, Channel, SharedBlock, WorkerSpec, arrays_in,
                                   layout, stamps_in)

log = logging.getLogger(__name__)


class _KilledWhileLoading(Exception):
    """The worker loading ``path`` was killed from outside (caught in :meth:`ProcessEngine._spawn`)."""

    def __init__(self, path: str, text: str) -> None:
        super().__init__(text)
        self.path, self.text = path, text


_FAILED_CODES = {cls.code: cls for cls in (E.ModelInvalid, E.BackendUnavailable, E.InputInvalid,
                                           E.ModelQuarantined, E.DelegateUnavailable)}


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
        self._forced = False  # the last teardown had to kill the worker: its exit status is ours, not a cause

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
            for attempt in range(2):
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
                    break
                except OSError:  # its end is closed: it died before this request, while idle
                    if attempt:
                        self._crashed("before the request reached it")
                    self._died_idle()
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

    def _died_idle(self) -> None:
        """The worker died between two requests: it was running no model code, so whatever killed it (an
        operator's kill, the OOM killer choosing it) is not the model's fault. The next request restarts it."""
        proc = self._proc
        self._teardown()
        if self._aborted:
            self._closed = True
            raise E.RuntimeClosed("the agent is stopping: the inference in flight was given up")
        log.warning("inference worker (pid %d) %s while idle on %s; started again for the next request (not "
                    "counted against the model)", proc.pid, describe_exit(proc.returncode), self._what())

    def _spawn(self) -> None:
        """Starts a worker; one killed from outside while loading is started again, and only kills that come
        at a rate are counted against the file (see the module docstring)."""
        kills = 0
        while True:
            try:
                return self._spawn_once()
            except _KilledWhileLoading as k:
                kills += 1
                if self.quarantine.killed(k.path) or kills >= KILLS_PER_CRASH:
                    self._fail(k.path, f"{k.text}, {kills} time(s) in a row", E.WorkerCrashed)
                log.warning("inference worker %s; started again (a kill from outside is not counted against "
                            "the model)", k.text)

    def _spawn_once(self) -> None:
        q = self.quarantine
        cands = self.usable_candidates()
        skipped = [f"{c.delegate} candidate {os.path.basename(c.path)} is quarantined"
                   for c in self.spec.candidates if c not in cands]
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = launch(child.fileno())
        finally:
            child.close()
        self._tail = StderrTail(proc.stderr, proc.pid)
        parent = Channel(parent)
        self._proc, self._conn, self._fd = proc, parent, parent.fileno()
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        loading = cands[0].path
        try:
            parent.send_bytes(replace(self.spec, candidates=tuple(cands)).to_json())
        except OSError:  # it died before it could read what to load
            self._died_loading(loading)
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
            self._died_loading(loading)

    def _died_loading(self, loading: str):
        """The worker died while it loaded ``loading``: a kill from outside is started again by :meth:`_spawn`,
        anything else is a crash of that file."""
        proc = self._proc
        self._teardown()
        text = f"(pid {proc.pid}) {describe_exit(proc.returncode)} while loading {os.path.basename(loading)}"
        if killed_from_outside(proc.returncode) and not self._forced:
            raise _KilledWhileLoading(loading, text) from None
        self._fail(loading, text, E.WorkerCrashed)

    def _crashed(self, when: str, path: str | None = None):
        proc = self._proc
        self._teardown()
        if self._aborted:
            self._closed = True
            raise E.RuntimeClosed("the agent is stopping: the inference in flight was given up")
        path = path or self.info.get("path", "")
        text = (f"(pid {proc.pid}) {describe_exit(proc.returncode)} {when} on {self._what()}; the request failed, "
                f"and the next one restarts the worker")
        counted = True
        if killed_from_outside(proc.returncode) and not self._forced:
            counted = bool(path) and self.quarantine.killed(path)
            if not counted:
                text += " (killed from outside: not counted against the model)"
        self._fail(path, text, E.WorkerCrashed, counted=counted)

    def _hung(self):
        pid = self._proc.pid
        self._kill()
        self.timeouts += 1
        self._fail(self.info.get("path", ""), f"(pid {pid}) gave no answer within {self._deadline_ms} ms on "
                                              f"{self._what()} and was killed; the next request restarts it",
                   E.WorkerTimeout)

    def _what(self) -> str:
        return f"variant {self.info.get('variant')!r} ({os.path.basename(self.info.get('path', ''))})"

    def _fail(self, path: str, text: str, cls, counted: bool = True):
        """Raises ``cls`` for a worker that failed on ``path``, counting it against the file when ``counted``."""
        self.crashes += cls is E.WorkerCrashed
        message = f"inference worker {text}"
        said = self._tail.last_words() if self._tail is not None else ""
        if said:
            message += f" (its stderr: {said})"
        self.last_error = message
        log.error("%s", message)
        if counted and path and self.quarantine.crashed(path, message):
            exc = E.ModelQuarantined(f"{message}; model file {path} is now quarantined after "
                                     f"{self.quarantine.threshold} consecutive failures", newly=True)
        else:
            exc = cls(message)
        exc.path = path  # the file to blame, for the runtime's event
        exc.counted = counted  # a kill from outside is no fault of the model: an update's trial must not fail on it
        raise exc

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._teardown()

    def _teardown(self) -> None:
        """Reaps the worker (killing it if needed, then :attr:`_forced` says so) and closes the socket; keeps the
        shared memory."""
        proc, self._proc = self._proc, None
        self._forced = False
        if proc is not None:
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                self._forced = True
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
