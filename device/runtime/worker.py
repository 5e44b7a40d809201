"""The inference worker: a child process that owns the interpreter.

Models are programs (TFLite has had model-triggered memory-safety bugs), so by default the interpreter runs
here and not in the agent. The supervisor (:mod:`device.runtime.supervisor`) spawns this process and talks
to it over one socket pair:

The worker is ``python -m device.runtime.worker FD``, FD being its end of the socket pair. Start-up, as
length-prefixed ``Connection`` messages (once per worker, never per call)::

    super  -> <WorkerSpec JSON>

    worker -> LOADING <path>       before each candidate file is opened (so a crash is blamed on that file)
    worker -> READY <json>         tensor specs, delegate, fallback reasons, timings
           or FAILED <json>        a clean refusal ({"code", "message"}), after which the worker exits
    super  -> ATTACH <shm name>    the shared-memory block: inputs, outputs, then the worker's timestamps
    worker -> ATTACHED

Per call, fixed 16-byte frames written and read with raw ``os.write``/``os.read`` (nothing pickled)::

    super  -> INFER  (op u32, seq u32, 0 u64)       inputs are already in shared memory
    worker -> OK     (status u32, seq u32, invoke_ns u64)   outputs and timestamps are in shared memory
           or ERROR  (status u32, seq u32, 0) followed by one Connection message with the error text
    super  -> STOP
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Sequence

import numpy as np

from device.runtime.delegates import Candidate

FRAME = struct.Struct("<IIQ")
OP_INFER = 1
OP_STOP = 2
ST_OK = 0
ST_ERROR = 1

MSG_LOADING = b"L"
MSG_READY = b"R"
MSG_FAILED = b"F"
MSG_ATTACH = b"A"
MSG_ATTACHED = b"a"

ALIGN = 64


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to load its model; pickled once when the process is spawned."""

    backend: str
    candidates: Sequence[Candidate]
    threads: int = 2
    warmup_runs: int = 2
    edgetpu_device: str = ""
    gpu_library: str = ""
    label: str = field(default="", compare=False)

    def to_json(self) -> bytes:
        d = {k: getattr(self, k) for k in ("backend", "threads", "warmup_runs", "edgetpu_device", "gpu_library",
                                           "label")}
        d["candidates"] = [[c.delegate, c.variant, c.path] for c in self.candidates]
        return json.dumps(d).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "WorkerSpec":
        d = json.loads(raw)
        d["candidates"] = tuple(Candidate(*c) for c in d["candidates"])
        return cls(**d)


STAMPS = ("received", "invoke_start", "invoke_end", "replied")  # the worker's clock readings per request


def layout(specs) -> tuple[list[int], int, int]:
    """Where things sit in the shared block: each tensor's offset (64-byte aligned), the offset of the
    worker's timestamps (:data:`STAMPS`, u64 ``perf_counter_ns`` readings, which are CLOCK_MONOTONIC and so
    comparable across processes), and the block's total size."""
    offsets, pos = [], 0
    for s in specs:
        offsets.append(pos)
        pos += (s.nbytes + ALIGN - 1) // ALIGN * ALIGN
    return offsets, pos, pos + ALIGN


def arrays_in(buf, specs, offsets) -> list[np.ndarray]:
    """Numpy arrays over the shared block, one per tensor spec."""
    return [np.ndarray(s.shape, s.np_dtype, buffer=buf, offset=o) for s, o in zip(specs, offsets)]


def stamps_in(buf, offset: int) -> np.ndarray:
    """The worker's timestamps of the latest request, over the shared block."""
    return np.ndarray((len(STAMPS),), np.uint64, buffer=buf, offset=offset)


def attach(name: str) -> shared_memory.SharedMemory:
    """Attaches to the supervisor's block without letting this process's exit unlink it."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # Python >= 3.13
    except TypeError:
        shm = shared_memory.SharedMemory(name=name)
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")  # the supervisor owns and unlinks it
        return shm


def _die_with_parent() -> None:
    """Asks Linux to SIGKILL this process when the supervisor dies, so no worker outlives its agent."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux, or no libc: the EOF on the socket still ends the worker
        pass


def main(argv: Sequence[str]) -> int:
    """``python -m device.runtime.worker FD``: serve on the inherited socket FD."""
    from multiprocessing.connection import Connection

    if len(argv) != 1 or not argv[0].isdigit():
        print("the inference worker is started by the fieldnode supervisor, not by hand", file=sys.stderr)
        return 2
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    import faulthandler

    faulthandler.enable()  # a fatal signal prints where it struck to stderr, which the supervisor keeps
    import warnings

    from device.runtime.delegates import DelegateFallback

    warnings.simplefilter("ignore", DelegateFallback)  # READY carries the reasons; the supervisor logs them
    conn = Connection(int(argv[0]))
    spec = WorkerSpec.from_json(conn.recv_bytes())
    worker_main(conn, spec)
    return 0


