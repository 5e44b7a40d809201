"""The agent's side of the local control socket: :class:`ControlServer` (the protocol: :mod:`device.control`).

The socket serves the agent's command registry (:class:`device.link.commands.Registry`), the same one the MQTT
dispatcher serves, but only the commands registered ``local=True``: unprivileged and read-only (``status``,
``ping`` and the like). A request is checked and run by the registry's own code (:func:`check_args`,
:func:`run_command`), so a command means the same on both transports; what differs is only the framing (one JSON
request a line, :mod:`device.control`) and the trust (the socket's mode and group, not a signature).

Serving is the standard library's :mod:`socketserver`: a threading Unix stream server, one thread per connection,
so a slow handler holds up only its own connection. Threads are bounded: ``max_connections`` connections of the
socket's group at once, and ``root_connections`` more that only root (the peer's uid from ``SO_PEERCRED``) may
use, so members of the group holding every slot cannot lock root out of ``fieldnode status``. An idle connection
is closed after ``idle_timeout`` seconds; a refused connection gets a ``too_many_connections`` reply and is
logged (at most once every :data:`REFUSAL_LOG_S` seconds, with the count of the ones not said).
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
import socketserver
import stat
import struct
import threading
import time
from typing import Any, Callable

from device.control import (MAX_LINE, ControlBusy, ControlSocketError, encode_line, now, path_problem,
                            socket_peer_pid)
from device.errors import FieldnodeError, error_json
from device.link import wire
from device.link.commands import CallContext, Registry, check_args, run_command
from device.link.errors import BadJson, BadRequest, PayloadTooLarge, UnknownCommand
from device.threads import Thread

log = logging.getLogger(__name__)

REFUSAL_LOG_S = 60.0  # a refused connection is logged at most this often (a flood must not flood the journal)
_WAKE_POLL_S = 30.0  # serve_forever's select timeout; close() wakes it at once by shutting the listening socket


class TooManyConnections(FieldnodeError):
    """Every connection slot of the control socket is in use."""

    code = "too_many_connections"


def peer_credentials(sock: socket.socket) -> tuple[int | None, int | None]:
    """``(pid, uid)`` of the process at the other end of a Unix socket (``(None, None)`` where unknown)."""
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
        return pid or None, uid
    except (OSError, AttributeError):  # SO_PEERCRED is Linux's
        return None, None


def _is_root(uid: int | None) -> bool:
    return uid == 0


class _Handler(socketserver.BaseRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        self.server.owner.converse(self.request)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The standard library's threading Unix server, with admission (slots, root's reserve) and named threads."""

    daemon_threads = True  # a handler stuck in the agent cannot be interrupted; close() does not wait for ever
    block_on_close = False
    request_queue_size = 16

    def __init__(self, owner: "ControlServer") -> None:
        self.owner = owner
        super().__init__(owner.path, _Handler, bind_and_activate=False)

    def get_request(self):
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):  # wait rather than spin
                log.warning("control socket: cannot accept a connection: %s", exc.strerror or exc)
                self.owner.closing.wait(0.5)
            raise

    def verify_request(self, request, client_address) -> bool:
        return self.owner.admit(request)

    def process_request(self, request, client_address) -> None:
        t = Thread(target=self.process_request_thread, args=(request, client_address),
                             name="control-conn", daemon=True)
        self.owner.started(request, t)
        try:
            t.start()
        except BaseException:  # no thread (RuntimeError at the process's limit): its slot is free again
            self.owner.ended(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner.ended(request)

    def handle_error(self, request, client_address) -> None:
        log.exception("control connection failed")  # never expected: the commands' failures are replies


class ControlServer:
    """Serves the ``local`` commands of ``registry`` on a Unix stream socket at ``path``, one JSON request a line.

    Args:
        path: The socket file (:func:`device.control.socket_path`).
        registry: The agent's commands; only those registered ``local=True`` are served.
        mode: The socket file's mode.
        group: The group given the socket (and the directory, when this server creates it), if it exists here.
        max_connections: Connections served at once (anyone who may open the socket).
        root_connections: Connections beyond ``max_connections`` that only root may use.
        read_timeout: Seconds a started request line has to end (and a reply has to be taken).
        idle_timeout: Seconds a connection may wait between requests before it is closed.
        is_root: ``is_root(uid)``: whether a peer may use root's reserve (a seam for tests, which run as root).
    """

    def __init__(self, path: str, registry: Registry, *, mode: int = 0o660, group: str | None = "fieldnode",
                 max_connections: int = 8, root_connections: int = 2, read_timeout: float = 5.0,
                 idle_timeout: float = 10.0, is_root: Callable[[int | None], bool] = _is_root):
        if not isinstance(registry, Registry):
            raise TypeError(f"registry must be a device.link.commands.Registry, not {type(registry).__name__}")
        if max_connections < 1 or root_connections < 0:
            raise ValueError("need max_connections >= 1 and root_connections >= 0")
        self.path = os.fspath(path)
        self.registry = registry
        self.mode, self.group = mode, group
        self.max_connections, self.root_connections = max_connections, root_connections
        self.read_timeout, self.idle_timeout = read_timeout, idle_timeout
        self.is_root = is_root
        self.closing = threading.Event()
        self.counters = {"connections": 0, "refused": 0, "idle_closed": 0}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, tuple[str, threading.Thread | None]] = {}  # conn -> (pool, thread)
        self._pools = {"shared": 0, "root": 0}
        self._refusals_unsaid = 0
        self._refusal_said_at: float | None = None

    def __enter__(self) -> "ControlServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Makes the socket (replacing a stale one) and starts serving.

        Raises:
            ControlBusy: Another process answers on ``path``.
            ControlSocketError: The directory cannot be made, a non-socket file is in the way, the path is too
                long, or the socket cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("the control server has started already")
        problem = path_problem(self.path)
        if problem:
            raise ControlSocketError(f"control socket {self.path}: {problem}")
        self._make_directory()
        self._clear_stale()
        server = _Server(self)
        try:
            server.server_bind()
            st = os.lstat(self.path)
            self._ident = (st.st_dev, st.st_ino)
            os.chmod(self.path, self.mode)
            self._give_group(self.path)
            server.server_activate()
        except OSError as exc:
            server.server_close()
            if self._ident is not None:
                self._unlink_own()
            raise ControlSocketError(f"cannot make the control socket {self.path}: {exc.strerror or exc}") from exc
        self._server = server
        self.closing.clear()
        self._thread = Thread(target=server.serve_forever, args=(_WAKE_POLL_S,), name="control",
                                        daemon=True)
        self._thread.start()
        log.info("control socket %s (mode %o)", self.path, self.mode)

    def close(self) -> None:
        """Stops accepting, ends the connections (waiting a moment for a handler), unlinks our own socket file."""
        server = self._server
        if server is None:
            return
        self.closing.set()
        # shutdown() only raises a flag that serve_forever reads after its select: shutting the listening socket
        # makes that select return at once (and every later one: no wake-up is lost).
        stopper = Thread(target=server.shutdown, name="control-stop", daemon=True)
        stopper.start()
        try:
            server.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        stopper.join(5)
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            conns = list(self._conns.items())
        for conn, _ in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes its thread's recv
            except OSError:
                pass
        for _, (_, t) in conns:
            if t is not None:
                t.join(2)
        server.server_close()
        self._server = None
        self._unlink_own()

    # ------------------------------------------------------------------------------------------ admission

    def admit(self, conn: socket.socket) -> bool:
        """Takes a slot for a new connection (root: a shared one, else its reserve); refuses it when none is free."""
        if self.closing.is_set():
            return False
        pid, uid = peer_credentials(conn)
        with self._lock:
            pool = None
            if self._pools["shared"] < self.max_connections:
                pool = "shared"
            elif self._pools["root"] < self.root_connections and self.is_root(uid):
                pool = "root"
            if pool is not None:
                self._pools[pool] += 1
                self._conns[conn] = (pool, None)
                self.counters["connections"] += 1
                return True
            self.counters["refused"] += 1
        self._refuse(conn, pid, uid)
        return False

    def started(self, conn: socket.socket, thread: threading.Thread) -> None:
        with self._lock:
            pool, _ = self._conns[conn]
            self._conns[conn] = (pool, thread)

    def ended(self, conn: socket.socket) -> None:
        with self._lock:
            pool, _ = self._conns.pop(conn, ("", None))
            if pool:
                self._pools[pool] -= 1

    def _refuse(self, conn: socket.socket, pid: int | None, uid: int | None) -> None:
        try:
            conn.setblocking(False)  # best effort: a refusal never waits on the client
            conn.send(encode_line(error_json(TooManyConnections(
                f"the agent serves {self.max_connections} control connections already; try again shortly"))))
        except OSError:
            pass
        t = now()
        with self._lock:
            if self._refusal_said_at is not None and t - self._refusal_said_at < REFUSAL_LOG_S:
                self._refusals_unsaid += 1
                return
            unsaid, self._refusals_unsaid, self._refusal_said_at = self._refusals_unsaid, 0, t
        more = f" ({unsaid} more refused since the last such message)" if unsaid else ""
        log.warning("control socket: refused a connection of uid %s (pid %s): all %d connection slots are in use%s; "
                    "idle connections are closed after %g s", uid, pid, self.max_connections, more,
                    self.idle_timeout)

    # ------------------------------------------------------------------------------------------ setup

    def _make_directory(self) -> None:
        directory = os.path.dirname(self.path) or "."
        if os.path.isdir(directory):
            return  # systemd's RuntimeDirectory, or a directory someone chose: its owner set its mode
        try:
            os.makedirs(directory, mode=0o750)
            os.chmod(directory, 0o750)  # makedirs' mode passes through the umask
            self._give_group(directory)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ControlSocketError(f"cannot create the control socket's directory {directory}: "
                                     f"{exc.strerror or exc} (device.runtime_dir)") from exc

    def _give_group(self, path: str) -> None:
        if not self.group:
            return
        try:
            gid = grp.getgrnam(self.group).gr_gid
        except KeyError:  # a development machine: no such group, and nobody else to let in
            log.debug("no group %r here: %s keeps its owner's group", self.group, path)
            return
        try:
            if os.lstat(path).st_gid == gid:
                return  # already (the service runs as Group=fieldnode, and its filter refuses chown)
            os.chown(path, -1, gid)
        except OSError as exc:
            log.warning("cannot give %s to the group %s (%s): only its owner can use it", path, self.group,
                        exc.strerror or exc)

    def _clear_stale(self) -> None:
        """Unlinks a socket file nobody answers on; refuses when someone does, or when it is not a socket."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlSocketError(f"cannot check the control socket {self.path}: {exc.strerror or exc}") from exc
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(f"{self.path} exists and is not a socket; move it away (it is not removed "
                                     f"automatically)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
            pid = socket_peer_pid(probe)
        except (ConnectionRefusedError, FileNotFoundError):
            pid = None  # nobody listens: left by a crash
        except (socket.timeout, BlockingIOError) as exc:  # a listener with a full queue: alive, but stuck
            raise ControlBusy(f"another process holds the control socket {self.path} and does not accept "
                              f"connections; stop it first (systemctl stop fieldnode)") from exc
        except OSError as exc:
            raise ControlSocketError(f"cannot check the control socket {self.path}: {exc.strerror or exc}") from exc
        else:
            who = f"an agent (pid {pid})" if pid else "another agent"
            raise ControlBusy(f"{who} already answers on the control socket {self.path}; stop it first "
                              f"(systemctl stop fieldnode) or give this one another device.runtime_dir")
        finally:
            probe.close()
        log.info("replacing the stale control socket %s (nobody answers on it)", self.path)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ControlSocketError(f"cannot remove the stale control socket {self.path}: "
                                     f"{exc.strerror or exc}") from exc

    def _unlink_own(self) -> None:
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
            else:
                log.debug("%s is not our socket any more: left in place", self.path)
        except OSError:
            pass
        self._ident = None

    # ------------------------------------------------------------------------------------------ serving

    def converse(self, conn: socket.socket) -> None:
        """Serves one connection: request lines in, one reply line each, until EOF, a bound or the idle timeout."""
        try:
            self._converse(conn)
        except OSError as exc:  # the client went away, or close() shut the connection
            log.debug("control connection ended: %s", exc)

    def _converse(self, conn: socket.socket) -> None:
        buf = bytearray()
        line_deadline = None
        while not self.closing.is_set():
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_LINE:
                    self._send(conn, error_json(_too_long()))
                    return
                if buf:
                    if line_deadline is None:
                        line_deadline = now() + self.read_timeout
                    timeout = line_deadline - now()
                else:
                    timeout = self.idle_timeout
                if timeout <= 0:
                    self._send(conn, error_json(BadRequest(
                        f"request line not ended within {self.read_timeout:g} s; the connection is closed")))
                    return
                conn.settimeout(timeout)
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    if buf:
                        continue  # the deadline check above replies
                    with self._lock:
                        self.counters["idle_closed"] += 1
                    return  # idle too long: closed quietly, a client reconnects
                if not data:
                    if buf.strip():  # `printf '{"op":"status"}' | socat - UNIX:...`: a last line without newline
                        self._send(conn, self.answer(bytes(buf)))
                    return
                buf += data
                continue
            line, buf = bytes(buf[:nl]), buf[nl + 1:]
            line_deadline = None
            if len(line) > MAX_LINE:
                self._send(conn, error_json(_too_long()))
                return
            self._send(conn, self.answer(line))

    def _send(self, conn: socket.socket, doc: dict) -> None:
        conn.settimeout(self.read_timeout)  # a client that does not read its reply is dropped
        conn.sendall(encode_line(doc))

    def answer(self, line: bytes) -> dict:
        """The reply to one request line, through the registry; never raises."""
        try:
            req = wire.parse_object(line.rstrip(b"\r"))
        except ValueError as exc:
            why = f"request {exc}"
            if "expected" not in why:
                why += '; expected {"op": NAME, "args": {...}}'
            return error_json(BadJson(why))
        op, args = req.get("op"), req.get("args", {})
        unknown = sorted(set(req) - {"op", "args"})
        if unknown:
            return error_json(BadRequest(f"unknown field {', '.join(map(repr, unknown))}; a request has 'op' and "
                                         f"'args'"))
        if not isinstance(op, str) or not op:
            return error_json(BadRequest("'op' is missing or not a non-empty string"))
        if not isinstance(args, dict):
            return error_json(BadRequest("'args' must be a JSON object"))
        command = self.registry.get(op)
        if command is None or not command.local:
            shown = op if len(op) <= 64 else op[:61] + "..."
            where = " (it is an MQTT command: use fieldnode send)" if command is not None else ""
            served = [n for n in self.registry.names() if self.registry.get(n).local]
            return error_json(UnknownCommand(f"unknown op {shown!r}{where}; this socket answers "
                                             f"{', '.join(served) or 'nothing'}"))
        try:
            result: Any = run_command(command, check_args(command.args, args),
                                      CallContext(cmd=op, request_id=None, signer=None, received_at=time.time()))
        except FieldnodeError as exc:
            return error_json(exc)
        return {"ok": True, "result": result}


def _too_long() -> FieldnodeError:
    return PayloadTooLarge(f"request line longer than {MAX_LINE} bytes; the connection is closed")
