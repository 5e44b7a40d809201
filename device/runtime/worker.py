"""The inference worker: a child process that owns the interpreter.

Models are programs (TFLite has had model-triggered memory-safety bugs), so by default the interpreter runs
here and not in the agent. The supervisor (:mod:`device.runtime.supervisor`) spawns this process and talks
to it over one socket pair:

The worker is ``python -m device.runtime.worker FD``, FD being its end of the socket pair, or, under
``fieldnode run``, a fork of the zygote (:mod:`device.runtime.zygote`) serving on that end. Start-up, as
length-prefixed :class:`Channel` messages (once per worker, never per call)::

    super  -> <WorkerSpec JSON>

    worker -> LOADING <path>       before each candidate file is opened (so a crash is blamed on that file)
    worker -> READY <json>         tensor specs, delegate, fallback reasons, timings
           or FAILED <json>        a clean refusal ({"code", "message"}), after which the worker exits
    super  -> ATTACH <name> + fd   the shared-memory block (:class:`SharedBlock`; its descriptor travels with the
                                   message): inputs, outputs, then the worker's timestamps
    worker -> ATTACHED

Per call, fixed 16-byte frames written and read with raw ``os.write``/``os.read`` (nothing pickled)::

    super  -> INFER  (op u32, seq u32, 0 u64)       inputs are already in shared memory
    worker -> OK     (status u32, seq u32, invoke_ns u64)   outputs and timestamps are in shared memory
           or ERROR  (status u32, seq u32, 0) followed by one Channel message with the error text
    super  -> STOP

Nothing here uses :mod:`multiprocessing`: its ``shared_memory`` starts a resource-tracker process in each
process that creates or opens a block (two more Python interpreters, about 6 MB each), and its package costs
imports the worker does not need. The block is a file in ``/dev/shm`` that the supervisor creates, hands over
as a descriptor and unlinks; a block left by an agent that was killed is removed by the next one.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
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


SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None  # None: the temporary directory (not Linux)
_BLOCK_NAME = re.compile(r"fieldnode-(\d+)-[0-9a-f]{8}")


class SharedBlock:
    """A shared-memory block for one engine: a file in ``/dev/shm`` named ``fieldnode-<agent pid>-<random>``,
    created and unlinked by the supervisor, mapped by the worker from a descriptor it is sent.

    Args:
        size: bytes (rounded up to a page by the mapping).

    Attributes:
        name: the file's name in :data:`SHM_DIR`.
        fd: the open descriptor (kept, so a restarted worker can be given the same block).
        buf: the mapping, for numpy arrays.
    """

    def __init__(self, size: int) -> None:
        base = SHM_DIR or _tempdir()
        sweep_stale_blocks(base)
        while True:
            self.name = f"fieldnode-{os.getpid()}-{os.urandom(4).hex()}"
            self.path = os.path.join(base, self.name)
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  0o600)
                break
            except FileExistsError:
                continue
        try:
            os.ftruncate(self.fd, size)
            self.buf = mmap.mmap(self.fd, size)
        except BaseException:
            self.unlink()
            os.close(self.fd)
            raise
        self.size = size

    def close(self) -> None:
        """Unmaps the block and closes its descriptor (views over ``buf`` must be dropped first)."""
        if self.fd >= 0:
            try:
                self.buf.close()
            except BufferError:  # a view is still alive somewhere: the mapping goes when it does
                pass
            os.close(self.fd)
            self.fd = -1

    def unlink(self) -> None:
        """Removes the name; the memory goes once no process maps it."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _tempdir() -> str:
    import tempfile

    return tempfile.gettempdir()


def sweep_stale_blocks(base: str) -> list[str]:
    """Removes the blocks of agents that are gone (a SIGKILLed agent cannot unlink its own); returns their
    names. A block is named after the agent that made it, and the agent's workers hold descriptors, not
    names, so removing a name is always safe."""
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        m = _BLOCK_NAME.fullmatch(name)
        if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(base, name))
            removed.append(name)
        except OSError:  # another agent's sweep was first, or not ours to remove
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