def worker_main(conn, spec: WorkerSpec) -> None:
    """Loads the model and serves until STOP or until the supervisor goes away."""
    from device.errors import FieldnodeError
    from device.runtime import delegates as dl
    from device.runtime.backends import load_backend

    try:
        backend = load_backend(spec.backend)
        opened = dl.open_model(backend, spec.candidates, spec.threads, spec.warmup_runs, spec.edgetpu_device,
                               spec.gpu_library,
                               on_try=lambda cand: conn.send_bytes(MSG_LOADING + cand.path.encode()))
    except FieldnodeError as exc:
        conn.send_bytes(MSG_FAILED + json.dumps({"code": exc.code, "message": str(exc)}).encode())
        return
    except Exception as exc:  # a defect or an unexpected interpreter error: say so, then exit
        conn.send_bytes(MSG_FAILED + json.dumps({"code": "worker_error", "message": f"{type(exc).__name__}: {exc}"}).encode())
        return

    model = opened.model
    ready = {
        "pid": os.getpid(),
        "backend": backend.name,
        "backend_version": backend.version,
        "delegate": opened.delegate_name,
        "variant": opened.candidate.variant,
        "path": opened.candidate.path,
        "fallbacks": opened.fallbacks,
        "threads": spec.threads,
        "init_ms": model.init_ns / 1e6,
        "first_ms": model.first_ns / 1e6,
        "inputs": [s.to_dict() for s in model.inputs],
        "outputs": [s.to_dict() for s in model.outputs],
    }
    conn.send_bytes(MSG_READY + json.dumps(ready).encode())
    msg = conn.recv_bytes()
    if not msg.startswith(MSG_ATTACH):
        return
    shm = attach(msg[1:].decode())
    specs = list(model.inputs) + list(model.outputs)
    offsets, stamps_at, _ = layout(specs)
    shared = arrays_in(shm.buf, specs, offsets)
    stamps = stamps_in(shm.buf, stamps_at)
    n_in = len(model.inputs)
    shm_in, shm_out = shared[:n_in], shared[n_in:]
    in_fns = model.input_fns
    out_fns = model.output_fns
    conn.send_bytes(MSG_ATTACHED)
    _serve(conn.fileno(), conn, model, shm_in, shm_out, in_fns, out_fns, stamps, poll_window_ns(_usable_cpus()))
    del shm_in, shm_out, shared, stamps
    shm.close()


SPIN_NS = 300_000  # after each reply, poll this long for the next request before going to sleep


def poll_window_ns(cpus: int) -> int:
    """How long the worker polls after a reply: ``SPIN_NS``, or 0 with a single CPU, where polling would
    only keep the agent from handling the reply it is waiting for."""
    return SPIN_NS if cpus > 1 else 0


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def next_frame(fd: int, size: int, spin_ns: int = SPIN_NS) -> bytes:
    """Reads the next request frame from the non-blocking socket ``fd``.

    Polls for ``spin_ns`` first, then blocks. Waking a sleeping process costs 20-40 µs on the 2-core build
    VM, whose idle CPUs halt (not yet measured on a board), twice a request; a caller that sends requests back to
    back (a backlog of windows, a benchmark) finds the worker still polling and pays about 2 µs instead.
    The poll is bounded: an idle agent's worker sleeps 300 µs after its last request.

    Returns:
        The bytes read: a whole frame in practice, ``b""`` when the supervisor is gone.
    """
    clock = time.perf_counter_ns
    end = clock() + spin_ns
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            if clock() >= end:
                break
        except OSError:
            return b""
    os.set_blocking(fd, True)
    try:
        return os.read(fd, size)
    except OSError:
        return b""
    finally:
        os.set_blocking(fd, False)


def _serve(fd, conn, model, shm_in, shm_out, in_fns, out_fns, stamps, spin_ns: int = SPIN_NS) -> None:
    """The request loop: wait for a frame (:func:`next_frame`), copy inputs into the interpreter, invoke,
    copy outputs back, and note the times in ``stamps`` (for ``fieldnode bench --stages``)."""
    write, unpack, pack = os.write, FRAME.unpack, FRAME.pack
    clock = time.perf_counter_ns
    size = FRAME.size
    os.set_blocking(fd, False)
    while True:
        frame = next_frame(fd, size, spin_ns)
        if not frame or len(frame) != size:
            return  # the supervisor is gone (EOF) or spoke out of turn: either way, stop
        received = clock()
        op, seq, _ = unpack(frame)
        if op != OP_INFER:
            return
        try:
            for fn, src in zip(in_fns, shm_in):
                np.copyto(fn(), src)  # straight into the interpreter's input tensor
            ns = model.invoke()
            invoked = clock()
            for fn, dst in zip(out_fns, shm_out):
                np.copyto(dst, fn())
            stamps[0], stamps[1], stamps[2] = received, invoked - ns, invoked
            stamps[3] = clock()
        except Exception as exc:
            os.set_blocking(fd, True)
            write(fd, pack(ST_ERROR, seq, 0))
            conn.send_bytes(f"{type(exc).__name__}: {exc}".encode())
            os.set_blocking(fd, False)
            continue
        write(fd, pack(ST_OK, seq, ns))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