def attach(fd: int, size: int) -> mmap.mmap:
    """Maps the supervisor's block from the descriptor it sent (and closes the descriptor).

    Raises:
        OSError: the block is smaller than ``size``, or cannot be mapped.
    """
    try:
        if os.fstat(fd).st_size < size:
            raise OSError(f"the shared block has {os.fstat(fd).st_size} bytes, the model needs {size}")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class Channel:
    """Length-prefixed messages on one end of the socket pair, for start-up and error texts (the request path
    writes raw :data:`FRAME` s on the same descriptor), and the block's descriptor with ``ATTACH``.

    Args:
        sock: the connected ``AF_UNIX`` stream socket; the channel owns it.
    """

    HEADER = struct.Struct("!I")
    MAX = 1 << 24  # a start-up message is a few kB; anything larger is a broken peer

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._fd = sock.fileno()

    def fileno(self) -> int:
        return self._fd

    def send_bytes(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Sends one message (blocking), with ``fds`` attached to its first byte."""
        msg = memoryview(self.HEADER.pack(len(data)) + data)
        if fds:
            msg = msg[socket.send_fds(self.sock, [msg], list(fds)):]
        while msg:
            msg = msg[os.write(self._fd, msg):]

    def recv_bytes(self) -> bytes:
        """Reads one message (blocking). Raises EOFError when the peer is gone."""
        return self.recv_with_fds(0)[0]

    def recv_with_fds(self, maxfds: int) -> tuple[bytes, list]:
        """Reads one message and up to ``maxfds`` descriptors sent with it."""
        header, fds = self._read(self.HEADER.size, maxfds)
        (n,) = self.HEADER.unpack(header)
        if n > self.MAX:
            for fd in fds:
                os.close(fd)
            raise OSError(f"a {n}-byte message is not part of the protocol")
        return self._read(n, 0)[0], fds

    def _read(self, n: int, maxfds: int) -> tuple[bytes, list]:
        buf, fds = b"", []
        while len(buf) < n:
            if maxfds and not buf:
                data, fds, _, _ = socket.recv_fds(self.sock, n, maxfds)
            else:
                data = os.read(self._fd, n - len(buf))
            if not data:
                for fd in fds:
                    os.close(fd)
                raise EOFError("the peer closed the channel")
            buf += data
        return buf, fds

    def poll(self, timeout: float) -> bool:
        """Whether a message (or EOF) can be read within ``timeout`` seconds."""
        import select

        p = select.poll()
        p.register(self._fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        return bool(p.poll(max(0, int(timeout * 1000))))

    def close(self) -> None:
        self.sock.close()


WORKER_NAME = b"fieldnode-infer"  # the process name of every inference worker, exec'd or forked


def _die_with_parent() -> None:
    """Asks Linux to SIGKILL this process when the supervisor dies, so no worker outlives its agent (without
    Linux or libc, the EOF on the socket still ends the worker)."""
    from device.linux import PR_SET_PDEATHSIG, prctl

    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def ignore_hangup() -> None:
    """SIGHUP is the agent's (a reload): the worker ignores it, then unblocks it. The supervisor starts an exec'd
    worker with HUP blocked, so one that comes while this interpreter starts waits, and is dropped here."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def main(argv: Sequence[str]) -> int:
    """``python -m device.runtime.worker FD``: serve on the inherited socket FD."""
    if len(argv) != 1 or not argv[0].isdigit():
        print("the inference worker is started by the fieldnode supervisor, not by hand", file=sys.stderr)
        return 2
    ignore_hangup()
    _die_with_parent()
    from device.linux import name_process

    name_process(WORKER_NAME)  # as ps and top show a forked worker too, not python3.11
    return serve_fd(int(argv[0]))


def serve_fd(fd: int) -> int:
    """Serves on the socket ``fd`` until STOP or until the supervisor goes away: an exec'd worker
    (:func:`main`) and one forked by the zygote (:mod:`device.runtime.zygote`) both end up here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    ignore_hangup()
    import faulthandler

    faulthandler.enable()  # a fatal signal prints where it struck to stderr, which the supervisor keeps
    import warnings

    from device.runtime.delegates import DelegateFallback

    warnings.simplefilter("ignore", DelegateFallback)  # READY carries the reasons; the supervisor logs them
    conn = Channel(socket.socket(fileno=fd))
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
    from device.threads import name_native_threads

    name_native_threads("infer-pool")  # the interpreter's own threads, apart from the worker's in top -H
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
    msg, fds = conn.recv_with_fds(1)
    if not msg.startswith(MSG_ATTACH) or len(fds) != 1:
        return
    specs = list(model.inputs) + list(model.outputs)
    offsets, stamps_at, size = layout(specs)
    shm = attach(fds[0], size)
    shared = arrays_in(shm, specs, offsets)
    stamps = stamps_in(shm, stamps_at)
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
